"""condconv-bench: benchmark, verify and choose implementations of CondConv layers."""

from condconv_bench.dispatch import DispatchTable
from condconv_bench.errors import CondConvBenchError
from condconv_bench.layer import CondConvBase
from condconv_bench.modules import CondConv2d, CondConvLinear
from condconv_bench.registry import create_impl, get_impl, list_impls, register_impl
from condconv_bench.results import load_results
from condconv_bench.runner import run_suite
from condconv_bench.spec import LayerSpec

__version__ = "0.1.0"

__all__ = [
    "CondConv2d",
    "CondConvBase",
    "CondConvBenchError",
    "CondConvLinear",
    "DispatchTable",
    "LayerSpec",
    "__version__",
    "create_impl",
    "get_impl",
    "list_impls",
    "load_results",
    "register_impl",
    "run_suite",
]
