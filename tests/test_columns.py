"""The result row's one definition (`run.columns`): the README's table, the CSV codec and the run
directories of every readable version all agree with it."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from condconv_bench.core.equivalence import EquivalenceReport, TensorComparison
from condconv_bench.core.flops import AnalyticMacs, FlopCounts
from condconv_bench.core.limits import CaseWork, Ceilings, Work, case_limits
from condconv_bench.core.traffic import Traffic
from condconv_bench.errors import ResultsError
from condconv_bench.run.columns import COLUMNS, DTYPES, READABLE_VERSIONS, SCHEMA_VERSION, header
from condconv_bench.run.directory import RunDirectory, load_results
from condconv_bench.run.row_codec import format_row, parse_row
from condconv_bench.run.rows import equivalence_columns, flop_columns, limit_columns

ROOT = Path(__file__).resolve().parents[1]
FROZEN = Path(__file__).parent / "data" / "runs"  # one small run of tiny.yaml per version, as that version wrote it


def readme_table() -> list[str]:
    """The table of columns in README's "What a run records", line by line."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## What a run records"):]
    section = section[: section.index("\n## ")]
    start = section.index("| column |")
    return section[start:].split("\n\n")[0].splitlines()


def rendered_table() -> list[str]:
    """The table as the definition says it should read: the topic on the first column of each."""
    lines = ["| column | topic | type | unit | since | meaning |", "|---|---|---|---|---|---|"]
    topic = None
    for column in COLUMNS:
        shown = column.topic if column.topic != topic else ""
        topic = column.topic
        lines.append(f"| `{column.name}` | {shown} | {column.dtype} | {column.unit} | {column.since} | {column.meaning} |")
    return lines


def test_the_readme_lists_exactly_the_defined_columns() -> None:
    expected = rendered_table()
    assert readme_table() == expected, "README's table of columns should read:\n" + "\n".join(expected)


def test_every_column_is_defined_once_with_a_meaning() -> None:
    names = [column.name for column in COLUMNS]
    assert len(names) == len(set(names)) == len(DTYPES)
    assert all(column.meaning and column.since <= SCHEMA_VERSION for column in COLUMNS)
    topics = [column.topic for column in COLUMNS]
    assert all(topics.index(t) == i or topics[i - 1] == t for i, t in enumerate(topics))  # each topic in one stretch


@pytest.mark.parametrize("version", READABLE_VERSIONS)
def test_a_frozen_run_of_every_readable_version_loads_with_the_columns_it_lacks_empty(version: int) -> None:
    rows = load_results(FROZEN / f"v{version}")
    assert list(rows.columns) == list(DTYPES) and rows.dtypes.astype(str).to_dict() == DTYPES
    current = load_results(FROZEN / f"v{SCHEMA_VERSION}")
    written = header(version)
    pd.testing.assert_frame_equal(rows[written], current[written])
    lacking = [name for name in DTYPES if name not in written and name != "runtime"]
    assert rows[lacking].isna().all().all()
    assert (rows["runtime"] == "eager").all()  # before version 6 every run was eager PyTorch
    assert len(rows) == 3 and (rows["status"] == "ok").all()
    if version < 4:
        assert {"limit_s", "vs_limit", "probed_dispatch"} <= set(lacking)
    assert current.loc[current["impl"] == "grouped_conv", "limit_bound"].item() == "memory"
    assert len(RunDirectory(FROZEN / f"v{version}").samples()) == 3


def test_the_current_version_writes_the_frozen_header(tmp_path: Path) -> None:
    frozen = FROZEN / f"v{SCHEMA_VERSION}"
    run = RunDirectory.create(tmp_path / "run", json.loads((frozen / "run.json").read_text()))
    written = (frozen / "results.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    assert run.results_file.read_text(encoding="utf-8") == written[0]
    for row in load_results(frozen).astype(object).to_dict("records"):
        run.append({name: None if pd.isna(value) else value for name, value in row.items()})
    assert run.results_file.read_text(encoding="utf-8") == "".join(written)  # the same bytes, cell for cell


def test_a_header_of_another_version_is_refused(tmp_path: Path) -> None:
    run = Path(shutil.copytree(FROZEN / "v4", tmp_path / "run"))
    metadata = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**metadata, "schema_version": 5}))
    with pytest.raises(ResultsError, match="header does not match schema version 5"):
        load_results(run)


def test_a_row_round_trips_through_the_codec_and_refuses_unknown_cells() -> None:
    row = {"case_id": "a,b", "batch_size": 3, "equivalent": False, "vs_floor": 1.25, "reason": 'say "x"'}
    fields = next(csv.reader([format_row(row)]))
    values = dict(zip(DTYPES, parse_row(fields, header(SCHEMA_VERSION))))
    assert {name: values[name] for name in row} == row
    assert all(values[name] is None for name in DTYPES if name not in row)
    with pytest.raises(ValueError, match="outside the schema: \\['batchsize'\\]"):
        format_row({"batchsize": 3})
    with pytest.raises(ValueError, match="column equivalent: not True or False"):
        parse_row(["yes" if name == "equivalent" else "" for name in header(SCHEMA_VERSION)], header(SCHEMA_VERSION))


def test_the_probes_results_fill_only_defined_columns() -> None:
    report = EquivalenceReport((TensorComparison("output", 1e-6, 1e-7, False),), 1e-4, checked_against="the as-shipped model")
    counts = FlopCounts(10, 20, AnalyticMacs(1, 2, 7), "", "")
    work = Work(AnalyticMacs(1, 2, 7), Traffic(input=40, output=40, experts=10, routing=10))  # 100 B moved
    limits = case_limits(CaseWork(work, work, False), Ceilings(1e9, 1e9, 1e9, 1e9, None))
    cells = {**equivalence_columns(report), **flop_columns(counts), **limit_columns(limits)}
    assert set(cells) <= set(DTYPES)
    assert cells["equivalent"] is True and cells["reason"] == "equivalence checked against the as-shipped model"
    assert cells["macs_analytic"] == 10 and cells["flops_agree"] is True
    assert cells["limit_s"] == pytest.approx(max(2 * 10 / 1e9, 100 / 1e9)) and cells["arithmetic_intensity"] == pytest.approx(0.2)
