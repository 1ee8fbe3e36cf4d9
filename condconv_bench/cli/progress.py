"""What a run shows while it runs: a bar on a terminal, a line per group in a log, nothing with --quiet."""

from __future__ import annotations

import sys
import time
from typing import Any

import click
import torch

from condconv_bench import formatting
from condconv_bench.core.case import Case
from condconv_bench.machine.devices import device_unavailable_reason


class ProgressBar:
    """Runner listener that draws `n/N`, the current case and an ETA on stderr."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def _ensure(self, total: int) -> Any:
        if self.bar is None:
            self.bar = click.progressbar(
                length=total, label=self.label, show_pos=True, show_eta=True, file=sys.stderr,
                item_show_func=lambda case: case.id if case else None,
            )
            self.bar.__enter__()
        return self.bar

    def case_started(self, index: int, total: int, case: Case) -> None:
        bar = self._ensure(total)
        bar.update(index - 1 - bar.pos, case)

    def run_started(self, cases: list[Case]) -> None:
        pass  # the bar's length comes with the first case

    def timing_started(self, groups: int, budget_s: float) -> None:
        pass  # the bar keeps showing the last case probed until the sweep's rows arrive

    def case_finished(self, index: int, total: int, case: Case, row: dict[str, Any]) -> None:
        bar = self._ensure(total)
        bar.update(index - bar.pos, case)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


class ProgressLines:
    """Runner listener for a log (stderr is not a terminal, where a bar draws nothing): a line per
    group probed and per sweep timed, each with the elapsed time and what is left.

    What is left is estimated from the probes so far, over the cases this machine can run (a
    case on a device it lacks is skipped in no time), and the timing of a sweep is said when it
    starts (its rounds' budget) and when it ends (how long it took, workers' first calls included).
    """

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.group: tuple[Any, ...] | None = None
        self.runs_here: dict[str, bool] = {}
        self.probed_here = 0
        self.probing_s = 0.0  # time spent probing, sweeps' timing excluded
        self.mark = self.started
        self.timing_since: float | None = None

    def _say(self, text: str) -> None:
        click.echo(f"[{formatting.duration(time.monotonic() - self.started)}] {self.label}: {text}", err=True)

    def run_started(self, cases: list[Case]) -> None:
        self.runs_here = {case.id: device_unavailable_reason(torch.device(case.device)) is None for case in cases}

    def case_started(self, index: int, total: int, case: Case) -> None:
        now = time.monotonic()
        self.probing_s += now - self.mark
        self.mark = now
        if case.group != self.group and self.runs_here.get(case.id, True):  # a group on a missing device is skipped unsaid
            self.group = case.group
            left = sum(self.runs_here.values()) - self.probed_here
            estimate = (f"; probes left about {formatting.duration(self.probing_s / self.probed_here * left)}"
                        if self.probed_here and left else "")
            self._say(f"probing case {index}/{total} ({case.layer} b{case.batch_size} {case.device} {case.dtype} {case.mode}){estimate}")
        self.probed_here += self.runs_here.get(case.id, False)

    def timing_started(self, groups: int, budget_s: float) -> None:
        now = time.monotonic()
        self.probing_s += now - self.mark
        self.timing_since = now
        self._say(f"timing {groups} groups in the worker processes ({budget_s:g} s of rounds per group, "
                  f"plus each worker's first calls)")

    def case_finished(self, index: int, total: int, case: Case, row: dict[str, Any]) -> None:
        if self.timing_since is not None:
            self._say(f"timed in {formatting.duration(time.monotonic() - self.timing_since)}")
            self.timing_since = None
        self.mark = time.monotonic()
        if index == total:
            self._say(f"{total}/{total} cases done")

    def close(self) -> None:
        pass


def progress_for(label: str, quiet: bool) -> ProgressBar | ProgressLines | None:
    """A bar on a terminal, lines in a log, nothing with --quiet."""
    if quiet:
        return None
    return ProgressBar(label) if sys.stderr.isatty() else ProgressLines(label)

