"""Messages between the runner and its worker processes, and how they travel over a pipe.

Each message is a pickle behind an 8-byte length. Pickle carries the frozen `Case`s (workloads
included) and the implementation classes by reference, so a worker builds exactly what the
runner resolved — registry keys, entry points or `module:Class` names alike — without parsing
the suite again.
"""

from __future__ import annotations

import math
import os
import pickle
import select
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from condconv_bench.timing.rounds import Round

_LENGTH = struct.Struct("<Q")
# `module:function` a worker calls before it says READY, named by whoever starts the pool (an A/B
# gate serves two source trees with it): the instrument runs it without knowing what it does.
SETUP_VARIABLE = "CONDCONV_BENCH_WORKER_SETUP"
READY = "ready"  # a worker's first message: imports done, nothing else will compete for the CPU
# A worker logs (on stderr) what it is about to do, so that if the process dies the runner knows
# which case killed it: `BUILDING <case id>` before building a case, `TIMING` before the rounds.
BUILDING = "condconv-bench worker: building "
TIMING = "condconv-bench worker: timing rounds"
# The round key of a group's sentinel (`machine.ceilings.sentinel_step`), timed beside its cases.
SENTINEL_KEY = "ceiling sentinel"


@dataclass(frozen=True)
class Visit:
    """Measure up to `rounds` rounds of one group (fewer once `time_limit_s` of rounds have passed,
    never fewer than `min_rounds`); a worker keeps the group built between visits."""

    cases: tuple[Any, ...]  # condconv_bench.core.case.Case, one per implementation
    classes: dict[str, type]  # implementation class by case id
    seed: int  # the suite's seed: parameters and inputs are drawn from it
    rounds: int
    block_s: float
    warmup: int
    shuffle_seed: int
    time_limit_s: float = math.inf
    min_rounds: int = 1
    graphs: dict[str, str] = field(default_factory=dict)  # a runtime case's exported graph (a file), by case id
    sentinel: str | None = None  # the ceiling whose sentinel the rounds time beside the cases (`SENTINEL_KEY`)


@dataclass(frozen=True)
class VisitResult:
    """What a worker measured in one visit; implementations that failed there are in `errors`."""

    pid: int
    rounds: list[Round]
    calls_per_block: dict[str, int]
    errors: dict[str, str] = field(default_factory=dict)
    setup_s: float = 0.0  # building, first calls and warm-up, when the group was new to the worker
    dispatched: dict[str, str] = field(default_factory=dict)  # what each dispatcher ran, when the group was built here
    failure: str | None = None  # set when the visit measured nothing (a step failed mid-round)


def write_message(fd: int, message: object) -> None:
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    data = _LENGTH.pack(len(payload)) + payload
    while data:
        data = data[os.write(fd, data):]


def read_exactly(fd: int, size: int, deadline: float | None = None) -> bytes:
    """`size` bytes from `fd`; EOFError if the other side closed first, TimeoutError past `deadline`
    (a `time.monotonic()` value)."""
    chunks = []
    while size:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                raise TimeoutError("no answer before the deadline")
        chunk = os.read(fd, min(size, 1 << 20))
        if not chunk:
            raise EOFError("pipe closed")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_message(fd: int, deadline: float | None = None) -> Any:
    (size,) = _LENGTH.unpack(read_exactly(fd, _LENGTH.size, deadline))
    return pickle.loads(read_exactly(fd, size, deadline))
