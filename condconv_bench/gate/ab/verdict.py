"""Each case's A/B verdict, and the gate's: pass, or fail on a regression of the head.

Time: slower when the median paired ratio (head / base) exceeds `1 + time_threshold`, the
signed-rank test gives p < `alpha`, and the two-level interval lies wholly above
`1 + time_threshold / 2`: surely slower by at least half the threshold, not merely surely
slower. The last condition is what keeps a loaded machine from failing unchanged code: with
another gate running beside it on the same two cores, unchanged cases came out 1.057×
[1.024, 1.117] (p = 7e-4) and 1.069× [1.008, 1.184] (p = 5e-4), while planted slowdowns of
1.10× and more had intervals starting at 1.097 or higher. Faster symmetrically. The threshold
can be lower than a baseline gate's (5% against 10–35%) because a paired ratio from the same
rounds carries none of the drift between two runs. Instructions: more than
`1 + instruction_threshold` times the base's, and more than `instruction_min_delta` more, fails.
Counts carry no timing noise, but one step of unchanged code still varies by up to ±3,000
instructions between two processes (interpreter and allocator paths; measured over 25 gates of
the smoke suite), which is 2.4% of its smallest step (73,000 instructions): the absolute floor
keeps that from failing a change, and a planted +3% stays above it on every smoke case.
A countable case whose count failed (callgrind crashed or timed out) fails the gate with the
reason: a gate that silently lost its most sensitive measure would pass what it cannot see.

A case that only one side defines, that the suite defines differently, or that cannot run here
is listed with the reason and does not fail the gate; a case whose head fails does.
"""

from __future__ import annotations

from dataclasses import dataclass

from condconv_bench.gate.ab.instructions import InstructionCounts
from condconv_bench.gate.ab.paired import PairedTiming
from condconv_bench.gate.ab.pairs import CasePair
from condconv_bench.gate.ab.revision import Revision
from condconv_bench.gate.verdict import GateVerdict
from condconv_bench.settings import ABSettings


@dataclass(frozen=True)
class ABCase:
    """One case: its time and instruction verdicts, or why it was not compared."""

    case_id: str
    impl: str
    verdict: str  # slower | faster | unchanged | not compared | errors
    timing: PairedTiming | None = None
    instructions: InstructionCounts | None = None
    instructions_verdict: str | None = None  # more | fewer | same; None when not counted
    note: str = ""  # why not compared, or why no instruction count
    problems: tuple[str, ...] = ()
    improvements: tuple[str, ...] = ()


@dataclass(frozen=True)
class ABResult(GateVerdict):
    base: Revision
    head: Revision
    suite: str
    thresholds: ABSettings
    processes: int
    instructions_unavailable: str | None  # why no case has an instruction count
    cases: tuple[ABCase, ...]

    @property
    def failures(self) -> list[ABCase]:  # type: ignore[override]
        return [case for case in self.cases if case.problems]


def _time_verdict(timing: PairedTiming, t: ABSettings) -> str:
    direction = timing.change.direction(t.time_threshold, t.alpha)
    surely = 1 + t.time_threshold / 2
    if direction == "slower" and timing.ratio.low > surely:
        return "slower"
    if direction == "faster" and timing.ratio.high < 1 / surely:
        return "faster"
    return "unchanged"


def instructions_verdict(counts: InstructionCounts, t: ABSettings) -> str:
    if abs(counts.head - counts.base) <= t.instruction_min_delta:
        return "same"
    if counts.ratio > 1 + t.instruction_threshold:
        return "more"
    return "fewer" if counts.ratio < 1 / (1 + t.instruction_threshold) else "same"


def decide(pair: CasePair, timing: PairedTiming | None, error: str | None, counts: InstructionCounts | None,
           count_note: str | None, count_failure: str | None, t: ABSettings) -> ABCase:
    """The verdict of one case from its paired timing (or error) and instruction counts
    (`count_note`: why it has none by design; `count_failure`: why counting it failed)."""
    impl = pair.case.impl
    if pair.not_compared is not None:
        return ABCase(pair.case_id, impl, "not compared", note=pair.not_compared)
    if timing is None:
        failed = (error or "").startswith("head")
        return ABCase(pair.case_id, impl, "errors" if failed else "not compared", note=error or "not measured",
                      problems=(f"fails in {error}",) if failed else ())
    problems, improvements = [], []
    verdict = _time_verdict(timing, t)
    text = f"{timing.ratio.estimate:.3f}× [{timing.ratio.low:.3f}, {timing.ratio.high:.3f}], p={timing.change.p_value:.1e}"
    if verdict == "slower":
        problems.append(f"slower: {text}")
    elif verdict == "faster":
        improvements.append(f"faster: {text}")
    instructions = None if counts is None else instructions_verdict(counts, t)
    if instructions == "more":
        problems.append(f"instructions +{counts.ratio - 1:.1%}")  # type: ignore[union-attr]
    elif instructions == "fewer":
        improvements.append(f"instructions {counts.ratio - 1:+.1%}")  # type: ignore[union-attr]
    if count_failure:
        problems.append(f"instructions not counted ({count_failure}); rerun, or judge time alone with --no-instructions")
    return ABCase(pair.case_id, impl, verdict, timing, counts, instructions, note=count_failure or count_note or "",
                  problems=tuple(problems), improvements=tuple(improvements))
