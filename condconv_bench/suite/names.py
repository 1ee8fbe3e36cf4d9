"""What the names in a suite refer to: implementations (the registry), models (their libraries), devices.

Each check returns one line per problem, naming the key path, so that a suite with several wrong
names is refused once with all of them. Implementation names resolve with the `resolve_impl`
the loader was given (an A/B gate passes another revision's registry). A model entry runs
`as_shipped` (the model as its library builds it), its floor (the floor implementation, with a
`floor:` model), or what `convert()` takes; its model names are looked up in their libraries
without building anything (`cases.models.sources.check_name`).
"""

from __future__ import annotations

from collections.abc import Callable

from condconv_bench.cases.models import AS_SHIPPED, sources
from condconv_bench.core.registry import dispatchable_impls
from condconv_bench.dispatch.dispatching_layers import SELECTORS
from condconv_bench.errors import CondConvBenchError
from condconv_bench.suite.schema import DEVICE_PATTERN, DeviceEntry, LayerEntry, device_of

ResolveImpl = Callable[[str], type]


def impl_problems(names: list[str], path: str, resolve_impl: ResolveImpl, *, models: bool = False) -> list[str]:
    """Names at `path` that do not resolve; `as_shipped` resolves where the list also serves `models`."""
    problems = []
    for index, name in enumerate(names):
        if models and name == AS_SHIPPED:
            continue
        try:
            resolve_impl(name)
        except CondConvBenchError as exc:
            problems.append(f"{path}[{index}]: {exc}")
    return problems


def model_impl_problems(names: list[str], entry: LayerEntry, path: str, resolve_impl: ResolveImpl) -> list[str]:
    """What a model entry cannot run: a name that is neither as_shipped, its floor, nor what convert() takes."""
    convertible = (*SELECTORS, *dispatchable_impls())
    problems = []
    for index, name in enumerate(names):
        if name == AS_SHIPPED or name in convertible:
            continue
        try:
            is_floor = resolve_impl(name).is_floor
        except CondConvBenchError as exc:
            problems.append(f"{path}[{index}]: {exc}")
            continue
        if not is_floor:
            problems.append(f"{path}[{index}]: {name!r} cannot run a model: expected {AS_SHIPPED}, the floor, "
                            f"or a strategy convert() takes ({', '.join(convertible)})")
        elif entry.floor is None:
            problems.append(f"{path}[{index}]: {name} is a model's floor; set floor: (the network without CondConv)")
    return problems


def model_problems(entry: LayerEntry, path: str) -> list[str]:
    """The entry's `model:` and `floor:` names that their libraries do not have."""
    problems = []
    for key in ("model", "floor"):
        source = getattr(entry, key)
        if source is None:
            continue
        try:
            sources.check_name(source)
        except CondConvBenchError as exc:
            problems.append(f"{path}.{key}: {exc}")
    return problems


def device_problems(devices: list[str | DeviceEntry], path: str) -> list[str]:
    problems = []
    for index, entry in enumerate(devices):
        device, _ = device_of(entry)
        if not DEVICE_PATTERN.match(device):
            where = f"{path}[{index}]" + ("" if isinstance(entry, str) else ".name")
            problems.append(f"{where}: {device!r} is not a device (expected cpu, cuda, cuda:N or mps)")
    return problems
