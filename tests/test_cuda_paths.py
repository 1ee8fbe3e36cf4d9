"""The CUDA paths, checked on any machine: TF32 off and recorded, compile limits that fail loudly,
auto's guesses labelled, devices warmed once, and the environment a GPU run records."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import torch
import torch._dynamo.config as dynamo_config
import yaml
from click.testing import CliRunner

from condconv_bench import CondConv2d, DispatchTable, LayerSpec
from condconv_bench.run import runner
from condconv_bench.machine import environment
from condconv_bench.cli import main
from condconv_bench.machine.devices import use_exact_float32
from condconv_bench.cases.steps import dispatched
from condconv_bench.impls.compiled import Compiled
from condconv_bench.profiling.traces import _self_time_column
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.selection import CaseFilter

TINY = Path(__file__).parent / "data" / "valid" / "tiny.yaml"


def test_float32_on_cuda_turns_tf32_off_in_cudnn_and_cublas() -> None:
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
        assert use_exact_float32(torch.device("cpu")) is None
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32  # the CPU leaves them alone
        assert use_exact_float32(torch.device("cuda")) is False
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_compiled_raises_the_recompile_limits_and_fails_on_a_hit() -> None:
    Compiled(LayerSpec("conv2d", 4, 4))
    assert dynamo_config.recompile_limit >= 4096 and dynamo_config.accumulated_recompile_limit >= 4096
    assert dynamo_config.fail_on_recompile_limit_hit is True


def test_a_compiling_implementation_that_runs_eager_is_an_error_row(tmp_path: Path) -> None:
    data = yaml.safe_load(TINY.read_text())
    data.update(devices=["cpu"], batch_sizes=[1], impls=["static", "fake_impls:CompilesNothing"],
                layers=[{"name": "pw", "in_channels": 4, "out_channels": 8, "input_size": 5}])
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump(data))
    frame = run_suite(suite, tmp_path / "run").run.results().set_index("impl")
    row = frame.loc["fake_impls:CompilesNothing"]
    assert row["status"] == "error" and row["compiled_graphs"] == 0
    assert row["reason"].startswith("CompileFellBackError: torch.compile built no graph")
    assert frame.loc["static", "status"] == "ok"


def _gpu_check_runs() -> list[list[str]]:
    """The `condconv-bench run` arguments of each step of `.ci/gpu`, its shell variables left as they are."""
    script = (Path(__file__).parent.parent / ".ci" / "gpu").read_text().replace("\\\n", " ")
    steps = [shlex.split(line)[3:] for line in script.splitlines() if line.startswith("step ")]
    return [words[2:] for words in steps if words[:2] == ["condconv-bench", "run"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the GPU check runs them for real")
def test_the_gpu_checks_runs_name_what_their_suites_have(tmp_path: Path, monkeypatch) -> None:
    """Every filter a step of `.ci/gpu` passes is checked against its suite before the device, so on
    a machine without a GPU the missing GPU is each run's only error: a renamed layer or a strategy
    missing from a suite shows here, not on a GPU lent for minutes."""
    monkeypatch.chdir(tmp_path)
    runs = _gpu_check_runs()
    assert len(runs) >= 2 and all("--device" in args for args in runs)
    for args in runs:
        result = CliRunner().invoke(main, ["run", *args])
        assert (result.exit_code, result.stderr.strip()) == (2, "error: --device cuda: CUDA is not available on this machine"), args


def test_auto_marks_a_choice_no_measurement_backed() -> None:
    layer = CondConv2d(8, 16, kernel_size=1, num_experts=4, dispatch_table=DispatchTable([], "empty"))
    layer(torch.randn(2, 8, 5, 5))
    assert layer.last_guessed and dispatched(layer) == "batched_matmul (rule of thumb)"
    measured = CondConv2d(8, 16, kernel_size=1, num_experts=4)  # the shipped CPU table covers cpu/float32
    measured(torch.randn(2, 8, 5, 5))
    assert not measured.last_guessed and "rule of thumb" not in dispatched(measured)


def test_each_device_and_dtype_is_warmed_once_before_its_first_case(tmp_path: Path, monkeypatch) -> None:
    warmed = []
    monkeypatch.setattr(runner, "warm_up_device", lambda device, dtype: warmed.append((device.type, dtype)))
    run_suite(TINY, tmp_path / "run", case_filter=CaseFilter(layers=("pw", "fc")))
    assert warmed == [("cpu", torch.float32)]  # the CUDA groups are skipped here, so nothing warms them


def test_gpu_state_reads_nvidia_smi_and_is_empty_without_it(monkeypatch) -> None:
    line = "NVIDIA H100 80GB HBM3, 550.54.15, 1980 MHz, 1980 MHz, 2619 MHz, 700.00 W, Disabled\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, stdout=line))
    (state,) = environment.gpu_state()
    assert state["driver_version"] == "550.54.15" and state["power.limit"] == "700.00 W" and state["mig.mode.current"] == "Disabled"

    def absent(*args, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(subprocess, "run", absent)
    assert environment.gpu_state() == []
    settings = environment.cuda_math_settings()
    assert {"tf32_cudnn", "tf32_matmul", "cudnn_benchmark", "cudnn_deterministic"} <= set(settings)


def test_a_mixed_run_is_labelled_by_both_devices() -> None:
    env = {"gpus": ["NVIDIA H100"], "cpu_model": "EPYC", "cpu_count": 16, "torch": "2.13.0"}
    assert environment.hardware_label(env, {"cuda"}) == "NVIDIA H100 / torch 2.13.0"
    assert environment.hardware_label(env, {"cpu"}) == "EPYC ×16 / torch 2.13.0"
    assert environment.hardware_label(env, {"cpu", "cuda"}) == "NVIDIA H100 + EPYC ×16 / torch 2.13.0"


def test_profile_reads_the_device_time_column_this_torch_has() -> None:
    assert _self_time_column(torch.device("cpu")) == "self_cpu_time_total"
    assert _self_time_column(torch.device("cuda")) in {"self_device_time_total", "self_cuda_time_total"}
