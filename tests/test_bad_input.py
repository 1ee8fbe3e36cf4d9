"""Bad input never costs a run: damaged files lose only their bad rows, outputs appear whole,
cases that cannot fit in memory are skipped, and no generated input produces a traceback."""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import warnings
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from condconv_bench import atomic
from condconv_bench.gate.snapshot import load_snapshot, save_baseline
from condconv_bench.cli import main
from condconv_bench.dispatch.table import DispatchTable
from condconv_bench.cases.memory_estimate import estimated_bytes
from condconv_bench.run.columns import DTYPES
from condconv_bench.run.directory import RunDirectory, load_results
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.selection import CaseFilter
from condconv_bench.set_aside import RowSetAside
from condconv_bench.suite.loader import load_suite

DATA = Path(__file__).parent / "data"
TINY = DATA / "valid" / "tiny.yaml"
SHIPPED_TABLE = Path(__file__).parent.parent / "condconv_bench" / "dispatch_tables" / "cpu.json"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> Path:
    """A real run of the tiny suite's CPU cases, and a baseline made from it beside it."""
    out = tmp_path_factory.mktemp("bad-input") / "run"
    run_suite(TINY, out, case_filter=CaseFilter(devices=("cpu",)))
    save_baseline([out], out.parent / "baseline.json")
    return out


def _copy(run: Path, into: Path) -> Path:
    return Path(shutil.copytree(run, into / "run", ignore=shutil.ignore_patterns(".lock")))


def _finished_without_traceback(result: Result, allowed: tuple[int, ...]) -> None:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code in allowed, (result.exit_code, result.output)


def test_a_bad_row_costs_that_row_only(small_run: Path, tmp_path: Path) -> None:
    run = _copy(small_run, tmp_path)
    with (run / "results.csv").open(newline="") as handle:
        rows = list(csv.reader(handle))
    rows[3][list(DTYPES).index("batch_size")] = "99999999999999999999"  # beyond 64 bits
    with (run / "results.csv").open("w", newline="") as handle:
        csv.writer(handle, lineterminator="\n").writerows(rows)
    with pytest.warns(RowSetAside, match=r"results.csv: line 4 set aside \(column batch_size: beyond a 64-bit integer"):
        frame = load_results(run)
    assert len(frame) == len(rows) - 2
    assert frame["batch_size"].dtype == "Int64"

    result = CliRunner().invoke(main, ["report", str(run), "--format", "markdown"])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning:") == 1 and "line 4 set aside" in result.stderr


def test_a_bad_samples_line_costs_that_case_only(small_run: Path, tmp_path: Path) -> None:
    run = _copy(small_run, tmp_path)
    lines = (run / "samples.jsonl").read_text().splitlines(keepends=True)
    lines[0] = lines[0].replace('"times_s": [', '"times_s": ["fast", ')
    (run / "samples.jsonl").write_bytes("".join(lines).encode() + b'\xff\xfe{"case_id": \n')
    with pytest.warns(RowSetAside) as caught:
        samples = RunDirectory.open(run).samples()
    assert [str(w.message).split(": ", 1)[1].split(" set aside")[0] for w in caught] == ["line 1", f"line {len(lines) + 1}"]
    assert len(samples) == len(lines) - 1


def test_a_bad_baseline_entry_costs_that_case_only(small_run: Path, tmp_path: Path) -> None:
    document = json.loads((small_run.parent / "baseline.json").read_text())
    broken_id = sorted(document["cases"])[2]
    document["cases"][broken_id]["samples_s"] = ["fast"]
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(document))
    with pytest.warns(RowSetAside, match=rf"case {broken_id} set aside \(samples_s.0: "):
        snapshot = load_snapshot(path)
    assert set(snapshot.cases) == set(document["cases"]) - {broken_id}


def test_a_bad_dispatch_entry_costs_that_entry_only(tmp_path: Path) -> None:
    document = json.loads(SHIPPED_TABLE.read_text())
    document["entries"][1]["batch_size"] = "8"
    document["entries"][2] = [1, 2]
    del document["entries"][3]["strategy"]
    path = tmp_path / "table.json"
    path.write_text(json.dumps(document))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = DispatchTable.load(path)
    assert [str(w.message) for w in caught] == [
        f"{path}: entries[1] set aside (batch_size: '8' is not int)",
        f"{path}: entries[2] set aside (not a JSON object)",
        f"{path}: entries[3] set aside (fields missing ['strategy'])",
    ]
    assert len(table.entries) == len(document["entries"]) - 3


def test_an_interrupted_write_leaves_the_old_file_whole(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "report.md"
    atomic.write_text_atomically(target, "old report\n")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        atomic.write_text_atomically(target, "new report, cut short\n")
    assert target.read_text() == "old report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_the_memory_estimate_bounds_every_measured_peak(small_run: Path) -> None:
    cases = {case.id: case for case in load_suite(TINY).cases()}
    ok = load_results(small_run).query("status == 'ok'")
    assert len(ok) > 10
    for row in ok.itertuples():
        assert estimated_bytes(cases[row.case_id]) > row.peak_memory_bytes, row.case_id


def test_a_case_that_cannot_fit_is_skipped_with_its_estimate(tmp_path: Path) -> None:
    suite = {
        "name": "too-big", "impls": ["static"], "batch_sizes": [1, 2**24], "devices": ["cpu"], "threads": [1],
        "timing": {"processes": 1, "rounds": 2, "block_time": 0.001, "warmup": 0, "budget": 0.1},
        "layers": [{"name": "wide", "in_channels": 256, "out_channels": 256, "input_size": 16, "experts": 8}],
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    run_suite(path, tmp_path / "run")
    rows = load_results(tmp_path / "run").set_index("batch_size")
    assert rows.loc[1, "status"] == "ok"
    assert rows.loc[2**24, "status"] == "skipped"
    assert rows.loc[2**24, "reason"].startswith("needs about ") and "GiB available on cpu" in rows.loc[2**24, "reason"]


# Generated inputs: whatever they are, the commands answer with an exit code, never a traceback.

_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
_DOCUMENTS = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)
_SUITE_KEYS = ["name", "impls", "batch_sizes", "devices", "threads", "dtypes", "modes", "timing", "layers", "layer_defaults", "gate"]
_LAYER_KEYS = ["name", "kind", "in_channels", "out_channels", "kernel_size", "stride", "padding", "groups", "input_size", "experts", "bias"]


@st.composite
def _suite_documents(draw: st.DrawFn) -> str:
    """The tiny suite with a few of its fields (top-level or a layer's) replaced by anything."""
    suite = yaml.safe_load(TINY.read_text())
    suite["devices"] = ["cpu"]
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.booleans()):
            suite[draw(st.sampled_from(_SUITE_KEYS))] = draw(_DOCUMENTS)
        elif isinstance(suite.get("layers"), list) and suite["layers"] and isinstance(suite["layers"][0], dict):
            suite["layers"][0][draw(st.sampled_from(_LAYER_KEYS))] = draw(_DOCUMENTS)
    return yaml.safe_dump(suite, allow_unicode=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=_suite_documents() | _DOCUMENTS.map(yaml.safe_dump), junk=st.binary(max_size=64), as_bytes=st.booleans())
def test_generated_suites_are_validated_or_refused_in_one_line(text: str, junk: bytes, as_bytes: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "suite.yaml"
        path.write_bytes(junk + text.encode() if as_bytes else text.encode())
        result = CliRunner().invoke(main, ["validate", str(path)])
    _finished_without_traceback(result, (0, 2))
    if result.exit_code == 2:
        assert result.stderr.startswith("error: ") and "Traceback" not in result.output


_RUN_FILES = ["results.csv", "samples.jsonl", "run.json"]


@st.composite
def _damage(draw: st.DrawFn) -> list[tuple[str, str, int, bytes]]:
    """A few edits to a run directory's files: overwrite, insert or cut at a position."""
    return draw(st.lists(st.tuples(
        st.sampled_from(_RUN_FILES), st.sampled_from(["overwrite", "insert", "cut"]),
        st.integers(0, 10**6), st.binary(min_size=1, max_size=24) | st.sampled_from([b",", b"\n", b'"', b"nan", b"-1", b"1e400", b"99999999999999999999"]),
    ), min_size=1, max_size=3))


def _apply(run: Path, edits: list[tuple[str, str, int, bytes]]) -> None:
    for name, how, where, data in edits:
        content = (run / name).read_bytes()
        at = where % (len(content) + 1)
        content = {
            "overwrite": content[:at] + data + content[at + len(data):],
            "insert": content[:at] + data + content[at:],
            "cut": content[:at],
        }[how]
        (run / name).write_bytes(content)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(edits=_damage())
def test_damaged_run_directories_never_end_in_a_traceback(small_run: Path, edits) -> None:
    baseline = small_run.parent / "baseline.json"
    with tempfile.TemporaryDirectory() as folder:
        run = _copy(small_run, Path(folder))
        _apply(run, edits)
        runner = CliRunner()
        _finished_without_traceback(runner.invoke(main, ["report", str(run), "--format", "markdown"]), (0, 2))
        _finished_without_traceback(runner.invoke(main, ["gate", "baseline", str(run), "--baseline", str(baseline), "--no-latency"]), (0, 1, 2))
        _finished_without_traceback(runner.invoke(main, ["baseline", "save", str(run), "-o", str(Path(folder) / "b.json")]), (0, 2))
        _finished_without_traceback(runner.invoke(main, ["compare", str(baseline), str(run)]), (0, 1, 2))

