"""Which cases the two revisions share: each case of either suite, with both classes or the reason
it cannot be compared.

Each side's suite is read from its own tree (a shipped name such as `smoke` is that tree's
`suites/smoke.yaml`; a path inside the repository is the same path in each tree), because a
change under review may change the suite too. A case is compared only when both sides define it
identically (same layer shapes, same axes) and both implementations load; otherwise the pair
says why — new, removed, redefined, failing to import, or skipped on this machine.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch

from condconv_bench.gate.ab.aliases import alias_for
from condconv_bench.gate.ab.revision import Revision
from condconv_bench.core.case import Case
from condconv_bench.errors import CondConvBenchError, first_line
from condconv_bench.cases.inputs import seed_of
from condconv_bench.measure.protocol import Visit
from condconv_bench.cases.models.workload import ModelWorkload
from condconv_bench.run.probes import skip_reason
from condconv_bench.suite.grid import Suite
from condconv_bench.suite.loader import load_suite
from condconv_bench.cases.workload import Workload

SIDES = ("base", "head")


@dataclass(frozen=True)
class CasePair:
    """One case id on both sides: the head's case, each side's class and workload, or why it is not compared."""

    case_id: str
    case: Case
    classes: dict[str, type]  # by side; empty when not compared
    not_compared: str | None = None
    workloads: dict[str, Workload] = field(default_factory=dict)  # by side, where a side builds the workload its own way

    def tagged(self, side: str) -> Case:
        """The case as measured for `side`: its implementation named `<impl>@<side>`, so that both
        versions can be timed in one round under distinct ids, and its workload as that side builds it."""
        return replace(self.case, impl=f"{self.case.impl}@{side}", workload=self.workloads.get(side, self.case.workload))


def suite_file(suite: str, root: Path, repo: Path) -> Path:
    """Where a side whose tree is at `root` keeps `suite` (a shipped name or a path)."""
    path = Path(suite)
    if not path.exists() and path.suffix not in (".yaml", ".yml"):
        return root / "suites" / f"{suite}.yaml"
    try:
        return root / path.resolve().relative_to(repo.resolve())
    except ValueError:
        return path  # outside the repository: one file for both sides


# Where a revision keeps each module the gate takes from it, newest layout first: a revision from
# before the package was split into layered subpackages kept both at the package root, and the
# gate must still compare against it (the move is exactly the kind of change a gate is for).
_HOMES_BY_LAYOUT = {"registry": ("core.registry", "registry"), "model workload": ("cases.models.workload", "models.workload")}


def _side_module(side: str, concept: str) -> ModuleType:
    """`concept`'s module in `side`'s tree, in whichever layout that tree has."""
    alias = alias_for(side)
    for home in _HOMES_BY_LAYOUT[concept]:
        name = f"{alias}.{home}"
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not exc.name or not (name == exc.name or name.startswith(exc.name + ".")):
                raise  # the module is there but fails to import: that is the revision's error
    raise ModuleNotFoundError(f"{side} keeps no {concept} module in any layout this gate knows ({', '.join(_HOMES_BY_LAYOUT[concept])})")


def _registry(side: str) -> ModuleType:
    return _side_module(side, "registry")


def _load(suite: str, side: str, revision: Revision, repo: Path) -> tuple[Suite | None, str | None]:
    path = suite_file(suite, revision.root, repo)
    if not path.exists():
        return None, f"{revision.label} has no suite {path.relative_to(revision.root) if path.is_relative_to(revision.root) else path}"
    try:
        return load_suite(path, _registry(side).get_impl), None
    except CondConvBenchError as exc:
        return None, f"{revision.label}: its suite does not load with this harness ({first_line(exc)})"


def _side_workload(workload: Workload, side: str) -> Workload:
    """`workload` as `side`'s tree builds it. A layer or a stack is built by the instrument around
    each side's class; a model is converted by name (`convert()`), so it must be converted by the
    side's own `ModelWorkload`, or both sides would measure the head's conversion and strategies."""
    if not isinstance(workload, ModelWorkload):
        return workload
    return _side_module(side, "model workload").ModelWorkload(workload.source, workload.input_size, workload.floor, workload.in_channels)


def _pair(case_id: str, cases: dict[str, Case | None]) -> CasePair:
    base, head = cases["base"], cases["head"]
    if base is None or head is None:
        return CasePair(case_id, head or base, {}, f"only in {'head' if base is None else 'base'}")  # type: ignore[arg-type]
    if base != head:
        return CasePair(case_id, head, {}, "the suite defines it differently in base and head")
    classes, workloads = {}, {}
    for side in SIDES:
        try:
            workloads[side] = _side_workload(head.workload, side)
            # A model's own workload resolves the name: its `as_shipped` is no registry entry.
            own = isinstance(head.workload, ModelWorkload)
            classes[side] = workloads[side].impl_class(head.impl) if own else _registry(side).get_impl(head.impl)
        except Exception as exc:  # the revision's code fails to import: that side cannot be measured
            return CasePair(case_id, head, {}, f"{side}: {first_line(exc)}")
    device = torch.device(head.device)
    skipped = next(filter(None, (skip_reason(classes[side], replace(head, workload=workloads[side]), device) for side in SIDES)), None)
    if skipped:
        return CasePair(case_id, head, {}, f"skipped: {skipped}")
    return CasePair(case_id, head, classes, workloads=workloads)


def pair_cases(suite: str, base: Revision, head: Revision, repo: Path) -> tuple[list[CasePair], Suite]:
    """Every case of either side's suite, paired; the head's suite (its settings rule the gate)."""
    suites = {side: _load(suite, side, revision, repo) for side, revision in zip(SIDES, (base, head))}
    head_suite, head_problem = suites["head"]
    if head_suite is None:
        raise CondConvBenchError(head_problem)
    base_suite, base_problem = suites["base"]
    by_side = {"head": {c.id: c for c in head_suite.cases()}, "base": {c.id: c for c in base_suite.cases()} if base_suite else {}}
    ids = list(dict.fromkeys([*by_side["head"], *by_side["base"]]))
    pairs = [_pair(i, {side: by_side[side].get(i) for side in SIDES}) for i in ids]
    if base_problem:
        pairs = [replace(p, classes={}, not_compared=base_problem) for p in pairs]
    return pairs, head_suite


def group_visits(pairs: list[CasePair], seed: int, rounds: int, block_s: float, warmup: int) -> list[Visit]:
    """One visit per group holding both versions of each of its compared cases (ids `…@base`, `…@head`)."""
    groups: dict[tuple, list[CasePair]] = {}
    for pair in pairs:
        groups.setdefault(pair.case.group, []).append(pair)
    return [
        Visit(tuple(pair.tagged(side) for pair in group for side in SIDES),
              {pair.tagged(side).id: pair.classes[side] for pair in group for side in SIDES},
              seed, rounds, block_s, warmup, seed_of(seed, "ab", *group[0].case.group))
        for group in groups.values()
    ]
