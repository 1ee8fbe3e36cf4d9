"""condconv-bench: benchmark, verify and choose implementations of CondConv layers."""

from condconv_bench.errors import CondConvBenchError
from condconv_bench.layer import CondConvBase
from condconv_bench.registry import create_impl, get_impl, list_impls, register_impl
from condconv_bench.spec import LayerSpec

__version__ = "0.1.0"

__all__ = [
    "CondConvBase",
    "CondConvBenchError",
    "LayerSpec",
    "__version__",
    "create_impl",
    "get_impl",
    "list_impls",
    "register_impl",
]
