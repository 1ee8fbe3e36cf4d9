"""Entry-point groups: how other packages add implementations and adapters, and how a broken one is reported."""

from __future__ import annotations

import importlib.metadata

import pytest

from condconv_bench.conversion import adapters
from condconv_bench.conversion.adapters.condconv_bench_layers import CondConvBenchLayers
from condconv_bench.core import entry_points
from condconv_bench.errors import DuplicateImplError, UnknownImplError

GROUP = "condconv_bench.tests"


@pytest.fixture
def advertised(monkeypatch):
    """Installs the entry points a test passes, as if packages advertised them."""
    def install(*points: tuple[str, str, str]) -> None:
        made = [importlib.metadata.EntryPoint(name, value, group) for name, value, group in points]
        monkeypatch.setattr(entry_points.importlib.metadata, "entry_points", lambda group: [p for p in made if p.group == group])
    return install


def test_a_group_loads_by_name_and_names_each_origin(advertised) -> None:
    advertised(("slow", "fake_impls:SlowerByHalf", GROUP), ("other", "fake_impls:SlowerByHalf", "another.group"))
    ((name, (cls, origin)),) = entry_points.load_group(GROUP).items()
    assert (name, cls.__name__, origin) == ("slow", "SlowerByHalf", "entry point slow = 'fake_impls:SlowerByHalf'")


@pytest.mark.parametrize(("value", "reason"), [
    ("no_such_module_xyz:Thing", "ModuleNotFoundError: No module named 'no_such_module_xyz'"),
    ("fake_impls:Missing", "AttributeError"),
])
def test_an_entry_point_that_fails_to_load_is_named_in_one_line(advertised, value: str, reason: str) -> None:
    advertised(("broken", value, GROUP))
    with pytest.raises(UnknownImplError) as raised:
        entry_points.load_group(GROUP)
    message = str(raised.value)
    assert message.startswith(f"entry point broken = {value!r} of group {GROUP!r} cannot be loaded: ") and reason in message
    assert "\n" not in message


def test_one_name_advertised_for_two_objects_is_an_error(advertised) -> None:
    advertised(("slow", "fake_impls:SlowerByHalf", GROUP), ("slow", "fake_impls:WrongExpertOrder", GROUP))
    with pytest.raises(DuplicateImplError, match="'slow' of group 'condconv_bench.tests' advertised twice"):
        entry_points.load_group(GROUP)


def test_one_entry_point_listed_twice_loads_once(advertised) -> None:
    advertised(("slow", "fake_impls:SlowerByHalf", GROUP), ("slow", "fake_impls:SlowerByHalf", GROUP))
    assert list(entry_points.load_group(GROUP)) == ["slow"]


@pytest.fixture
def fresh_adapters(monkeypatch) -> None:
    """The built-ins, with the entry points still to read (and nothing a test adds kept after it)."""
    monkeypatch.setattr(adapters, "_adapters", dict(adapters.adapters()))
    monkeypatch.setattr(adapters, "_loaded", False)


class ThirdPartyAdapter(CondConvBenchLayers):
    key = "third_party"


def test_an_adapter_entry_point_is_known_to_convert_under_its_key(advertised, fresh_adapters) -> None:
    advertised(("whatever_name", f"{__name__}:ThirdPartyAdapter", adapters.ENTRY_POINT_GROUP))
    known = adapters.adapters()
    assert isinstance(known["third_party"], ThirdPartyAdapter) and "condconv_bench" in known  # beside the built-ins


def test_an_adapter_entry_point_that_is_no_adapter_is_refused_by_name(advertised, fresh_adapters) -> None:
    advertised(("not_one", "fake_impls:SlowerByHalf", adapters.ENTRY_POINT_GROUP))
    with pytest.raises(UnknownImplError, match=r"entry point not_one = 'fake_impls:SlowerByHalf': .* is not a LayerAdapter subclass"):
        adapters.adapters()
