"""Exact instruction counts of base and head, per case, from one process run under callgrind.

Wall-clock time on a shared runner moves by percents between rounds; the number of instructions
a step executes does not (measured here: three dumps of one step agreed within 0.1%). So a
change that adds a few percent of work shows in instruction counts when it is lost in timing
noise; PyTorch's CI tracked instruction counts for the same reason. They are no substitute for
time — a cache miss costs one instruction — which is why the gate judges both.

Both revisions are counted in the same valgrind process (`count_worker`), so the interpreter,
libraries and CPU features valgrind presents are the same for both sides. Only CPU cases are
counted (a GPU's work is not host instructions), and not implementations that compile: inductor
under valgrind takes minutes per graph.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from condconv_bench.gate.ab.count_worker import CALLS
from condconv_bench.gate.ab.pairs import SIDES, CasePair, group_visits
from condconv_bench.machine.allocators import worker_environment
from condconv_bench.measure.protocol import Visit

COUNT_TIMEOUT_S = 1800.0
WARMUP = 1  # steps after the first call before counting; each costs ~50× its native time


@dataclass(frozen=True)
class InstructionCounts:
    """Instructions per step of one case on each side (the smallest of the worker's dumps)."""

    base: int
    head: int

    @property
    def ratio(self) -> float:
        return self.head / self.base


def unavailable_reason() -> str | None:
    """Why instructions cannot be counted on this machine, or None."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed (Debian/Ubuntu: apt-get install valgrind)"
    if not torch._C._valgrind_supported_platform():
        return "this build of torch has no valgrind support"
    return None


def not_counted_reason(pair: CasePair) -> str | None:
    """Why a compared case gets no instruction count, or None."""
    if pair.case.device != "cpu":
        return "instructions are counted on CPU cases only"
    if any(getattr(cls, "compiles", False) for cls in pair.classes.values()):
        return "not counted: compiling under valgrind takes minutes per graph"
    return None


def _total(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError(f"{dump}: no totals line")


def _shares(visits: list[Visit], processes: int) -> list[list[Visit]]:
    """Visits dealt to `processes` callgrind processes, costliest first (batch size, training)."""
    cost = lambda visit: visit.cases[0].batch_size * (3 if visit.cases[0].mode == "training" else 1)  # noqa: E731
    shares: list[list[Visit]] = [[] for _ in range(min(processes, len(visits)))]
    for visit in sorted(visits, key=cost, reverse=True):
        min(shares, key=lambda share: sum(map(cost, share))).append(visit)
    return shares


def _command(folder: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--collect-atstart=no", "--dump-instr=no", "--dump-line=no",
            f"--callgrind-out-file={folder / 'callgrind.out'}", sys.executable, "-m", "condconv_bench.gate.ab.count_worker",
            str(folder / "job.pickle"), str(folder / "index.json")]


def _failure(folder: Path, returncode: int | None) -> str | None:
    """Why a callgrind process produced no usable index, from its exit and its log; None if it did."""
    if returncode == 0 and (folder / "index.json").exists():
        return None
    said = [line.strip() for line in (folder / "log").read_text(errors="replace").splitlines() if line.strip() and not line.startswith("==")]
    reason = f"callgrind process gave no answer within {COUNT_TIMEOUT_S:.0f} s" if returncode is None else (
        f"callgrind process failed (exit code {returncode})")
    return reason + (f": {said[-1]}" if said else "")


def _read_counts(folder: Path) -> tuple[dict[str, list[int]], dict[str, str]]:
    index = json.loads((folder / "index.json").read_text())
    per_tag: dict[str, list[int]] = {}
    for number, tag in enumerate(index["dumps"], start=1):
        per_tag.setdefault(tag, []).append(_total(folder / f"callgrind.out.{number}") // CALLS)
    return per_tag, index["errors"]


def count_instructions(pairs: list[CasePair], seed: int, allocator: str, extra_env: dict[str, str]
                       ) -> tuple[dict[str, InstructionCounts], dict[str, str]]:
    """Instructions per step of each pair (CPU, not compiling) by case id, and why others have none.

    The groups are shared among as many callgrind processes as there are cores: counts do not
    depend on what else runs, and valgrind runs code some 50× slower. Each starts in its own
    scratch folder, not in the repository: `python -m` would import the checkout's package first.
    """
    counted = [pair for pair in pairs if not_counted_reason(pair) is None]
    tags = {pair.tagged(side).id: (pair, side) for pair in counted for side in SIDES}
    env = worker_environment(allocator, {**os.environ, **extra_env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    per_tag: dict[str, list[int]] = {}
    errors: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="condconv-bench-callgrind-") as scratch:
        folders = []
        for number, share in enumerate(_shares(group_visits(counted, seed, 1, 0.0, WARMUP), os.cpu_count() or 1)):
            folder = Path(scratch) / str(number)
            folder.mkdir()
            (folder / "job.pickle").write_bytes(pickle.dumps(share))
            log = open(folder / "log", "wb")  # noqa: SIM115 (closed once the process has ended)
            folders.append((folder, share, log, subprocess.Popen(_command(folder), stdout=log, stderr=log, env=env, cwd=folder)))
        for folder, share, log, process in folders:
            try:
                returncode: int | None = process.wait(timeout=COUNT_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                returncode = None
            log.close()
            failure = _failure(folder, returncode)
            if failure:
                errors.update({tag: failure for visit in share for tag in visit.classes})
                continue
            counts, failed = _read_counts(folder)
            per_tag.update(counts)
            errors.update(failed)
    reasons: dict[str, str] = {}
    for tag, reason in errors.items():
        pair, side = tags[tag]
        reasons.setdefault(pair.case_id, f"{side}: {reason}")
    counts = {
        pair.case_id: InstructionCounts(*(min(per_tag[pair.tagged(side).id]) for side in SIDES))
        for pair in counted if pair.case_id not in reasons
    }
    return counts, reasons
