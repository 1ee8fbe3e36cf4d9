"""condconv-bench: benchmark, verify and choose implementations of CondConv layers.

The public names resolve on first use (PEP 562), so `from condconv_bench import CondConv2d` loads
the layer and torch only: a model that wants the drop-in layer does not pay for the harness
(pandas, scipy, fvcore, pydantic), and neither do the benchmark's worker processes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "CondConv2d": "condconv_bench.layers.condconv",
    "CondConvLinear": "condconv_bench.layers.condconv",
    "CondConvBase": "condconv_bench.core.contract",
    "CondConvBenchError": "condconv_bench.errors",
    "DispatchTable": "condconv_bench.dispatch.table",
    "convert": "condconv_bench.conversion.swap",
    "LayerSpec": "condconv_bench.core.spec",
    "create_impl": "condconv_bench.core.registry",
    "get_impl": "condconv_bench.core.registry",
    "list_impls": "condconv_bench.core.registry",
    "register_impl": "condconv_bench.core.registry",
    "load_results": "condconv_bench.run.directory",
    "run_suite": "condconv_bench.run.runner",
    "set_autotune": "condconv_bench.dispatch.switch",
}

__all__ = sorted([*_HOMES, "__version__"])

if TYPE_CHECKING:
    from condconv_bench.conversion.swap import convert
    from condconv_bench.dispatch.table import DispatchTable
    from condconv_bench.errors import CondConvBenchError
    from condconv_bench.core.contract import CondConvBase
    from condconv_bench.layers.condconv import CondConv2d, CondConvLinear
    from condconv_bench.core.registry import create_impl, get_impl, list_impls, register_impl
    from condconv_bench.run.directory import load_results
    from condconv_bench.dispatch.switch import set_autotune
    from condconv_bench.run.runner import run_suite
    from condconv_bench.core.spec import LayerSpec


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'condconv_bench' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
