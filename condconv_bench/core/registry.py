"""Name → implementation class, with a small verb set: register, get, create, list.

Three sources, one namespace: the built-ins — the strategies in `condconv_bench.impls` (one module
per key, loaded by importing the package's modules) and the dispatching layers `auto` and
`autotune` (`condconv_bench.dispatch.dispatching_layers`) — third-party classes advertised in the `condconv_bench.impls`
entry-point group (registered under the entry point's name), and `package.module:Class` names
resolved on demand. A key claimed twice is an error: a silent override would mislabel results.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from condconv_bench.errors import DuplicateImplError, UnknownImplError
from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.entry_points import load_group
from condconv_bench.core.spec import LayerSpec

ENTRY_POINT_GROUP = "condconv_bench.impls"
# `auto` and `autotune`: built in, but not strategies. Relative to this package, so that a tree the
# A/B gate serves under another package name registers its own.
DISPATCHING_LAYERS = "..dispatch.dispatching_layers"

_registry: dict[str, type[CondConvBase]] = {}
_loaded = False


def _add(key: str, cls: type[CondConvBase], origin: str) -> None:
    if not (isinstance(cls, type) and issubclass(cls, CondConvBase)):
        raise UnknownImplError(f"{origin}: {cls!r} is not a subclass of condconv_bench.CondConvBase")
    existing = _registry.get(key)
    if existing is not None and existing is not cls:
        raise DuplicateImplError(
            f"implementation key {key!r} registered twice: {existing.__module__}.{existing.__qualname__} "
            f"and {cls.__module__}.{cls.__qualname__} ({origin})"
        )
    cls.key = key
    _registry[key] = cls


def register_impl(key: str) -> Callable[[type[CondConvBase]], type[CondConvBase]]:
    """Class decorator: make an implementation nameable in suites and listed by `condconv-bench list`."""

    def decorate(cls: type[CondConvBase]) -> type[CondConvBase]:
        _add(key, cls, f"register_impl({key!r})")
        return cls

    return decorate


def _load_sources() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import condconv_bench.impls as builtin

    for module in pkgutil.iter_modules(builtin.__path__):
        importlib.import_module(f"{builtin.__name__}.{module.name}")
    importlib.import_module(DISPATCHING_LAYERS, __package__)
    for name, (cls, origin) in load_group(ENTRY_POINT_GROUP).items():
        _add(name, cls, origin)  # type: ignore[arg-type]  # _add checks it is a CondConvBase subclass


def _import_class(name: str) -> type[CondConvBase]:
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownImplError(f"implementation {name!r}: cannot import module {module_name!r} ({exc})") from None
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, CondConvBase)):
        raise UnknownImplError(f"implementation {name!r}: {attribute!r} is not a CondConvBase subclass in {module_name}")
    return cls


def get_impl(name: str) -> type[CondConvBase]:
    """The class for a registry key or a `package.module:Class` name."""
    _load_sources()
    if ":" in name:
        return _import_class(name)
    if name in _registry:
        return _registry[name]
    close = difflib.get_close_matches(name, _registry, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(sorted(_registry))}"
    raise UnknownImplError(f"unknown implementation {name!r}{hint}")


def create_impl(name: str, spec: LayerSpec) -> CondConvBase:
    """An instance of the named implementation for `spec`, freshly initialised."""
    return get_impl(name)(spec)


def dispatchable_impls() -> dict[str, type[CondConvBase]]:
    """The strategies a dispatching layer may run on its own parameters, by key."""
    _load_sources()
    return {key: cls for key, cls in sorted(_registry.items()) if cls.__dict__.get("dispatchable", False)}


@dataclass(frozen=True)
class ImplInfo:
    key: str
    description: str
    is_floor: bool
    unavailable_reason: str | None

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None


def list_impls(*, include_floor: bool = True, available_only: bool = False, include_baselines: bool | None = None) -> list[ImplInfo]:
    """Every registered implementation, sorted by key, with its machine-wide availability.

    `include_baselines` is the name `include_floor` had in 0.1 releases: still accepted, with a
    `DeprecationWarning`, until the next minor release removes it.
    """
    if include_baselines is not None:
        warnings.warn("list_impls(include_baselines=...) is deprecated: the static layer is the floor, use include_floor=...",
                      DeprecationWarning, stacklevel=2)
        include_floor = include_baselines
    _load_sources()
    infos = [
        ImplInfo(key, cls.description(), cls.is_floor, cls.unavailable_reason())
        for key, cls in sorted(_registry.items())
    ]
    return [
        info
        for info in infos
        if (include_floor or not info.is_floor) and (info.available or not available_only)
    ]
