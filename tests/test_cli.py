"""The ``fastinfer`` command line: generate, chat, and errors with exit code 2."""
from __future__ import annotations

from fastinfer.cli.main import main


def test_generate_prints_a_completion(smollm_path, capsys):
    # the exact float path: greedy answers are those of transformers (the quantized default's
    # int8 inputs may tip near-ties, and this prompt's first token is one)
    code = main(["generate", "What is the capital of France?", "--model", smollm_path, "--max-tokens", "16",
                 "--temperature", "0", "--kv-cache-memory", "64MiB", "--max-model-len", "512",
                 "--quantization", "none"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Paris" in out and "finish_reason=stop" in out


def test_generate_raw_and_seeded_sampling_is_reproducible(smollm_path, capsys):
    args = ["generate", "Once upon a time", "--template", "none", "--model", smollm_path, "--max-tokens", "12",
            "--temperature", "0.8", "--top-p", "0.9", "--seed", "7", "--kv-cache-memory", "64MiB",
            "--max-model-len", "512"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first and "(12 tokens, finish_reason=length)" in first


def test_chat_keeps_the_conversation(smollm_path, capsys):
    code = main(["chat", "--model", smollm_path, "--temperature", "0", "--max-tokens", "32",
                 "--kv-cache-memory", "64MiB", "--max-model-len", "512", "--quantization", "none",
                 "--message", "What is the capital of France?", "--message", "And of Italy?"])
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("assistant>")]
    assert code == 0 and len(lines) == 2
    assert "Paris" in lines[0] and "Rome" in lines[1]


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["generate", "hi", "--model", str(tmp_path / "nope")]) == 2
    assert "neither a known alias" in capsys.readouterr().err
    assert main(["generate", "hi", "--top-p", "1.5"]) == 2
    assert "top_p must be a number in (0, 1], got 1.5" in capsys.readouterr().err


def test_chat_refuses_an_empty_message_when_parsed(capsys):
    import pytest

    for message in ("", "   "):
        with pytest.raises(SystemExit) as info:
            main(["chat", "--message", "hi", "--message", message])
        assert info.value.code == 2 and "argument --message: message is empty" in capsys.readouterr().err


def test_chat_error_exits_non_zero(smollm_path, capsys):
    code = main(["chat", "--model", smollm_path, "--temperature", "0", "--max-tokens", "4",
                 "--kv-cache-memory", "64MiB", "--max-model-len", "64", "--message", "word " * 200])
    assert code == 2
    assert "the message alone is longer than the model's context" in capsys.readouterr().err


def test_generate_refuses_an_empty_prompt_when_parsed(capsys):
    import pytest

    with pytest.raises(SystemExit) as info:
        main(["generate", "fine", ""])
    assert info.value.code == 2 and "argument prompts: prompt is empty" in capsys.readouterr().err


def test_generate_errors_name_the_argument(smollm_path, capsys):
    base = ["generate", "hi", "--model", smollm_path, "--kv-cache-memory", "64MiB"]
    assert main([*base, "--temperature", "inf"]) == 2
    assert "temperature must be a finite number" in capsys.readouterr().err
    assert main([*base[:-2], "--kv-cache-memory", "2X"]) == 2
    assert "kv_cache_memory must be a number of bytes or a size with a unit" in capsys.readouterr().err
    assert main([*base, "--device", "cudanope"]) == 2
    assert "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err
    assert main([*base, "-n", "1000"]) == 2
    assert "n must be an int in [1, 128], got 1000" in capsys.readouterr().err
