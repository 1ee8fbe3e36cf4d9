"""An A/B gate's verdict for a terminal, a pull-request comment (markdown) or a machine (JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pandas as pd

from condconv_bench.gate.ab.verdict import ABCase, ABResult
from condconv_bench import formatting

VERDICT_ORDER = ["errors", "slower", "faster", "not compared", "unchanged"]


def _interval(case: ABCase) -> str:
    if case.timing is None:
        return "-"
    r = case.timing.ratio
    return f"{r.estimate:.3f}× [{r.low:.3f}, {r.high:.3f}]"


def _rows(cases: list[ABCase]) -> pd.DataFrame:
    rank = {verdict: i for i, verdict in enumerate(VERDICT_ORDER)}
    ordered = sorted(cases, key=lambda c: (not c.problems, rank.get(c.verdict, len(rank)), c.case_id))
    return pd.DataFrame({
        "case": [c.case_id for c in ordered],
        "base": [formatting.seconds(c.timing.base_s if c.timing else None) for c in ordered],
        "head": [formatting.seconds(c.timing.head_s if c.timing else None) for c in ordered],
        "head/base (95% CI)": [_interval(c) for c in ordered],
        "p": [f"{c.timing.change.p_value:.1e}" if c.timing else "-" for c in ordered],
        "instructions": [f"{c.instructions.ratio - 1:+.2%}" if c.instructions else "-" for c in ordered],
        "verdict": [("FAIL " if c.problems else "") + c.verdict for c in ordered],
        "notes": ["; ".join(filter(None, (*c.problems, *c.improvements, c.note))) for c in ordered],
    })


def _header(result: ABResult) -> list[str]:
    t = result.thresholds
    counted = "" if result.instructions_unavailable is None else f" (instructions not counted: {result.instructions_unavailable})"
    return [
        f"base: {result.base.label}",
        f"head: {result.head.label}",
        f"suite: {result.suite}; both sides timed in the same interleaved rounds of {result.processes} worker processes",
        f"thresholds: paired time ratio +{t.time_threshold:.0%} with signed-rank p < {t.alpha:g} and the 95% interval above "
        f"{1 + t.time_threshold / 2:g}; "
        f"instructions +{t.instruction_threshold:.0%} and > {t.instruction_min_delta:,} per step{counted}",
    ]


def summary_line(result: ABResult) -> str:
    verdicts = pd.Series([c.verdict for c in result.cases]).value_counts()
    counts = ", ".join(f"{verdicts[v]} {v}" for v in VERDICT_ORDER if v in verdicts)
    if result.failures:
        return f"FAIL: {len(result.failures)} of {len(result.cases)} cases regress ({counts})"
    return f"PASS: {len(result.cases)} cases, no regression ({counts})"


def _skipped_here(case: ABCase) -> bool:
    return case.verdict == "not compared" and case.note.startswith("skipped: ")


def _shown(result: ABResult, everything: bool) -> list[ABCase]:
    """Every case with `everything`; else those that changed or differ between the revisions."""
    if everything:
        return list(result.cases)
    return [c for c in result.cases if c.problems or c.improvements or (c.verdict != "unchanged" and not _skipped_here(c))]


def _skipped_lines(result: ABResult, everything: bool) -> list[str]:
    """Cases this machine cannot run (no GPU, say), one line per reason instead of one per case."""
    if everything:
        return []
    reasons = pd.Series([c.note for c in result.cases if _skipped_here(c)], dtype=object).value_counts()
    return [f"not compared here: {count} cases, {reason}" for reason, count in reasons.items()]


def render_text(result: ABResult, everything: bool = False) -> str:
    cases = _shown(result, everything)
    table = _rows(cases).to_string(index=False) if cases else "(every compared case unchanged)"
    return "\n".join([*_header(result), *_skipped_lines(result, everything), "", table, "", summary_line(result)])


def render_markdown(result: ABResult, everything: bool = False) -> str:
    cases = _shown(result, everything)
    header = [*_header(result), *_skipped_lines(result, everything)]
    lines = ["### condconv-bench A/B: " + summary_line(result), "", *(f"- {line}" for line in header)]
    if cases:
        lines += ["", formatting.markdown_table(_rows(cases))]
    return "\n".join(lines) + "\n"


def _json_case(case: ABCase) -> dict[str, Any]:
    document = asdict(case)
    if case.instructions is not None:
        document["instructions"]["ratio"] = case.instructions.ratio
    return document


def render_json(result: ABResult, everything: bool = True) -> str:
    """Every case, whatever `everything` says: a program reading it filters for itself."""
    return json.dumps({
        "base": {"name": result.base.name, "commit": result.base.commit},
        "head": {"name": result.head.name, "root": str(result.head.root)},
        "suite": result.suite,
        "thresholds": asdict(result.thresholds),
        "processes": result.processes,
        "instructions_unavailable": result.instructions_unavailable,
        "passed": result.passed,
        "cases": [_json_case(c) for c in result.cases],
    }, indent=2)


RENDERERS = {"text": render_text, "markdown": render_markdown, "json": render_json}  # the formats of `gate ab`
