"""``Engine``: the one engine core. ``step()`` runs DESIGN.md's loop once: schedule, launch the
step on the runner, accept its tokens in the output processor, emit; ``LLM`` and
``AsyncEngine`` drive it. It holds no tensor and imports no torch: device work is the
runner's, memory profiling ``engine/memory.py``'s."""
from __future__ import annotations

import collections
import dataclasses
import gc
import itertools
import logging
import os
import random
import time
from collections.abc import Callable

from fastinfer.engine.config import EngineConfig
from fastinfer.engine.memory import allocate_kv_cache, profile_activations
from fastinfer.engine.output_processor import OutputProcessor
from fastinfer.engine.speculation import (accept_verified, draft_bytes_per_block, fill_drafts, load_draft,
                                         make_speculator)
from fastinfer.engine.outputs import RequestMetrics, RequestOutput
from fastinfer.engine.request import Request, Sample
from fastinfer.errors import ArgumentTypeError, ConfigError, InvalidRequestError, RequestTooLargeError
from fastinfer.kv_cache.block_manager import BlockManager
from fastinfer.kv_cache.cache import bytes_per_block
from fastinfer.kv_cache.events import KVEventBatch
from fastinfer.model.loader import LoadedModel, load_model, weight_bytes
from fastinfer.model.runner import ModelRunner, StepInput
from fastinfer.model.tensor_parallel import TPModelRunner, TPWorkers, start_tensor_parallel
from fastinfer.model.step import Feed, StepFuture
from fastinfer.sampling.detokenizer import IncrementalDetokenizer
from fastinfer.sampling.generator import seeded_generator
from fastinfer.sampling.grammar import Grammar, StructuredOutputs
from fastinfer.sampling.params import SamplingParams
from fastinfer.sampling.sampler import Sampler, SamplingRow
from fastinfer.sampling.stop import StopText
from fastinfer.scheduler.scheduler import Scheduler, SchedulerOutput
from fastinfer.scheduler.sequence import Sequence, SeqStatus
from fastinfer.validation import Prompt, as_prompt, check_int, check_str, describe, fail

_log = logging.getLogger("fastinfer.engine")

_KV_EVENT_BACKLOG = 4096
"""Event batches ``kv_events()`` keeps for a reader that has fallen behind (the oldest go)."""

PENDING = -1
"""Stands in a sequence's token ids for a token that a step in flight has sampled and the host
has not read yet (asynchronous scheduling); no prompt holds it (ids are checked to be >= 0)."""


@dataclasses.dataclass(slots=True)
class _InFlight:
    """A launched step whose sampled tokens the host has not all read yet."""

    rows: list[tuple[Request, Sample, int]]  # each sampled row, and where its token goes in seq.token_ids
    future: StepFuture                       # its tokens, on the device until read
    settled: int = 0                         # rows already appended to their sequences


class Engine:
    """Continuous-batching engine over a paged KV cache.

    ``add_request`` validates and queues; ``step`` runs one packed batch and returns the
    outputs of every request that advanced (each request's last output has
    ``finished=True``, exactly once); ``abort`` ends a request with ``finish_reason="abort"``.
    """

    def __init__(self, config: EngineConfig | str | os.PathLike, loaded: LoadedModel | None = None) -> None:
        if isinstance(config, (str, os.PathLike)):
            config = EngineConfig(model=config)
        if not isinstance(config, EngineConfig):
            raise ArgumentTypeError("Engine takes an EngineConfig or a model name or path, got "
                                    f"{describe(config)}; LLM(model, **options) builds both", "config")
        if loaded is not None and not isinstance(loaded, LoadedModel):
            fail("loaded", "a LoadedModel (from fastinfer.model.loader.load_model) or None", loaded,
                 wrong_type=True)
        self.config = config
        self.device, self.dtype, self.kv_dtype = config.torch_device(), config.torch_dtype(), config.kv_torch_dtype()
        self.workers: TPWorkers | None = None  # tensor parallelism: ranks 1..N-1
        self.loaded = self._load(loaded)
        mcfg = self.loaded.config
        self.max_model_len = self._max_model_len(mcfg.max_position_embeddings)
        draft = load_draft(config, self.loaded, self.dtype, self.device, self.max_model_len)
        self.activation_bytes = profile_activations(config, self.loaded, self.device, self.kv_dtype,
                                                    self.max_model_len)
        self.kv_cache = allocate_kv_cache(config, self.loaded, self.device, self.kv_dtype, self.activation_bytes,
                                          self.max_model_len, draft_bytes_per_block(draft, config.block_size,
                                                                                    self.kv_dtype))
        self.block_manager = BlockManager(self.kv_cache.num_blocks, config.block_size,
                                          enable_caching=config.enable_prefix_caching,
                                          host_blocks=self.kv_cache.host_blocks)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.token_budget(self.max_model_len),
                                   chunked_prefill=config.enable_chunked_prefill,
                                   preemption_mode=config.preemption_mode)
        self.runner = self._runner()
        if not config.enforce_eager:  # the runner captures where it can (a GPU)
            self.runner.capture_graphs(config.max_num_seqs, self.max_model_len)
        self.tokenizer = self.loaded.tokenizer
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(mcfg.eos_token_ids)
        self.outputs = OutputProcessor(self.eos_token_ids, self.scheduler.finish, self._forget)
        self.speculator = make_speculator(config, draft, self.kv_cache.num_blocks, self.device, self.kv_dtype)
        self.structured = StructuredOutputs(self.tokenizer, mcfg.vocab_size, self.eos_token_ids,
                                            config.grammar_compile_timeout)
        self._rng = random.Random(config.seed)
        self._requests: dict[str, Request] = {}
        self._by_seq: dict[int, tuple[Request, Sample]] = {}
        self._aborted: list[Request] = []
        self._held: dict[str, RequestOutput] = {}  # final outputs ``drain`` kept for their owner
        self._inflight: list[_InFlight] = []  # async_scheduling: launched steps whose tokens are unread
        self._kv_events: collections.deque[KVEventBatch] = collections.deque(maxlen=_KV_EVENT_BACKLOG)
        self._kv_listeners: list[Callable[[KVEventBatch], None]] = []
        self._weights_seen: int | None = None  # the model's weights version the cache was filled under
        # From the config; a benchmark may switch it between runs on one engine (it takes effect
        # at the next step, and a step run synchronously first settles the step in flight).
        self.async_scheduling = config.async_scheduling
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self.num_steps = 0
        self.weight_bytes = weight_bytes(self.loaded.model)
        self.kv_bytes_per_token = bytes_per_block(mcfg.num_layers, 1, self.loaded.kv_heads, mcfg.head_dim,
                                                  self.kv_dtype)
        # What exists now (the model, torch's and the tokenizer's objects) lives as long as the
        # process: out of the cyclic collector's generations, the collections that each step's
        # allocations set off no longer walk it (about 3% of a CPU decode step, measured).
        gc.freeze()

    def _load(self, loaded: LoadedModel | None) -> LoadedModel:
        """The model this process runs: the whole one, or under tensor parallelism rank 0's share
        (the workers load theirs meanwhile)."""
        config = self.config
        if config.tensor_parallel_size == 1:
            return loaded or load_model(config.model, self.dtype, self.device, config.quantization,
                                        config.quant_group_size, config.quant_method)
        if loaded is not None:
            raise ConfigError("tensor_parallel_size > 1: every rank loads its own share of the weights, so pass no "
                              "loaded model", "tensor_parallel_size")
        loaded, self.workers, _ = start_tensor_parallel(config)
        return loaded

    def _runner(self) -> ModelRunner:
        """Rank 0's runner (which sends each step to the workers under tensor parallelism)."""
        args = (self.loaded.model, self.kv_cache.layers, self.config.block_size, self.device, self.config.ops_backend,
                Sampler())
        if self.workers is None:
            return ModelRunner(*args, copy_blocks=self.kv_cache.apply)
        self.workers.start_cache(self.kv_cache.num_blocks)
        return TPModelRunner(self.workers, *args, copy_blocks=self.kv_cache.apply)

    def shutdown(self) -> None:
        """Stops the tensor-parallel workers (if any); the engine takes no more steps. Also done
        when the engine is collected and at exit."""
        if self.workers is not None:
            self.workers.shutdown()

    def _max_model_len(self, model_limit: int) -> int:
        wanted = self.config.max_model_len
        if wanted is not None and wanted > model_limit:
            raise ConfigError(f"max_model_len ({wanted}) exceeds the model's context length ({model_limit})",
                              "max_model_len")
        return wanted or model_limit

    # ----------------------------------------------------------------- submission
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None,
                    request_id: str | None = None, *, priority: int = 0, cache_salt: str | None = None,
                    admit: Callable[[int], None] | None = None, grammar: Grammar | None = None) -> str:
        """Validates and queues one request; returns its id. Bad input raises
        ``InvalidRequestError`` (a ``ValueError``) and leaves the engine untouched.
        ``priority``: a lower value is served first (FCFS within one value), and under memory
        pressure the running request with the highest value is preempted first. ``cache_salt``:
        an extra key of the prefix cache's block hashes (requests with different salts never
        share cached blocks, e.g. one per tenant or model version). ``admit``,
        when given, is called with the tokens the request will prefill (prompt tokens times
        ``n``) once it is valid and before it is queued; whatever it raises refuses the
        request, leaving the engine untouched (``AsyncEngine``'s queue limits). ``grammar``: the
        grammar of ``params.structured_outputs`` compiled beforehand (``self.structured.compile``,
        as ``AsyncEngine`` does off this thread); else it is compiled here, under the time limit."""
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            fail("params", "a SamplingParams", params, InvalidRequestError, wrong_type=True)
        # A validated private copy: the caller may change or reuse its object afterwards.
        params = dataclasses.replace(params)
        if request_id is None:
            request_id = self._next_id()
        check_str("request_id", request_id, error=InvalidRequestError)
        if request_id in self._requests:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use", "request_id")
        priority = check_int("priority", priority, lo=-2**62, hi=2**62, error=InvalidRequestError)
        if cache_salt is not None:
            check_str("cache_salt", cache_salt, error=InvalidRequestError)
        text, ids = self._prompt_ids(as_prompt(prompt))
        self._check_fits(ids, params)
        self._check_logit_bias(params)
        grammar = self._grammar(params, grammar)
        if admit is not None:
            admit(len(ids) * params.n)
        now = time.monotonic()
        samples = [self._new_sample(i, ids, params, priority, cache_salt, grammar) for i in range(params.n)]
        for s in samples[1:]:
            s.seq.fork_of = samples[0].seq  # shares the prompt's blocks once sample 0 has computed them
        req = Request(request_id, text, ids, params, samples, RequestMetrics(now))
        self._requests[request_id] = req
        for s in samples:
            self._by_seq[s.seq.seq_id] = (req, s)
            self.scheduler.add(s.seq)
        return request_id

    def _next_id(self) -> str:
        rid = str(next(self._ids))
        while rid in self._requests:  # a caller chose this id for an earlier request
            rid = str(next(self._ids))
        return rid

    def _prompt_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        """A validated prompt's text (None for token ids) and token ids, checked against the
        vocabulary."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            if not ids:
                raise InvalidRequestError("prompt is empty after tokenization", "prompt")
            return prompt, ids
        vocab = self.loaded.config.vocab_size
        bad = next(((i, t) for i, t in enumerate(prompt) if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"prompt token id {bad[1]} at position {bad[0]} is outside the vocabulary "
                                      f"[0, {vocab})", "prompt")
        return None, prompt

    def _check_fits(self, ids: list[int], params: SamplingParams) -> None:
        """Refuses a request that can never run: no room for a new token, or a sample needing
        more blocks than the whole cache. Each of the ``n`` samples is scheduled (and preempted)
        as its own sequence, so the samples of a request fit whenever one does."""
        if len(ids) >= self.max_model_len:
            raise RequestTooLargeError(
                f"prompt has {len(ids)} tokens; max_model_len is {self.max_model_len}, "
                "which leaves no room for a new token", "prompt")
        total = min(len(ids) + params.max_tokens, self.max_model_len)
        need = self.block_manager.blocks_for(total)
        if need > self.block_manager.num_total:
            each = "each of its samples " if params.n > 1 else ""
            raise RequestTooLargeError(
                f"request needs {need} KV-cache blocks {each}({total} tokens) but the whole cache has "
                f"{self.block_manager.num_total}; lower max_tokens or raise kv_cache_memory", "max_tokens")

    def _grammar(self, params: SamplingParams, given: Grammar | None) -> Grammar | None:
        """The compiled grammar of the request's structured output (None without one)."""
        spec = params.structured_outputs
        if spec is None:
            return None
        if given is not None and given.key == spec.key() and given.owner is self.structured:
            return given
        return self.structured.compile(spec)

    def _check_logit_bias(self, params: SamplingParams) -> None:
        vocab = self.loaded.config.vocab_size
        bad = next((t for t in params.logit_bias or () if t >= vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"logit_bias token id {bad} is outside the vocabulary [0, {vocab})",
                                      "logit_bias")

    def _new_sample(self, index: int, ids: list[int], params: SamplingParams, priority: int,
                    cache_salt: str | None, grammar: Grammar | None) -> Sample:
        seed = params.seed if params.seed is not None else self._rng.getrandbits(64)
        gen = seeded_generator(seed, index)
        sid = next(self._seq_ids)
        seq = Sequence(sid, list(ids), len(ids), arrival=sid,
                       stop_at=min(len(ids) + params.max_tokens, self.max_model_len),
                       priority=priority, cache_salt=cache_salt)
        detok = IncrementalDetokenizer(self.tokenizer, ids)
        return Sample(index, seq, detok, gen, StopText(params.stop_list),
                      logprobs=[] if params.logprobs is not None else None,
                      grammar=self.structured.matcher(grammar) if grammar is not None else None)

    # ----------------------------------------------------------------- control
    def abort(self, request_id: str) -> bool:
        """Ends a request now; its final output (``finish_reason="abort"``) comes from the next
        ``step``. Returns False for an unknown or already finished request (one that finished
        but whose final output was lost to an exception in ``step`` is queued to report it)."""
        req = self._requests.get(check_str("request_id", request_id, error=InvalidRequestError))
        if req is None:
            return False
        ended_now = not req.finished
        for s in req.samples:
            if s.finish_reason is None:
                self.outputs.finish(s, "abort", None)
        if ended_now:
            req.metrics.finished_time = time.monotonic()
        if req not in self._aborted:
            self._aborted.append(req)
        return ended_now

    def is_waiting(self, request_id: str) -> bool:
        """True while a request is queued and no step has run it yet."""
        req = self._requests.get(request_id)
        return req is not None and req.metrics.first_scheduled_time is None and not req.finished

    def has_unfinished(self) -> bool:
        """True while any request has not yet returned its final output."""
        return bool(self._requests)

    def stats(self) -> dict[str, int | float]:
        """Counters of the scheduler and the KV cache. ``prefix_cache_queries`` and
        ``prefix_cache_hits``: prompt tokens looked up in the prefix cache at admission, and
        found there (cumulative); ``kv_blocks_cached``: device blocks holding a cached prefix;
        ``kv_offload_blocks`` of ``kv_offload_blocks_total``: host-tier blocks in use;
        ``kv_offload_loads`` / ``kv_offload_stores``: blocks copied back from / out to it
        (cumulative); ``num_swapped``: requests' sequences swapped out to it now; ``spec_*``:
        speculative decoding's counts (``Speculator.stats``), with a ``speculative_config``."""
        blocks = self.block_manager
        return {
            "num_requests": len(self._requests),
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_blocks_total": blocks.num_total,
            "kv_blocks_free": blocks.num_free,
            "kv_blocks_cached": blocks.num_cached,
            "prefix_cache_queries": blocks.prefix_queries,
            "prefix_cache_hits": blocks.prefix_hits,
            "kv_offload_blocks": blocks.host_used,
            "kv_offload_blocks_total": blocks.host_total,
            "kv_offload_loads": blocks.host_loads,
            "kv_offload_stores": blocks.host_stores,
            "num_swapped": blocks.num_swapped,
            "num_swap_preemptions": self.scheduler.num_swap_preemptions,
            "block_size": self.config.block_size,
            "kv_cache_bytes": self.kv_cache.nbytes,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "weight_bytes": self.weight_bytes,
            "max_model_len": self.max_model_len,
            "num_steps": self.num_steps,
            **(self.speculator.stats() if self.speculator is not None else {}),
        }

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (device and host tier), e.g. after the weights changed
        in place; running requests keep their blocks."""
        self.block_manager.reset_prefix_cache()
        self._publish_kv_events()

    def _forget_stale_prefixes(self) -> None:
        """Resets the prefix cache when the model's weights were replaced (its
        ``weights_version`` moved): cached keys and values of the old weights would otherwise
        be served. (A weight changed in place is not seen: call ``reset_prefix_cache``.)"""
        version = getattr(getattr(self.loaded.model, "weights_version", None), "value", None)
        if version != self._weights_seen:
            if self._weights_seen is not None:
                self.reset_prefix_cache()
            self._weights_seen = version

    def kv_events(self) -> list[KVEventBatch]:
        """The KV events (blocks stored in and removed from the prefix cache, by hash; see
        ``fastinfer.kv_cache.events``) since the previous call, one batch per step, oldest
        first. Events are collected from the first call of this or ``on_kv_events`` on; the
        last 4,096 batches are kept for a reader that has fallen behind."""
        self.block_manager.events.enabled = True
        out = []
        while self._kv_events:  # popleft: safe against the engine's thread appending meanwhile
            out.append(self._kv_events.popleft())
        return out

    def on_kv_events(self, callback: Callable[[KVEventBatch], None]) -> None:
        """Calls ``callback`` with each step's batch of KV events, in the engine's thread."""
        self.block_manager.events.enabled = True
        self._kv_listeners.append(callback)

    def _publish_kv_events(self) -> None:
        batch = self.block_manager.events.take()
        if batch is None:
            return
        self._kv_events.append(batch)
        for callback in self._kv_listeners:
            callback(batch)

    # ----------------------------------------------------------------- the loop
    def drain(self, request_ids=None, on_final: Callable[[RequestOutput], None] | None = None
              ) -> dict[str, RequestOutput]:
        """Steps until the requests ``request_ids`` (default: every request) have finished;
        returns their final outputs by request id (``on_final`` is called with each one as it
        arrives). The final outputs of other requests that finish meanwhile are kept for the
        ``drain`` that asks for them, so one caller never consumes another's. Its steps build
        no output for a request that is still running (see ``step(finals_only=True)``)."""
        wanted = set(self._requests) | set(self._held) if request_ids is None else set(request_ids)
        finals: dict[str, RequestOutput] = {}
        for rid in wanted & set(self._held):
            finals[rid] = self._held.pop(rid)
            if on_final is not None:
                on_final(finals[rid])
        while len(finals) < len(wanted) and any(rid in self._requests for rid in wanted - set(finals)):
            for out in self.step(finals_only=True):
                if out.request_id not in wanted:
                    self._held[out.request_id] = out
                    continue
                finals[out.request_id] = out
                if on_final is not None:
                    on_final(out)
        return finals

    def step(self, finals_only: bool = False) -> list[RequestOutput]:
        """One iteration: schedule, run the model, sample, update, emit outputs.

        ``finals_only``: emit only the final outputs of requests that finished, for a caller
        that reads nothing else (``drain``). A "cumulative" output copies everything generated
        so far, so building one per running request per step would cost time quadratic in the
        length; a "delta" request's final output then carries all that no earlier output did.

        If it ends by an exception (Ctrl-C included), the requests it touched are reported by
        the next ``step``; abort the ones you stop waiting for (``LLM.generate`` does). The
        prefix cache is then emptied (the step's blocks may be cached but not written)."""
        touched: dict[str, Request] = {r.request_id: r for r in self._aborted}
        self._aborted = []
        try:
            self._forget_stale_prefixes()
            if self.speculator is not None:
                self._propose(touched)
            sched = self.scheduler.schedule()
            self._publish_kv_events()
            if sched.scheduled:
                self.num_steps += 1
                start = time.perf_counter()
                if self.async_scheduling and not any(s.spec for s in sched.scheduled):
                    self._run_async(sched, touched)
                else:
                    self._settle_then_run(sched, touched)
                if self.speculator is not None:
                    self.speculator.observe_step(sched.scheduled, time.perf_counter() - start)
            else:
                self._copy_blocks(sched)  # e.g. a swap-out that made room for a priority
                self._resolve(touched)
            return self.outputs.emit(touched.values(), finals_only)
        except BaseException:
            self._aborted.extend(r for r in touched.values() if not r.reported_final)
            # Blocks enter the prefix cache when their step is scheduled; this step's forward or
            # copies may not have written them, so no later request may read any cached prefix.
            self.block_manager.reset_prefix_cache()
            raise

    def _inputs(self, sched: SchedulerOutput) -> tuple[list[tuple[Request, Sample]], StepInput]:
        """The requests and samples of the rows that sample (in order), and the step's input
        (marks the requests scheduled)."""
        pairs = [self._by_seq[s.seq.seq_id] for s in sched.scheduled]
        start = time.monotonic()
        for req, _ in pairs:
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = start
        ids = [s.seq.token_ids[s.start:s.start + s.num_tokens] for s in sched.scheduled]
        num_spec = None
        if any(s.spec for s in sched.scheduled):
            ids = [t + s.spec if s.spec else t for t, s in zip(ids, sched.scheduled)]
            num_spec = [len(s.spec) for s in sched.scheduled]
        inp = StepInput(
            token_ids=ids,
            start_positions=[s.start for s in sched.scheduled],
            block_tables=[self.block_manager.block_table(s.seq.seq_id) for s in sched.scheduled],
            needs_logits=[s.completes for s in sched.scheduled],
            block_ops=sched.block_ops or None,
            num_spec=num_spec,
        )
        return [pair for pair, done in zip(pairs, inp.needs_logits) if done], inp

    def _executed(self, sched: SchedulerOutput) -> None:
        """Marks the step's tokens computed."""
        for s in sched.scheduled:
            s.seq.num_computed = s.start + s.num_tokens

    def _run(self, sched: SchedulerOutput, touched: dict[str, Request]) -> None:
        """Runs the step and reads its tokens at once. Only sequences that reached their last
        token sample (a prefill chunk does not, and draws nothing from its generator), so
        chunking never changes a request's tokens. A draft model decodes its drafts first."""
        probs = fill_drafts(self.speculator, sched.scheduled, self._by_seq, self.block_manager.block_table) \
            if self.speculator is not None else {}
        sampled, inp = self._inputs(sched)
        rows = [SamplingRow(req.params, smp.generator, smp.seq.prompt_token_ids, smp.seq.output_token_ids)
                for req, smp in sampled]
        matchers = [smp.grammar for _, smp in sampled]
        if inp.num_spec is not None:  # a grammar's state at each position verified
            drafts = inp.drafts()
            matchers = [m for g, d in zip(matchers, drafts) for m in (g.along(d) if g else [None] * (len(d) + 1))]
        # The grammars' masks are filled on their own thread while the model runs.
        masks = self.structured.start_masks(matchers)
        future = self.runner.launch(inp, rows, masks=masks,
                                    draft_probs=[probs.get(smp.seq.seq_id) for _, smp in sampled] if probs else None)
        self._executed(sched)
        now = time.monotonic()
        if inp.num_spec is not None:
            accept_verified(self.speculator, sampled, drafts, future, self._append, now, touched)
            return
        for (req, smp), token, logprobs in zip(sampled, future.token_ids(), future.logprobs):
            self._append(req, smp, token, logprobs, now)
            touched[req.request_id] = req

    # ------------------------------------------------------- speculative decoding
    def _propose(self, touched: dict[str, Request]) -> None:
        """Sets the drafts each running sequence verifies next. They need every token so far: a
        step in flight settles first, where drafting is expected to pay (else none drafts)."""
        running = self.scheduler.running
        if self._inflight and not self.speculator.may_draft(len(running)):
            for seq in running:
                seq.spec_token_ids = []
            return
        self._resolve(touched)
        self.speculator.draft(running, lambda seq_id: (self._by_seq[seq_id][0].params, self._by_seq[seq_id][1].grammar))

    # ------------------------------------------------------- asynchronous scheduling
    def _run_async(self, sched: SchedulerOutput, touched: dict[str, Request]) -> None:
        """Launches this step, feeding it on the device the tokens of the step in flight, and
        only then reads and processes those tokens (see ``EngineConfig.async_scheduling``). A
        step whose sampling needs the host (penalties, logprobs, random draws) first settles
        the step in flight and runs as ``_run`` does.

        A step stays in ``_inflight`` until every row of it is settled, so an exception at any
        point leaves each placeholder either fed by a later step or settled by one."""
        if not all(Sampler.can_defer(self._by_seq[s.seq.seq_id][0].params)
                   for s in sched.scheduled if s.completes):
            self._settle_then_run(sched, touched)
            return
        sampled, inp = self._inputs(sched)
        feed = self._feed(sched, inp)
        future = self.runner.launch(inp, feed=feed)
        self._executed(sched)
        if sampled:
            rows = [(req, smp, len(smp.seq.token_ids)) for req, smp in sampled]
            self._inflight.append(_InFlight(rows, future))
            for _, smp, _ in rows:
                smp.seq.token_ids.append(PENDING)
        self._resolve(touched, keep_last=bool(sampled))

    def _settle_then_run(self, sched: SchedulerOutput, touched: dict[str, Request]) -> None:
        """``_run`` after settling the steps in flight (if any): sequences that stopped at them
        leave this one (their blocks are free), the others read their real tokens."""
        if self._inflight:
            self._resolve(touched)
            sched.scheduled = [s for s in sched.scheduled if s.seq.status is SeqStatus.RUNNING]
        self._run(sched, touched) if sched.scheduled else self._copy_blocks(sched)

    def _copy_blocks(self, sched: SchedulerOutput) -> None:
        """Carries out the block copies of a step that runs no forward pass: they were decided
        (a swapped-out sequence's blocks are free for reuse from now on), so they must happen."""
        if sched.block_ops:
            self.runner.apply_block_ops(sched.block_ops)

    def _feed(self, sched: SchedulerOutput, inp: StepInput) -> Feed | None:
        """Where this step reads tokens that steps in flight sampled, or None. Every placeholder
        in ``inp`` must be one of them (else an internal error, before any kernel could read a
        -1)."""
        pending, base = {}, 0  # (sequence, position) -> index in the in-flight steps' tokens, concatenated
        for entry in self._inflight:
            for row in range(entry.settled, len(entry.rows)):
                _, smp, at = entry.rows[row]
                pending[(smp.seq.seq_id, at)] = base + row
            base += len(entry.rows)
        dst, src, offset = [], [], 0
        for s in sched.scheduled:
            if s.seq.token_ids[s.start + s.num_tokens - 1] == PENDING:  # only ever a row's last token
                dst.append(offset + s.num_tokens - 1)
                src.append(pending.get((s.seq.seq_id, s.start + s.num_tokens - 1)))
            offset += s.num_tokens
        if None in src or sum(PENDING in ids for ids in inp.token_ids) != len(dst):
            raise RuntimeError("internal error: a step would read a token that no step in flight holds")
        # One in flight but after an exception while settling: then the earlier ones' tokens too.
        return Feed(dst, src, [e.future for e in self._inflight]) if dst else None

    def _resolve(self, touched: dict[str, Request], keep_last: bool = False) -> None:
        """Settles the steps in flight (but the newest one with ``keep_last``), oldest first."""
        while len(self._inflight) > (1 if keep_last else 0):
            self._settle(self._inflight[0], touched)
            self._inflight.pop(0)

    def _settle(self, entry: _InFlight, touched: dict[str, Request]) -> None:
        """Reads the tokens of ``entry`` and appends each to its sequence, with the usual
        checks; a token of a sequence that had already stopped (or was aborted) is dropped."""
        values = entry.future.token_ids()
        now = time.monotonic()
        while entry.settled < len(entry.rows):
            req, smp, at = entry.rows[entry.settled]
            token = values[entry.settled]
            entry.settled += 1
            seq = smp.seq
            if smp.finish_reason is not None:
                del seq.token_ids[at:]
                continue
            seq.token_ids[at] = token
            seq.output_token_ids.append(token)
            touched[req.request_id] = req
            self.outputs.accept(req, smp, token, None, now, at + 1)

    def _append(self, req: Request, smp: Sample, token: int, logprobs, now: float) -> None:
        smp.seq.append(token)
        self.outputs.accept(req, smp, token, logprobs, now, smp.seq.num_tokens)

    def _forget(self, req: Request) -> None:
        """Drops a request whose final output is built."""
        self._requests.pop(req.request_id, None)
        for s in req.samples:
            self._by_seq.pop(s.seq.seq_id, None)
            if self.speculator is not None:
                self.speculator.forget(s.seq.seq_id)
