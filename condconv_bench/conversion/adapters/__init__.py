"""Layer adapters: how `convert()` recognises another library's CondConv layer and maps it exactly.

An adapter answers three questions about a module: is it a layer of its kind (`recognises`, by
class and attributes, without importing the library it comes from), what `LayerSpec` it computes
(`spec`, raising `NotExact` with the reason when the project's layers cannot compute exactly the
same function), and the replacement with its weights copied (`replacement`). Built-ins are the
modules of this package, one adapter each; other packages advertise theirs in the
`condconv_bench.adapters` entry-point group, as implementations do in `condconv_bench.impls`. A
key claimed twice is an error.
"""

from __future__ import annotations

import importlib
import pkgutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from condconv_bench.core.entry_points import load_group
from condconv_bench.errors import DuplicateImplError, UnknownImplError
from condconv_bench.core.spec import LayerSpec

if TYPE_CHECKING:  # the layer module knows where the dispatch table lives
    from condconv_bench.dispatch.table import DispatchTable

ENTRY_POINT_GROUP = "condconv_bench.adapters"


class NotExact(Exception):
    """The reason a recognised layer cannot be mapped exactly (`convert()` names the module path)."""


@dataclass(frozen=True)
class Target:
    """What the replacement layers are asked to run."""

    strategy: str
    dispatch_table: DispatchTable | str | Path | None = None
    tuning_budget_s: float | None = None


class LayerAdapter(ABC):
    """Maps one kind of CondConv layer onto the project's `CondConv2d` / `CondConvLinear`."""

    key: ClassVar[str] = ""

    @abstractmethod
    def recognises(self, module: nn.Module) -> bool:
        """Whether `module` is a layer of this adapter's kind (never imports its library)."""

    @abstractmethod
    def spec(self, module: nn.Module) -> LayerSpec:
        """The layer `module` computes; `NotExact` with the reason if no project layer computes exactly it."""

    @abstractmethod
    def replacement(self, module: nn.Module, spec: LayerSpec, target: Target) -> nn.Module:
        """A project layer computing what `module` computes, with its weights, dtype, device and mode,
        called the way `module` is called."""


_adapters: dict[str, LayerAdapter] = {}
_loaded = False


def register_adapter(cls: type[LayerAdapter]) -> type[LayerAdapter]:
    """Class decorator: make an adapter known to `convert()` under its `key`."""
    _add(cls, f"register_adapter({cls.__qualname__})")
    return cls


def _add(cls: object, origin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, LayerAdapter) and cls.key):
        raise UnknownImplError(f"{origin}: {cls!r} is not a LayerAdapter subclass with a key")
    existing = _adapters.get(cls.key)
    if existing is not None and type(existing) is not cls:
        raise DuplicateImplError(f"adapter key {cls.key!r} registered twice: {type(existing).__qualname__} and {cls.__qualname__} ({origin})")
    _adapters[cls.key] = cls()


def adapters() -> dict[str, LayerAdapter]:
    """Every adapter, by key: the built-ins, then the entry points'."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        for cls, origin in load_group(ENTRY_POINT_GROUP).values():
            _add(cls, origin)
    return dict(_adapters)
