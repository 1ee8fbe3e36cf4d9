"""A suite file (or a shipped suite's name) → a validated `Suite`, or every problem in one line each.

Validation runs in stages, each of which only sees what the one before accepted: YAML (duplicate
keys refused), the schema (`schema`, messages by `messages`), each layer's workload
(`workloads`), then the names it uses (`names`). Every problem becomes one line naming the file
and the key path, e.g. `suites/x.yaml: layers[3].groups: 5 does not divide in_channels 64`.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from condconv_bench.cases.models import AS_SHIPPED
from condconv_bench.core.registry import get_impl
from condconv_bench.errors import SuiteError
from condconv_bench.suite import names
from condconv_bench.suite.grid import Layer, Suite
from condconv_bench.suite.messages import schema_problems
from condconv_bench.suite.schema import LayerEntry, LayerFields, SuiteModel
from condconv_bench.suite.workloads import workload_of


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML loading silently overrides."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _layers(model: SuiteModel, resolve_impl: names.ResolveImpl) -> tuple[list[Layer], list[str]]:
    """Each layer entry (with `layer_defaults` under it) as a `Layer`, and the problems of those that are not."""
    problems: list[str] = []
    layers: list[Layer] = []
    for index, raw in enumerate(model.layers):
        path = f"layers[{index}]"
        if not isinstance(raw, dict):
            problems.append(f"{path}: expected a mapping of layer keys, got {raw!r}")
            continue
        merged = {**model.layer_defaults, **raw}
        try:
            entry = LayerEntry.model_validate(merged)
        except ValidationError as exc:
            problems += schema_problems(exc, merged, path + ".")
            continue
        try:
            layers.append(Layer(entry.name, workload_of(entry, path), entry.count, entry))
        except SuiteError as exc:
            problems += exc.problems
            continue
        if entry.kind == "model":
            where = f"{path}.impls" if entry.impls else "impls"
            problems += names.model_impl_problems(entry.impls or model.impls, entry, where, resolve_impl)
            problems += names.model_problems(entry, path)
        elif entry.impls:
            problems += names.impl_problems(entry.impls, f"{path}.impls", resolve_impl)
        if entry.devices:
            problems += names.device_problems(entry.devices, f"{path}.devices")
    return layers, problems


def parse_suite(data: Any, source: Path, resolve_impl: names.ResolveImpl = get_impl) -> Suite:
    """Validate already-loaded YAML data; `source` names the file in every message. Implementation
    names must resolve with `resolve_impl` (an A/B gate passes another revision's registry)."""
    label = str(source)
    if not isinstance(data, dict):
        raise SuiteError([f"{label}: (top level): expected a mapping of suite keys, got {type(data).__name__}"])
    try:
        model = SuiteModel.model_validate(data)
    except ValidationError as exc:
        raise SuiteError([f"{label}: {p}" for p in schema_problems(exc, data)]) from None
    try:
        LayerFields.model_validate(model.layer_defaults)
    except ValidationError as exc:
        raise SuiteError([f"{label}: {p}" for p in schema_problems(exc, model.layer_defaults, "layer_defaults.")]) from None
    layers, problems = _layers(model, resolve_impl)
    layer_names = [layer.name for layer in layers]
    for name in sorted({n for n in layer_names if layer_names.count(n) > 1}):
        problems.append(f"layers: the name {name!r} is used by more than one layer")
    problems += names.impl_problems(model.impls, "impls", resolve_impl, models=True)
    for layer in layers:
        if layer.entry.kind != "model" and not layer.entry.impls and AS_SHIPPED in model.impls:
            problems.append(f"impls: {AS_SHIPPED} runs only model entries, and {layer.name} is a {layer.entry.kind}")
    problems += names.device_problems(model.devices, "devices")
    if problems:
        raise SuiteError([f"{label}: {p}" for p in problems])
    digest = hashlib.sha256(yaml.safe_dump(data, sort_keys=True).encode()).hexdigest()
    return Suite(source, model, tuple(layers), digest)


def shipped_suites() -> dict[str, Path]:
    """The suites installed with the package, by name (`smoke`, `mobile`, …)."""
    folder = importlib.resources.files("condconv_bench.suites")
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def resolve_suite_path(name_or_path: str | Path) -> Path:
    """A path as given if it exists, else a shipped suite's name (`mobile` → its YAML file)."""
    path = Path(name_or_path)
    if path.exists() or path.suffix in (".yaml", ".yml"):
        return path
    return shipped_suites().get(str(name_or_path), path)


def load_suite(name_or_path: str | Path, resolve_impl: names.ResolveImpl = get_impl) -> Suite:
    """Read, parse and validate a suite file (or a shipped suite by name)."""
    path = resolve_suite_path(name_or_path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SuiteError([f"{path}: cannot read suite file ({exc.strerror or exc})"]) from None
    except UnicodeDecodeError as exc:
        raise SuiteError([f"{path}: not a YAML text file (byte {exc.start} is not UTF-8)"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise SuiteError([f"{path}{where}: YAML error: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise SuiteError([f"{path}: YAML error: {exc}"]) from None
    return parse_suite(data, path, resolve_impl)
