from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from condconv_bench.cli import main
from condconv_bench.run.directory import RunDirectory

DATA = Path(__file__).parent / "data"
TINY = DATA / "valid" / "tiny.yaml"


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_list_shows_the_six_builtins_and_suites() -> None:
    result = invoke("list")
    assert result.exit_code == 0
    for key in ("per_sample_loop", "grouped_conv", "batched_matmul", "naive_moe", "compiled", "static"):
        assert f"  {key} " in result.output
    assert "[available]" in result.output
    assert "smoke" in result.output and "mobile" in result.output


def test_run_writes_results_and_prints_a_summary(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = invoke("run", str(TINY), "-o", str(out), "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    assert (out / "results.csv").exists() and (out / "run.json").exists()
    assert "fastest" in result.stdout and "vs floor" in result.stdout
    assert "cases:" in result.stdout


def test_a_run_logged_to_a_file_prints_a_line_per_group_and_sweep(tmp_path: Path) -> None:
    result = invoke("run", str(TINY), "-o", str(tmp_path / "run"), "--device", "cpu", "--layer", "pw", "--no-report")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    probing = [line for line in lines if ": probing case " in line]
    groups = len(RunDirectory.open(tmp_path / "run").results().groupby(["layer", "batch_size", "mode"]))
    # each line starts with the run's elapsed seconds (0 on a fast machine; the ceilings come first)
    assert len(probing) == groups and re.match(r"\[\d+s\] ", probing[0]) and "probing case 1/" in probing[0]
    assert "probes left about" in probing[-1]
    timing = next(i for i, line in enumerate(lines) if ": timing " in line)
    assert " groups in the worker processes (" in lines[timing] and ": timed in " in lines[timing + 1]
    assert lines[-1].endswith(" cases done") and "[" in lines[-1]


def test_equivalence_failure_exits_1(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["impls"] = ["static", "fake_impls:WrongExpertOrder"]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    result = invoke("run", str(path), "-o", str(tmp_path / "run"), "--device", "cpu", "-q", "--layer", "pw")
    assert result.exit_code == 1
    assert "equivalence failure: pw/fake_impls:WrongExpertOrder" in result.stderr


def test_error_rows_exit_1_only_with_strict(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data["impls"] = ["static", "fake_impls:Crashes"]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    lenient = invoke("run", str(path), "-o", str(tmp_path / "a"), "--device", "cpu", "-q", "--layer", "fc")
    assert lenient.exit_code == 0 and "error row:" in lenient.stderr
    strict = invoke("run", str(path), "-o", str(tmp_path / "b"), "--device", "cpu", "-q", "--layer", "fc", "--strict")
    assert strict.exit_code == 1


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["run", "no/such/suite.yaml"], "no/such/suite.yaml: cannot read suite file"),
        (["run", str(TINY), "--impl", "nope", "-q"], "--impl nope: not in"),
        (["run", str(TINY), "--shard", "3/2", "-q"], "--shard '3/2'"),
        (["run", str(TINY), "--resume", "-q"], "--resume needs -o/--output"),
        (["merge", "/nonexistent/run", "-o", "/tmp/x"], "run.json: missing"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], fragment: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], lines
    assert "Traceback" not in result.output


def test_unavailable_device_on_the_command_line_exits_2() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("run", str(TINY), "--device", "cuda", "-q")
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --device cuda: CUDA is not available on this machine"


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def test_ctrl_c_keeps_the_run_and_says_how_to_resume(tmp_path) -> None:
    out = tmp_path / "run"
    # tiny.yaml can finish within the second this test waits: its rounds and budget are raised so
    # that the interrupt always lands mid-run (this copy would time for minutes).
    suite = tmp_path / "long.yaml"
    suite.write_text(TINY.read_text().replace("rounds: 2, block_time: 0.001, warmup: 0, budget: 0.1", "rounds: 1000, block_time: 0.001, warmup: 0, budget: 60, precision: 0.0001"))
    assert "budget: 60" in suite.read_text()
    command = [sys.executable, "-m", "condconv_bench", "run", str(suite), "-o", str(out), "-q", "--no-report"]
    # A test runner started in the background may pass SIGINT on ignored or blocked (a CI run here
    # saw the run finish untouched), and Python then installs no KeyboardInterrupt handler; the run
    # gets the disposition a run started from a terminal has.
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (out / "run.json").exists():
        time.sleep(0.05)
    time.sleep(1.0)  # into the probes and timings
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: interrupted: the finished cases are in {out}; continue with: condconv-bench run {suite} -o {out} --resume"
    )
    assert RunDirectory.open(out).results() is not None  # still a readable run directory


def test_the_gates_options_show_the_settings_defaults() -> None:
    from dataclasses import asdict

    from condconv_bench.cli.gates import gate
    from condconv_bench.settings import ABSettings, GateSettings

    ab = {p.name: p.default for p in gate.commands["ab"].params}
    assert {name: ab[name] for name in asdict(ABSettings())} == asdict(ABSettings())
    helps = {p.name: p.help for p in gate.commands["baseline"].params}
    defaults = GateSettings()
    assert helps["time_threshold"].endswith(f"else {defaults.time_threshold:g}].")
    assert helps["alpha"].endswith(f"else {defaults.alpha:g}].")


def test_progress_lines_estimate_what_is_left_over_the_cases_this_machine_runs(monkeypatch, capsys) -> None:
    import torch

    from condconv_bench.cli import progress
    from condconv_bench.suite.loader import load_suite

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA: the CUDA cases are the ones skipped in no time")
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    cases = [case for case in load_suite(TINY).cases() if case.layer == "pw"][:2]
    cuda = [case.__class__(**{**case.__dict__, "device": "cuda"}) for case in cases]
    lines = progress.ProgressLines("tiny")
    lines.run_started(cases + cuda)
    for index, case in enumerate(cases + cuda, start=1):
        lines.group = None  # every case its own group here, so each gets a line
        lines.case_started(index, 4, case)
        now[0] += 1.0 if case.device == "cpu" else 0.0
    said = capsys.readouterr().err.splitlines()
    # a second per cpu probe: after the first, one cpu case is left (1 s); the cuda cases add nothing and say nothing
    assert len(said) == 2 and "probes left about 1s" in said[1], said
