"""`gate ab REF`: the working tree against a revision, measured side by side on this machine.

The order of work: check out REF, serve both trees under their aliases, pair the cases of the
two suites, time the compared pairs in fresh worker processes (the suite's timing settings; the
head's suite rules), count their instructions under callgrind (after the timing, never beside
it: two cores shared with valgrind would time valgrind), and decide per case.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from condconv_bench.gate.ab import aliases, instructions
from condconv_bench.gate.ab.paired import measure_pairs
from condconv_bench.gate.ab.pairs import SIDES, pair_cases
from condconv_bench.gate.ab.revision import checked_out, repository_root, working_tree
from condconv_bench.gate.ab.verdict import ABResult, decide
from condconv_bench.dispatch.cache import FRESH_MACHINE
from condconv_bench.measure.pool import WorkerPool
from condconv_bench.settings import ABSettings


def run_ab_gate(against: str, suite: str = "smoke", repo: Path | None = None, thresholds: ABSettings = ABSettings(),
                processes: int | None = None, allocator: str | None = None, count_instructions: bool = True) -> ABResult:
    """Measure the working tree of `repo` (default: the repository around the current directory)
    against revision `against`, case by case, and decide."""
    repo = repository_root(repo or Path.cwd())
    head = working_tree(repo)
    with checked_out(repo, against) as base:
        trees = {aliases.alias_for(side): revision.root for side, revision in zip(SIDES, (base, head))}
        extra_env = aliases.environment_for(trees)
        with aliases.serving(trees):
            pairs, head_suite = pair_cases(suite, base, head, repo)
            # A group holds both versions of every case, so its rounds take twice as long as in a
            # run: twice the budget keeps as many rounds per case.
            settings = head_suite.model.timing.settings(processes, allocator)
            settings = replace(settings, budget_s=2 * settings.budget_s)
            seed = head_suite.model.seed
            pool = WorkerPool(settings.processes, settings.allocator, {**FRESH_MACHINE, **extra_env})
            timed, errors = measure_pairs(pairs, seed, settings, pool)
            unavailable = instructions.unavailable_reason() if count_instructions else "not asked for (--no-instructions)"
            counts, count_errors = ({}, {}) if unavailable else instructions.count_instructions(
                [p for p in pairs if p.not_compared is None and p.case_id in timed], seed, settings.allocator, extra_env)
    cases = []
    for pair in pairs:
        note = None if pair.not_compared else instructions.not_counted_reason(pair)
        cases.append(decide(pair, timed.get(pair.case_id), errors.get(pair.case_id), counts.get(pair.case_id), note,
                            count_errors.get(pair.case_id), thresholds))
    return ABResult(base, head, suite, thresholds, settings.processes, unavailable, tuple(cases))
