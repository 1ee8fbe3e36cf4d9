"""Do two runs of one suite on one machine tell the same story? The figure anyone can re-check.

Run the suite twice, as two separate invocations, then `condconv-bench compare RUN_A RUN_B`:
per case, how far the paired ratio to the static floor moved between the runs; per group,
whether the two tied-fastest sets share a strategy; and whether the cases that moved were
flagged as unstable by at least one of the runs, which is the instrument's promise: a verdict
it does not flag, a second run confirms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from condconv_bench.core.case import Role
from condconv_bench.report import tables

MOVED = 0.10  # a ratio that moved more than this between the runs should have been flagged


@dataclass(frozen=True)
class Reproducibility:
    cases: int  # cases with a ratio to the floor in both runs
    within_5: int
    within_10: int
    lowest: float  # smallest (run B ratio) / (run A ratio)
    lowest_case: str
    highest: float
    highest_case: str
    groups: int  # groups with a fastest set in both runs
    winners_agree: int  # of which the tied-fastest sets share a strategy
    disagreeing_groups: tuple[str, ...]
    moved: int  # cases whose ratio moved by more than MOVED
    moved_flagged: int  # of which flagged unstable in at least one run

    def lines(self) -> list[str]:
        share = lambda n, d: f"{n}/{d} ({n / d:.0%})" if d else "0/0"  # noqa: E731
        lines = [
            f"reproducibility: impl/floor ratio within ±5% in {share(self.within_5, self.cases)} cases, "
            f"within ±10% in {share(self.within_10, self.cases)}",
            f"worst moves: {self.lowest:.2f}× ({self.lowest_case}) and {self.highest:.2f}× ({self.highest_case})",
            f"fastest (tied sets) agree in {share(self.winners_agree, self.groups)} groups",
            f"cases that moved more than {MOVED:.0%}: {self.moved}, flagged unstable in at least one run: {self.moved_flagged}",
        ]
        lines += [f"  fastest differs: {group}" for group in self.disagreeing_groups]
        return lines


def _ratios(frame: pd.DataFrame) -> pd.DataFrame:
    rows = tables.with_ratios(frame)
    return rows[rows["role"] != Role.FLOOR].set_index("case_id")[["vs_floor", "noisy"]].dropna(subset=["vs_floor"])


def _fastest_sets(frame: pd.DataFrame) -> pd.Series:
    best = tables.headline(frame)
    sets = best["fastest_set"].fillna(best["fastest"]).map(lambda text: frozenset(text.split(tables.TIE)))
    return pd.Series(sets.values, index=[" ".join(map(str, key)) for key in best[tables.GROUP_COLUMNS].itertuples(index=False)])


def reproducibility(first: pd.DataFrame, second: pd.DataFrame) -> Reproducibility:
    """Agreement of two runs' results (the rows of `RunDirectory.results()`)."""
    a, b = _ratios(first), _ratios(second)
    both = a.add_suffix("_a").join(b.add_suffix("_b"), how="inner")
    moved = both["vs_floor_b"] / both["vs_floor_a"]
    off = np.abs(moved.astype(float) - 1)
    far = off > MOVED
    flagged = both["noisy_a"].fillna(False).astype(bool) | both["noisy_b"].fillna(False).astype(bool)
    sets_a, sets_b = _fastest_sets(first), _fastest_sets(second)
    common = sets_a.index.intersection(sets_b.index)
    disagree = tuple(
        f"{group}: {' ≈ '.join(sorted(sets_a[group]))} | {' ≈ '.join(sorted(sets_b[group]))}"
        for group in common if not sets_a[group] & sets_b[group]
    )
    empty = moved.empty
    return Reproducibility(
        cases=len(both),
        within_5=int((off <= 0.05).sum()),
        within_10=int((off <= 0.10).sum()),
        lowest=float("nan") if empty else float(moved.min()),
        lowest_case="-" if empty else str(moved.idxmin()),
        highest=float("nan") if empty else float(moved.max()),
        highest_case="-" if empty else str(moved.idxmax()),
        groups=len(common),
        winners_agree=len(common) - len(disagree),
        disagreeing_groups=disagree,
        moved=int(far.sum()),
        moved_flagged=int((far & flagged).sum()),
    )
