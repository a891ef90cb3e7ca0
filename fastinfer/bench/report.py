"""Turns system runs into the result document's ``results`` entries, a terminal table, a
Markdown table and a plot."""
from __future__ import annotations

import json

from fastinfer.bench.schema import percentiles
from fastinfer.bench.systems import SystemRun


def summarize(runs: list[SystemRun]) -> dict:
    """Schema ``results`` entry of one system from one or more runs (pooled)."""
    records = [r for run in runs for r in run.records]
    total = sum(run.total_time_s for run in runs)
    out_tokens = sum(r.output_tokens for r in records)
    return {
        "output_throughput_tok_s": out_tokens / total,
        "request_throughput_req_s": len(records) / total,
        "total_time_s": total,
        "num_requests": len(records),
        "output_tokens": out_tokens,
        "ttft_ms": percentiles([r.ttft_ms for r in records]),
        "tpot_ms": percentiles([r.tpot_ms for r in records if r.tpot_ms is not None]),
        "e2e_ms": percentiles([r.e2e_ms for r in records]),
        "peak_memory_mb": max(run.peak_memory_mb for run in runs),
    }


_COLUMNS = [
    ("system", None), ("out tok/s", "output_throughput_tok_s"), ("req/s", "request_throughput_req_s"),
    ("time s", "total_time_s"), ("TTFT p50 ms", ("ttft_ms", "p50")), ("TTFT p99 ms", ("ttft_ms", "p99")),
    ("TPOT p50 ms", ("tpot_ms", "p50")), ("TPOT p99 ms", ("tpot_ms", "p99")),
    ("E2E p50 ms", ("e2e_ms", "p50")), ("E2E p99 ms", ("e2e_ms", "p99")), ("peak MB", "peak_memory_mb"),
    ("fastinfer / system", "ratio"),
]


def table_rows(doc: dict) -> list[list[str]]:
    """Header plus one row per system of a result document (with each system's share of the
    in-run compute roofline where the run measured one)."""
    columns = _COLUMNS
    if "roofline" in doc:
        columns = _COLUMNS[:-1] + [("% roofline", "roofline_fraction")] + _COLUMNS[-1:]
    rows = [[name for name, _ in columns]]
    for system, res in doc["results"].items():
        row = [system]
        for _, key in columns[1:]:
            if key == "ratio":
                value = doc.get("ratios", {}).get(system)
                row.append("-" if value is None else f"{value:.2f}x")
                continue
            if key == "roofline_fraction":
                row.append(f"{100 * res[key]:.0f}%")
                continue
            row.append(fmt(res[key[0]][key[1]] if isinstance(key, tuple) else res[key]))
        rows.append(row)
    return rows


def fmt(value: float | None) -> str:
    """A table cell: one decimal from 10 up, three significant digits below, ``-`` for None."""
    return "-" if value is None else f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def text_table(rows: list[list[str]]) -> str:
    """Header plus rows, aligned (first column left, the rest right), a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[list[str]]) -> list[str]:
    """Header plus rows as the lines of a Markdown table."""
    return (["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def to_text(doc: dict) -> str:
    """An aligned plain-text table for the terminal."""
    return text_table(table_rows(doc))


def markdown_head(doc: dict, command_line: str | None, workload: str = "", extra: str = "") -> list[str]:
    """The lines a benchmark's Markdown starts with: its command, model, dtype, device,
    ``workload`` (if any), threads, CPU and ``extra`` (if any), then the command line that
    reproduces it."""
    env = doc["env"]
    parts = [f"model `{doc['model']}`", doc["dtype"], doc["device"], workload,
             f"{env.get('threads')} threads", env.get("cpu"), extra]
    lines = [f"**{doc['command']}** — " + ", ".join(str(p) for p in parts if p), ""]
    if command_line:
        lines += [f"`{command_line}`", ""]
    return lines


def to_markdown(doc: dict, command_line: str | None = None) -> str:
    """The same table in Markdown, with the configuration (and the command) above it."""
    w = doc["workload"]
    lines = markdown_head(doc, command_line, f"{w['num_prompts']} requests (workload `{w['name']}`, seed {w['seed']})")
    return "\n".join(lines + markdown_table(table_rows(doc))) + "\n"


def plot(doc: dict, runs: dict[str, list[SystemRun]], path: str) -> None:
    """PNG: output throughput per system (bars) and the CDF of end-to-end request latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, cdf) = plt.subplots(1, 2, figsize=(11, 4))
    systems = list(doc["results"])
    bars.bar(systems, [doc["results"][s]["output_throughput_tok_s"] for s in systems], color="tab:blue")
    bars.set_ylabel("output tokens/s")
    bars.set_title(f"{doc['command']}: {doc['model']} ({doc['dtype']}, {doc['device']})")
    bars.tick_params(axis="x", rotation=20)
    for s in systems:
        e2e = sorted(r.e2e_ms / 1e3 for run in runs[s] for r in run.records)
        cdf.plot(e2e, [(i + 1) / len(e2e) for i in range(len(e2e))], label=s, drawstyle="steps-post")
    cdf.set_xlabel("end-to-end latency (s)")
    cdf.set_ylabel("fraction of requests")
    cdf.set_title("request latency CDF")
    cdf.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dump_json(doc: dict, path: str) -> None:
    """Writes the result document as indented JSON."""
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def emit(doc: dict, args, command_line: str | None, markdown) -> None:
    """Prints how to reproduce ``doc`` and writes it where ``args.json`` and ``args.markdown``
    ask (``markdown(doc, command_line)`` renders the Markdown)."""
    if command_line:
        print(f"\nreproduce: {command_line}")
    if args.json:
        dump_json(doc, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(doc, command_line))
