"""Whole-model workloads: a suite with a model runs end to end; timm models probe exactly; a missing library skips."""

from __future__ import annotations

import sys

import pytest
import yaml

from condconv_bench.core.case import Case
from condconv_bench.errors import SuiteError
from condconv_bench.cases.models.workload import ModelWorkload
from condconv_bench.run.probes import GroupContext, probe_case
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.loader import load_suite

TINY = {
    "name": "tiny-model",
    "impls": ["as_shipped", "static", "grouped_conv", "batched_matmul", "auto", "autotune"],
    "batch_sizes": [2],
    "modes": ["inference", "training"],
    "threads": [1],
    "timing": {"processes": 1, "rounds": 2, "block_time": 0.001, "warmup": 0, "budget": 0.1},
    "layers": [{"name": "tiny", "kind": "model", "model": "tiny_models:tiny_condconv_net",
                "floor": "tiny_models:tiny_floor_net", "input_size": 15}],
}


def write_suite(tmp_path, suite: dict) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return str(path)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    outcome = run_suite(write_suite(folder, TINY), folder / "run")
    return outcome.run.path, outcome.run.results()


def test_a_model_suite_runs_every_case_through_the_runner(tiny_run) -> None:
    _, rows = tiny_run
    assert (rows["status"] == "ok").all(), rows[["case_id", "reason"]]
    assert set(rows["kind"]) == {"model"} and len(rows) == 12
    roles = rows.drop_duplicates("impl").set_index("impl")["role"]
    assert roles["static"] == "floor" and roles["as_shipped"] == "strategy" and roles["auto"] == "dispatcher"
    converted = rows[rows["impl"] != "static"]
    assert converted["equivalent"].all(), converted[["case_id", "max_rel_error", "worst_tensor"]]
    assert converted["vs_floor"].notna().all() and rows["flops_agree"].all(), rows[["case_id", "flops_problems"]]
    floor = rows[rows["impl"] == "static"].iloc[0]
    condconv = rows[rows["impl"] == "grouped_conv"].iloc[0]
    assert floor["macs_analytic_mixing"] == 0 < condconv["macs_analytic_mixing"]
    assert condconv["dispatched"] == "grouped_conv×2" and rows.loc[rows["impl"] == "batched_matmul", "kernel_bytes"].gt(0).all()
    # batched_matmul is not for the depthwise layer: timm's algorithm runs there, and the row says so
    assert set(rows.loc[rows["impl"] == "batched_matmul", "dispatched"]) == {"batched_matmul×1 grouped_conv×1"}


def test_the_report_has_a_section_per_model(tiny_run) -> None:
    from bs4 import BeautifulSoup

    from condconv_bench.report import write_report

    path, _ = tiny_run
    soup = BeautifulSoup(write_report([path], path / "report.html").read_text(), "html.parser")
    section = soup.find(id="model-1-tiny")
    assert section is not None, "no section for the model"
    headers = [th.get_text(" ", strip=True) for th in section.find_all("th")]
    assert "as shipped / floor" in headers and "as shipped / autotune" in headers
    assert "grouped_conv / floor" in headers and "auto / floor" in headers


def test_compare_baseline_and_gate_take_model_rows(tiny_run, tmp_path) -> None:
    from click.testing import CliRunner

    from condconv_bench.cli import main

    path, _ = tiny_run
    compared = CliRunner().invoke(main, ["compare", str(path), str(path)])
    assert compared.exit_code == 0 and "within ±5% in 10/10" in compared.output, compared.output
    baseline = tmp_path / "models.json"
    assert CliRunner().invoke(main, ["baseline", "save", str(path), "-o", str(baseline)]).exit_code == 0
    gated = CliRunner().invoke(main, ["gate", "baseline", str(path), "--baseline", str(baseline), "--no-latency"])
    assert gated.exit_code == 0 and "PASS: 12 cases" in gated.output, gated.output


def test_a_timm_model_probes_exactly_at_a_small_size() -> None:
    workload = ModelWorkload("timm:efficientnet_cc_b0_4e", (64, 64), "timm:efficientnet_b0")
    assert len(workload.layer_specs()) == 24 and workload.output_shape(2) == (2, 1000)
    ctx = None
    rows = {}
    for impl in ("as_shipped", "static", "pixel_major_matmul"):
        case = Case("cc_b0_4e", workload, impl, 2, "cpu", "float32", "inference", 2, "contiguous")
        ctx = ctx or GroupContext(case, 0)
        rows[impl], _ = probe_case(case, ctx)
    assert all(row["status"] == "ok" for row in rows.values()), rows
    assert rows["pixel_major_matmul"]["equivalent"] and rows["pixel_major_matmul"]["max_rel_error"] < 1e-4
    assert all(row["flops_agree"] for row in rows.values()), [row["flops_problems"] for row in rows.values()]
    shipped, floor = rows["as_shipped"], rows["static"]
    assert shipped["macs_analytic_mixing"] > 0 == floor["macs_analytic_mixing"] and shipped["macs_fvcore"] > floor["macs_fvcore"]


def test_without_timm_a_model_case_is_skipped_with_the_install_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # what `import timm` meets when timm is not installed
    case = Case("cc", ModelWorkload("timm:efficientnet_cc_b0_4e", (64, 64)), "grouped_conv", 1, "cpu", "float32",
                "inference", 1, "contiguous")
    row, _ = probe_case(case, GroupContext(case, 0))
    assert row["status"] == "skipped"
    assert 'pip install "condconv-bench[models]"' in row["reason"] and "torchvision" in row["reason"]


@pytest.mark.parametrize(("change", "expected"), [
    ({"model": None}, "layers[0].model: a model entry needs model"),
    ({"floor": None}, "impls[1]: static is a model's floor"),
    ({"model": "efficientnet_b0"}, "layers[0].model: model 'efficientnet_b0': expected timm:<model name>"),
    ({"kernel_size": 3}, "layers[0].kernel_size: a model takes its layers from the model itself"),
    ({"impls": ["as_shipped", "compiled"]}, "layers[0].impls[1]: 'compiled' cannot run a model"),
])
def test_bad_model_entries_are_one_line_naming_file_and_key(tmp_path, change: dict, expected: str) -> None:
    entry = {k: v for k, v in {**TINY["layers"][0], **change}.items() if v is not None}
    path = write_suite(tmp_path, {**TINY, "layers": [entry]})
    with pytest.raises(SuiteError) as caught:
        load_suite(path)
    assert any(problem == f"{path}: {expected}" or problem.startswith(f"{path}: {expected}") for problem in caught.value.problems), caught.value.problems


def test_as_shipped_runs_only_model_entries(tmp_path) -> None:
    layer = {"name": "pw", "in_channels": 8, "out_channels": 8, "input_size": 5}
    path = write_suite(tmp_path, {**TINY, "layers": [layer]})
    with pytest.raises(SuiteError, match="as_shipped runs only model entries"):
        load_suite(path)


def test_the_shipped_models_suite_validates_without_building_a_model() -> None:
    suite = load_suite("models")
    models = {layer.workload.source: layer.workload.floor for layer in suite.layers}
    assert models == {
        "timm:efficientnet_cc_b0_4e": "timm:efficientnet_b0", "timm:efficientnet_cc_b0_8e": "timm:efficientnet_b0",
        "timm:efficientnet_cc_b1_8e": "timm:efficientnet_b1", "timm:tf_efficientnet_cc_b0_8e": "timm:tf_efficientnet_b0",
    }
    cpu = {(c.mode, c.batch_size) for c in suite.cases() if c.device == "cpu"}
    cuda = {(c.dtype, c.batch_size) for c in suite.cases() if c.device == "cuda"}
    assert {b for _, b in cpu} == {1, 8, 32} and {m for m, _ in cpu} == {"inference", "training"}
    assert cuda == {(d, b) for d in ("float32", "bfloat16") for b in (64, 256)}


def tiny_case(impl: str, mode: str = "inference") -> Case:
    workload = ModelWorkload("tiny_models:tiny_condconv_net", (15, 15), "tiny_models:tiny_floor_net")
    return Case("tiny", workload, impl, 2, "cpu", "float32", mode, 1, "contiguous")


@pytest.mark.parametrize(("mode", "tolerance"), [("inference", 2e-4), ("training", 5e-4)])
def test_where_the_float64_oracle_does_not_fit_the_model_is_checked_against_its_shipped_self(
        monkeypatch: pytest.MonkeyPatch, mode: str, tolerance: float) -> None:
    import torch

    from condconv_bench.cases import memory_estimate
    from condconv_bench.conversion.adapters.condconv_bench_layers import CondConvBenchLayers

    case = tiny_case("batched_matmul", mode)
    training = mode == "training"
    alone = memory_estimate.case_bytes(case.workload, 2, training, torch.float32)
    fallback = case.workload.fallback_reference_bytes(2, training, torch.float32)
    assert memory_estimate.estimated_bytes(case) > alone + fallback, "the float64 oracle must be what does not fit"
    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device: alone + fallback)
    row, _ = probe_case(case, GroupContext(case, 0))
    assert row["status"] == "ok" and row["equivalent"], row
    assert row["tolerance"] == pytest.approx(tolerance) and "as-shipped model in float32" in row["reason"]

    original = CondConvBenchLayers.replacement

    def planted(self, module, spec, target):  # what a bad weight copy would do
        layer = original(self, module, spec, target)
        with torch.no_grad():
            layer.weight.copy_(layer.weight.flip(0).clone())
        return layer

    monkeypatch.setattr(CondConvBenchLayers, "replacement", planted)
    row, _ = probe_case(case, GroupContext(case, 0))
    assert row["status"] == "ok" and not row["equivalent"], row

    monkeypatch.setattr(memory_estimate, "available_bytes", lambda device: alone + fallback - 1)
    row, _ = probe_case(case, GroupContext(case, 0))
    assert row["status"] == "skipped" and "the float32 reference the float64 one falls back to" in row["reason"]


def test_where_the_float64_oracle_fits_the_row_names_no_other_check(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from condconv_bench.conversion.adapters.condconv_bench_layers import CondConvBenchLayers

    case = tiny_case("batched_matmul")
    row, _ = probe_case(case, GroupContext(case, 0))
    assert row["status"] == "ok" and row["equivalent"] and row["tolerance"] == 1e-4 and row.get("reason") is None

    original = CondConvBenchLayers.replacement

    def planted(self, module, spec, target):  # the oracle is built from the parameters before conversion
        layer = original(self, module, spec, target)
        with torch.no_grad():
            layer.weight.copy_(layer.weight.transpose(-1, -2).clone())
        return layer

    monkeypatch.setattr(CondConvBenchLayers, "replacement", planted)
    row, _ = probe_case(case, GroupContext(case, 0))
    assert row["status"] == "ok" and not row["equivalent"], row


def test_model_cases_shard_like_layer_cases_and_merge(tmp_path) -> None:
    """`run --shard i/N` splits a model suite by whole groups (a model at one batch size and mode with
    its floor and as-shipped self), the shards are disjoint and cover the suite, and `merge` joins them."""
    from click.testing import CliRunner

    from condconv_bench.cli import main
    from condconv_bench.run.directory import RunDirectory

    suite = {**TINY, "impls": ["as_shipped", "static", "grouped_conv"], "batch_sizes": [1, 2, 3], "modes": ["inference"],
             "timing": {**TINY["timing"], "rounds": 1, "budget": 0.05}}
    path = write_suite(tmp_path, suite)
    parts = [tmp_path / f"shard{i}" for i in (1, 2)]
    for index, part in enumerate(parts, start=1):
        ran = CliRunner().invoke(main, ["run", path, "--shard", f"{index}/2", "-o", str(part), "--no-report", "-q"])
        assert ran.exit_code == 0, ran.output
    frames = [RunDirectory(part).results() for part in parts]
    assert [sorted(set(f["batch_size"])) for f in frames] == [[1, 3], [2]]
    for frame in frames:
        assert (frame["status"] == "ok").all() and set(frame["kind"]) == {"model"}
        for _, group in frame.groupby("batch_size"):  # each group whole: the floor beside what it divides
            assert set(group["impl"]) == {"as_shipped", "static", "grouped_conv"}
            assert group.loc[group["impl"] != "static", "vs_floor"].notna().all()
    merged = CliRunner().invoke(main, ["merge", *map(str, parts), "-o", str(tmp_path / "merged")])
    assert merged.exit_code == 0 and "9 cases" in merged.output, merged.output
    assert set(RunDirectory(tmp_path / "merged").results()["case_id"]) == {c.id for c in load_suite(path).cases()}


def test_stage_attribution_times_every_stage_and_finds_the_mixing_where_the_condconv_layers_are() -> None:
    import torch

    from condconv_bench.conversion.swap import convert
    from condconv_bench.profiling.model_stages import condconv_paths, stage_phases, stage_table, stages_of, time_stages
    from tiny_models import tiny_staged_floor, tiny_staged_net

    torch.manual_seed(0)
    converted = convert(tiny_staged_net().eval(), "pixel_major_matmul", elsewhere="grouped_conv").model
    floor = tiny_staged_floor().eval()
    assert [name for name, _ in stages_of(converted)] == ["stem", "blocks.0", "blocks.1", "head"]
    x = torch.randn(2, 3, 16, 16)
    times = time_stages({"converted": converted, "floor": floor}, x, rounds=3)
    assert all(len(times.per_stage[stage]) == 3 and all(set(r.order) == {"converted", "floor"} for r in times.per_stage[stage])
               for stage in times.stages)
    for i, whole in enumerate(times.whole):  # each round's stages ran inside that round's whole forward
        for label in ("converted", "floor"):
            assert sum(times.per_stage[stage][i].per_call_s[label] for stage in times.stages) <= whole.per_call_s[label]
    phases = {label: stage_phases(model, x, num_experts=4) for label, model in (("converted", converted), ("floor", floor))}
    assert phases["converted"]["blocks.0"]["mixing"] > 0 and phases["converted"]["blocks.1"]["mixing"] > 0
    assert phases["converted"]["stem"]["mixing"] == 0 and all(p["mixing"] == 0 for p in phases["floor"].values())
    table = stage_table(times, "converted", "floor", phases)
    assert table.count("\n| ") == 5 and "| blocks.1 |" in table and "**whole forward**" in table

    paths = condconv_paths(converted)  # per layer: the floor has plain convs at the same paths
    assert paths == [f"blocks.{s}.0.{i}" for s in (0, 1) for i in (0, 2, 4)]
    layers = time_stages({"converted": converted, "floor": floor}, x, rounds=2, paths=paths)
    assert layers.stages == paths and all(len(layers.per_stage[p]) == 2 for p in paths)
    per_layer = {label: stage_phases(model, x, 4, paths=paths) for label, model in (("converted", converted), ("floor", floor))}
    assert all(per_layer["converted"][p]["mixing"] > 0 == per_layer["floor"][p]["mixing"] for p in paths)
    ran = {p: converted.get_submodule(p).last_strategy for p in paths}
    assert "| blocks.0.0.2 | grouped_conv |" in stage_table(layers, "converted", "floor", per_layer, ran)


def test_stage_attribution_refuses_models_whose_stages_differ() -> None:
    import torch

    from condconv_bench.profiling.model_stages import time_stages
    from tiny_models import tiny_condconv_net, tiny_staged_floor

    with pytest.raises(ValueError, match="stages differ"):
        time_stages({"a": tiny_condconv_net(), "b": tiny_staged_floor()}, torch.randn(1, 3, 8, 8), rounds=1)


def test_the_model_section_says_which_batch_sizes_were_checked_against_the_shipped_model(tiny_run) -> None:
    from condconv_bench.report.markdown import _model_table
    from condconv_bench.report.model_tables import model_tables

    _, rows = tiny_run
    assert all(not table.notes for table in model_tables(rows))
    checked = "equivalence checked against the as-shipped model in float32 (the float64 one does not fit in memory), tolerance 2e-04"
    rows = rows.copy()
    rows.loc[(rows["mode"] == "inference") & (rows["impl"] != "static"), "reason"] = checked
    inference = next(t for t in model_tables(rows) if "inference" in t.context)
    assert inference.notes == (f"batch 2: {checked}",)
    assert _model_table(inference).endswith(f"\n\nbatch 2: {checked}")


def test_model_stages_command_prints_a_table_per_batch_size() -> None:
    from click.testing import CliRunner

    from condconv_bench.cli import main

    result = CliRunner().invoke(main, ["model-stages", "tiny_models:tiny_staged_net", "tiny_models:tiny_staged_floor",
                                       "--batch-size", "1", "--batch-size", "2", "--input-size", "16", "--rounds", "2"])
    assert result.exit_code == 0, result.output
    assert result.output.count("**whole forward**") == 2 and ", batch 2, 16px" in result.output
    assert "| blocks.1 |" in result.output


def run_cli(tmp_path, change: dict, command: str = "run") -> tuple[int, list[str], object]:
    """`condconv-bench <command>` on the tiny model suite with its entry changed: exit code, stderr lines, run directory."""
    from click.testing import CliRunner

    from condconv_bench.cli import main

    entry = {k: v for k, v in {**TINY["layers"][0], **change}.items() if v is not None}
    path = write_suite(tmp_path, {**TINY, "impls": ["as_shipped", "static", "grouped_conv"], "modes": ["inference"], "layers": [entry]})
    output = tmp_path / "run"
    args = [command, path] + (["-o", str(output), "--no-report", "-q"] if command == "run" else [])
    result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stderr.strip().splitlines(), output


@pytest.mark.parametrize(("key", "name", "expected"), [
    ("model", "tiny_models:tiny_condconv_nett",
     "layers[0].model: model 'tiny_models:tiny_condconv_nett': tiny_models has no callable 'tiny_condconv_nett'; did you mean 'tiny_condconv_net'?"),
    ("floor", "tiny_models:tiny_flor_net",
     "layers[0].floor: model 'tiny_models:tiny_flor_net': tiny_models has no callable 'tiny_flor_net'; did you mean 'tiny_floor_net'?"),
    ("floor", "tiny_modls:tiny_floor_net", "layers[0].floor: model 'tiny_modls:tiny_floor_net': cannot import module 'tiny_modls'"),
])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_unknown_model_or_floor_is_refused_before_anything_runs(tmp_path, key: str, name: str, expected: str, command: str) -> None:
    code, lines, output = run_cli(tmp_path, {key: name}, command)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: {tmp_path / 'suite.yaml'}: {expected}"), lines[0]
    assert not output.exists()


def test_an_unknown_timm_model_is_refused_with_the_closest_name(tmp_path) -> None:
    pytest.importorskip("timm")
    code, lines, _ = run_cli(tmp_path, {"model": "timm:efficientnet_cc_b0_4x", "floor": "timm:efficientnet_b0"}, "validate")
    assert code == 2 and len(lines) == 1, lines
    assert "layers[0].model: model 'timm:efficientnet_cc_b0_4x': timm" in lines[0]
    assert lines[0].endswith("has no model 'efficientnet_cc_b0_4x'; did you mean 'efficientnet_cc_b0_4e'?"), lines[0]


@pytest.mark.parametrize(("change", "reason"), [
    ({"in_channels": 5}, "ModelError: model 'tiny_models:tiny_condconv_net' cannot take inputs of 5 channels at 15x15 (in_channels, input_size): "),
    ({"model": "tiny_models:tiny_unpadded_net", "input_size": 2},
     "ModelError: model 'tiny_models:tiny_unpadded_net' cannot take inputs of 3 channels at 2x2 (in_channels, input_size): "),
    ({"input_size": [15, 2], "model": "tiny_models:tiny_condconv_net", "floor": "tiny_models:tiny_unpadded_net"},
     "ModelError: model 'tiny_models:tiny_unpadded_net' cannot take inputs of 3 channels at 15x2 (in_channels, input_size): "),
    ({"model": "tiny_models:tiny_floor_net"},
     "ModelError: model 'tiny_models:tiny_floor_net' has no CondConv layer that convert() recognises (a floor, the network without CondConv, goes under floor:)"),
], ids=["channels", "input-size", "floor-input-size", "no-condconv"])
def test_a_model_that_cannot_run_the_entry_is_one_error_row_per_case_and_one_line(tmp_path, change: dict, reason: str) -> None:
    from condconv_bench.run.directory import RunDirectory

    code, lines, output = run_cli(tmp_path, change)
    rows = RunDirectory.open(output).results()
    assert code == 0 and len(rows) == 3 and (rows["status"] == "error").all(), rows[["case_id", "status", "reason"]]
    assert rows["reason"].str.startswith(reason).all(), rows["reason"].tolist()
    errors = [line for line in lines if line.startswith("error row:")]
    assert len(errors) == 1 and errors[0].startswith(f"error row: tiny, 3 cases: {reason}"), lines
    assert "Traceback" not in "\n".join(lines)
