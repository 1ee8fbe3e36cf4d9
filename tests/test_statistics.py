"""The gate's decision rule on synthetic samples, where the truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from condconv_bench.timing.rank_tests import compare_samples
from condconv_bench.timing.samples import median, percentiles, spread

THRESHOLD = 0.10


def timings(rng: np.random.Generator, n: int, scale: float = 1e-4, spread: float = 0.03) -> np.ndarray:
    return scale * rng.lognormal(0.0, spread, n)


def with_outliers(rng: np.random.Generator, samples: np.ndarray, share: float = 0.1, factor: float = 5.0) -> np.ndarray:
    """Heavy right tail: a share of blocks hit by interference, several times slower."""
    hit = rng.random(len(samples)) < share
    return np.where(hit, samples * factor * (1 + rng.pareto(2.0, len(samples))), samples)


@pytest.mark.parametrize("n", [5, 20, 60])
def test_identical_distributions_never_alarm(n: int) -> None:
    rng = np.random.default_rng(0)
    verdicts = [compare_samples(timings(rng, n), timings(rng, n)).direction(THRESHOLD) for _ in range(300)]
    assert verdicts.count("unchanged") == 300


def test_a_one_and_a_half_times_slowdown_is_always_caught() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        change = compare_samples(timings(rng, 20), 1.5 * timings(rng, 20))
        assert change.direction(THRESHOLD) == "slower"
        assert change.ratio == pytest.approx(1.5, rel=0.05)


def test_speedups_are_reported_as_faster() -> None:
    rng = np.random.default_rng(2)
    assert compare_samples(timings(rng, 30), 0.7 * timings(rng, 30)).direction(THRESHOLD) == "faster"


def test_significant_but_small_drift_is_below_the_threshold() -> None:
    rng = np.random.default_rng(3)
    change = compare_samples(timings(rng, 400, spread=0.01), 1.04 * timings(rng, 400, spread=0.01))
    assert change.p_value < 1e-10  # the rank test alone would alarm
    assert change.direction(THRESHOLD) == "unchanged"


def test_large_but_insignificant_change_is_not_a_verdict() -> None:
    # Medians 30% apart, but three noisy samples a side cannot reach p < 0.002: no verdict.
    before = np.array([1.0, 1.6, 2.2]) * 1e-4
    after = np.array([1.5, 2.08, 2.6]) * 1e-4
    change = compare_samples(before, after)
    assert change.ratio == pytest.approx(1.3) and change.p_value >= 0.002
    assert change.direction(THRESHOLD) == "unchanged"
    # The same ratio with enough tight samples is a verdict: the rank test, not the ratio, held it back.
    rng = np.random.default_rng(4)
    assert compare_samples(timings(rng, 40), 1.3 * timings(rng, 40)).direction(THRESHOLD) == "slower"


def test_heavy_tails_do_not_alarm_and_rarely_hide_a_real_slowdown() -> None:
    rng = np.random.default_rng(5)
    false_alarms = caught = 0
    for _ in range(200):
        before = with_outliers(rng, timings(rng, 30))
        false_alarms += compare_samples(before, with_outliers(rng, timings(rng, 30))).direction(THRESHOLD) != "unchanged"
        caught += compare_samples(before, with_outliers(rng, 1.5 * timings(rng, 30))).direction(THRESHOLD) == "slower"
    assert false_alarms == 0
    assert caught >= 196  # 10% of blocks 5-10× slower costs the rank test a little power, not much


@pytest.mark.parametrize("n", [1, 2, 3])
def test_tiny_sample_counts_cannot_reach_significance(n: int) -> None:
    rng = np.random.default_rng(6)
    change = compare_samples(timings(rng, n), 1.5 * timings(rng, n))
    assert change.ratio > 1.3
    assert change.p_value >= 0.002 and change.direction(THRESHOLD) == "unchanged"


def test_identical_constant_samples_are_unchanged() -> None:
    change = compare_samples([1e-3] * 10, [1e-3] * 10)
    assert change.ratio == 1.0 and change.p_value == 1.0


def test_the_sample_statistics_are_numpys_percentiles_and_median() -> None:
    """Autotune, the instrument and the gates read one implementation; it must agree with numpy's."""
    rng = np.random.default_rng(7)
    for n in (1, 2, 5, 20, 301):
        values = list(timings(rng, n, spread=0.5))
        assert median(values) == np.median(values)
        assert percentiles(values, (10, 25, 75, 90)) == pytest.approx(np.percentile(values, (10, 25, 75, 90)), rel=1e-12)
    assert spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.0 - 2.0) / 3.0)
    with pytest.raises(ValueError):
        median([])
