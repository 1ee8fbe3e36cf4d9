"""Per stage of a model: where the time converted / floor still costs goes.

A model's cases say what CondConv costs end to end (converted / floor); this says where. Both
models are cut into the same *stages*, their top-level children in order, with a sequence of
sequences (timm's `blocks`) giving one stage per inner sequence (EfficientNet's seven stages), so
a stage of the CondConv model and the same stage of its floor compute the same shapes.

- Time per stage: forward hooks on every stage read the clock before and after it; the models run
  in shuffled interleaved rounds in one process (`condconv_bench.timing.rounds`, one call per
  block, as the instrument's workers do for whole cases), and each stage's ratio is the median of
  its per-round ratios. The hooks cost about a microsecond each (a dozen stages), against
  milliseconds per stage.
- What the difference is made of: one profiled pass per model with a `record_function` label
  around each stage (only in that pass: a label costs about 4 µs without a profiler, which would
  distort the timed rounds) and the project's phase attribution (`condconv_bench.profiling.phases`) applied
  to the operators inside each label. The profiler's per-operator overhead inflates these times;
  they are shares, and the timed rounds are the latencies.

With `--layers`, the rows are the CondConv layers instead (the floor's layers of the same paths),
and say which strategy each ran. Forward only (inference): stage hooks cannot time the backward without wrapping every stage in
autograd hooks that change what is measured. Run it as
`condconv-bench model-stages timm:efficientnet_cc_b0_8e timm:efficientnet_b0 --batch-size 8`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.profiler import ProfilerActivity, record_function

from condconv_bench.conversion.swap import convert, find_layers
from condconv_bench.dispatch.cache import cache_off
from condconv_bench.cases.models import sources
from condconv_bench.profiling.phases import FORWARD_PHASES, outermost, classify
from condconv_bench.profiling.session import profiler_session
from condconv_bench.timing.ratios import paired_ratios
from condconv_bench.timing.rounds import Round, run_rounds, times_of
from condconv_bench.timing.samples import median


def stages_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level children in order, a sequence of sequences giving one stage per element."""
    found = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and len(child) and all(isinstance(c, nn.Sequential) for c in child):
            found += [(f"{name}.{inner}", stage) for inner, stage in child.named_children()]
        else:
            found.append((name, child))
    return found


def condconv_paths(model: nn.Module) -> list[str]:
    """The paths of a model's CondConv layers: its per-layer "stages" (timm's EfficientNets and their
    floors share them, e.g. `blocks.5.1.conv_pw`)."""
    return [found.path for found in find_layers(model)]


@contextmanager
def _hooked(model: nn.Module, before: Callable[[str], None], after: Callable[[str], None],
            paths: list[str] | None = None) -> Iterator[None]:
    handles = []
    named = stages_of(model) if paths is None else [(path, model.get_submodule(path)) for path in paths]
    for name, stage in named:
        handles.append(stage.register_forward_pre_hook(lambda *_, n=name: before(n)))
        handles.append(stage.register_forward_hook(lambda *_, n=name: after(n)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class StageTimes:
    """Each model's seconds per round, of the whole forward and of each stage (a round ran every
    model once, back to back, so the same round of two models is a paired sample)."""

    stages: list[str]
    whole: list[Round]
    per_stage: dict[str, list[Round]]

    def _rounds(self, stage: str | None) -> list[Round]:
        return self.whole if stage is None else self.per_stage[stage]

    def median(self, label: str, stage: str | None = None) -> float:
        return median(times_of(self._rounds(stage), label))

    def ratio(self, label: str, over: str, stage: str | None = None) -> float:
        """Median of the per-round ratios of `label` to `over` (the whole forward when `stage` is None)."""
        return median(paired_ratios(self._rounds(stage), label, over))


def time_stages(models: dict[str, nn.Module], x: torch.Tensor, rounds: int, seed: int = 0,
                paths: list[str] | None = None) -> StageTimes:
    """Interleaved, shuffled rounds of each model's forward (inference mode), every stage timed (or
    every module of `paths`, e.g. `condconv_paths`, which all the models must have)."""
    if paths is None:
        names = {label: [n for n, _ in stages_of(m)] for label, m in models.items()}
        stages = next(iter(names.values()))
        if any(n != stages for n in names.values()):
            raise ValueError(f"the models' stages differ: {names}")
    else:
        stages = paths
    seconds = {label: {s: [] for s in stages} for label in models}  # model label → stage → per-round seconds
    started: dict[str, float] = {}

    def before(stage: str) -> None:
        started[stage] = time.perf_counter()

    def after(label: str, stage: str) -> None:
        seconds[label][stage].append(time.perf_counter() - started[stage])

    with torch.inference_mode(), ExitStack() as hooks:
        for model in models.values():
            model(x)  # the first call (autotune's tuning) is not a round
        for label, model in models.items():
            hooks.enter_context(_hooked(model, before, partial(after, label), paths))
        whole = run_rounds({label: partial(model, x) for label, model in models.items()}, dict.fromkeys(models, 1), rounds,
                           random.Random(seed), time.perf_counter, lambda: None, warm=False)
    per_stage = {stage: [Round({label: seconds[label][stage][i] for label in r.order}) for i, r in enumerate(whole)]
                 for stage in stages}
    return StageTimes(stages, whole, per_stage)


def stage_phases(model: nn.Module, x: torch.Tensor, num_experts: int, steps: int = 3,
                 paths: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Microseconds per forward in each phase (`condconv_bench.profiling.phases`), per stage (or module of
    `paths`), from a profiled pass."""
    labels: dict[str, record_function] = {}

    def before(stage: str) -> None:
        labels[stage] = record_function(f"stage:{stage}")
        labels[stage].__enter__()

    def after(stage: str) -> None:
        labels.pop(stage).__exit__(None, None, None)

    with torch.inference_mode():
        model(x)
        with _hooked(model, before, after, paths), profiler_session(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                model(x)
    phases: dict[str, dict[str, float]] = {}
    for event in prof.events():
        if not event.name.startswith("aten::") or not outermost(event):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("stage:"):
            parent = parent.cpu_parent
        if parent is None:
            continue
        stage = phases.setdefault(parent.name.removeprefix("stage:"), dict.fromkeys(FORWARD_PHASES, 0.0))
        stage[classify(event.name, event.input_shapes or [], num_experts)] += event.cpu_time_total / steps
    return phases


def stage_table(times: StageTimes, converted: str, floor: str, phases: dict[str, dict[str, dict[str, float]]],
                strategies: dict[str, str] | None = None) -> str:
    """Markdown: per stage, floor and converted latency, their ratio, the difference, and what the
    difference is made of by phase (converted's phase time less the floor's, profiled); with
    `strategies` (stage → what ran there), a column for it."""
    ran = "" if strategies is None else " ran |"
    header = (f"| stage |{ran} floor | converted | converted / floor | difference | of which (profiled, converted − floor) |\n"
              f"|---|{'---|' if strategies else ''}---|---|---|---|---|\n")
    lines = []
    for stage in [*times.stages, None]:
        a, b = times.median(converted, stage), times.median(floor, stage)
        ratio = times.ratio(converted, floor, stage)
        which = "" if strategies is None else f" {strategies.get(stage, '') if stage else ''} |"
        if stage is None:
            parts = ""
        else:
            mine, theirs = phases[converted].get(stage, {}), phases[floor].get(stage, {})
            deltas = {p: mine.get(p, 0.0) - theirs.get(p, 0.0) for p in FORWARD_PHASES}
            parts = ", ".join(f"{p} {d / 1e3:+.2f} ms" for p, d in sorted(deltas.items(), key=lambda kv: -abs(kv[1]))
                              if abs(d) >= 0.05e3)
        lines.append(f"| {stage or '**whole forward**'} |{which} {b * 1e3:.2f} ms | {a * 1e3:.2f} ms | {ratio:.2f}× | "
                     f"{(a - b) * 1e3:+.2f} ms | {parts} |")
    return header + "\n".join(lines)


@dataclass(frozen=True)
class StageReport:
    """One batch size's table, and the line that says what was compared."""

    title: str
    table: str


def stage_reports(model: str, floor: str, batch_sizes: tuple[int, ...], input_size: int = 224, strategy: str = "autotune",
                  rounds: int = 15, threads: int | None = None, layers: bool = False) -> Iterator[StageReport]:
    """Per batch size, `model` converted to `strategy` against `floor`, stage by stage (or layer by
    layer with `layers`); one report as each batch size is measured (`condconv-bench model-stages`)."""
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    with cache_off():  # as in a run: the machine's autotune cache is neither read nor filled
        for batch in batch_sizes:
            torch.manual_seed(0)
            shipped = sources.build_model(model).eval()
            experts = max(found.spec.num_experts for found in find_layers(shipped))
            models = {"floor": sources.build_model(floor).eval(), "converted": convert(shipped, strategy).model}
            x = torch.randn(batch, 3, input_size, input_size)
            paths = condconv_paths(models["converted"]) if layers else None
            times = time_stages(models, x, rounds, paths=paths)
            phases = {label: stage_phases(m, x, experts, paths=paths) for label, m in models.items()}
            ran = {p: getattr(models["converted"].get_submodule(p), "last_strategy", "") for p in paths} if paths else None
            yield StageReport(f"{model} converted to {strategy} vs {floor}, batch {batch}, {input_size}px, {threads} threads, "
                              f"{rounds} rounds", stage_table(times, "converted", "floor", phases, ran))
