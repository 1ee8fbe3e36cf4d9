"""A baseline comparison rendered for a terminal, a pull-request comment (markdown) or a machine (JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pandas as pd

from condconv_bench.gate.compare import CaseComparison, Comparison
from condconv_bench import formatting

VERDICT_ORDER = ["errors", "skipped", "missing", "slower", "faster", "fixed", "new", "not measured", "unchanged", "latency not compared"]


def _rows(cases: list[CaseComparison]) -> pd.DataFrame:
    rank = {verdict: i for i, verdict in enumerate(VERDICT_ORDER)}
    ordered = sorted(cases, key=lambda c: (not c.problems, rank.get(c.verdict, len(rank)), c.case_id))
    return pd.DataFrame({
        "case": [c.case_id for c in ordered],
        "before": [formatting.seconds(c.before_s) for c in ordered],
        "after": [formatting.seconds(c.after_s) for c in ordered],
        "ratio": [formatting.ratio(c.ratio) for c in ordered],
        "verdict": [("FAIL " if c.problems else "") + c.verdict for c in ordered],
        "FLOP": [_delta(c.flops_before, c.flops_after, formatting.count) for c in ordered],
        "peak memory": [_delta(c.memory_before, c.memory_after, formatting.size) for c in ordered],
        "equivalent": ["-" if c.equivalent is None else ("yes" if c.equivalent else "NO") for c in ordered],
        "notes": ["; ".join((*c.problems, *c.improvements, *c.notes)) for c in ordered],
    })


def _delta(before: int | None, after: int | None, fmt: Any) -> str:
    if before is None or after is None:
        return fmt(after if after is not None else before)
    return fmt(after) if before == after else f"{fmt(before)} → {fmt(after)}"


def _header(comparison: Comparison) -> list[str]:
    t = comparison.thresholds
    lines = [
        f"baseline: {comparison.baseline}",
        f"current:  {comparison.current}",
        (f"comparison: {comparison.mode} — " if comparison.mode else "") + comparison.mode_reason
        + (" (latencies divided by the static floor of their own run)" if comparison.mode == "floor" else ""),
        f"thresholds: time +{t.time_threshold:.0%}"
        + (f" and > {formatting.seconds(t.time_min_delta_s)}" if t.time_min_delta_s else "")
        + f" with Mann–Whitney U p < {t.alpha:g}; "
        f"peak memory +{t.memory_threshold:.0%} and > {formatting.size(t.memory_min_bytes)}; FLOPs, equivalence and errors exactly",
    ]
    lines += [f"environment: {note}" for note in comparison.environment_notes]
    return lines


def summary_line(comparison: Comparison, failures: list[CaseComparison] | None = None) -> str:
    failures = comparison.regressions if failures is None else failures
    verdicts = pd.Series([c.verdict for c in comparison.cases]).value_counts()
    counts = ", ".join(f"{verdicts[v]} {v}" for v in VERDICT_ORDER if v in verdicts)
    status = f"FAIL: {len(failures)} of {len(comparison.cases)} cases fail" if failures else f"PASS: {len(comparison.cases)} cases, no regression"
    hint = " — faster cases: update the baseline (condconv-bench baseline save)" if comparison.improvements else ""
    return f"{status} ({counts}){hint}"


def render_text(comparison: Comparison, everything: bool = True, failures: list[CaseComparison] | None = None) -> str:
    cases = list(comparison.cases) if everything else [c for c in comparison.cases if c.problems or c.improvements or c.notes]
    table = _rows(cases).to_string(index=False) if cases else "(no case changed)"
    return "\n".join([*_header(comparison), "", table, "", summary_line(comparison, failures)])


def render_markdown(comparison: Comparison, everything: bool = True, failures: list[CaseComparison] | None = None) -> str:
    cases = list(comparison.cases) if everything else [c for c in comparison.cases if c.problems or c.improvements or c.notes]
    rows = _rows(cases)
    lines = ["### condconv-bench: " + summary_line(comparison, failures), ""]
    lines += [f"- {line}" for line in _header(comparison)]
    if not rows.empty:
        lines += ["", formatting.markdown_table(rows)]
    return "\n".join(lines) + "\n"


def render_json(comparison: Comparison, everything: bool = True, failures: list[CaseComparison] | None = None) -> str:
    """Every case, changed or not, whatever `everything` says: a program reading it filters for itself."""
    failures = comparison.regressions if failures is None else failures
    document = {
        "baseline": comparison.baseline,
        "current": comparison.current,
        "mode": comparison.mode,
        "mode_reason": comparison.mode_reason,
        "environment_notes": list(comparison.environment_notes),
        "thresholds": asdict(comparison.thresholds),
        "passed": not failures,
        "cases": [asdict(c) for c in comparison.cases],
    }
    return json.dumps(document, indent=2)


RENDERERS = {"text": render_text, "markdown": render_markdown, "json": render_json}  # the formats of `compare` and `gate baseline`
