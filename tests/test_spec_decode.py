"""Speculative decoding in the engine (issue 25): with ``speculative_config`` n-gram drafts,
greedy requests get exactly the tokens, text, finish reasons and logprob choices of plain
decoding, with stops ending an accepted run in its middle, ``max_tokens``, ``n > 1``, chunked
prefill, async scheduling, preemption under a tiny KV budget and aborts; every KV block comes
back; seeded sampled requests repeat; the speculator's counts reach ``stats()``."""
from __future__ import annotations

import pytest
import torch

from fastinfer import SamplingParams
from fastinfer.errors import ConfigError
from fastinfer.spec_decode import Speculator, SpeculativeConfig
from fastinfer.spec_decode.cost import LinearCost
from fastinfer.spec_decode.speculator import _Track

from .conftest import make_engine, run_to_completion, save_tiny_model

@pytest.fixture(autouse=True)
def speculate_always(request, monkeypatch):
    """The learned-cost backoff depends on this machine's timings: tests that count drafts
    speculate whenever they have drafts (the backoff has its own tests, with given costs)."""
    if "learned_costs" not in request.keywords:
        monkeypatch.setattr(Speculator, "_worth", lambda self, *args: True)


NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
PASSAGE = ("The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single "
           "step. All that glitters is not gold.")
PROMPTS = [f"Repeat the following text exactly.\nText: {PASSAGE}\nRepeated text:",
           "1, 2, 3, 4, 5, 6, 7, 8,",
           "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
           f"{PASSAGE} {PASSAGE}",
           "Hello"]


def greedy_params(i: int) -> SamplingParams:
    kinds = [dict(ignore_eos=True), dict(stop=[" gold", "\n\n"]), dict(n=2, ignore_eos=True),
             dict(stop_token_ids=[28]), dict(logprobs=2)]
    return SamplingParams(max_tokens=17 + 7 * i, temperature=0.0, **kinds[i % len(kinds)])


def run(loaded, params, abort_after: dict[int, int] | None = None, prompts=PROMPTS, setup=None, **options):
    """(per request: (token ids, text, finish reason, stop reason, chosen logprob ids) of each
    sample), and the engine, stepped until idle; checks one final output per request and that
    every KV block came back."""
    engine = make_engine(loaded, **{"kv_cache_memory": "64MiB", "max_num_batched_tokens": 64, "max_num_seqs": 6,
                                    **options})
    if setup is not None:
        setup(engine)
    ids = [engine.add_request(p, params(i)) for i, p in enumerate(prompts)]

    def abort(step: int) -> None:
        for index in (i for i, at in (abort_after or {}).items() if at == step):
            engine.abort(ids[index])

    finals = run_to_completion(engine, abort)
    assert sorted(finals) == sorted(ids)
    stats = engine.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] and stats["num_requests"] == 0
    engine.block_manager.check()
    return [[(c.token_ids, c.text, c.finish_reason, c.stop_reason,
              None if c.logprobs is None else [list(lp) for lp in c.logprobs]) for c in finals[r].outputs]
            for r in ids], engine


@pytest.mark.parametrize("options", [{}, {"async_scheduling": True}, {"max_num_batched_tokens": 8},
                                     {"enable_prefix_caching": False}],
                         ids=["plain", "async", "small-budget", "no-prefix-cache"])
def test_greedy_tokens_equal_plain_decoding(smollm, options):
    plain, _ = run(smollm, greedy_params, **options)
    spec, engine = run(smollm, greedy_params, speculative_config=NGRAM, **options)
    assert spec == plain
    stats = engine.stats()
    # speculation really ran: most drafts of these copy-prone prompts were accepted
    assert stats["spec_num_drafts"] > 10 and stats["spec_acceptance_rate"] > 0.4
    assert stats["spec_mean_accepted_length"] > 1.5
    assert stats["num_steps"] < 0.7 * sum(len(c[0]) for outs in plain for c in outs)
    endings = {c[2] for outs in plain for c in outs}
    assert endings == {"stop", "length"}


def test_a_stop_inside_an_accepted_run_ends_the_request_there(smollm):
    """Stop token ids and strings that the copied passage reaches: the run of accepted drafts
    goes past them, and the output still ends exactly where plain decoding's does."""
    miles = smollm.tokenizer.encode(" miles")
    assert len(miles) == 1
    stop_params = [SamplingParams(max_tokens=60, temperature=0.0, stop=[" thousand"]),
                   SamplingParams(max_tokens=60, temperature=0.0, stop_token_ids=miles),
                   SamplingParams(max_tokens=60, temperature=0.0, stop=["single s"])]
    prompts = [PROMPTS[3]] * 3
    plain, _ = run(smollm, lambda i: stop_params[i], prompts=prompts)
    spec, engine = run(smollm, lambda i: stop_params[i], prompts=prompts, speculative_config=NGRAM)
    assert spec == plain
    assert [c[2] for outs in plain for c in outs] == ["stop"] * 3
    assert engine.stats()["spec_accepted_tokens"] > 0


def test_preemption_and_abort(smollm):
    """A KV budget of 8 blocks forces preemption; request 1 is aborted at step 4."""
    opts = dict(kv_cache_memory=8 * 16 * 30 * 2 * 3 * 64 * 4, max_model_len=128, max_num_seqs=4)
    plain, _ = run(smollm, greedy_params, {1: 4}, **opts)
    spec, engine = run(smollm, greedy_params, {1: 4}, speculative_config=NGRAM, **opts)
    assert engine.stats()["kv_blocks_total"] == 8 and engine.stats()["num_preemptions"] > 0
    assert all(c[2] == "abort" for c in spec[1])
    assert spec[:1] + spec[2:] == plain[:1] + plain[2:]


class OracleProposer:
    """Drafts the tokens plain decoding gave next (``runs``: prompt + output of each sample),
    with every third draft made wrong: acceptances and rejections at known places."""

    def __init__(self, runs: list[list[int]], k: int) -> None:
        self.runs, self.k, self.calls = runs, k, 0

    def propose(self, token_ids) -> list[int]:
        ids = list(token_ids)
        full = next((r for r in self.runs if r[:len(ids)] == ids), None)
        if full is None:
            return []
        self.calls += 1
        drafts = full[len(ids):len(ids) + self.k]
        if self.calls % 3 == 0 and len(drafts) > 1:
            drafts[1] = (drafts[1] + 1) % 1000
        return drafts


def test_random_gqa_models(tmp_path, hf_smollm_tokenizer):
    """Tiny random-weight Llama (GQA 4/2) and Qwen2 (QKV bias, tied), drafts from an oracle that
    is right most of the time: the tokens equal plain decoding's, and most drafts are accepted."""
    from fastinfer.model.loader import load_model

    prompts = ["Hello there", "The capital of France is", "1, 2, 3,"]
    for family in ("llama", "qwen2"):
        path = save_tiny_model(tmp_path / family, family, hf_smollm_tokenizer)
        loaded = load_model(path, torch.float32, torch.device("cpu"), None)
        params = lambda i: SamplingParams(max_tokens=30 + 3 * i, temperature=0.0, ignore_eos=True)  # noqa: E731
        plain, base = run(loaded, params, prompts=prompts, max_num_seqs=3)
        runs = [base.tokenizer.encode(p) + outs[0][0] for p, outs in zip(prompts, plain)]

        def oracle(engine):
            engine.speculator.proposer = OracleProposer(runs, 4)

        spec, engine = run(loaded, params, prompts=prompts, max_num_seqs=3, speculative_config=NGRAM, setup=oracle)
        assert spec == plain
        stats = engine.stats()
        assert stats["spec_accepted_tokens"] > 30 and 0.3 < stats["spec_acceptance_rate"] < 0.95


def test_random_gqa_models_with_stops_n2_preemption_and_abort(tmp_path, hf_smollm_tokenizer):
    """The random models again, with a stop token their own output reaches, ``n = 2``, a KV budget
    of 6 blocks that forces preemption and an abort at step 5: the tokens, texts and endings of
    every request but the aborted one equal plain decoding's, and every KV block comes back."""
    from fastinfer.model.loader import load_model

    prompts = ["Hello there", "The capital of France is", "1, 2, 3,", "Once upon a time"]
    for family in ("llama", "qwen2"):
        path = save_tiny_model(tmp_path / family, family, hf_smollm_tokenizer)
        loaded = load_model(path, torch.float32, torch.device("cpu"), None)
        free = lambda i: SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)  # noqa: E731
        first, base = run(loaded, free, prompts=prompts, max_num_seqs=4)
        stop = first[1][0][0][8]  # a token request 1 reaches: it stops at its first occurrence
        kinds = [dict(ignore_eos=True), dict(stop_token_ids=[stop]), dict(n=2, ignore_eos=True), dict(ignore_eos=True)]
        params = lambda i: SamplingParams(max_tokens=40 + 3 * i, temperature=0.0, **kinds[i])  # noqa: E731
        opts = dict(prompts=prompts, max_num_seqs=4, max_model_len=64,
                    kv_cache_memory=base.stats()["kv_bytes_per_token"] * 16 * 6)
        plain, plain_engine = run(loaded, params, {3: 5}, **opts)
        assert plain[1][0][2] == "stop" and len(plain[2]) == 2 and plain_engine.stats()["num_preemptions"] > 0
        runs = [base.tokenizer.encode(p) + outs[0][0] for p, outs in zip(prompts, plain)]

        def oracle(engine):
            engine.speculator.proposer = OracleProposer(runs, 4)

        spec, engine = run(loaded, params, {3: 5}, speculative_config=NGRAM, setup=oracle, **opts)
        stats = engine.stats()
        assert stats["kv_blocks_total"] == 6 and stats["num_preemptions"] > 0
        assert stats["spec_accepted_tokens"] > 20
        assert all(c[2] == "abort" for c in spec[3])
        assert spec[:3] == plain[:3]


def mixed_params(i: int) -> SamplingParams:
    """Greedy requests (they draft) beside seeded random ones (they never do)."""
    if i % 2 == 0:
        return SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    return SamplingParams(max_tokens=30, temperature=0.8, top_p=0.95, top_k=50, min_p=0.02, seed=100 + i,
                          repetition_penalty=1.1 if i == 1 else 1.0, logprobs=1 if i == 3 else None)


@pytest.mark.learned_costs
@pytest.mark.parametrize("config", [NGRAM, {"method": "draft_model", "quantization": "int4"}], ids=["ngram", "draft"])
def test_seeded_sampling_is_that_of_plain_decoding(smollm, config):
    """Seeded random requests keep plain sampling's tokens exactly, beside greedy requests that
    draft (their verification steps draw the random rows as plain steps do), whatever the
    learned costs decide; so seeded repeats are equal."""
    plain, _ = run(smollm, mixed_params)
    spec, engine = run(smollm, mixed_params, speculative_config=config)
    assert spec == plain
    assert len(spec[3][0][4]) == len(spec[3][0][0])  # a logprob per token


def test_unseeded_sampling_drafts(smollm):
    """Random requests without a seed draft and go through rejection sampling: each ends as
    asked, with a logprob per token."""
    params = lambda i: SamplingParams(max_tokens=30, temperature=0.7, top_p=0.9, logprobs=1, ignore_eos=True)  # noqa: E731
    spec, engine = run(smollm, params, speculative_config=NGRAM)
    assert all(len(c[0]) == 30 and len(c[4]) == 30 for outs in spec for c in outs)
    assert engine.stats()["spec_num_drafts"] > 5


def test_backoff_by_batch_size(smollm):
    """With more running sequences than ``disable_by_batch_size``, no step drafts."""
    config = {**NGRAM, "disable_by_batch_size": 2}
    spec, engine = run(smollm, lambda i: SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                       prompts=[PROMPTS[3]] * 4, max_num_seqs=4, max_num_batched_tokens=512, speculative_config=config)
    plain, _ = run(smollm, lambda i: SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                   prompts=[PROMPTS[3]] * 4, max_num_seqs=4, max_num_batched_tokens=512)
    assert spec == plain and engine.stats()["spec_num_drafts"] == 0


def test_the_config_is_checked():
    with pytest.raises(ConfigError, match="num_speculative_tokens must be an integer >= 1"):
        make_engine_config({"method": "ngram", "num_speculative_tokens": 0})
    with pytest.raises(ConfigError, match="disable_by_batch_size"):
        make_engine_config({**NGRAM, "disable_by_batch_size": 0})
    with pytest.raises(ConfigError, match="min_acceptance_rate"):
        make_engine_config({**NGRAM, "min_acceptance_rate": 1.5})


def make_engine_config(spec):
    from fastinfer import EngineConfig

    return EngineConfig(speculative_config=spec)


def test_structured_outputs_check_the_drafts(smollm):
    """Drafts pass the grammar first, and each verified position is masked by the grammar's
    state there: the JSON is that of plain decoding, and repeated items were drafted."""
    import json

    from fastinfer.sampling.params import StructuredOutputsParams

    schema = {"type": "array", "items": {"type": "string", "enum": ["apple", "pear", "plum"]},
              "minItems": 10, "maxItems": 10}

    def params(i):
        return SamplingParams(max_tokens=80, temperature=0.0,
                              structured_outputs=StructuredOutputsParams(json=schema))

    prompts = ["Write the word apple ten times as a JSON list:", "A JSON list of fruit:"]
    plain, _ = run(smollm, params, prompts=prompts)
    spec, engine = run(smollm, params, prompts=prompts, speculative_config=NGRAM)
    assert spec == plain
    assert all(len(json.loads(outs[0][1])) == 10 for outs in spec)
    assert engine.stats()["spec_accepted_tokens"] > 10


def test_cli_takes_a_speculative_config(smollm_path, capsys):
    from fastinfer.cli.main import main

    base = ["generate", f"Repeat this: {PASSAGE}", "--model", smollm_path, "--max-tokens", "24", "--temperature", "0",
            "--kv-cache-memory", "64MiB", "--max-model-len", "512"]
    assert main(base) == 0
    plain = capsys.readouterr().out
    assert main([*base, "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}']) == 0
    assert capsys.readouterr().out == plain
    assert main([*base, "--speculative-config", '{"method": "ngram"}']) == 2
    assert "needs 'method' and 'num_speculative_tokens'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's exit
        main([*base, "--speculative-config", "{ngram"])
    assert exit_.value.code == 2 and "--speculative-config: not JSON" in capsys.readouterr().err


def test_prometheus_series():
    from prometheus_client.parser import text_string_to_metric_families

    from fastinfer.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    for drafts, tokens, accepted in ((2, 8, 5), (5, 20, 12)):
        metrics.engine_stats("m", "v1", {"spec_num_drafts": drafts, "spec_draft_tokens": tokens,
                                         "spec_accepted_tokens": accepted, "spec_acceptance_rate": accepted / tokens,
                                         "spec_mean_accepted_length": 1 + accepted / drafts})
    body, _ = metrics.render()
    found = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
             if s.labels.get("model_version") == "v1"}
    assert found["fastinfer:spec_decode_num_drafts_total"] == 5
    assert found["fastinfer:spec_decode_num_draft_tokens_total"] == 20
    assert found["fastinfer:spec_decode_num_accepted_tokens_total"] == 12
    assert found["fastinfer:spec_decode_acceptance_rate"] == 0.6
    assert found["fastinfer:spec_decode_mean_accepted_length"] == 1 + 12 / 5


# --------------------------------------------------------------------------- draft models
SELF_DRAFT = {"method": "draft_model", "quantization": "int4", "num_speculative_tokens": 3}


@pytest.mark.parametrize("options", [{}, {"async_scheduling": True, "max_num_batched_tokens": 16}],
                         ids=["plain", "async-small-budget"])
def test_int4_self_draft_gives_plain_greedy_tokens(smollm, options):
    """The target's own int4 copy drafts (its KV cache on the target's block tables): the
    greedy outputs equal plain decoding's, and most drafts are accepted."""
    plain, _ = run(smollm, greedy_params, **options)
    spec, engine = run(smollm, greedy_params, speculative_config=SELF_DRAFT, **options)
    assert spec == plain
    stats = engine.stats()
    assert stats["spec_num_drafts"] > 20 and stats["spec_acceptance_rate"] > 0.6
    assert engine.speculator.draft_model is not None


def test_self_draft_under_preemption_and_abort(smollm):
    """Preempted sequences lose their draft cache (recomputed from the prompt); an abort mid-way."""
    opts = dict(kv_cache_memory=16 * 16 * 30 * 2 * 3 * 64 * 4, max_model_len=128, max_num_seqs=4)
    plain, _ = run(smollm, greedy_params, {1: 4}, **opts)
    spec, engine = run(smollm, greedy_params, {1: 4}, speculative_config=SELF_DRAFT, **opts)
    assert engine.stats()["kv_blocks_total"] == 8  # the draft's blocks share the budget: half as many
    assert engine.stats()["num_preemptions"] > 0
    assert spec[:1] + spec[2:] == plain[:1] + plain[2:]


def test_a_smaller_draft_model_with_the_same_tokenizer(smollm, tmp_path, hf_smollm_tokenizer):
    """A tiny random Llama drafts for the default model: its drafts are mostly wrong, and the
    outputs are still plain decoding's (and the speculator backs off)."""
    draft = save_tiny_model(tmp_path / "draft", "llama", hf_smollm_tokenizer)
    config = {"method": "draft_model", "model": draft, "num_speculative_tokens": 2}
    params = lambda i: SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)  # noqa: E731
    plain, _ = run(smollm, params, prompts=PROMPTS[:3], max_model_len=512)
    spec, engine = run(smollm, params, prompts=PROMPTS[:3], max_model_len=512, speculative_config=config)
    assert spec == plain and engine.stats()["spec_num_drafts"] > 0


def test_random_sampling_with_a_draft_model(smollm):
    """Unseeded random requests draw their drafts from the draft model's distribution, which
    verification takes as q."""
    params = lambda i: SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, ignore_eos=True)  # noqa: E731
    spec, engine = run(smollm, params, prompts=PROMPTS[:3], speculative_config=SELF_DRAFT)
    assert all(len(c[0]) == 20 for outs in spec for c in outs)
    assert engine.stats()["spec_accepted_tokens"] > 5


def test_draft_models_are_refused_where_they_cannot_run(tmp_path, hf_smollm_tokenizer):
    from fastinfer import EngineConfig

    with pytest.raises(ConfigError, match="does not run under tensor parallelism"):
        EngineConfig(speculative_config=SELF_DRAFT, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="speculative_config.quantization"):
        EngineConfig(speculative_config={**SELF_DRAFT, "quantization": "int3"})
    # the issue's own example: a draft model's num_speculative_tokens has a default
    config = EngineConfig(speculative_config={"method": "draft_model", "quantization": "int4"})
    assert config.speculative_config.num_speculative_tokens == 3


# --------------------------------------------------------------------------- the backoff
def test_linear_cost_learns_a_line_and_forgets():
    cost = LinearCost(decay=0.9)
    assert cost.predict(4) is None
    for n in (1, 2, 3, 1, 2, 3):
        cost.observe(n, 0.005 + 0.002 * n)
    assert cost.predict(10) == pytest.approx(0.025)
    for _ in range(200):  # only one size seen lately: no slope to go by
        cost.observe(2, 0.009)
    assert cost.predict(10) is None and cost.predict(2) == pytest.approx(0.009)


class _Seq:
    def __init__(self, seq_id, n, drafts):
        self.seq_id, self.token_ids, self.num_computed, self.stop_at = seq_id, list(range(n)), n - 1, 10**6
        self.spec_token_ids = drafts


def _speculator(step_cost: tuple[float, float], rates: dict[int, float] | None = None) -> Speculator:
    spec = Speculator(SpeculativeConfig.from_dict(NGRAM))
    for n in (1, 4, 8, 16, 32, 64):
        spec.target_cost.observe(n, step_cost[0] + step_cost[1] * n)
    for seq_id, rate in (rates or {}).items():
        spec._tracks[seq_id] = _Track(rate=rate, verified=1)
    return spec


@pytest.mark.learned_costs
def test_drafts_go_where_they_pay():
    """Costs of 8 ms a step plus 3 ms a token (about this CPU's quantized default model), drafts
    accepted half the time: one sequence speculates (3 tokens expected for 2x the time of 1);
    32 do not (the fixed cost is shared already), nor one whose drafts are all rejected."""
    costs = (0.008, 0.003)
    assert _speculator(costs, {1: 0.5})._pays([_Seq(1, 50, [7, 8, 9, 10])])
    assert not _speculator(costs, {i: 0.5 for i in range(32)})._pays([_Seq(i, 50, [7, 8, 9, 10]) for i in range(32)])
    assert not _speculator(costs, {1: 0.0})._pays([_Seq(1, 50, [7, 8, 9, 10])])
    assert _speculator((0.008, 0.003))._pays([_Seq(1, 50, [7])])  # no record yet: half expected


@pytest.mark.learned_costs
def test_the_engine_backs_off_where_drafts_cost_more_than_they_give(smollm, monkeypatch):
    """With a cost model that grows with the square of the tokens, no step drafts: outputs
    equal plain decoding's."""
    monkeypatch.setattr(LinearCost, "predict", lambda self, n: float(n) ** 2)
    spec, engine = run(smollm, greedy_params, speculative_config=NGRAM)
    plain, _ = run(smollm, greedy_params)
    assert spec == plain
    stats = engine.stats()
    assert stats["spec_num_drafts"] == 0 and stats["spec_backoff_steps"] > 10


@pytest.mark.learned_costs
def test_a_draft_model_as_slow_as_the_target_turns_speculation_off():
    """The int4 self-draft of an already 4-bit target: a draft pass costs a target step, so no
    acceptance rate can pay; speculation goes off for good (and says so)."""
    class Draft:
        cost = LinearCost()

    spec = Speculator(SpeculativeConfig.from_dict(SELF_DRAFT), Draft())
    for n in (1, 4, 1, 4):
        spec.target_cost.observe(n, 0.008 + 0.003 * (n - 1))
        Draft.cost.observe(1, 0.0085)
    assert not spec._pays([_Seq(1, 50, [-2, -2, -2])])
    assert spec.disabled and not spec.active(1)


def test_streamed_deltas_carry_several_tokens_a_step(smollm):
    """Through ``AsyncEngine``: a streamed request's deltas (several tokens each where drafts were
    accepted, a stop string held back until it is known) add up to the whole output, which is
    plain decoding's."""
    import asyncio

    from fastinfer.engine.async_engine import AsyncEngine

    prompt = PROMPTS[3]

    async def stream(**options):
        engine = AsyncEngine.from_engine(make_engine(smollm, kv_cache_memory="64MiB", **options))
        async with engine:
            kinds = ("delta", "final_only")
            return await asyncio.gather(*[
                asyncio.create_task(_collect(engine, prompt, SamplingParams(max_tokens=40, temperature=0.0,
                                                                            stop=[" a single"], output_kind=k)))
                for k in kinds])

    deltas, final = asyncio.run(stream(speculative_config=NGRAM))
    (plain,) = asyncio.run(stream())[1]
    want = final[0].outputs[0]
    assert (want.token_ids, want.text, want.finish_reason) == (plain.outputs[0].token_ids, plain.outputs[0].text,
                                                               "stop")
    assert sum(o.finished for o in deltas) == 1 and deltas[-1].finished
    assert [t for o in deltas for t in o.outputs[0].token_ids] == want.token_ids
    assert "".join(o.outputs[0].text for o in deltas) == want.text
    assert max(len(o.outputs[0].token_ids) for o in deltas) > 1  # accepted drafts arrive together


async def _collect(engine, prompt, params):
    return [out async for out in engine.generate(prompt, params)]
