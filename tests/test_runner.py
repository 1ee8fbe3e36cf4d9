from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from condconv_bench.errors import CondConvBenchError, ResultsError
from condconv_bench.run.columns import COLUMNS, DTYPES, SCHEMA_VERSION, header
from condconv_bench.run.directory import RunDirectory, load_results
from condconv_bench.run.lock import writer_lock
from condconv_bench.run.merge import merge_runs
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.selection import CaseFilter, Shard
from condconv_bench.suite.loader import load_suite

DATA = Path(__file__).parent / "data"
TINY = DATA / "valid" / "tiny.yaml"
HUNDRED_MIB = 100 * 2**20
LIMIT_COLUMNS = [column.name for column in COLUMNS if column.topic == "limits"]
SENTINEL_COLUMNS = ["sentinel", "sentinel_best_s", "sentinel_median_s", "vs_sentinel"]
LIMIT_COLUMNS_ALWAYS = [column for column in LIMIT_COLUMNS if column not in SENTINEL_COLUMNS]


def suite_with(tmp_path: Path, **changes) -> Path:
    data = yaml.safe_load(TINY.read_text())
    data.update(changes)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    run_suite(TINY, out)
    return load_results(out)


def test_every_case_has_a_row_with_real_figures(tiny_run: pd.DataFrame) -> None:
    suite = load_suite(TINY)
    assert sorted(tiny_run["case_id"]) == sorted(c.id for c in suite.cases())
    ok = tiny_run[tiny_run["status"] == "ok"]
    assert set(ok["device"]) == ({"cpu", "cuda"} if torch.cuda.is_available() else {"cpu"})
    for column in ("latency_median_s", "latency_iqr_s", "macs_fvcore", "flops_torch", "macs_analytic", "peak_memory_bytes"):
        assert ok[column].notna().all(), column
        assert (ok[column] >= 0).all(), column
    assert (ok["latency_median_s"] > 0).all() and (ok["peak_memory_bytes"] > 0).all()
    assert (ok["flops_torch"] == 2 * ok["macs_analytic"]).all()
    assert ok["flops_agree"].all()
    condconv = ok[ok["impl"] != "static"]
    assert condconv["equivalent"].all() and (condconv["max_rel_error"] < 1e-4).all()
    assert ok[ok["impl"] == "static"]["equivalent"].isna().all()
    assert set(ok["threads"]) == {1}


def test_absent_device_is_skipped_with_reason(tiny_run: pd.DataFrame) -> None:
    cuda = tiny_run[tiny_run["device"] == "cuda"]
    if not cuda.empty and cuda["status"].eq("ok").all():
        pytest.skip("this machine has CUDA")
    assert (cuda["status"] == "skipped").all()
    assert cuda["reason"].str.contains("CUDA is not available").all()


def test_raw_samples_are_kept(tiny_run: pd.DataFrame, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_suite(TINY, out, case_filter=CaseFilter(layers=("pw",), devices=()))
    run = RunDirectory.open(out)
    samples = run.samples()
    ok = run.results().query("status == 'ok'")
    assert set(samples) == set(ok["case_id"])
    for _, row in ok.iterrows():
        timing = samples[row["case_id"]]
        assert len(timing.times_s) == row["n_measurements"]
        assert timing.median_s == pytest.approx(row["latency_median_s"])


def test_run_json_describes_the_environment(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_suite(TINY, out, case_filter=CaseFilter(layers=("fc",)))
    meta = json.loads((out / "run.json").read_text())
    assert meta["schema_version"] == SCHEMA_VERSION
    assert meta["suite"]["sha256"] == load_suite(TINY).sha256
    env = meta["environment"]
    for key in ("torch", "cuda", "cudnn", "cpu_model", "gpus", "torch_threads", "git_commit", "python"):
        assert key in env
    assert meta["finished_at"]


def test_known_allocation_is_measured_within_ten_percent(tmp_path: Path) -> None:
    path = suite_with(
        tmp_path, impls=["fake_impls:AllocatesHundredMB"], devices=["cpu"], batch_sizes=[1],
        layers=[{"name": "pw", "in_channels": 4, "out_channels": 4, "input_size": 4}],
    )
    frame = run_suite(path, tmp_path / "run").run.results()
    peak = int(frame["peak_memory_bytes"].iloc[0])
    assert HUNDRED_MIB <= peak <= 1.1 * HUNDRED_MIB


def test_failing_case_is_recorded_and_the_suite_goes_on(tmp_path: Path) -> None:
    path = suite_with(tmp_path, impls=["fake_impls:Crashes", "grouped_conv", "fake_impls:WrongExpertOrder"], devices=["cpu"])
    outcome = run_suite(path, tmp_path / "run")
    frame = outcome.run.results()
    crashed = frame[frame["impl"] == "fake_impls:Crashes"]
    assert (crashed["status"] == "error").all()
    assert crashed["reason"].str.fullmatch("RuntimeError: planted failure").all()
    assert (frame[frame["impl"] == "grouped_conv"]["status"] == "ok").all()
    wrong = frame[frame["impl"] == "fake_impls:WrongExpertOrder"]
    assert (wrong["status"] == "ok").all() and not wrong["equivalent"].any()
    assert len(outcome.equivalence_failures) == len(wrong)


def test_shards_partition_the_suite_and_merge(tmp_path: Path) -> None:
    suite = load_suite(TINY)
    filters = CaseFilter(devices=("cpu",))
    parts = [tmp_path / f"shard{i}" for i in (1, 2)]
    for index, part in enumerate(parts, start=1):
        run_suite(suite, part, shard=Shard(index, 2), case_filter=filters)
    frames = [load_results(p) for p in parts]
    assert all(len(f) for f in frames)
    assert not set(frames[0]["case_id"]) & set(frames[1]["case_id"])
    for frame in frames:  # whole groups per shard: static sits with its peers
        for _, group in frame.groupby(["layer", "batch_size", "mode"]):
            assert "static" in set(group["impl"])
    merged = merge_runs(parts, tmp_path / "merged")
    expected = {c.id for c in filters.apply(suite.cases(), suite)}
    assert set(merged.results()["case_id"]) == expected
    assert len(merged.results()) == len(expected)
    assert len(merged.samples()) == sum(len(RunDirectory(p).samples()) for p in parts)


def test_merge_refuses_different_suites_and_overlaps(tmp_path: Path) -> None:
    run_suite(TINY, tmp_path / "a", case_filter=CaseFilter(layers=("fc",), devices=("cpu",)))
    run_suite(suite_with(tmp_path, batch_sizes=[3]), tmp_path / "b", case_filter=CaseFilter(layers=("fc",), devices=("cpu",)))
    with pytest.raises(ResultsError, match="different suites"):
        merge_runs([tmp_path / "a", tmp_path / "b"], tmp_path / "m1")
    with pytest.raises(ResultsError, match="shards must not overlap"):
        merge_runs([tmp_path / "a", tmp_path / "a"], tmp_path / "m2")


def test_filters_name_unknown_values_and_absent_devices() -> None:
    suite = load_suite(TINY)
    with pytest.raises(CondConvBenchError, match="--layer nope: not in"):
        CaseFilter(layers=("nope",)).apply(suite.cases(), suite)
    if not __import__("torch").cuda.is_available():
        with pytest.raises(CondConvBenchError, match="--device cuda: CUDA is not available"):
            CaseFilter(devices=("cuda",)).apply(suite.cases(), suite)


def test_existing_run_is_not_overwritten(tmp_path: Path) -> None:
    run_suite(TINY, tmp_path / "run", case_filter=CaseFilter(layers=("fc",), devices=("cpu",)))
    with pytest.raises(ResultsError, match="pass --resume"):
        run_suite(TINY, tmp_path / "run", case_filter=CaseFilter(layers=("fc",), devices=("cpu",)))


def test_two_runs_cannot_write_one_directory(tmp_path: Path) -> None:
    with writer_lock(tmp_path / "run"):
        with pytest.raises(ResultsError, match="another condconv-bench run is writing this directory"):
            run_suite(TINY, tmp_path / "run", case_filter=CaseFilter(layers=("fc",), devices=("cpu",)))
    assert not (tmp_path / "run" / "results.csv").exists()


def test_resume_refuses_a_changed_suite(tmp_path: Path) -> None:
    run_suite(TINY, tmp_path / "run", case_filter=CaseFilter(layers=("fc",), devices=("cpu",)))
    changed = suite_with(tmp_path, batch_sizes=[1])
    with pytest.raises(ResultsError, match="different version"):
        run_suite(changed, tmp_path / "run", resume=True)


def test_half_written_row_is_dropped_on_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_suite(TINY, out, case_filter=CaseFilter(layers=("fc",), devices=("cpu",)))
    complete = load_results(out)
    last = complete["case_id"].iloc[-1]
    text = (out / "results.csv").read_text().splitlines(keepends=True)
    (out / "results.csv").write_text("".join(text[:-1]) + text[-1][:25])  # a crash mid-write
    assert last not in set(load_results(out)["case_id"])
    run_suite(TINY, out, resume=True, case_filter=CaseFilter(layers=("fc",), devices=("cpu",)))
    again = load_results(out)
    assert sorted(again["case_id"]) == sorted(complete["case_id"])


@pytest.mark.slow
def test_kill_9_then_resume_gives_every_case_exactly_once(tmp_path: Path) -> None:
    # Two sweeps of four groups (12 rows each): each sweep's end re-measures the real ceilings in this subprocess.
    path = suite_with(tmp_path, devices=["cpu"], batch_sizes=[1, 2], timing={"processes": 1, "rounds": 3, "block_time": 0.002, "warmup": 1, "budget": 0.2, "sweep_groups": 4})
    out = tmp_path / "run"
    command = [sys.executable, "-m", "condconv_bench", "run", str(path), "-o", str(out), "-q"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = out / "results.csv"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if results.exists() and len(results.read_text().splitlines()) > 6:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done_before = len(load_results(out))
    total = len(load_suite(path).cases())
    assert 5 <= done_before < total
    finished = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    frame = load_results(out)
    assert len(frame) == total and frame["case_id"].is_unique
    assert f"{done_before} already done" in finished.stdout


def test_every_probe_fills_its_columns(tiny_run: pd.DataFrame) -> None:
    """The row is composed from the probes' typed results; a probe that stops filling a column shows here."""
    on_cpu = tiny_run[(tiny_run["status"] == "ok") & (tiny_run["device"] == "cpu")]
    # Empty by design for these cases: no error or skip reason, no dispatcher, TF32 only on CUDA,
    # no FLOP disagreement; fvcore names the routing's elementwise ops it skips only where there is
    # routing; a linear layer has no image size; eager cases export nothing (tests/test_runtimes.py
    # checks the export columns of runtime cases).
    may_be_empty = {"reason", "dispatched", "probed_dispatch", "tf32", "flops_problems", "fvcore_uncounted_ops", "input_size",
                    "export", "export_reason", "export_ops", "export_s"}
    assert on_cpu["sentinel"].notna().any()
    for impl, rows in on_cpu.groupby("impl"):
        empty = {column for column in DTYPES if column not in LIMIT_COLUMNS and rows[column].isna().any()} - may_be_empty
        # Limits model a layer's forward pass: every inference row has them, no training row does.
        inference = rows["mode"] == "inference"
        assert rows.loc[inference, LIMIT_COLUMNS_ALWAYS].notna().all().all(), impl
        assert rows.loc[~inference, LIMIT_COLUMNS].isna().all().all(), impl
        # A group times the dense peak's sentinel where the dense peak bound its CondConv limit when the sweep began.
        paired = rows["sentinel"].notna()
        assert rows.loc[paired, SENTINEL_COLUMNS].notna().all().all() and (rows.loc[paired, "sentinel"] == "dense").all(), impl
        if impl == "static":  # the floor is not CondConv: no equivalence check, no ratio to itself
            assert empty == {"equivalent", "max_abs_error", "max_rel_error", "tolerance", "worst_tensor",
                             "tied_fastest", "vs_best", "vs_best_ci_high", "vs_best_ci_low", "vs_floor",
                             "vs_floor_ci_high", "vs_floor_ci_low"}, impl
        else:
            assert empty == set(), (impl, empty)


def test_result_columns_include_the_documented_ones() -> None:
    required = "impl layer batch_size device dtype mode threads status latency_median_s latency_iqr_s macs_fvcore flops_torch macs_analytic peak_memory_bytes max_rel_error equivalent"
    assert set(required.split()) <= set(DTYPES)


def test_corrupt_run_json_is_a_results_error(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_suite(TINY, out, case_filter=CaseFilter(layers=("fc",), devices=("cpu",)))
    (out / "run.json").write_text("{not json")
    with pytest.raises(ResultsError, match="run.json: not valid JSON"):
        load_results(out)


def test_a_version_4_run_directory_loads_without_the_probed_choice_and_gates(tmp_path) -> None:
    from condconv_bench.gate.snapshot import load_snapshot

    data = yaml.safe_load(TINY.read_text())
    data["impls"] = ["static", "auto"]
    suite = tmp_path / "s.yaml"
    suite.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    run_suite(suite, out, case_filter=CaseFilter(layers=("pw",), batch_sizes=(1,), devices=("cpu",)))
    assert load_results(out)["probed_dispatch"].notna().any()
    frame = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    frame[header(4)].to_csv(out / "results.csv", index=False)
    metadata = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**metadata, "schema_version": 4}))
    rows = load_results(out)
    assert (rows["status"] == "ok").all() and rows["probed_dispatch"].isna().all()
    assert all(figures.probed_dispatch is None for figures in load_snapshot(out).cases.values())
