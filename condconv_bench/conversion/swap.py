"""`convert()`: replace every CondConv layer of a model by the project's layers, weights copied exactly.

Layers are found through adapters (`condconv_bench.conversion.adapters`): timm's `CondConv2d`, this project's
own layers, and any third-party adapter from the `condconv_bench.adapters` entry points. Every
recognised layer is mapped before anything is replaced, so a model with one layer that cannot be
mapped exactly is refused whole, with one line naming that layer's path and the reason, and is
left as it was. A layer reachable from several places (a shared module) gets one replacement,
put in all of them. Nothing here imports a model library.
"""

from __future__ import annotations

import copy as copying
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from torch import nn

from condconv_bench.conversion.adapters import LayerAdapter, NotExact, Target, adapters
from condconv_bench.dispatch.deployable import batch_fixed_reason, deployed_strategy
from condconv_bench.dispatch.dispatching_layers import SELECTORS
from condconv_bench.errors import UnmappableLayerError
from condconv_bench.core.registry import get_impl
from condconv_bench.core.spec import LayerSpec

if TYPE_CHECKING:  # the layer module knows where the dispatch table lives
    from condconv_bench.dispatch.table import DispatchTable


@dataclass(frozen=True)
class Replacement:
    """One replaced layer: where it is, what it was, what runs there now."""

    path: str  # as in `model.named_modules()`; "" for the model itself
    from_class: str  # `module.Class` of the layer that was there
    to_class: str
    strategy: str  # what runs there now
    spec: LayerSpec
    reason: str | None = None  # why `strategy` is not the one asked for (it is not for this kind of layer)


class Conversion(NamedTuple):
    """`convert()`'s answer: the model (converted) and what was replaced, in module order."""

    model: nn.Module
    replaced: tuple[Replacement, ...]


@dataclass(frozen=True)
class FoundLayer:
    """A recognised CondConv layer, the adapter that maps it, and the layer it computes."""

    path: str
    module: nn.Module
    adapter: LayerAdapter
    spec: LayerSpec


def _class_name(module: nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def find_layers(model: nn.Module) -> list[FoundLayer]:
    """Every CondConv layer an adapter recognises, each once, in module order; `UnmappableLayerError`
    for the first that cannot be mapped exactly. Layers inside a recognised layer are its own business."""
    known = list(adapters().values())
    found: list[FoundLayer] = []
    inside: list[str] = []
    for path, module in model.named_modules():
        if any(path.startswith(prefix + ".") for prefix in inside):
            continue
        adapter = next((a for a in known if a.recognises(module)), None)
        if adapter is None:
            continue
        inside.append(path)
        try:
            spec = adapter.spec(module)
        except NotExact as exc:
            raise UnmappableLayerError(f"{path or '(the model itself)'} ({_class_name(module)}): cannot be converted exactly: {exc}") from None
        found.append(FoundLayer(path, module, adapter, spec))
    return found


def convert(
    model: nn.Module,
    strategy: str = "autotune",
    *,
    copy: bool = False,
    elsewhere: str | None = "auto",
    dispatch_table: DispatchTable | str | Path | None = None,
    tuning_budget_s: float | None = None,
    for_export: bool = False,
) -> Conversion:
    """Replace every CondConv layer of `model` by `CondConv2d` / `CondConvLinear` running `strategy`.

    `strategy` is `"autotune"` (measure the strategies on each new input's first call, remembered per
    machine), `"auto"` (a dispatch table's choice: `dispatch_table`, or the shipped one) or a
    dispatchable strategy's key. A fixed strategy runs only in the layers it is an algorithm for:
    the matmul strategies (`batched_matmul`, `pixel_major_matmul`, `workspace_matmul`,
    `chunked_matmul`) are not for depthwise layers, which have no matrix product to batch, so a
    model converted "to batched_matmul" runs `elsewhere` (default `auto`; any strategy key or
    `autotune`) in its depthwise layers, and its record says so (`Replacement.reason`);
    `elsewhere=None` runs `strategy` in every layer regardless. `for_export` prepares the model
    for an exported graph with a dynamic batch: every layer runs `strategy` where that is a fixed
    strategy that exports so and suits the layer, else the strategy measured fastest for its
    class among those that do (`dispatch.deployable`), and its record says why. (`auto` and
    `autotune` layers run that one while being exported anyway; `for_export` also runs it eagerly,
    so that what is tested is what is exported.) Weights, dtype, device, training
    mode and `requires_grad` carry over; each replacement is called as the layer it replaces
    (timm's blocks pass their routing weights). In place, unless `copy` (then `model` is
    untouched). Raises `UnmappableLayerError` (one line: the module path and the reason) before
    changing anything when a recognised layer cannot be mapped exactly.
    """
    if copy:
        model = copying.deepcopy(model)
    found = find_layers(model)
    built: dict[int, nn.Module] = {}
    replaced = []
    for layer in found:
        runs, reason = _exported_strategy_for(layer.spec, strategy) if for_export else _strategy_for(layer.spec, strategy, elsewhere)
        built[id(layer.module)] = layer.adapter.replacement(layer.module, layer.spec, Target(runs, dispatch_table, tuning_budget_s))
        replaced.append(Replacement(layer.path, _class_name(layer.module), _class_name(built[id(layer.module)]), runs,
                                    layer.spec, reason))
    if id(model) in built:
        return Conversion(built[id(model)], tuple(replaced))
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # named_children() would skip a repeated child
            if child is not None and id(child) in built:
                setattr(parent, name, built[id(child)])
    return Conversion(model, tuple(replaced))


def _strategy_for(spec: LayerSpec, strategy: str, elsewhere: str | None) -> tuple[str, str | None]:
    """What runs in a layer of `spec` when `strategy` is asked for, and why, if it is not `strategy`."""
    if elsewhere is None or strategy in SELECTORS:
        return strategy, None
    reason = get_impl(strategy).unsuited_reason(spec)
    return (strategy, None) if reason is None else (elsewhere, f"{strategy} {reason}: runs {elsewhere}")


def _exported_strategy_for(spec: LayerSpec, strategy: str) -> tuple[str, str | None]:
    """What runs in a layer of `spec` in a model prepared for export when `strategy` is asked for, and why."""
    deployed = deployed_strategy(spec)
    if strategy in SELECTORS:
        return deployed, None if strategy == deployed else f"for export: {strategy} runs {deployed} in an exported graph"
    reason = batch_fixed_reason(strategy) or get_impl(strategy).unsuited_reason(spec)
    return (strategy, None) if reason is None else (deployed, f"for export: {strategy} {reason}: runs {deployed}")
