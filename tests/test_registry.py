from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

from condconv_bench import LayerSpec, create_impl, get_impl, list_impls, register_impl
from condconv_bench.core import entry_points, registry
from condconv_bench.errors import DuplicateImplError, UnknownImplError
from condconv_bench.impls.grouped_conv import GroupedConv

import condconv_bench.impls

# One module (or a folder, for a strategy with kernels of its own) per strategy, named by its key,
# and the two dispatching layers: the registry must list exactly these, so a built-in that stops
# registering (or a file whose key differs) fails here.
STRATEGY_FILES = ({p.stem for p in Path(condconv_bench.impls.__path__[0]).glob("*.py") if p.stem != "__init__"}
                  | {p.parent.name for p in Path(condconv_bench.impls.__path__[0]).glob("*/__init__.py")})
BUILTINS = STRATEGY_FILES | {"auto", "autotune"}


def test_builtins_are_listed_with_descriptions() -> None:
    infos = {info.key: info for info in list_impls()}
    assert {"per_sample_loop", "grouped_conv", "batched_matmul", "naive_moe", "compiled", "static", "stacked_moe",
            "workspace_matmul", "pixel_major_matmul", "chunked_matmul"} <= STRATEGY_FILES
    assert set(infos) == BUILTINS  # nothing else registers in a plain install
    assert all(infos[key].key == key and get_impl(key).__module__.endswith(f".{key}") for key in STRATEGY_FILES)
    assert all(info.description and "\n" not in info.description for info in infos.values())
    assert infos["static"].is_floor
    assert "static" not in {info.key for info in list_impls(include_floor=False)}


def test_the_keyword_of_earlier_releases_still_works_and_says_it_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="include_floor"):
        without = list_impls(include_baselines=False)
    assert {info.key for info in without} == {info.key for info in list_impls(include_floor=False)} and "static" not in {i.key for i in without}


def test_unknown_key_suggests_the_closest() -> None:
    with pytest.raises(UnknownImplError, match="did you mean 'grouped_conv'"):
        get_impl("grouped_cnv")


def test_duplicate_key_is_an_error(isolated_registry) -> None:
    with pytest.raises(DuplicateImplError, match="'grouped_conv' registered twice"):

        @register_impl("grouped_conv")
        class Impostor(GroupedConv):
            """Claims a taken key."""


def test_module_class_names_resolve() -> None:
    cls = get_impl("fake_impls:WrongExpertOrder")
    assert cls.__name__ == "WrongExpertOrder"
    module = create_impl("fake_impls:WrongExpertOrder", LayerSpec("conv2d", 4, 4))
    assert isinstance(module, GroupedConv)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("no_such_module_xyz:Impl", "cannot import module"),
        ("fake_impls:Missing", "is not a CondConvBase subclass"),
        ("fake_impls:NotAnImplementation", "is not a CondConvBase subclass"),
    ],
)
def test_bad_module_class_names(name: str, fragment: str) -> None:
    with pytest.raises(UnknownImplError, match=fragment):
        get_impl(name)


def _entry_points(*points: importlib.metadata.EntryPoint):
    return lambda group: [p for p in points if p.group == group]


def test_entry_point_registers_third_party_impl(monkeypatch, isolated_registry) -> None:
    point = importlib.metadata.EntryPoint("plugin_loop", "fake_impls:SlowerByHalf", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(entry_points.importlib.metadata, "entry_points", _entry_points(point))
    monkeypatch.setattr(registry, "_loaded", False)
    assert get_impl("plugin_loop").__name__ == "SlowerByHalf"
    assert "plugin_loop" in {info.key for info in list_impls()}


def test_entry_point_cannot_override_a_builtin(monkeypatch, isolated_registry) -> None:
    point = importlib.metadata.EntryPoint("static", "fake_impls:SlowerByHalf", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(entry_points.importlib.metadata, "entry_points", _entry_points(point))
    monkeypatch.setattr(registry, "_loaded", False)
    with pytest.raises(DuplicateImplError, match="'static' registered twice"):
        list_impls()


def test_an_entry_point_that_fails_to_import_is_named_when_the_registry_loads(monkeypatch, isolated_registry) -> None:
    point = importlib.metadata.EntryPoint("broken", "no_such_module_xyz:Impl", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(entry_points.importlib.metadata, "entry_points", _entry_points(point))
    monkeypatch.setattr(registry, "_loaded", False)
    with pytest.raises(UnknownImplError, match="^entry point broken = 'no_such_module_xyz:Impl' of group 'condconv_bench.impls' cannot be loaded"):
        list_impls()


@pytest.mark.parametrize("cuda_builds", [None, False, True], ids=["no-gpu", "gpu-without-triton", "gpu-with-triton"])
def test_compiled_without_a_cpp_compiler_is_listed_by_where_inductor_can_still_build(monkeypatch, cuda_builds: bool | None) -> None:
    import torch
    import torch._inductor.cpp_builder as cpp_builder
    import torch.utils._triton as triton_check

    def no_compiler() -> None:
        raise RuntimeError("no C++ compiler on PATH")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_builds is not None)
    monkeypatch.setattr(triton_check, "has_triton", lambda: bool(cuda_builds))
    info = next(i for i in list_impls() if i.key == "compiled")
    if cuda_builds:
        assert info.available  # its CUDA cases run; its CPU cases are skipped one by one
        assert "needs a C++ compiler" in get_impl("compiled").unsupported_reason(LayerSpec("conv2d", 4, 4, 1), torch.device("cpu"), torch.float32)
    else:
        assert not info.available and "inductor needs a C++ compiler for CPU: no C++ compiler on PATH" in info.unavailable_reason
        assert ("needs Triton" in info.unavailable_reason) == (cuda_builds is False)
