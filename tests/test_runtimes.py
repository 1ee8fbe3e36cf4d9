"""The runtime axis: strategies exported to ONNX and run by ONNX Runtime beside eager PyTorch,
their export outcome recorded per case, and the report's deployment tables.

One small run (a pointwise and a linear layer, two batches, four implementations) is shared by the
module; it needs the `onnx` extra and is skipped without it, as the GPU machine has none.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from bs4 import BeautifulSoup
from click.testing import CliRunner

from condconv_bench.cli import main
from condconv_bench.conversion.swap import convert
from condconv_bench.core.registry import get_impl
from condconv_bench.core.spec import LayerSpec
from condconv_bench.dispatch.deployable import DEPLOYED, BatchFixedExportWarning
from condconv_bench.layers.condconv import CondConv2d
from condconv_bench.report import write_report
from condconv_bench.report.deployment import layer_class
from condconv_bench.run.directory import load_results
from condconv_bench.run.runner import run_suite
from condconv_bench.runtimes import catalog
from condconv_bench.runtimes.export import export_dynamic
from condconv_bench.suite.loader import load_suite
from tiny_models import TinyCondConvNet

SUITE = {
    "name": "runtimes",
    "impls": ["static", "grouped_conv", "per_sample_loop", "batched_matmul"],
    "batch_sizes": [1, 3],
    "runtimes": ["eager", "onnxruntime"],
    "threads": [1],
    "timing": {"processes": 1, "rounds": 2, "block_s": 0.001, "warmup": 0, "budget_s": 0.1},
    "layer_defaults": {"experts": 3},
    "layers": [
        {"name": "pw", "in_channels": 6, "out_channels": 10, "input_size": 5},
        {"name": "fc", "kind": "linear", "in_channels": 12, "out_channels": 5, "bias": True, "routing_weights": "given",
         "impls": ["static", "batched_matmul"]},
    ],
}
ONNX_MISSING = catalog.RUNTIMES["onnxruntime"].unavailable_reason()
needs_onnx = pytest.mark.skipif(ONNX_MISSING is not None, reason=ONNX_MISSING or "")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("runtimes")
    suite = base / "suite.yaml"
    suite.write_text(yaml.safe_dump(SUITE))
    run_suite(suite, base / "run")
    return base / "run"


@pytest.fixture(scope="module")
def rows(run):
    return load_results(run).set_index("case_id")


@needs_onnx
def test_each_strategy_records_how_it_exports(rows) -> None:
    onnx = rows[rows["runtime"] == "onnxruntime"]
    export = {impl: set(group["export"]) for impl, group in onnx.groupby("impl")}
    assert export == {"static": {"ok"}, "batched_matmul": {"ok"}, "grouped_conv": {"batch_fixed"}, "per_sample_loop": {"batch_fixed"}}
    grouped = onnx[onnx["impl"] == "grouped_conv"]["export_reason"]
    assert grouped.str.startswith("aten.conv2d").all(), "the reason names the operator that bakes the batch in"
    assert onnx[onnx["impl"] == "per_sample_loop"]["export_reason"].str.contains("fails at batch").all()
    assert onnx.loc["pw/batched_matmul/b3/cpu/float32/inference/t1/contiguous/onnxruntime", "export_ops"].count("MatMul")
    assert rows[rows["runtime"] == "eager"]["export"].isna().all()


@needs_onnx
def test_runtime_cases_are_verified_and_timed_against_the_exported_floor(rows) -> None:
    onnx = rows[rows["runtime"] == "onnxruntime"]
    assert (onnx["status"] == "ok").all() and onnx["latency_median_s"].notna().all()
    strategies = onnx[onnx["role"] == "strategy"]
    assert strategies["equivalent"].all() and (strategies["max_rel_error"] < 1e-5).all()
    assert strategies["vs_floor"].notna().all()
    assert onnx["peak_memory_bytes"].isna().all(), "a runtime allocates outside torch's profiler"
    assert len(rows[rows["runtime"] == "eager"]) == len(onnx), "eager ids stay as they were, runtime ids add the runtime"


@needs_onnx
def test_graphs_and_the_runtimes_versions_are_kept_with_the_run(run) -> None:
    graphs = {path.name for path in (run / "exports" / "pw").glob("*.onnx")}
    assert {"batched_matmul-onnxruntime.onnx", "grouped_conv-onnxruntime-b1.onnx", "grouped_conv-onnxruntime-b3.onnx"} <= graphs
    recorded = json.loads((run / "run.json").read_text())["runtimes"]["onnxruntime"]
    assert recorded["versions"]["onnxruntime"] and "threads" in recorded


@needs_onnx
def test_the_report_has_a_deployment_matrix(run, tmp_path) -> None:
    soup = BeautifulSoup(write_report([run], tmp_path / "report.html").read_text(encoding="utf-8"), "html.parser")
    matrix = soup.find("table", class_="deployment-matrix")
    cells = {tr.find("td").get_text(): [td.get_text() for td in tr.find_all("td")[1:]] for tr in matrix.find_all("tr")[1:]}
    assert [th.get_text() for th in matrix.find_all("th")] == ["strategy", "eager", "onnxruntime"]
    assert cells["batched_matmul"][1].startswith("dynamic batch") and cells["grouped_conv"][1].startswith("batch fixed")
    assert cells["grouped_conv"][0].startswith("eager ·")
    classes = soup.find("table", class_="deployment-classes").get_text()
    assert "pointwise" in classes and "linear" in classes


def test_a_runtime_that_is_not_installed_is_a_skipped_row_with_the_install_line(tmp_path, monkeypatch) -> None:
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(catalog.importlib.util, "find_spec", lambda name: None if name == "openvino" else find_spec(name))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({**SUITE, "runtimes": ["openvino"], "impls": ["static"], "batch_sizes": [1],
                                     "layers": SUITE["layers"][:1]}))
    row = load_results(run_suite(suite, tmp_path / "run").run.path).iloc[0]
    assert row["status"] == "skipped" and row["runtime"] == "openvino"
    assert row["reason"] == 'openvino needs openvino, not installed here: pip install -e ".[openvino]"'


def test_runtimes_are_narrowed_like_dtypes_and_filtered_on_the_command_line(tmp_path) -> None:
    suite = tmp_path / "suite.yaml"
    narrowed = {**SUITE, "devices": ["cpu", {"name": "cuda", "runtimes": ["eager"]}],
                "layers": [{**SUITE["layers"][0], "runtimes": ["onnxruntime"]}, SUITE["layers"][1]]}
    suite.write_text(yaml.safe_dump(narrowed))
    cases = load_suite(suite).cases()
    assert {c.runtime for c in cases if c.layer == "pw"} == {"onnxruntime"}
    assert {c.runtime for c in cases if c.layer == "fc" and c.device == "cuda"} == {"eager"}
    result = CliRunner().invoke(main, ["run", str(suite), "--runtime", "tensorrt", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: --runtime tensorrt: not in {suite} (it has: onnxruntime, eager)"]
    # A value the suite has, but not under the filters before it, names those filters.
    result = CliRunner().invoke(main, ["run", str(suite), "--device", "cuda", "--layer", "fc", "--runtime", "onnxruntime",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: --runtime onnxruntime: not in {suite} with --device cuda --layer fc (it has: eager)"]


@pytest.mark.parametrize("description, expected", [
    ("conv2d 192→1152 k1 E8", "pointwise"), ("conv2d 672→672 k5 s2 g672 E8", "depthwise k5"),
    ("conv2d 64→64 k3 E8", "conv k3"), ("conv2d 8→12 k3 g4 E4", "grouped k3"), ("linear 1280→1000 E8", "linear"),
])
def test_layer_classes_of_the_deployment_tables(description: str, expected: str) -> None:
    assert layer_class(description) == expected


# Strategies the run above does not export (fused's native build is tested in test_fused.py, and
# workspace_matmul runs batched_matmul's code); each declares whether its graph keeps a dynamic batch.
OTHERS = ["pixel_major_matmul", "chunked_matmul", "naive_moe", "stacked_moe", "input_scaled_moe", "auto"]


@needs_onnx
@pytest.mark.parametrize("impl", OTHERS)
def test_each_strategy_declares_whether_its_exported_graph_keeps_a_dynamic_batch(impl: str, tmp_path) -> None:
    cls = get_impl(impl)
    spec = LayerSpec("conv2d", 6, 10, num_experts=3)
    export = export_dynamic(cls(spec).eval(), lambda batch: (torch.randn(batch, 6, 5, 5),), [3], "onnxruntime", tmp_path / "g.onnx", 1)
    assert (export.status == "ok") == (cls.batch_fixed_export is None), export.reason


def test_a_model_prepared_for_export_runs_a_strategy_with_a_dynamic_batch_in_every_layer() -> None:
    model = TinyCondConvNet()  # both layers fixed to grouped_conv, which bakes the batch in
    replaced = convert(model, "grouped_conv", for_export=True).replaced
    assert [r.strategy for r in replaced] == [DEPLOYED["dense"], DEPLOYED["depthwise"]]
    assert all(r.reason.startswith("for export: grouped_conv folds the batch into the convolution's groups") for r in replaced)
    assert all(get_impl(r.strategy).batch_fixed_export is None for r in replaced)
    kept = convert(TinyCondConvNet(), "pixel_major_matmul", for_export=True).replaced
    assert [(r.strategy, r.reason is None) for r in kept] == [("pixel_major_matmul", True), (DEPLOYED["depthwise"], False)]


@needs_onnx
def test_a_layer_fixed_to_a_batch_baking_strategy_says_so_when_exported(tmp_path) -> None:
    layer = CondConv2d(6, 10, 1, num_experts=3, strategy="grouped_conv").eval()
    with pytest.warns(BatchFixedExportWarning, match="grouped_conv folds the batch"):
        torch.onnx.export(layer, (torch.randn(2, 6, 5, 5),), dynamo=True, verbose=False)


@needs_onnx
def test_input_scaled_moe_exports_its_convs_on_the_scaled_input_where_that_is_the_smaller_side(tmp_path) -> None:
    import onnx

    from condconv_bench.impls.input_scaled_moe import scales_input

    spec = LayerSpec("conv2d", 8, 8, num_experts=3, kernel_size=3, padding=1, groups=8)
    export = export_dynamic(get_impl("input_scaled_moe")(spec).eval(), lambda batch: (torch.randn(batch, 8, 6, 6),), [3],
                            "onnxruntime", tmp_path / "g.onnx", 1)
    assert export.status == "ok", export.reason
    graph = onnx.load(str(export.path)).graph
    made_by = {name: node.op_type for node in graph.node for name in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    # each expert's conv reads α_e·x, so that ONNX Runtime can fuse the running sum into the next conv
    assert len(convs) == 3 and all(made_by.get(conv.input[0]) == "Mul" for conv in convs)
    strided = LayerSpec("conv2d", 8, 8, num_experts=3, kernel_size=3, stride=2, padding=1, groups=8)
    assert scales_input(spec, (6, 6)) and not scales_input(strided, (6, 6))  # 4× more input than output: naive_moe's form
