"""The drop-in layers, the dispatch table and `tune`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from condconv_bench import CondConv2d, CondConvLinear, DispatchTable, LayerSpec
from condconv_bench.dispatch.cache import CACHE_VARIABLE, cache_path, machine_key
from condconv_bench.cli import main
from condconv_bench.dispatch.table import ENVIRONMENT_VARIABLE, Entry, Query, rule_of_thumb, shape_class, signature
from condconv_bench.core.equivalence import check_equivalence
from condconv_bench.errors import ResultsError, UnknownImplError
from condconv_bench.machine import allocators
from condconv_bench.core.registry import dispatchable_impls, get_impl
from conftest import needs_cpp_compiler
from condconv_bench.run.runner import run_suite
from condconv_bench.suite.selection import CaseFilter

DATA = Path(__file__).parent / "data"
TINY = DATA / "valid" / "tiny.yaml"
SPEC = LayerSpec("conv2d", 8, 16, 4, kernel_size=3, padding=1)


def entry(strategy: str, batch_size: int, spec: LayerSpec = SPEC, size=(6, 6), **changes) -> Entry:
    fields = dict(
        device="cpu", dtype="float32", mode="inference", threads=torch.get_num_threads(), memory_format="contiguous",
        allocator=allocators.current(), signature=signature(spec, size), shape_class=shape_class(spec, size), batch_size=batch_size,
        conv_macs_per_example=spec.kernel_numel * size[0] * size[1], strategy=strategy, margin=1.2, layer="t",
    )
    return Entry(**{**fields, **changes})


def query(batch_size: int, spec: LayerSpec = SPEC, size=(6, 6), **changes) -> Query:
    fields = dict(spec=spec, input_size=size, device="cpu", dtype="float32", mode="inference",
                  threads=torch.get_num_threads(), memory_format="contiguous", allocator=allocators.current(),
                  batch_size=batch_size)
    return Query(**{**fields, **changes})


def test_lookup_takes_the_nearest_batch_size_of_the_exact_layer() -> None:
    table = DispatchTable([entry("per_sample_loop", 1), entry("grouped_conv", 8), entry("batched_matmul", 32)])
    assert table.choose(query(1)) == "per_sample_loop"
    assert table.choose(query(6)) == "grouped_conv"
    assert table.choose(query(64)) == "batched_matmul"


def test_lookup_falls_back_to_the_shape_class_then_the_rule_of_thumb() -> None:
    other = LayerSpec("conv2d", 16, 32, 4, kernel_size=3, padding=1)  # never tuned, same class as SPEC
    table = DispatchTable([entry("naive_moe", 8)])
    assert table.choose(query(8, other)) == "naive_moe"
    assert table.choose(query(8, dtype="bfloat16")) == rule_of_thumb(SPEC)
    assert table.choose(query(8, mode="training")) == "naive_moe"  # training falls back to inference entries
    trained = DispatchTable([entry("naive_moe", 8), entry("stacked_moe", 8, mode="training")])
    assert trained.choose(query(8, mode="training")) == "stacked_moe"


def test_an_entry_whose_strategy_cannot_run_here_gives_way_to_its_rivals_then_the_nearest(monkeypatch) -> None:
    """A table measured where fused was built, read where it cannot be (no C++ compiler)."""
    table = DispatchTable([entry("fused", 8), entry("grouped_conv", 32)])
    monkeypatch.setattr(get_impl("fused"), "unavailable_reason", classmethod(lambda cls: None))  # built here
    assert table.choose(query(8)) == "fused"
    monkeypatch.setattr(get_impl("fused"), "unavailable_reason", classmethod(lambda cls: "needs a C++ compiler"))
    assert table.choose(query(8)) == "grouped_conv"
    assert DispatchTable([entry("fused", 8)]).choose(query(8)) == rule_of_thumb(SPEC)
    half = DispatchTable([entry("fused", 8, dtype="float16"), entry("grouped_conv", 32, dtype="float16")])
    assert half.choose(query(8, dtype="float16")) == "grouped_conv"  # fused refuses float16
    # an entry's own runner-ups come before a farther entry's choice
    ranked = DispatchTable([entry("fused", 8, rivals=("batched_matmul", "grouped_conv")), entry("grouped_conv", 32)])
    assert ranked.choose(query(8)) == "batched_matmul"


def test_a_native_strategys_entry_holds_only_where_its_build_targets_the_same_vector_extension(monkeypatch) -> None:
    """fused built for AVX-512 and for AVX2 are two programs: a table measured on one speaks for
    the other's build in nothing, so there the entry answers with its rivals."""
    from condconv_bench.dispatch import table as table_module

    monkeypatch.setattr(get_impl("fused"), "unavailable_reason", classmethod(lambda cls: None))
    measured = DispatchTable([entry("fused", 8, rivals=("batched_matmul",), vector_isa="AVX-512"),
                              entry("grouped_conv", 8, spec=LayerSpec("conv2d", 8, 16, 4, kernel_size=1), vector_isa="AVX-512")])
    monkeypatch.setattr(table_module, "vector_isa", lambda: "AVX-512")
    assert measured.choose(query(8)) == "fused"
    monkeypatch.setattr(table_module, "vector_isa", lambda: "AVX2")
    assert measured.choose(query(8)) == "batched_matmul"
    # strategies made of torch operators keep their entries; an entry that recorded no ISA holds everywhere
    assert measured.choose(query(8, LayerSpec("conv2d", 8, 16, 4, kernel_size=1))) == "grouped_conv"
    assert DispatchTable([entry("fused", 8)]).choose(query(8)) == "fused"
    # with tables measured on both kinds of CPU (the shipped ones merge), each CPU reads its own
    both = DispatchTable([entry("fused", 8, vector_isa="AVX-512"), entry("pixel_major_matmul", 8, vector_isa="AVX2")])
    assert both.choose(query(8)) == "pixel_major_matmul"
    monkeypatch.setattr(table_module, "vector_isa", lambda: "AVX-512")
    assert both.choose(query(8)) == "fused"
    # a GPU's entries are not narrowed by their host CPU: the nearer measurement wins
    gpu = DispatchTable([entry("grouped_conv", 8, device="cuda", vector_isa="AVX2"),
                         entry("batched_matmul", 32, device="cuda", vector_isa="AVX-512")])
    assert gpu.choose(query(8, device="cuda")) == "grouped_conv"


def test_the_shipped_cpu_table_records_where_its_native_entries_hold() -> None:
    shipped = DispatchTable.load(Path(__file__).parent.parent / "condconv_bench" / "dispatch_tables" / "cpu.json")
    native = [e for e in shipped.entries if e.strategy == "fused"]
    assert native and {e.vector_isa for e in native} == {"AVX-512"} and "AVX-512" in shipped.measured_on
    assert all(e.rivals and "fused" not in e.rivals for e in native)  # each has a rival to answer with elsewhere


def test_table_round_trips_and_refuses_garbage(tmp_path) -> None:
    table = DispatchTable([entry("grouped_conv", 8)])
    path = table.save(tmp_path / "t.json")
    assert DispatchTable.load(path).entries == table.entries
    (tmp_path / "bad.json").write_text('{"format": "something"}')
    with pytest.raises(ResultsError, match="not a valid dispatch table"):
        DispatchTable.load(tmp_path / "bad.json")


def test_auto_uses_the_table_it_is_given(tmp_path) -> None:
    for strategy in ("per_sample_loop", "naive_moe"):
        table = DispatchTable([entry(strategy, 2)])
        layer = CondConv2d(8, 16, 3, padding=1, num_experts=4, dispatch_table=table)
        with torch.no_grad():
            layer(torch.randn(2, 8, 6, 6))
        assert layer.last_strategy == strategy


def test_environment_variable_points_at_a_table(tmp_path, monkeypatch) -> None:
    path = DispatchTable([entry("naive_moe", 2)]).save(tmp_path / "env.json")
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, str(path))
    layer = CondConv2d(8, 16, 3, padding=1, num_experts=4)
    with torch.no_grad():
        layer(torch.randn(2, 8, 6, 6))
    assert layer.last_strategy == "naive_moe"


def test_fixed_strategy_and_unknown_strategy() -> None:
    layer = CondConv2d(8, 16, 3, padding=1, num_experts=4, strategy="per_sample_loop")
    with torch.no_grad():
        layer(torch.randn(3, 8, 6, 6))
    assert layer.last_strategy == "per_sample_loop"
    with pytest.raises(UnknownImplError, match="strategy 'compiled'"):
        CondConv2d(8, 16, 3, strategy="compiled")


@pytest.mark.parametrize("strategy", ["auto", *dispatchable_impls()])
def test_drop_in_conv_matches_the_oracle_in_training_with_channels_last(strategy: str) -> None:
    unavailable = strategy != "auto" and get_impl(strategy).unavailable_reason()
    if unavailable:
        pytest.skip(unavailable)  # a native strategy without a compiler
    torch.manual_seed(0)
    layer = CondConv2d(8, 12, 3, stride=2, padding=1, num_experts=4, strategy=strategy).train()
    x = torch.randn(3, 8, 9, 9).to(memory_format=torch.channels_last)
    grad = torch.randn(3, 12, 5, 5)
    report = check_equivalence(layer, x, None, grad)
    assert report.passed, report


def test_drop_in_linear_has_linear_defaults_and_matches_the_oracle() -> None:
    layer = CondConvLinear(32, 10, num_experts=4)
    assert layer.bias is not None and layer.weight.shape == (4, 10, 32)
    assert check_equivalence(layer, torch.randn(5, 32)).passed


def test_state_dict_round_trip_and_flat_expert_import() -> None:
    source = CondConv2d(8, 16, 3, padding=1, num_experts=4, bias=False)
    target = CondConv2d(8, 16, 3, padding=1, num_experts=4, bias=False, strategy="grouped_conv")
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=1e-4, atol=1e-5)
    flat = torch.randn(4, 16 * 8 * 3 * 3)  # timm / TF layout: (E, C_out·C_in/g·kh·kw)
    target.load_flat_experts(flat)
    torch.testing.assert_close(target.weight[2], flat[2].view(16, 8, 3, 3))
    state = {**source.state_dict(), "weight": flat}
    source.load_state_dict(state)
    torch.testing.assert_close(source.weight, target.weight)
    with pytest.raises(ValueError, match="must have shape"):
        target.load_flat_experts(torch.randn(4, 10))


@pytest.mark.slow
@needs_cpp_compiler
def test_auto_under_torch_compile_matches_eager() -> None:
    torch.manual_seed(0)
    layer = CondConv2d(8, 16, 1, num_experts=4)
    x = torch.randn(4, 8, 7, 7)
    with torch.no_grad():
        expected = layer(x)
        compiled = torch.compile(layer, fullgraph=True, dynamic=False)
        torch.testing.assert_close(compiled(x), expected, rtol=1e-4, atol=1e-5)


def test_dispatch_lookup_is_cached_per_input_shape(monkeypatch) -> None:
    layer = CondConv2d(8, 16, 1, num_experts=4)
    calls = []
    original = layer._resolve
    monkeypatch.setattr(layer, "_resolve", lambda x, routing: calls.append(x.shape) or original(x, routing))
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(2, 8, 5, 5))
        layer(torch.randn(4, 8, 5, 5))
    assert len(calls) == 2


def test_tune_builds_a_table_that_auto_uses(tmp_path) -> None:
    output = tmp_path / "dispatch.json"
    result = CliRunner().invoke(main, ["tune", str(TINY), "-o", str(output), "--run-dir", str(tmp_path / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    document = json.loads(output.read_text())
    entries = document["entries"]
    assert {e["layer"] for e in entries} == {"pw", "dw3", "fc"}
    assert {e["strategy"] for e in entries} <= {"grouped_conv", "per_sample_loop"}  # tiny.yaml's dispatchable impls
    again = CliRunner().invoke(main, ["tune", str(TINY), "-o", str(tmp_path / "again.json"), "--from-run", str(tmp_path / "run")])
    assert again.exit_code == 0 and json.loads((tmp_path / "again.json").read_text())["entries"] == entries
    fc = next(e for e in entries if e["layer"] == "fc" and e["batch_size"] == 2 and e["mode"] == "inference")
    layer = CondConvLinear(8, 4, bias=False, num_experts=2, dispatch_table=output)
    with torch.no_grad():
        layer(torch.randn(2, 8))
    assert layer.last_strategy == fc["strategy"]
    assert {e["allocator"] for e in entries} == {"fixed"}  # the workers' default policy, recorded
    assert "autotune cache: " in result.output
    cached = json.loads(cache_path().read_text())["entries"]  # measured here: autotune starts from it
    assert {(e["layer"], e["batch_size"], e["strategy"]) for e in entries} <= {(e["layer"], e["batch_size"], e["strategy"]) for e in cached}


def test_runner_records_what_auto_and_autotune_dispatched_in_the_workers(tmp_path) -> None:
    import yaml

    data = yaml.safe_load(TINY.read_text())
    data["impls"] = ["static", "auto", "autotune"]
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(data))
    frame = run_suite(path, tmp_path / "run", case_filter=CaseFilter(devices=("cpu",))).run.results()
    auto = frame[frame["impl"] == "auto"]
    assert auto["dispatched"].isin(list(dispatchable_impls())).all()  # one table: every build agrees
    tuned = frame[frame["impl"] == "autotune"]
    picks = tuned["dispatched"].str.split("; ").explode().str.split(" ").str[0]  # `a 2/3; b 1/3` where builds differed
    assert picks.isin(list(dispatchable_impls())).all()
    # What the probing process ran, which the FLOPs and peak memory describe, is kept apart.
    assert (auto["probed_dispatch"] == auto["dispatched"]).all() and tuned["probed_dispatch"].isin(list(dispatchable_impls())).all()
    assert frame.loc[frame["impl"] == "static", "probed_dispatch"].isna().all()
    assert frame[frame["impl"] != "static"]["equivalent"].all() and auto["flops_agree"].all()
    assert not (tmp_path / "autotune-cache.json").exists()  # the workers never touch a cache file


def test_dispatch_summary_gives_each_choice_its_share_of_the_builds() -> None:
    from collections import Counter

    from condconv_bench.run.rows import dispatch_summary

    assert dispatch_summary(Counter({"grouped_conv": 3})) == "grouped_conv"
    assert dispatch_summary(Counter({"b": 1, "a": 1, "c": 5})) == "c 5/7; a 1/7; b 1/7"


@pytest.mark.slow
@needs_cpp_compiler
def test_auto_compiles_one_graph_per_input_size_with_dynamic_false() -> None:
    """By default a second shape makes dynamo's sizes dynamic, and the per-shape lookup cannot be
    called on those; with dynamic=False (what the README says) every size gets its own graph."""
    torch.manual_seed(0)
    layer = CondConv2d(8, 16, 1, num_experts=4)
    compiled = torch.compile(layer, fullgraph=True, dynamic=False)
    with torch.no_grad():
        for size in (5, 7, 9):
            x = torch.randn(2, 8, size, size)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)



@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the XDG base directories are Linux's convention")
def test_the_autotune_cache_is_in_the_xdg_cache_folder(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(CACHE_VARIABLE)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "condconv-bench" / f"autotune-{machine_key()}.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path() == tmp_path / "home" / ".cache" / "condconv-bench" / f"autotune-{machine_key()}.json"


def test_the_autotune_cache_variable_names_another_file_or_none(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(CACHE_VARIABLE, str(tmp_path / "mine.json"))
    assert cache_path() == tmp_path / "mine.json"
    monkeypatch.setenv(CACHE_VARIABLE, " Off")
    assert cache_path() is None
