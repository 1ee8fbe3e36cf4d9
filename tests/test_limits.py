"""The traffic model against real allocations, the limit function, and limits in a run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from condconv_bench.errors import ResultsError
from condconv_bench.core.flops import AnalyticMacs, compulsory_macs
from condconv_bench.core.limits import CaseWork, Ceilings, Work, case_limits, limit, memory_seconds
from condconv_bench.machine import ceilings
from condconv_bench.machine.ceilings import best_ceilings, fastest_sentinels, memory_bandwidths
from condconv_bench.core.registry import get_impl
from condconv_bench.run.columns import COLUMNS, header
from condconv_bench.run.directory import load_results
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.selection import CaseFilter
from condconv_bench.core.spec import LayerSpec
from condconv_bench.core.traffic import Traffic, compulsory_traffic

MOBILE = Path(__file__).parent.parent / "suites" / "mobile.yaml"
STRATEGIES = ["static", "grouped_conv", "batched_matmul", "workspace_matmul", "pixel_major_matmul", "chunked_matmul",
              "per_sample_loop", "naive_moe", "stacked_moe", "input_scaled_moe"]
SHAPES = {
    "pointwise": (LayerSpec("conv2d", 16, 32, 4), (6, 6)),
    "pointwise_s2": (LayerSpec("conv2d", 16, 32, 4, stride=2), (7, 7)),
    "k3_bias": (LayerSpec("conv2d", 16, 32, 4, kernel_size=3, padding=1, bias=True), (6, 6)),
    "grouped_k3": (LayerSpec("conv2d", 16, 32, 4, kernel_size=3, padding=1, groups=2), (5, 5)),
    "depthwise_k5_bias": (LayerSpec("conv2d", 32, 32, 4, kernel_size=5, padding=2, groups=32, bias=True), (7, 7)),
    "linear_bias": (LayerSpec("linear", 64, 48, 4, bias=True), (1, 1)),
}


class Allocations(TorchDispatchMode):
    """Bytes of every tensor an op returns in fresh storage (not a view of, or written into, an input)."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in given:
                self.sizes.append((str(func), tensor.untyped_storage().nbytes()))
        return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("impl", STRATEGIES)
def test_traffic_model_matches_what_a_forward_call_allocates(impl: str, shape: str) -> None:
    spec, input_size = SHAPES[shape]
    batch = 3
    module = get_impl(impl)(spec).eval()
    x = torch.randn(spec.input_shape(batch, input_size))
    with torch.inference_mode():
        module(x)  # builds cached expert layouts, which later calls only read
        recorder = Allocations()
        with recorder:
            module(x)
    allocated = sum(size for _, size in recorder.sizes)
    if module._workspace is not None:  # workspace_matmul writes its kernels into a buffer it keeps
        allocated += module._workspace[1].untyped_storage().nbytes()
    traffic = module.traffic(batch, input_size)
    assert traffic.moved == traffic.compulsory + 2 * traffic.intermediate
    # What the model says is written: the output and every intermediate. The routing's own small
    # tensors (pooled input, logits, weights) are not buffers of the model.
    routing_scratch = batch * (spec.in_channels + 2 * spec.num_experts) * 4
    assert abs(allocated - (traffic.output + traffic.intermediate)) <= routing_scratch, recorder.sizes


def test_compulsory_work_is_the_cheaper_exact_form_and_reads_every_expert() -> None:
    conv = LayerSpec("conv2d", 8, 16, 4)
    macs = compulsory_macs(conv, 2, (5, 5))
    assert (macs.routing, macs.mixing, macs.conv) == (2 * 8 * 4, 2 * 4 * 128, 2 * 25 * 128)
    linear = LayerSpec("linear", 8, 16, 4)  # one pixel: E products beat mixing B kernels
    assert compulsory_macs(linear, 2, (1, 1)) == AnalyticMacs(2 * 8 * 4, 0, 4 * 2 * 128)
    traffic = compulsory_traffic(conv, 2, (5, 5), 4)
    assert traffic.experts == 4 * 128 * 4 and traffic.input == 2 * 8 * 25 * 4 and traffic.output == 2 * 16 * 25 * 4
    assert traffic.moved == traffic.compulsory


CEILINGS = Ceilings(dense_flops_per_s=1e11, depthwise_flops_per_s=1e10, dram_bytes_per_s=1e10, llc_bytes_per_s=1e11, llc_bytes=1000)


def test_limit_is_the_larger_of_compute_and_memory_time() -> None:
    traffic = Traffic(input=100, output=100, experts=200, routing=0)
    compute_bound = limit(AnalyticMacs(0, 0, 10**6), traffic, traffic.compulsory, False, CEILINGS)
    assert compute_bound.seconds == pytest.approx(2e6 / 1e11) and compute_bound.bound == "compute"
    assert compute_bound.memory_level == "llc"
    memory_bound = limit(AnalyticMacs(0, 0, 1), traffic, traffic.compulsory, False, CEILINGS)
    assert memory_bound.seconds == pytest.approx(400 / 1e11) and memory_bound.bound == "memory"


def test_depthwise_convs_are_held_to_the_depthwise_peak() -> None:
    traffic = Traffic(input=1, output=1, experts=1, routing=0)
    macs = AnalyticMacs(routing=10, mixing=90, conv=1000)
    depthwise = limit(macs, traffic, traffic.compulsory, True, CEILINGS)
    assert depthwise.compute_s == pytest.approx(2000 / 1e10 + 200 / 1e11)
    assert limit(macs, traffic, traffic.compulsory, False, CEILINGS).compute_s == pytest.approx(2200 / 1e11)


@pytest.mark.parametrize(("macs", "moved", "depthwise", "ceiling"), [
    (10**6, 400, False, "dense"), (10**6, 400, True, "depthwise"), (1, 400, False, "llc"), (1, 3000, True, "dram")])
def test_a_limit_names_the_ceiling_it_is_drawn_from(macs, moved, depthwise, ceiling) -> None:
    """The sentinel a group's rounds time is that of this ceiling (`machine.ceilings`)."""
    traffic = Traffic(input=moved // 4, output=moved // 4, experts=moved // 2, routing=0)
    work = Work(AnalyticMacs(0, 0, macs), traffic)
    assert case_limits(CaseWork(work, work, depthwise), CEILINGS).binding_ceiling == ceiling


def test_a_sentinel_faster_than_its_ceiling_raises_that_ceiling_in_its_own_context() -> None:
    def sentinel(kind: str, per_s: float, dtype: str = "float32") -> dict:
        return {"device": "cpu", "dtype": dtype, "threads": 2, "sentinel": kind, "seconds": 1e-3, "per_s": per_s}

    metadata = {"matmul_peaks": [{"device": "cpu", "dtype": "float32", "threads": 2, "dense_flops_per_s": 1e11, "depthwise_flops_per_s": 1e10}],
                "memory_bandwidths": [{"device": "cpu", "threads": 2, "dram_bytes_per_s": 1e10, "llc_bytes_per_s": 1e11, "llc_bytes": 1000}],
                "sentinels": [sentinel("dense", 2e11), sentinel("llc", 5e10), sentinel("depthwise", 9e10, "bfloat16")]}
    assert Ceilings.from_metadata(metadata, "cpu", "float32", 2) == Ceilings(2e11, 1e10, 1e10, 1e11, 1000)


@pytest.mark.parametrize("kind", ceilings.SENTINELS)
def test_every_ceiling_has_a_sentinel_that_runs(kind) -> None:
    step = ceilings.sentinel_step(kind, torch.device("cpu"), torch.float32)
    assert torch.isfinite(step()).all()


def test_without_a_stream_curve_a_working_set_beyond_the_llc_streams_its_excess_from_dram() -> None:
    assert memory_seconds(800, 800, CEILINGS) == (pytest.approx(800 / 1e11), "llc")
    seconds, level = memory_seconds(3000, 1500, CEILINGS)  # 500 bytes cannot stay in a 1000-byte LLC
    assert level == "dram" and seconds == pytest.approx(500 / 1e10 + 2500 / 1e11)


# An LLC of 1000 bytes; re-read rates measured at 125 (the LLC buffer), 500, 1000, 2000 and 4000 (DRAM) bytes.
STREAM = ((125, 1e11), (500, 9e10), (1000, 4e10), (2000, 2e10), (4000, 1e10))


@pytest.mark.parametrize(("working_set", "rate", "level"), [
    (100, 1e11, "llc"), (400, 1e11, "llc"), (800, 9e10, "llc"), (1000, 4e10, "llc"), (1500, 4e10, "dram"),
    (3000, 2e10, "dram"), (10**6, 1e10, "dram")])
def test_a_working_set_is_re_read_at_the_rate_of_the_largest_measured_buffer_no_larger(working_set, rate, level) -> None:
    with_stream = Ceilings(1e11, 1e10, 1e10, 1e11, 1000, STREAM)
    assert memory_seconds(working_set, working_set, with_stream) == (pytest.approx(working_set / rate), level)
    seconds, _ = memory_seconds(working_set + 700, working_set, with_stream)  # bytes beyond the working set: LLC rate
    assert seconds == pytest.approx(working_set / rate + 700 / 1e11)


def test_the_stream_curve_is_read_from_run_json_with_the_llc_and_dram_buffers_as_its_ends() -> None:
    metadata = {"matmul_peaks": [{"device": "cpu", "dtype": "float32", "threads": 2, "dense_flops_per_s": 1e11, "depthwise_flops_per_s": 1e10}],
                "memory_bandwidths": [{"device": "cpu", "threads": 2, "dram_bytes_per_s": 1e10, "llc_bytes_per_s": 1e11,
                                       "llc_bytes": 1000, "llc_buffer_bytes": 125, "dram_buffer_bytes": 4000,
                                       "stream_bytes_per_s": [[2000, 2e10], [500, 9e10], [1000, 4e10]]}]}
    assert Ceilings.from_metadata(metadata, "cpu", "float32", 2).stream == STREAM
    del metadata["memory_bandwidths"][0]["stream_bytes_per_s"]  # a run before the curve: the two-level model
    assert Ceilings.from_metadata(metadata, "cpu", "float32", 2).stream == ()


def test_stream_curves_keep_the_best_rate_per_buffer_across_measurements() -> None:
    first = [{"device": "cpu", "threads": 2, "dram_bytes_per_s": 1e10, "stream_bytes_per_s": [[500, 9e10], [1000, 3e10]]}]
    later = [{"device": "cpu", "threads": 2, "dram_bytes_per_s": 1e10, "stream_bytes_per_s": [[500, 7e10], [1000, 4e10], [2000, 2e10]]}]
    assert best_ceilings(first, later)[0]["stream_bytes_per_s"] == [[500, 9e10], [1000, 4e10], [2000, 2e10]]


def _suite(tmp_path: Path, layers: list[dict], impls: list[str], batch_sizes: list[int], budget: float = 0.3) -> Path:
    data = {
        "name": "limits", "impls": impls, "batch_sizes": batch_sizes, "devices": ["cpu"], "threads": [1],
        "timing": {"processes": 1, "rounds": 4, "block_time": 0.002, "warmup": 1, "budget": budget}, "layers": layers,
    }
    path = tmp_path / "limits.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.timing
def test_a_strategy_that_copies_its_input_ten_times_moves_more_and_is_further_from_the_limit(tmp_path: Path) -> None:
    layer = {"name": "pw", "in_channels": 64, "out_channels": 64, "input_size": 28, "experts": 4}
    suite = _suite(tmp_path, [layer], ["static", "grouped_conv", "fake_impls:CopiesInputTenTimes"], [8])
    run_suite(suite, tmp_path / "run")
    rows = load_results(tmp_path / "run").set_index("impl")
    honest, planted = rows.loc["grouped_conv"], rows.loc["fake_impls:CopiesInputTenTimes"]
    input_bytes = 8 * 64 * 28 * 28 * 4
    assert planted["bytes_modelled"] - honest["bytes_modelled"] == 2 * 10 * input_bytes
    assert planted["limit_s"] == honest["limit_s"] and planted["bytes_compulsory"] == honest["bytes_compulsory"]
    assert planted["limit_own_s"] >= honest["limit_own_s"]  # higher only where memory binds its own work
    assert planted["vs_limit"] > 1.2 * honest["vs_limit"]
    assert planted["arithmetic_intensity"] < honest["arithmetic_intensity"]


def test_ceilings_keep_the_best_of_every_measurement_per_context() -> None:
    start = [{"device": "cpu", "dtype": "float32", "threads": 2, "flops_per_s": 1e11, "dense_flops_per_s": 2e11,
              "depthwise_flops_per_s": 8e10}]
    later = [{"device": "cpu", "dtype": "float32", "threads": 2, "flops_per_s": 3e11, "dense_flops_per_s": 1.8e11,
              "depthwise_flops_per_s": 9e10},
             {"device": "cpu", "dtype": "float32", "threads": 1, "flops_per_s": 5e10, "dense_flops_per_s": 1e11,
              "depthwise_flops_per_s": 4e10}]
    merged = {entry["threads"]: entry for entry in best_ceilings(start, later)}
    assert merged[2]["dense_flops_per_s"] == 2e11 and merged[2]["depthwise_flops_per_s"] == 9e10
    assert merged[2]["flops_per_s"] == 1e11  # the median matmul tells machines apart: kept as first measured
    assert merged[2]["measurements"] == 2 and merged[1]["measurements"] == 1
    again = best_ceilings(best_ceilings([], [{"device": "cpu", "threads": 1, "dram_bytes_per_s": 3e10}]),
                          [{"device": "cpu", "threads": 1, "dram_bytes_per_s": 4e10}])
    assert again == [{"device": "cpu", "threads": 1, "dram_bytes_per_s": 4e10, "measurements": 2}]



def test_each_sentinel_keeps_its_fastest_block_per_context() -> None:
    def entry(kind: str, seconds: float, threads: int = 2) -> dict:
        return {"device": "cpu", "dtype": "float32", "threads": threads, "sentinel": kind, "seconds": seconds, "per_s": 1 / seconds}

    merged = fastest_sentinels([entry("dram", 5e-3), entry("llc", 3e-5)], [entry("dram", 4e-3), entry("llc", 6e-5), entry("llc", 7e-5, 1)])
    assert sorted((e["sentinel"], e["threads"], e["seconds"]) for e in merged) == [("dram", 2, 4e-3), ("llc", 1, 7e-5), ("llc", 2, 3e-5)]
    assert ceilings.sentinel_best_seconds({"sentinels": merged}, "cpu", "float32", 2, "llc") == 3e-5
    assert ceilings.sentinel_best_seconds({"sentinels": merged}, "cpu", "float32", 2, "dense") is None


def test_a_run_reads_its_limits_from_the_best_ceilings_measured_before_and_after_its_sweep(tmp_path: Path, monkeypatch) -> None:
    """The run measures its ceilings at the start (three passes) and once more after the sweep's
    timing; here the machine is planted 4x faster by then, so every compute-bound limit is 4x lower
    than in a run that measured the same figure both times."""
    layer = {"name": "pw", "in_channels": 64, "out_channels": 64, "input_size": 28, "experts": 4}
    suite = _suite(tmp_path, [layer], ["static", "grouped_conv"], [8])
    run_suite(suite, tmp_path / "steady")
    calls = iter(range(100))
    monkeypatch.setattr(ceilings, "dense_peak_flops", lambda device, dtype, threads: 1e11 if next(calls) < ceilings.CEILING_PASSES else 4e11)
    run_suite(suite, tmp_path / "faster_later")
    steady, faster = (load_results(tmp_path / name).set_index("impl") for name in ("steady", "faster_later"))
    assert (steady["limit_bound"] == "compute").all()
    assert steady["limit_s"].to_numpy() == pytest.approx(4 * faster["limit_s"].to_numpy(), rel=1e-6)
    peaks = json.loads((tmp_path / "faster_later" / "run.json").read_text())["matmul_peaks"]
    assert [(p["dense_flops_per_s"], p["measurements"]) for p in peaks] == [(4e11, 2)]
    # The group's rounds timed the dense ceiling's sentinel; its latency at the ceilings' moment is read from it.
    sentinels = json.loads((tmp_path / "steady" / "run.json").read_text())["sentinels"]
    assert [(s["sentinel"], s["device"], s["threads"]) for s in sentinels] == [("dense", "cpu", 1)]
    assert (steady["sentinel"] == "dense").all() and (steady["sentinel_best_s"] == sentinels[0]["seconds"]).all()
    assert (steady["sentinel_median_s"] >= steady["sentinel_best_s"]).all() and (steady["vs_sentinel"] > 0).all()
    assert steady["vs_limit"].to_numpy() == pytest.approx((steady["latency_median_s"] / steady["limit_s"]).to_numpy())


def test_a_device_error_while_measuring_the_ceilings_again_keeps_the_sweeps_rows(tmp_path: Path, monkeypatch) -> None:
    layer = {"name": "pw", "in_channels": 16, "out_channels": 16, "input_size": 5, "experts": 2}
    suite = _suite(tmp_path, [layer], ["static", "grouped_conv"], [2])
    calls = iter(range(100))

    def broken_after_the_start(device, dtype, threads):
        if next(calls) >= ceilings.CEILING_PASSES:
            raise RuntimeError("planted: CUDA error: an illegal memory access was encountered")
        return 1e11

    monkeypatch.setattr(ceilings, "dense_peak_flops", broken_after_the_start)
    run_suite(suite, tmp_path / "run")
    rows = load_results(tmp_path / "run")
    assert list(rows["status"]) == ["ok", "ok"] and rows["limit_s"].notna().all() and rows["vs_limit"].notna().all()
    peaks = json.loads((tmp_path / "run" / "run.json").read_text())["matmul_peaks"]
    assert [(p["dense_flops_per_s"], p["measurements"]) for p in peaks] == [(1e11, 1)]


@pytest.mark.timing
@pytest.mark.real_ceilings
def test_no_strategy_beats_its_limit_on_shipped_mobile_shapes(tmp_path: Path) -> None:
    """A latency below the compulsory limit would mean a ceiling or a traffic model is wrong."""
    mobile = yaml.safe_load(MOBILE.read_text())
    # the depthwise 3x3 at 7x7 is the cheapest depthwise shape: the slowest strategies here take
    # 0.1 s a call on 5x5 at 14x14, and this test is about the models, not the shapes
    wanted = {"s6_expand_192_1152", "s7_dw3_1152", "mbv2_classifier_1280_1000"}
    layers = [{**mobile["layer_defaults"], **layer} for layer in mobile["layers"] if layer["name"] in wanted]
    for layer in layers:
        layer.pop("count", None)
    suite = _suite(tmp_path, layers, ["static", "grouped_conv", "pixel_major_matmul", "stacked_moe"], [1, 8])
    run_suite(suite, tmp_path / "run")
    rows = load_results(tmp_path / "run")
    ok = rows[rows["status"] == "ok"]
    assert ok["limit_s"].notna().all() and ok["vs_limit"].notna().all()
    measurement_error = 0.9
    beaten = ok[ok["vs_limit"] < measurement_error]
    assert beaten.empty, beaten[["case_id", "vs_limit", "limit_bound", "limit_memory"]].to_string()
    assert (ok["limit_own_s"] >= ok["limit_s"] * 0.999).all()  # a strategy's own work includes the compulsory


@pytest.mark.timing
@pytest.mark.real_ceilings
def test_bandwidths_are_measured_for_the_cpu() -> None:
    measured = memory_bandwidths(torch.device("cpu"), 1)
    assert measured["dram_bytes_per_s"] > 1e8 and measured["llc_bytes_per_s"] > 1e8
    assert measured["dram_buffer_bytes"] >= 4 * (measured["llc_bytes"] or 0)
    assert measured["llc_buffer_bytes"] <= (measured["llc_bytes"] or measured["llc_buffer_bytes"])
    if measured["llc_bytes"]:
        sizes = [size for size, _ in measured["stream_bytes_per_s"]]
        assert measured["llc_buffer_bytes"] < sizes[0] < sizes[-1] < measured["dram_buffer_bytes"]
        assert all(rate > 1e8 for _, rate in measured["stream_bytes_per_s"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.real_ceilings
def test_bandwidths_are_measured_on_the_gpu() -> None:
    measured = memory_bandwidths(torch.device("cuda"), 1)
    assert measured["llc_bytes"] == torch.cuda.get_device_properties(0).L2_cache_size
    assert measured["dram_bytes_per_s"] > 1e10


def test_a_version_3_run_directory_still_loads_without_limits_and_is_not_continued(tmp_path: Path) -> None:
    tiny = Path(__file__).parent / "data" / "valid" / "tiny.yaml"
    out = tmp_path / "run"
    run_suite(tiny, out, case_filter=CaseFilter(layers=("pw",), batch_sizes=(1,)))
    frame = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    frame[header(3)].to_csv(out / "results.csv", index=False)
    metadata = json.loads((out / "run.json").read_text())
    metadata["schema_version"] = 3
    metadata.pop("memory_bandwidths")
    (out / "run.json").write_text(json.dumps(metadata))
    rows = load_results(out)
    assert (rows["status"] == "ok").any() and rows[[c.name for c in COLUMNS if c.topic == "limits"]].isna().all().all()
    with pytest.raises(ResultsError, match="older condconv-bench"):
        run_suite(tiny, out, resume=True, case_filter=CaseFilter(layers=("pw",), batch_sizes=(1,)))
