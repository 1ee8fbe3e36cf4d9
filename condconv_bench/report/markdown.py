"""A compact markdown summary of one or more runs, for a pull-request comment or a README."""

from __future__ import annotations

import pandas as pd

from condconv_bench.machine.environment import hardware_label
from condconv_bench import formatting
from condconv_bench.report import tables
from condconv_bench.report.model_tables import ModelTable, model_tables
from condconv_bench.report.runs import LoadedRun, comparison_summary, cross_run


def render(runs: list[LoadedRun]) -> str:
    """Headline and per-implementation summary of each run, then the cross-run ratios."""
    parts = []
    for run in runs:
        frame = run.results
        parts.append(f"## {run.suite_name} — {hardware_label(run.environment)}")
        counts = frame["status"].value_counts()
        parts.append(
            f"{len(frame)} cases: {counts.get('ok', 0)} measured, {counts.get('skipped', 0)} skipped, "
            f"{counts.get('error', 0)} errors; torch {run.environment.get('torch')}, commit {run.environment.get('git_commit') or 'unknown'}."
        )
        best = tables.headline_display(frame)
        if tables.measured(frame).empty:
            parts.append(tables.headline_absent(frame))
            continue
        parts.append(formatting.markdown_table(best) if not best.empty else tables.headline_absent(frame))
        summary = tables.geomean_by_impl(frame)
        parts.append(formatting.markdown_table(pd.DataFrame({
            "implementation": summary["impl"],
            "cases": summary["cases"],
            "fastest in": summary["wins"],
            "geomean vs floor": summary["geomean_vs_floor"].map(formatting.ratio),
            "geomean vs grouped_conv": summary["geomean_vs_grouped_conv"].map(formatting.ratio),
            "geomean vs fastest": summary["geomean_vs_fastest"].map(formatting.ratio),
            **({"geomean vs limit": summary["geomean_vs_limit"].map(formatting.ratio)} if summary["geomean_vs_limit"].notna().any() else {}),
            "within 5% of fastest": summary["within_5pct"].astype(int),
        })))
        parts += [_model_table(model) for model in model_tables(frame)]
        failures = tables.equivalence_failures(frame)
        if not failures.empty:
            parts.append("**Equivalence failures:** " + ", ".join(f"`{c}`" for c in failures["case_id"]))
    comparison, variants = cross_run(runs)
    if not comparison.empty:
        parts.append("## Side by side")
        summary = comparison_summary(comparison, variants)
        ratios = summary.drop(columns=["impl", "cases"]).map(formatting.ratio)
        ratios.columns = [f"{v} / {variants[0]}" for v in variants[1:]]
        parts.append(formatting.markdown_table(pd.concat([summary[["impl", "cases"]].rename(columns={"impl": "implementation"}), ratios], axis=1)))
    return "\n\n".join(parts) + "\n"


def _model_table(model: ModelTable) -> str:
    """A model's ratios to its floor per batch size, as the README's "Speed up your model" shows them."""
    rows = model.rows
    shown = pd.DataFrame({"batch": rows["batch_size"]})
    if "floor_latency_s" in rows:
        shown["floor"] = rows["floor_latency_s"].map(formatting.seconds)
    for column in model.columns:
        if f"{column} low" in rows:
            shown[column] = [formatting.interval(*v) for v in rows[[column, f"{column} low", f"{column} high"]].itertuples(index=False)]
        else:
            shown[column] = rows[column].map(formatting.ratio)
    notes = "".join(f"\n\n{note}" for note in model.notes)
    return f"### {model.description} — {model.context}\n\n" + formatting.markdown_table(shown) + notes
