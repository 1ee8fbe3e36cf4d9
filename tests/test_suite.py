from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from condconv_bench.cli import main
from condconv_bench.errors import SuiteError
from condconv_bench.suite.loader import load_suite, parse_suite, shipped_suites

DATA = Path(__file__).parent / "data"
INVALID = sorted((DATA / "invalid").glob("*.yaml"))


def expected_fragment(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: <fragment>'"
    return first.removeprefix("# expect: ")


def test_there_are_at_least_fifteen_kinds_of_malformed_suite() -> None:
    assert len(INVALID) >= 15


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_malformed_suite_gives_one_line_and_exit_2(path: Path) -> None:
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {path}"), lines[0]
    assert expected_fragment(path) in lines[0]
    assert "Traceback" not in result.output


def test_a_binary_file_is_refused_in_one_line(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.yaml"
    garbage.write_bytes(bytes(range(256)) * 4)
    for command in (["validate", str(garbage)], ["run", str(garbage), "-o", str(tmp_path / "run")]):
        result = CliRunner().invoke(main, command)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert result.stderr.strip() == f"error: {garbage}: not a YAML text file (byte 128 is not UTF-8)"


def test_shipped_suites_are_valid_and_named() -> None:
    suites = shipped_suites()
    assert {"smoke", "mobile", "server", "efficientnet_cc_b0"} <= set(suites)
    for path in suites.values():
        assert load_suite(path).cases()


def test_mobile_suite_has_the_b0_shapes_and_classifier() -> None:
    suite = load_suite("mobile")
    assert len(suite.layers) == 14
    assert sum(layer.count for layer in suite.layers if layer.workload.kind == "conv2d") == 24
    assert {layer.workload.num_experts for layer in suite.layers} == {8}
    cpu = [c for c in suite.cases() if c.device == "cpu"]
    assert {c.batch_size for c in cpu} == {1, 8, 32} and {c.dtype for c in cpu} == {"float32"}
    cuda = [c for c in suite.cases() if c.device == "cuda"]
    assert {c.dtype for c in cuda} == {"float32", "bfloat16"}
    assert {c.impl for c in cpu} >= {"static", "per_sample_loop", "grouped_conv", "batched_matmul", "naive_moe", "compiled", "stacked_moe", "auto"}


def minimal(**changes) -> dict:
    data = {
        "name": "t",
        "impls": ["static", "grouped_conv"],
        "batch_sizes": [1, 4],
        "devices": ["cpu", {"name": "cuda", "batch_sizes": [64], "dtypes": ["bfloat16"]}],
        "threads": [1, 2],
        "memory_formats": ["contiguous", "channels_last"],
        "layers": [
            {"name": "a", "in_channels": 8, "out_channels": 8, "kernel_size": 3, "input_size": 8},
            {"name": "b", "in_channels": 8, "out_channels": 8, "input_size": 8, "batch_sizes": [2], "impls": ["static"]},
            {"name": "fc", "kind": "linear", "in_channels": 8, "out_channels": 4},
        ],
    }
    data.update(changes)
    return data


def test_axes_resolve_layer_then_device_then_suite() -> None:
    cases = parse_suite(minimal(), Path("t.yaml")).cases()
    a_cpu = [c for c in cases if c.layer == "a" and c.device == "cpu"]
    assert {c.batch_size for c in a_cpu} == {1, 4}
    assert {c.threads for c in a_cpu} == {1, 2}
    assert {c.memory_format for c in a_cpu} == {"contiguous", "channels_last"}
    a_cuda = [c for c in cases if c.layer == "a" and c.device == "cuda"]
    assert {c.batch_size for c in a_cuda} == {64} and {c.dtype for c in a_cuda} == {"bfloat16"}
    assert {c.threads for c in a_cuda} == {1}  # host threads are not swept for a device
    b = [c for c in cases if c.layer == "b"]
    assert {c.batch_size for c in b} == {2} and {c.impl for c in b} == {"static"}
    fc = [c for c in cases if c.layer == "fc"]
    assert {c.memory_format for c in fc} == {"contiguous"}  # channels_last means nothing for linear


def test_same_padding_is_the_default() -> None:
    workload = parse_suite(minimal(), Path("t.yaml")).layers[0].workload
    assert workload.spec.padding == (1, 1)
    assert workload.output_shape(1) == (1, 8, 8, 8)


def test_group_members_are_adjacent_and_ids_unique() -> None:
    cases = parse_suite(minimal(), Path("t.yaml")).cases()
    assert len({c.id for c in cases}) == len(cases)
    order = [c.group for c in cases]
    for group in set(order):
        positions = [i for i, g in enumerate(order) if g == group]
        assert positions == list(range(positions[0], positions[-1] + 1))


def test_hash_ignores_formatting_but_not_content(tmp_path: Path) -> None:
    data = minimal()
    one = tmp_path / "one.yaml"
    one.write_text(yaml.safe_dump(data))
    two = tmp_path / "two.yaml"
    two.write_text("# a comment\n" + yaml.safe_dump(data, default_flow_style=True))
    assert load_suite(one).sha256 == load_suite(two).sha256
    assert parse_suite(minimal(batch_sizes=[1]), one).sha256 != load_suite(one).sha256


def test_several_problems_are_all_reported() -> None:
    data = minimal(impls=["nope"], devices=["gpu"])
    with pytest.raises(SuiteError) as info:
        parse_suite(data, Path("t.yaml"))
    assert len(info.value.problems) == 2


def test_a_suites_sections_take_their_defaults_from_the_settings_types() -> None:
    from condconv_bench.machine.allocators import ALLOCATORS
    from condconv_bench.settings import GateSettings, MeasureSettings
    from condconv_bench.suite.schema import GateSection, TimingSection

    assert TimingSection().settings() == MeasureSettings()
    assert GateSection().settings() == GateSettings()
    assert TimingSection().settings(processes=5, allocator="glibc") == MeasureSettings(processes=5, allocator="glibc")
    assert set(TimingSection.model_fields["allocator"].annotation.__args__) == set(ALLOCATORS)


def test_every_measure_setting_is_a_timing_key_with_its_bounds() -> None:
    import dataclasses

    from condconv_bench.settings import MeasureSettings

    assert [f.name for f in dataclasses.fields(MeasureSettings)] == list(parse_suite(minimal(), Path("t.yaml")).model.timing.model_dump())
    timing = parse_suite(minimal(timing={"max_passes": 3, "block_s": 0.01, "budget_s": 2}), Path("t.yaml")).model.timing.settings()
    assert (timing.max_passes, timing.block_s, timing.budget_s) == (3, 0.01, 2.0) and isinstance(timing.budget_s, float)
    with pytest.raises(SuiteError) as info:
        parse_suite(minimal(timing={"max_passes": 0}), Path("t.yaml"))
    assert info.value.problems == ["t.yaml: timing.max_passes: Input should be greater than or equal to 1, got 0"]


def test_block_time_and_budget_name_block_s_and_budget_s() -> None:
    timing = parse_suite(minimal(timing={"block_time": 0.01, "budget": 2}), Path("t.yaml")).model.timing.settings()
    assert (timing.block_s, timing.budget_s) == (0.01, 2.0)
    with pytest.raises(SuiteError) as info:
        parse_suite(minimal(timing={"block_s": 0.01, "block_time": 0.02}), Path("t.yaml"))
    assert info.value.problems == ["t.yaml: timing.block_time: the same setting as 'block_s'; set it once"]
    with pytest.raises(SuiteError) as info:
        parse_suite(minimal(timing={"budget": -1}), Path("t.yaml"))
    assert info.value.problems == ["t.yaml: timing.budget: Input should be greater than 0, got -1"]


def test_validate_shows_the_timing_settings_by_their_suite_names(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(minimal(devices=["cpu"], timing={"budget": 2, "max_passes": 3})))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    timing = next(line for line in result.output.splitlines() if line.startswith("timing:"))
    assert "budget_s 2" in timing and "max_passes 3" in timing and "block_s 0.005" in timing and "allocator fixed" in timing
