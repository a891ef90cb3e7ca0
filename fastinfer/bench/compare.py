"""``fastinfer bench compare``: judge a new result file against a base one (the CI gate).

Metrics are paths into ``results.<system>``: ``output_throughput_tok_s``,
``request_throughput_req_s`` (higher is better), ``total_time_s``, ``peak_memory_mb`` and
``{ttft,tpot,e2e}_ms.{mean,p50,p90,p99}`` (lower is better). Tracked by default:
``DEFAULT_METRICS``. A metric regresses when it moves in the worse direction by more than the
threshold, relative to the base value. A value missing (``null``) on either side is shown as
``n/a`` and never counts as a regression.

With ``on="ratios"`` only the in-run ratios (fastinfer throughput over each baseline measured in
the same run; higher is better) are judged, which tolerates noisy shared CI machines.

Exit codes of ``main_compare``: 0 no regression, 1 at least one regression, 2 unusable input.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from fastinfer.bench.schema import (LATENCY_FIELDS, STAT_KEYS, THROUGHPUT_FIELDS, SchemaError,
                                    load_result, validate)

DEFAULT_METRICS = ("output_throughput_tok_s", "request_throughput_req_s", "ttft_ms.p50",
                   "tpot_ms.p50", "e2e_ms.p99")
ALL_METRICS = (*THROUGHPUT_FIELDS, "total_time_s", "peak_memory_mb",
               *(f"{lat}.{s}" for lat in LATENCY_FIELDS for s in STAT_KEYS))
HIGHER_IS_BETTER = frozenset(THROUGHPUT_FIELDS)
RATIO_METRIC = "ratio"
MODES = ("absolute", "ratios")
IDENTITY_FIELDS = ("command", "model", "dtype", "device")
WORKLOAD_FIELDS = ("name", "num_prompts", "seed", "input_lens", "output_lens")

EXIT_OK, EXIT_REGRESSED, EXIT_UNUSABLE = 0, 1, 2


class CompareError(ValueError):
    """The two results cannot be compared (different workloads, model, systems) or the request
    is malformed (unknown metric or mode); the CLI maps it to exit code 2."""


@dataclass(frozen=True, slots=True)
class CompareRow:
    """One metric of one system: base and new values, change in percent (None when a value is
    missing), and whether it moved the worse way past the threshold."""

    system: str
    metric: str
    base: float | None
    new: float | None
    change_pct: float | None
    higher_is_better: bool
    regressed: bool


@dataclass(slots=True)
class CompareReport:
    """Every compared row plus the settings that judged them."""

    rows: list[CompareRow]
    threshold: float
    on: str

    @property
    def regressed(self) -> bool:
        """True when any row regressed past the threshold."""
        return any(r.regressed for r in self.rows)

    @property
    def regressions(self) -> list[CompareRow]:
        """The rows that regressed."""
        return [r for r in self.rows if r.regressed]

    def to_table(self) -> str:
        """An aligned plain-text table, one row per (system, metric), then a verdict line."""
        header = ("system", "metric", "better", "base", "new", "change", "status")
        lines = [header] + [_format_row(r) for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        left = {0, 1, 2, 6}  # text columns left-aligned, numbers right-aligned
        out = ["  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(line, widths))).rstrip()
               for line in lines]
        out.insert(1, "  ".join("-" * w for w in widths))
        n = len(self.regressions)
        verdict = f"{n} regression(s)" if n else "no regression"
        out.append(f"{verdict} (threshold {self.threshold * 100:g}%, on {self.on})")
        return "\n".join(out)


def _format_value(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3f}"


def _format_row(r: CompareRow) -> tuple[str, ...]:
    change = "n/a" if r.change_pct is None else f"{r.change_pct:+.1f}%"
    status = "n/a" if r.change_pct is None else ("REGRESSED" if r.regressed else "ok")
    better = "higher" if r.higher_is_better else "lower"
    return (r.system, r.metric, better, _format_value(r.base), _format_value(r.new), change, status)


def parse_threshold(text: str | float) -> float:
    """A relative threshold as a fraction: ``"5%"`` → 0.05, ``"0.05"`` → 0.05, ``"5"`` → 0.05.
    A bare number below 1 is a fraction, one of 1 or more a percentage."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, is_pct = float(text), False
    else:
        s = str(text).strip()
        is_pct = s.endswith("%")
        try:
            value = float(s[:-1] if is_pct else s)
        except ValueError:
            raise ValueError(f"threshold must be a number or a percentage like '5%', "
                             f"got {text!r}") from None
        is_pct = is_pct or value >= 1
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"threshold must be a finite value >= 0, got {text!r}")
    return value / 100 if is_pct else value


def _check_same_run_shape(base: dict, new: dict) -> None:
    diffs = [f"{k}: {base[k]!r} vs {new[k]!r}" for k in IDENTITY_FIELDS if base[k] != new[k]]
    diffs += [f"workload.{k}: {_short(base['workload'][k])} vs {_short(new['workload'][k])}"
              for k in WORKLOAD_FIELDS if base["workload"][k] != new["workload"][k]]
    if diffs:
        raise CompareError("results are not comparable (different run setup): " + "; ".join(diffs))
    b, n = set(base["results"]), set(new["results"])
    if b != n:
        raise CompareError(f"results are not comparable (different systems): "
                           f"base has {sorted(b)}, new has {sorted(n)}")


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _lookup(res: dict, metric: str) -> float | None:
    value = res
    for part in metric.split("."):
        value = value[part]
    return value


def _judge(system: str, metric: str, base: float | None, new: float | None,
           higher_is_better: bool, threshold: float) -> CompareRow:
    if base is None or new is None:
        return CompareRow(system, metric, base, new, None, higher_is_better, False)
    if base != 0:
        change = (new - base) / abs(base) * 100
    else:
        change = 0.0 if new == base else math.copysign(math.inf, new - base)
    worse_by = -change if higher_is_better else change
    return CompareRow(system, metric, base, new, change, higher_is_better,
                      worse_by > threshold * 100)


def _resolve_metrics(metrics: Sequence[str] | str | None) -> tuple[str, ...]:
    if metrics is None:
        return DEFAULT_METRICS
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [m.strip() for m in names if m.strip()]
    unknown = [m for m in names if m not in ALL_METRICS]
    if unknown or not names:
        raise CompareError(f"unknown metric(s) {unknown or names}; expected some of: "
                           f"{', '.join(ALL_METRICS)}")
    return tuple(names)


def compare(base: dict, new: dict, threshold: float = 0.05,
            metrics: Sequence[str] | None = None, on: str = "absolute") -> CompareReport:
    """Judge ``new`` against ``base`` (both valid result documents). ``on="absolute"`` compares
    each system's ``metrics`` (default ``DEFAULT_METRICS``); ``on="ratios"`` compares the
    ``ratios`` entries and ignores ``metrics``. Raises ``SchemaError`` for an invalid document
    and ``CompareError`` when the runs differ in
    command, model, dtype, device, workload or set of systems, or on an unknown metric/mode."""
    if on not in MODES:
        raise CompareError(f"on must be one of {MODES}, got {on!r}")
    if isinstance(threshold, bool) or not (isinstance(threshold, (int, float))
                                           and math.isfinite(threshold) and threshold >= 0):
        raise CompareError(f"threshold must be a finite fraction >= 0, got {threshold!r}")
    for label, doc in (("base", base), ("new", new)):
        try:
            validate(doc)
        except SchemaError as e:
            raise SchemaError(f"{label} result: {e}") from None
    _check_same_run_shape(base, new)
    if on == "ratios":
        return _compare_ratios(base, new, threshold)
    names = _resolve_metrics(metrics)
    rows = [_judge(system, m, _lookup(base["results"][system], m), _lookup(res, m),
                   m in HIGHER_IS_BETTER, threshold)
            for system, res in new["results"].items() for m in names]
    return CompareReport(rows, threshold, on)


def _compare_ratios(base: dict, new: dict, threshold: float) -> CompareReport:
    b, n = base["ratios"], new["ratios"]
    if not b and not n:
        raise CompareError("cannot compare on ratios: neither result has any ratio (a run needs "
                           "a 'fastinfer' system and at least one baseline)")
    rows = [_judge(system, RATIO_METRIC, b.get(system), n.get(system), True, threshold)
            for system in sorted(set(b) | set(n))]
    return CompareReport(rows, threshold, "ratios")


def main_compare(base_path: str | os.PathLike, new_path: str | os.PathLike,
                 threshold: str | float = 0.05, metrics: Sequence[str] | str | None = None,
                 on: str = "absolute") -> int:
    """Load both files, print the table to stdout and return 0 (no regression) or 1
    (regression); on unusable input print ``error: ...`` to stderr and return 2."""
    try:
        report = compare(load_result(base_path), load_result(new_path),
                         parse_threshold(threshold), metrics, on)
    except ValueError as e:  # SchemaError, CompareError and a bad threshold alike
        print(f"fastinfer bench compare: error: {e}", file=sys.stderr)
        return EXIT_UNUSABLE
    print(f"base: {base_path}\nnew:  {new_path}")
    print(report.to_table())
    return EXIT_REGRESSED if report.regressed else EXIT_OK
