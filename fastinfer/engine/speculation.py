"""The engine's side of speculative decoding: loading a draft model and its KV cache, asking
the speculator for drafts (before scheduling, and after it for a draft model, which decodes its
drafts into the slots the scheduler reserved), and accepting what verification kept."""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from fastinfer.errors import ConfigError
from fastinfer.kv_cache.cache import KVCache, bytes_per_block
from fastinfer.model.loader import LoadedModel, load_model
from fastinfer.model.runner import ModelRunner
from fastinfer.sampling.sampler import SamplingRow
from fastinfer.spec_decode.draft import DraftModel
from fastinfer.spec_decode.speculator import Speculator

if TYPE_CHECKING:
    from fastinfer.engine.config import EngineConfig
    from fastinfer.engine.request import Request, Sample
    from fastinfer.model.step import StepFuture
    from fastinfer.scheduler.scheduler import ScheduledSeq


def load_draft(config: EngineConfig, target: LoadedModel, dtype: torch.dtype, device: torch.device,
               max_model_len: int) -> LoadedModel | None:
    """The draft model of a ``draft_model`` speculative config (its ``model``, or the target's
    own file, loaded with its ``quantization``), checked against the target; None otherwise."""
    spec = config.speculative_config
    if spec is None or spec.method != "draft_model":
        return None
    draft = load_model(spec.model or target.path, dtype, device, spec.quantization, config.quant_group_size)
    if draft.config.vocab_size != target.config.vocab_size:
        raise ConfigError(f"the draft model's vocabulary ({draft.config.vocab_size} tokens) differs from the "
                          f"target's ({target.config.vocab_size}): it needs the same tokenizer", "speculative_config")
    if draft.config.max_position_embeddings < max_model_len:
        raise ConfigError(f"the draft model's context ({draft.config.max_position_embeddings}) is shorter than "
                          f"max_model_len ({max_model_len})", "speculative_config")
    return draft


def draft_bytes_per_block(draft: LoadedModel | None, block_size: int, kv_dtype: torch.dtype) -> int:
    """What a draft model adds to each KV block (its own keys and values for the block's tokens)."""
    if draft is None:
        return 0
    return bytes_per_block(draft.config.num_layers, block_size, draft.kv_heads, draft.config.head_dim, kv_dtype)


def make_speculator(config: EngineConfig, draft: LoadedModel | None, num_blocks: int, device: torch.device,
                    kv_dtype: torch.dtype) -> Speculator | None:
    """The engine's speculator (None without a speculative config); a draft model gets a KV
    cache of ``num_blocks`` blocks, addressed by the target's block tables."""
    if config.speculative_config is None:
        return None
    if draft is None:
        return Speculator(config.speculative_config)
    cfg = draft.config
    cache = KVCache(cfg.num_layers, num_blocks, config.block_size, draft.kv_heads, cfg.head_dim, kv_dtype, device)
    runner = ModelRunner(draft.model, cache.layers, config.block_size, device, config.ops_backend)
    return Speculator(config.speculative_config, DraftModel(runner, cache))


def fill_drafts(speculator: Speculator, scheduled: list[ScheduledSeq], by_seq: dict[int, tuple[Request, Sample]],
                block_table: Callable[[int], list[int]]) -> dict[int, torch.Tensor]:
    """A draft model reads the step's prefill chunks and decodes the drafts of the scheduled rows
    whose slots it reserved; returns the distributions random rows' drafts were drawn from, by
    sequence id."""
    if speculator.draft_model is None:
        return {}
    reading = [s for s in scheduled if not s.spec and s.start + s.num_tokens <= s.seq.num_prompt_tokens]
    if reading and speculator.may_draft(len(scheduled)):  # the prompt: the draft reads it in the same steps
        speculator.draft_model.catch_up([s.seq for s in reading], [s.start + s.num_tokens for s in reading],
                                        [block_table(s.seq.seq_id) for s in reading])
    rows = [s for s in scheduled if s.spec]
    if not rows:
        return {}

    def sampling_row(seq_id: int) -> SamplingRow:
        req, smp = by_seq[seq_id]
        return SamplingRow(req.params, smp.generator, smp.seq.prompt_token_ids, smp.seq.output_token_ids)

    return speculator.fill(rows, block_table, sampling_row, lambda seq_id: by_seq[seq_id][1].grammar)


def accept_verified(speculator: Speculator, sampled: list[tuple[Request, Sample]], drafts: list[list[int]],
                    future: StepFuture, append: Callable, now: float, touched: dict[str, Request]) -> None:
    """Appends each row's accepted drafts and the token after them through the output
    processor (``append``, the engine's; a stop ends the row there), counting what was accepted;
    the keys and values of rejected drafts lie past the sequence's computed tokens, written over
    later."""
    for (req, smp), d, tokens, logprobs in zip(sampled, drafts, future.token_ids(), future.logprobs):
        speculator.record(smp.seq.seq_id, len(d), len(tokens) - 1)
        touched[req.request_id] = req
        for m, token in enumerate(tokens):
            if m and smp.finish_reason is not None:
                break
            smp.seq.num_computed += m > 0  # the accepted draft before it (its keys are valid)
            append(req, smp, token, None if logprobs is None else logprobs[m], now)
        # a draft model's keys of rejected drafts are not valid either
        smp.seq.num_draft_computed = min(smp.seq.num_draft_computed, smp.seq.num_computed)
