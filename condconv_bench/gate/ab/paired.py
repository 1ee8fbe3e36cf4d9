"""Base and head timed in the same rounds of the same processes: one paired ratio per round.

For every group the visit holds both versions of each compared implementation (`<impl>@base`,
`<impl>@head`); worker processes time them in shuffled interleaved rounds and sweep the groups,
as a run does (`measure`). A sample is the head's per-call time over the base's *in the same
round of the same process*, so the machine's drift, the process's memory placement and the
other tenants' load land on both sides of the ratio. Each group is measured for its time
budget; more samples only make the test sharper.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from condconv_bench.gate.ab.pairs import SIDES, CasePair, group_visits
from condconv_bench.measure.group import GroupMeasurement, measure_groups
from condconv_bench.measure.pool import WorkerPool
from condconv_bench.timing.ratios import BOOTSTRAP_SEED, Interval, hierarchical_interval
from condconv_bench.timing.rank_tests import SampleChange, compare_paired
from condconv_bench.settings import MeasureSettings


@dataclass(frozen=True)
class PairedTiming:
    """Head against base for one case: medians per call, the paired ratio, its interval and test."""

    base_s: float
    head_s: float
    ratio: Interval  # head / base, two-level bootstrap over processes and rounds
    change: SampleChange  # the same median ratio with the signed-rank p-value
    samples: int
    processes: int


def _paired(measurement: GroupMeasurement, pair: CasePair, rng: np.random.Generator) -> PairedTiming:
    base_id, head_id = pair.tagged("base").id, pair.tagged("head").id
    ratios, processes = measurement.samples.paired(head_id, base_id)
    return PairedTiming(
        base_s=measurement.samples.timing(base_id).median_s, head_s=measurement.samples.timing(head_id).median_s,
        ratio=hierarchical_interval(ratios, processes, rng), change=compare_paired(ratios),
        samples=len(ratios), processes=len(np.unique(processes)),
    )


def measure_pairs(pairs: list[CasePair], seed: int, settings: MeasureSettings, pool: WorkerPool
                  ) -> tuple[dict[str, PairedTiming], dict[str, str]]:
    """Paired timing of every compared case by case id, and why the others could not be timed."""
    compared = [pair for pair in pairs if pair.not_compared is None]
    if not compared:
        return {}, {}
    measurements = [GroupMeasurement(visit, settings, floor=None, candidates=set(), dispatchers=set())
                    for visit in group_visits(compared, seed, settings.rounds, settings.block_s, settings.warmup)]
    with pool:
        results = measure_groups(pool, measurements)
    tags = {pair.tagged(side).id: (pair, side) for pair in compared for side in SIDES}
    errors: dict[str, str] = {}
    for result in results:
        for tag, reason in result.errors.items():
            pair, side = tags[tag]
            errors.setdefault(pair.case_id, f"{side}: {reason}")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    timed = {pair.case_id: _paired(measurement, pair, rng)
             for measurement in measurements for pair in _pairs_of(measurement, tags) if pair.case_id not in errors}
    return timed, errors


def _pairs_of(measurement: GroupMeasurement, tags: dict[str, tuple[CasePair, str]]) -> list[CasePair]:
    return [tags[case.id][0] for case in measurement.visit.cases if tags[case.id][1] == "head"]
