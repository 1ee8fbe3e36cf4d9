"""Which cases of a suite a run takes: the command line's filters and a shard's slice."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from condconv_bench.core.case import Case
from condconv_bench.machine.devices import device_unavailable_reason
from condconv_bench.errors import CondConvBenchError, DeviceUnavailableError
from condconv_bench.suite.grid import Suite


@dataclass(frozen=True)
class Shard:
    """Slice `index` of `count` (1-based), e.g. `2/4`; whole groups go to one shard."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise CondConvBenchError(f"--shard {text!r}: expected i/N, e.g. 1/4") from None
        if not 1 <= index <= count:
            raise CondConvBenchError(f"--shard {text!r}: i must be between 1 and N")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def select(self, cases: list[Case]) -> list[Case]:
        # Whole groups stay together so every strategy's ratio to `static` comes from one machine.
        groups = list(dict.fromkeys(case.group for case in cases))
        mine = {group for position, group in enumerate(groups) if position % self.count == self.index - 1}
        return [case for case in cases if case.group in mine]


@dataclass(frozen=True)
class CaseFilter:
    """Command-line narrowing of a suite; empty tuples keep everything."""

    impls: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    layers: tuple[str, ...] = ()
    dtypes: tuple[str, ...] = ()
    modes: tuple[str, ...] = ()
    runtimes: tuple[str, ...] = ()

    def apply(self, cases: list[Case], suite: Suite) -> list[Case]:
        applied: list[str] = []  # the filters already applied, named in an error (a suite's dtypes can differ per device)
        for option, values, attribute in (
            ("--impl", self.impls, "impl"),
            ("--device", self.devices, "device"),
            ("--batch-size", self.batch_sizes, "batch_size"),
            ("--layer", self.layers, "layer"),
            ("--dtype", self.dtypes, "dtype"),
            ("--mode", self.modes, "mode"),
            ("--runtime", self.runtimes, "runtime"),
        ):
            known = list(dict.fromkeys(getattr(case, attribute) for case in cases))
            for value in values:
                if value not in known:
                    where = f" with {' '.join(applied)}" if applied else ""
                    raise CondConvBenchError(
                        f"{option} {value}: not in {suite.path}{where} (it has: {', '.join(map(str, known))})"
                    )
            if values:
                cases = [case for case in cases if getattr(case, attribute) in values]
                applied.extend(f"{option} {value}" for value in values)
        for device in self.devices:
            reason = device_unavailable_reason(torch.device(device))
            if reason:
                raise DeviceUnavailableError(f"--device {device}: {reason}")
        return cases
