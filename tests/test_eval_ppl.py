"""``fastinfer eval ppl``: strided windows score every token once; the engine's perplexity
equals transformers' on the same windows; the command writes its JSON document."""
from __future__ import annotations

import json
import math

import pytest
import torch

from fastinfer.bench.perplexity import default_text, perplexity, windows
from fastinfer.cli.main import main
from fastinfer.errors import InvalidArgumentError

from .conftest import make_engine


@pytest.mark.parametrize("n,context,stride", [(10, 4, 2), (11, 4, 4), (5, 8, 3), (1000, 512, 256), (7, 3, 1)])
def test_windows_score_every_token_once(n, context, stride):
    """Each token is scored at most once, with a token of context before it; with overlapping
    windows (stride < context) every token after the first is scored."""
    spans = windows(n, context, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == sorted(set(scored)) and set(scored) <= set(range(1, n))
    if stride < context:
        assert scored == list(range(1, n))
    assert all(end - begin <= context and begin <= first - 1 for begin, end, first in spans)


def test_perplexity_matches_transformers(smollm, hf_smollm):
    ids = smollm.tokenizer.encode(default_text())[:700]
    engine = make_engine(smollm, kv_cache_memory="64MiB", max_model_len=512)
    ours = perplexity(engine, ids, context=256, stride=128)
    nll = 0.0
    with torch.no_grad():
        for begin, end, first in windows(len(ids), 256, 128):
            logits = hf_smollm(torch.tensor([ids[begin:end]])).logits[0].float()
            nll += float(torch.nn.functional.cross_entropy(logits[first - 1 - begin:end - 1 - begin],
                                                           torch.tensor(ids[first:end]), reduction="sum"))
    assert ours.num_tokens == len(ids) - 1
    assert ours.perplexity == pytest.approx(math.exp(nll / (len(ids) - 1)), rel=1e-4)
    assert engine.block_manager.num_free == engine.block_manager.num_total  # blocks given back
    with pytest.raises(InvalidArgumentError, match="stride must be in"):
        perplexity(engine, ids, context=64, stride=65)


def test_eval_ppl_command_writes_json(tmp_path, capsys):
    out = tmp_path / "res" / "ppl.json"
    text = tmp_path / "t.txt"
    text.write_text(default_text()[:4000], encoding="utf-8")
    rc = main(["eval", "ppl", "--text", str(text), "--max-tokens", "300", "--context", "128", "--stride", "64",
               "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["num_tokens"] == 299 and 1 < doc["perplexity"] < 100
    assert doc["settings"]["quantization"] is None and doc["settings"]["context"] == 128
    assert doc["weight_bytes"] > 0 and doc["kv_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    assert doc["env"]["torch"] == torch.__version__
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", "ppl", "--text", str(tmp_path / "missing.txt")]) == 2
