"""llama.cpp as an optional benchmark baseline, on the same GGUF file (issue 11).

Never part of the install or CI: the binaries are looked up on ``PATH`` or in the folder named
by ``FASTINFER_LLAMA_CPP`` (a llama.cpp ``build/bin``; how to build it on these machines:
``../shared/BUILD_NOTES.md``). When they are absent the baseline is skipped with a message.

- :class:`LlamaCppServerSystem` serves the benchmark's workload with ``llama-server`` (one slot
  per request, up to ``--max-num-seqs``): every request is sent at once with its prompt as
  token ids, greedy, ``n_predict`` tokens with EOS ignored, streamed, so time to first token
  and end-to-end times are measured like fastinfer's.
- :func:`llama_bench` runs ``llama-bench`` (prompt processing and token generation tok/s).
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from fastinfer.bench.process import ServerProcess, free_port
from fastinfer.bench.systems import Progress, RequestRecord, SystemRun, _noop

ENV = "FASTINFER_LLAMA_CPP"
HOW = ("install llama.cpp's llama-server and llama-bench on PATH or set FASTINFER_LLAMA_CPP to the folder "
       "holding them (../shared/BUILD_NOTES.md: building llama.cpp)")


def find_binary(name: str) -> str | None:
    """``name`` (``llama-server``, ``llama-bench``) in ``$FASTINFER_LLAMA_CPP`` or on PATH."""
    folder = os.environ.get(ENV)
    if folder:
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return shutil.which(name)


def unavailable_reason(model_path: str) -> str | None:
    """Why the baseline cannot run here (None when it can)."""
    if not model_path.endswith(".gguf"):
        return f"llama.cpp needs a GGUF file, and {model_path} is not one"
    for name in ("llama-server", "llama-bench"):
        if find_binary(name) is None:
            return f"{name} not found; {HOW}"
    return None


def llama_bench(model_path: str, threads: int, prompt: int = 128, new: int = 128, depth: int = 0) -> dict:
    """``llama-bench`` on ``model_path``: ``{"pp_tok_s", "tg_tok_s", "build"}`` (raises
    RuntimeError when it fails or is absent). ``depth`` > 0 runs the tests after that many
    tokens of context (``-d``): tg128 then decodes at positions depth .. depth + 127."""
    exe = find_binary("llama-bench")
    if exe is None:
        raise RuntimeError(f"llama-bench not found; {HOW}")
    cmd = [exe, "-m", model_path, "-p", str(prompt), "-n", str(new), "-t", str(threads), "-o", "json"]
    out = subprocess.run(cmd + (["-d", str(depth)] if depth else []), capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {out.stderr[-500:]}")
    result = {"prompt": prompt, "new": new, "threads": threads, "depth": depth}
    for row in json.loads(out.stdout):
        key = "pp_tok_s" if row.get("n_prompt", 0) > 0 else "tg_tok_s"
        result[key] = float(row["avg_ts"])
        result["build"] = f"{row.get('build_commit', '?')} ({row.get('cpu_info', '')})"
    return result


class LlamaCppServerSystem:
    """``llama-server`` on the same GGUF file, fed the workload over HTTP."""

    name = "llama.cpp"

    def __init__(self, model_path: str, threads: int, parallel: int, context: int) -> None:
        self.model_path, self.threads, self.parallel, self.context = model_path, threads, parallel, context
        self.server: ServerProcess | None = None

    @property
    def proc(self) -> subprocess.Popen | None:
        return None if self.server is None else self.server.proc

    @property
    def port(self) -> int:
        return 0 if self.server is None else self.server.port

    def start(self) -> None:
        """Starts ``llama-server`` on a free port and waits until it is ready (RuntimeError when
        it is absent, exits or is not ready in 120 s)."""
        exe = find_binary("llama-server")
        if exe is None:
            raise RuntimeError(f"llama-server not found; {HOW}")
        port = free_port()
        # -c is the whole KV cache, shared by the slots: each slot gets context / parallel.
        cmd = [exe, "-m", self.model_path, "--host", "127.0.0.1", "--port", str(port), "-t", str(self.threads),
               "-np", str(self.parallel), "-c", str(self.context * self.parallel), "--no-webui"]
        self.server = ServerProcess("llama-server", cmd, port).start(ready_timeout_s=120)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    def __del__(self) -> None:
        self.close()

    def _one(self, prompt: list[int], n: int, t0: float) -> RequestRecord:
        body = json.dumps({"prompt": prompt, "n_predict": n, "ignore_eos": True, "temperature": 0.0,
                           "top_k": 1, "stream": True, "cache_prompt": False})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=3600)
        conn.request("POST", "/completion", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"llama-server answered {resp.status}: {resp.read()[:300]!r}")
        first, count = None, 0
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            chunk = json.loads(line[6:])
            if first is None and (chunk.get("content") or chunk.get("tokens")):
                first = time.monotonic()
            if chunk.get("stop"):
                count = int(chunk.get("tokens_predicted", chunk.get("timings", {}).get("predicted_n", 0)))
                break
        end = time.monotonic()
        return RequestRecord(t0, first if first is not None else end, end, count)

    def run(self, prompts: list[list[int]], output_lens: list[int], progress: Progress = _noop) -> SystemRun:
        """Sends every request at once (one connection each); ``progress(1)`` as each ends."""
        if self.server is None:
            self.start()
        lock = threading.Lock()

        def task(args):
            rec = self._one(*args)
            with lock:
                progress(1)
            return rec

        start = time.perf_counter()
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=max(1, len(prompts))) as pool:
            records = list(pool.map(task, [(p, n, t0) for p, n in zip(prompts, output_lens)]))
        total = time.perf_counter() - start
        return SystemRun(self.name, total, records, self.server.peak_rss_mb() or 0.0).check(output_lens)
