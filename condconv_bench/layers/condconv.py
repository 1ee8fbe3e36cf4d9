"""Drop-in CondConv layers that pick their strategy: `CondConv2d` and `CondConvLinear`.

They take the usual `nn.Conv2d` / `nn.Linear` arguments (and their defaults, bias included) plus
`num_experts`, the routing kind and `strategy`: `"auto"` (the default) dispatches per call through
a dispatch table — the one given as `dispatch_table` (a `DispatchTable` or a JSON path from
`condconv-bench tune`), else `$CONDCONV_BENCH_DISPATCH`, else the tables shipped with the package —
`"autotune"` measures the strategies on the first call of each new input signature, within
`tuning_budget_s` (`condconv_bench.dispatch.autotuning`), and any dispatchable registry key fixes the strategy. `forward(x, routing_weights=None)` routes
from `x` or takes routing weights shared across a block.
"""

from __future__ import annotations

from pathlib import Path

from condconv_bench.dispatch.table import DispatchTable
from condconv_bench.dispatch.dispatching_layers import Auto
from condconv_bench.core.spec import LayerSpec, RoutingKind

IntOrPair = int | tuple[int, int]


class CondConv2d(Auto):
    """A conditionally parameterised `nn.Conv2d` with `num_experts` kernels mixed per example."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
        *,
        num_experts: int = 8,
        routing: RoutingKind = "sigmoid",
        temperature: float = 1.0,
        strategy: str = "auto",
        dispatch_table: DispatchTable | str | Path | None = None,
        tuning_budget_s: float | None = None,
    ) -> None:
        spec = LayerSpec(
            "conv2d", in_channels, out_channels, num_experts, kernel_size, stride, padding, dilation, groups,
            bias, routing, temperature,
        )
        super().__init__(spec, strategy=strategy, dispatch_table=dispatch_table, tuning_budget_s=tuning_budget_s)


class CondConvLinear(Auto):
    """A conditionally parameterised `nn.Linear` (e.g. a CondConv classifier)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        num_experts: int = 8,
        routing: RoutingKind = "sigmoid",
        temperature: float = 1.0,
        strategy: str = "auto",
        dispatch_table: DispatchTable | str | Path | None = None,
        tuning_budget_s: float | None = None,
    ) -> None:
        spec = LayerSpec("linear", in_features, out_features, num_experts, bias=bias, routing=routing, temperature=temperature)
        super().__init__(spec, strategy=strategy, dispatch_table=dispatch_table, tuning_budget_s=tuning_budget_s)
