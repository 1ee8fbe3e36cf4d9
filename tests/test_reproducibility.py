"""The reproducibility figure of two runs: ratios that moved, winners that changed, flags that warned."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from condconv_bench.cli import main
from condconv_bench.report.reproducibility import reproducibility
from condconv_bench.run.directory import load_results
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.selection import CaseFilter

TINY = Path(__file__).parent / "data" / "valid" / "tiny.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("repro") / "run"
    run_suite(TINY, out, case_filter=CaseFilter(devices=("cpu",)))
    return out


def test_a_run_reproduces_itself_exactly(run_dir: Path) -> None:
    frame = load_results(run_dir)
    figure = reproducibility(frame, frame)
    compared = int((frame["role"] != "floor").sum())
    assert figure.cases == compared and figure.within_5 == compared and figure.within_10 == compared
    assert figure.lowest == figure.highest == 1.0
    assert figure.groups == frame.groupby(["layer", "mode", "batch_size"]).ngroups == figure.winners_agree
    assert figure.moved == 0 and not figure.disagreeing_groups


def test_moved_ratios_changed_winners_and_missing_flags_are_counted(run_dir: Path) -> None:
    first = load_results(run_dir)
    first["noisy"] = False
    second = first.copy()
    strategies = second.index[(second["role"] == "strategy") & second["vs_floor"].notna()]
    moved, flagged = strategies[0], strategies[1]
    second.loc[moved, "vs_floor"] *= 1.2  # moved 20%, flagged by neither run
    second.loc[flagged, "vs_floor"] *= 0.8  # moved 20%, flagged by the second run
    second.loc[flagged, "noisy"] = True
    second.loc[strategies[2], "vs_floor"] *= 1.07  # outside ±5%, inside ±10%
    # In one group the two runs crown different strategies, neither tied with the other's winner.
    group = (first[["layer", "mode", "batch_size"]] == first.loc[moved, ["layer", "mode", "batch_size"]]).all(axis=1)
    for frame, winner in ((first, "grouped_conv"), (second, "per_sample_loop")):
        strategy = group & (frame["role"] == "strategy")
        frame.loc[strategy, "tied_fastest"] = frame.loc[strategy, "impl"] == winner
        frame.loc[strategy, "vs_best"] = (frame.loc[strategy, "impl"] == winner).map({True: 1.0, False: 1.3})
    figure = reproducibility(first, second)
    assert figure.within_5 == figure.cases - 3 and figure.within_10 == figure.cases - 2
    assert figure.highest == pytest.approx(1.2) and figure.highest_case == first.loc[moved, "case_id"]
    assert figure.lowest == pytest.approx(0.8) and figure.lowest_case == first.loc[flagged, "case_id"]
    assert (figure.moved, figure.moved_flagged) == (2, 1)
    assert figure.winners_agree == figure.groups - 1 and len(figure.disagreeing_groups) == 1


def test_compare_prints_the_figure_for_two_run_directories(run_dir: Path) -> None:
    result = CliRunner().invoke(main, ["compare", str(run_dir), str(run_dir)])
    assert result.exit_code == 0, result.output
    first = result.stdout.splitlines()[0]
    assert first.startswith("reproducibility: impl/floor ratio within ±5% in ") and "(100%)" in first
    assert "fastest (tied sets) agree in" in result.stdout
