"""Instruction counts of each case's step, in a process that runs under callgrind.

Started by `condconv_bench.gate.ab.instructions` as `valgrind --tool=callgrind --collect-atstart=no …
python -m condconv_bench.gate.ab.count_worker JOB INDEX`. Collection is off until a step is about
to run: each group is built and warmed up as a timing worker does (so first calls, lazy
initialisation and one-off allocations are not counted), then, for every case in turn,
collection is switched on for `CALLS` steps and the counts are dumped. Callgrind numbers the
dumps 1, 2, … in the order they happen; INDEX (JSON) lists the case id of each, and the cases
that failed. The cases' order alternates between repetitions, so neither side is always first.

The garbage collector is off while counting: a collection that happens to fall into one counted
step adds thousands of instructions (measured here: one of three dumps of a 370k-instruction
step came out 3.7% higher). What else happens only now and then — a heap consolidation, a lazy
initialisation — only ever adds, so the caller takes the smallest of the dumps.
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import torch

from condconv_bench.gate.ab.aliases import install_from_environment
from condconv_bench.errors import first_line
from condconv_bench.cases.steps import grad_mode
from condconv_bench.timing.rounds import gc_paused
from condconv_bench.measure.worker import build_group

CALLS = 1  # steps per dump: one step's count repeats within 0.1% once warmed up
REPEATS = 4  # dumps per case; the smallest is taken (each step costs ~500× its native time)


def main(job: Path, index: Path) -> None:
    install_from_environment()
    visits = pickle.loads(job.read_bytes())
    dumps: list[str] = []
    errors: dict[str, str] = {}
    for visit in visits:
        group = build_group(visit)
        errors.update(group.errors)
        order = list(group.steps)
        with grad_mode(group.mode), gc_paused():
            for repetition in range(REPEATS):
                for case_id in order if repetition % 2 == 0 else reversed(order):
                    torch._C._valgrind_toggle()
                    try:
                        for _ in range(CALLS):
                            group.steps[case_id]()
                    except Exception as exc:  # the step failed while counted: the dump still happens, the case is an error
                        errors.setdefault(case_id, first_line(exc))
                    finally:
                        torch._C._valgrind_toggle_and_dump_stats()
                        dumps.append(case_id)
    index.write_text(json.dumps({"dumps": dumps, "errors": errors}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
