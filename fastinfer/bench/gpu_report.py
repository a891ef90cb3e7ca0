"""Renderings of the GPU benchmark's result document: ``gpu_bench.md`` (one table per part:
single-stream decode, the decode step profile, the mixed workload, models and start-up,
kernels, errors, section times) and the short plain-text summary printed at the end. Tables
are ``fastinfer.bench.report``'s."""
from __future__ import annotations

from typing import Any

from fastinfer.bench.report import markdown_table, text_table

DECODE_SYSTEMS = (("fastinfer_decode", "fastinfer"), ("fastinfer_decode_async", "fastinfer, async scheduling"),
                  ("transformers_decode", "transformers"), ("compiled_decode", "torch.compile plain loop"))
THROUGHPUT_SYSTEMS = (("fastinfer_throughput", "fastinfer"),
                      ("fastinfer_throughput_async", "fastinfer, async scheduling"),
                      ("fastinfer_subset", "fastinfer (baselines' subset)"),
                      ("transformers_throughput", "transformers batched"),
                      ("compiled_throughput", "torch.compile plain loop, batched"))
SUBSET_BASELINES = ("transformers_throughput", "compiled_throughput")


def fmt(x: Any, digits: int = 3) -> str:
    """A cell: ``-`` for None, strings and ints as they are, 0 as ``0``, from 100 up with
    thousands separators and no decimals, else ``digits`` significant digits."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    if isinstance(x, int):
        return str(x)
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _get(s: dict, key: str, field: str) -> Any:
    v = s.get(key)
    return v.get(field) if isinstance(v, dict) else None


def _cell(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")[:200]


def _why(r: Any) -> str:
    """The error or skip reason of a section's entry, short."""
    if not isinstance(r, dict):
        return "-"
    if "error" in r:
        return "error: " + str(r["error"])[:120].replace("|", "/")
    if "skipped" in r:
        return str(r["skipped"])[:120]
    return "-"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _p3(p: dict | None) -> str:
    if not p:
        return "-"
    return " / ".join(fmt(p.get(k)) for k in ("p50", "p90", "p99"))


def _table(rows: list[list[Any]]) -> list[str]:
    return markdown_table([[str(c) for c in r] for r in rows])


def _header(doc: dict) -> list[str]:
    env, bw = doc.get("env", {}), doc.get("bandwidth", {})
    table = bw.get("table_bytes_per_s")
    sheet = f"{fmt(table / 1e9)} GB/s ({bw.get('table_entry')})" if table else "unknown for this GPU"
    frac = bw.get("copy_fraction_of_table")
    return [
        "# fastinfer GPU benchmark", "",
        f"- GPU: **{env.get('gpu')}** (compute capability {env.get('capability')}, "
        f"{env.get('gpu_memory_gib')} GiB, {env.get('sm_count')} SMs, driver {env.get('driver')})",
        f"- python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda_runtime')}), "
        f"triton {env.get('triton')}, transformers {env.get('transformers')}; fastinfer {env.get('fastinfer')} "
        f"at {str(env.get('git_sha'))[:12]}{' (uncommitted changes)' if env.get('git_dirty') else ''}, "
        f"CUDA extension built: {env.get('fastinfer_cuda_extension')}",
        f"- peak HBM bandwidth: data sheet {sheet}; measured device copy (1 GiB, read + write) "
        f"{fmt(bw.get('copy_GBps'))} GB/s" + (f" = {frac:.0%} of the data sheet" if frac else ""),
        f"- roofline fractions below: weight bytes per token x tok/s / peak, against the data sheet "
        f"({'used' if table else 'n/a'}) and against the measured copy bandwidth",
        f"- command: `{doc.get('command')}`; started {doc.get('started')}, {doc.get('elapsed_s')} s, "
        f"budget {doc.get('args', {}).get('budget_s')} s",
        "",
    ]


def _system_rows(doc: dict, systems, measured: str, width: int, cells) -> list[list[str]]:
    """One row per shape and system that ran: ``[shape, name, *cells(sections, key, result)]``
    where the result has ``measured``, else the reason it has not (a failure or a skip)."""
    rows = []
    for shape, res in doc.get("shapes", {}).items():
        s = res.get("sections", {})
        for key, name in systems:
            r = s.get(key)
            if r is None:
                continue
            rows.append([shape, name, *cells(s, key, r)] if measured in r
                        else [shape, name, _why(r)] + [""] * (width - 3))
    return rows


def _decode_cells(s: dict, key: str, r: dict) -> list[str]:
    fi = _get(s, "fastinfer_decode", "tok_s")
    ratio = "" if key.startswith("fastinfer_decode") or not fi else f"{fi / r['tok_s']:.2f}x"
    return [fmt(r["tok_s"]), fmt(r["ms_per_token"]), fmt(r.get("ttft_ms")), _pct(r.get("fraction_of_table_peak")),
            _pct(r.get("fraction_of_measured_copy")), ratio]


def _decode_table(doc: dict) -> list[str]:
    rows = [["shape", "system", "tok/s", "ms/token", "TTFT ms", "% data-sheet peak", "% measured copy", "fastinfer x"]]
    rows += _system_rows(doc, DECODE_SYSTEMS, "tok_s", len(rows[0]), _decode_cells)
    a = doc.get("args", {})
    return [f"## Single-stream decode (batch 1, {a.get('prompt_len')}-token prompt, {a.get('decode_tokens')} new "
            "tokens, greedy, EOS ignored; tok/s after the first token)", ""] + _table(rows) + [""]


def _profile_table(doc: dict) -> list[str]:
    rows = [["shape", "wall ms/step", "GPU busy ms/step", "host: runner ms", "host: sampler (waits) ms",
             "host: rest ms", "top GPU kernels (us/step)"]]
    for shape, res in doc.get("shapes", {}).items():
        r = res.get("sections", {}).get("fastinfer_step_profile")
        if not r or "wall_ms_per_step" not in r:
            continue
        top = "; ".join(f"{k['name'][:48]} {k['us_per_step']:.0f}" for k in r["top_kernels"][:5])
        rows.append([shape, fmt(r["wall_ms_per_step"]), fmt(r["gpu_busy_ms_per_step"]),
                     fmt(r["host_runner_ms_per_step"]), fmt(r["host_sampler_ms_per_step"]),
                     fmt(r["host_other_ms_per_step"]), top])
    if len(rows) == 1:
        return []
    return ["### Where a batch-1 decode step goes (torch.profiler; host times include its overhead)", ""] + \
        _table(rows) + [""]


def _throughput_cells(s: dict, key: str, r: dict) -> list[str]:
    sub = _get(s, "fastinfer_subset", "output_tok_s")
    ratio = f"{sub / r['output_tok_s']:.2f}x" if sub and key in SUBSET_BASELINES else ""
    return [str(r["requests"]), fmt(r["output_tok_s"]), fmt(r["total_tok_s"]), _p3(r["ttft_ms"]), _p3(r["tpot_ms"]),
            fmt(r["seconds"]), fmt(r.get("peak_allocated_gib")), ratio]


def _throughput_table(doc: dict) -> list[str]:
    rows = [["shape", "system", "requests", "out tok/s", "total tok/s", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
             "time s", "peak GiB", "fastinfer x (same requests)"]]
    rows += _system_rows(doc, THROUGHPUT_SYSTEMS, "output_tok_s", len(rows[0]), _throughput_cells)
    a = doc.get("args", {})
    return [f"## Mixed workload (prompts {a.get('input_range')}, outputs {a.get('output_range')} tokens, seed "
            f"{a.get('seed')}, all submitted at once, greedy, EOS ignored)", "",
            "The baselines run the first requests of the same workload (static batches of "
            f"{a.get('baseline_batch')}, left padding); fastinfer's ratio is taken on those same requests.", ""] + \
        _table(rows) + [""]


def _startup_row(shape: str, res: dict) -> list[str]:
    s = res.get("sections", {})
    b, st = s.get("build") or {}, s.get("fastinfer_startup") or {}
    stats = st.get("stats") or {}
    build = _why(b) if ("error" in b or "skipped" in b) else (
        "reused" if b.get("reused") else f"{fmt(b.get('build_seconds'))} s + save {fmt(b.get('save_seconds'))} s")
    return [shape, fmt((res.get("weight_bytes_per_token") or 0) / 1e9), build,
            _why(st) if ("error" in st or "skipped" in st) else fmt(st.get("seconds")),
            fmt(stats.get("kv_blocks_total")),
            fmt((stats.get("kv_cache_bytes") or 0) / 2**30) if stats else "-",
            str(st.get("cuda_graphs")), f"{fmt(_get(s, 'compiled_decode', 'compile_seconds'))} / "
                                        f"{fmt(_get(s, 'compiled_throughput', 'compile_seconds'))}"]


def _startup_table(doc: dict) -> list[str]:
    rows = [["shape", "weights read per token GB", "build", "fastinfer start-up s", "KV blocks", "KV cache GiB",
             "CUDA graphs", "compile s (b1 / batched)"]]
    rows += [_startup_row(shape, res) for shape, res in doc.get("shapes", {}).items()]
    return ["## Models and start-up", ""] + _table(rows) + [""]


def _kernel_row(r: dict) -> list[str]:
    if "us" not in r:
        return [r["op"], r["size"], r["backend"], _cell(r.get("error") or r.get("note") or "-"), "", "", "", ""]
    return [r["op"], r["size"], r["backend"], fmt(r["us"]), fmt(r["GBps"]), _pct(r.get("fraction_of_peak")),
            fmt(r.get("us_graph")) if "us_graph" in r else _cell(r.get("graph_error") or "-")[:60],
            fmt(r.get("GBps_graph"))]


def _kernels_table(doc: dict) -> list[str]:
    k = doc.get("kernels") or {}
    if not k.get("rows"):
        return ["## Kernels", "", f"{_why(k)}", ""] if k else []
    rows = [["op", "size", "backend", "us (do_bench median)", "GB/s", "% peak", "us (graph replay)", "GB/s (graph)"]]
    rows += [_kernel_row(r) for r in k["rows"]]
    return [f"## Kernels ({k.get('shape')} sizes, {k.get('dtype')}): bytes moved / time", "",
            "do_bench flushes L2 between runs and includes the launch; graph replay has no launch cost and "
            "may hit L2 for small sizes.", ""] + _table(rows) + [""]


def _problems(doc: dict) -> list[str]:
    if not (doc.get("errors") or doc.get("skipped")):
        return []
    lines = ["## Errors and skipped sections", ""]
    lines += [f"- **{e['section']}** failed: `{e['error'][:500]}`" for e in doc.get("errors", [])]
    lines += [f"- **{s['section']}** {s['reason']}" for s in doc.get("skipped", [])]
    return lines + [""]


def to_markdown(doc: dict) -> str:
    """``gpu_bench.md``: the configuration, then a table per part of the run."""
    lines = (_header(doc) + _decode_table(doc) + _profile_table(doc) + _throughput_table(doc) + _startup_table(doc)
             + _kernels_table(doc) + _problems(doc) + ["## Section times", ""])
    lines += _table([["section", "seconds", "ok"]] + [[s["section"], fmt(s["seconds"]), "yes" if s["ok"] else "no"]
                                                      for s in doc.get("sections", [])])
    return "\n".join(lines) + "\n"


def _summary_rows(shape: str, res: dict) -> list[list[str]]:
    s = res.get("sections", {})
    if res.get("skipped") or res.get("error"):
        return [[shape, "-", "-", "-", "-", (res.get("skipped") or res.get("error"))[:70]]]
    fi = _get(s, "fastinfer_decode", "fraction_of_table_peak") or _get(s, "fastinfer_decode",
                                                                       "fraction_of_measured_copy")
    return [
        [shape, "decode b1 tok/s", fmt(_get(s, "fastinfer_decode", "tok_s")),
         fmt(_get(s, "transformers_decode", "tok_s")), fmt(_get(s, "compiled_decode", "tok_s")),
         f"fastinfer at {_pct(fi)} of peak BW" if fi else ""],
        [shape, "decode b1 tok/s, async scheduling", fmt(_get(s, "fastinfer_decode_async", "tok_s")), "", "", ""],
        [shape, f"mixed out tok/s ({_get(s, 'fastinfer_throughput', 'requests') or '-'} req)",
         fmt(_get(s, "fastinfer_throughput", "output_tok_s")), "", "", ""],
        [shape, "mixed out tok/s, async scheduling", fmt(_get(s, "fastinfer_throughput_async", "output_tok_s")),
         "", "", ""],
        [shape, f"subset out tok/s ({_get(s, 'fastinfer_subset', 'requests') or '-'} req)",
         fmt(_get(s, "fastinfer_subset", "output_tok_s")), fmt(_get(s, "transformers_throughput", "output_tok_s")),
         fmt(_get(s, "compiled_throughput", "output_tok_s")), ""],
    ]


def summary(doc: dict) -> str:
    """A short plain-text table of the main figures, under a line with the GPU, the versions,
    the time and the number of failed and skipped sections."""
    rows = [["shape", "figure", "fastinfer", "transformers", "torch.compile", "notes"]]
    for shape, res in doc.get("shapes", {}).items():
        rows += _summary_rows(shape, res)
    env = doc.get("env", {})
    head = (f"GPU {env.get('gpu')}, torch {env.get('torch')}, triton {env.get('triton')}; "
            f"{doc.get('elapsed_s')} s; {len(doc.get('errors', []))} section(s) failed, "
            f"{len(doc.get('skipped', []))} skipped")
    return head + "\n" + text_table(rows)
