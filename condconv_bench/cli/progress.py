"""What a run shows while it runs: a bar on a terminal, a line per group in a log, nothing with --quiet."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from condconv_bench import formatting
from condconv_bench.case import Case


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
    group probed and per sweep timed, each with the elapsed time and what is left."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.started = time.monotonic()
        self.group: tuple[Any, ...] | None = None

    def _say(self, text: str) -> None:
        click.echo(f"[{formatting.duration(time.monotonic() - self.started)}] {self.label}: {text}", err=True)

    def case_started(self, index: int, total: int, case: Case) -> None:
        if case.group == self.group:
            return
        self.group = case.group
        elapsed = time.monotonic() - self.started
        left = f"; probes left about {formatting.duration(elapsed / (index - 1) * (total - index + 1))}" if index > 1 else ""
        self._say(f"probing case {index}/{total} ({case.layer} b{case.batch_size} {case.device} {case.dtype} {case.mode}){left}")

    def timing_started(self, groups: int, budget_s: float) -> None:
        self._say(f"timing {groups} groups in the worker processes: at most {formatting.duration(groups * budget_s)} "
                  f"({budget_s:g} s budget per group)")

    def case_finished(self, index: int, total: int, case: Case, row: dict[str, Any]) -> None:
        if index == total:
            self._say(f"{total}/{total} cases done")

    def close(self) -> None:
        pass


def progress_for(label: str, quiet: bool) -> ProgressBar | ProgressLines | None:
    """A bar on a terminal, lines in a log, nothing with --quiet."""
    if quiet:
        return None
    return ProgressBar(label) if sys.stderr.isatty() else ProgressLines(label)

