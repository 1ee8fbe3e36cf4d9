"""The A/B gate against regressions planted in a temporary git repository of this project.

Each test copies the project into a fresh repository, commits it, then changes the working tree
the way a pull request would: a spin-wait after an implementation's forward (FLOPs unchanged),
a few percent more instructions, a changed suite. The gate must name exactly the planted cases.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from condconv_bench.gate.ab import aliases, instructions
from condconv_bench.gate.ab.gate import run_ab_gate
from condconv_bench.gate.ab.instructions import InstructionCounts
from condconv_bench.gate.ab.verdict import instructions_verdict
from condconv_bench.settings import ABSettings
from condconv_bench.cli import main
from condconv_bench.report import ab as ab_report

PROJECT = Path(__file__).resolve().parent.parent
SUITE = {
    "name": "ab-test",
    "impls": ["static", "grouped_conv", "batched_matmul"],
    "batch_sizes": [8],
    "devices": ["cpu"],
    "threads": [1],
    "timing": {"processes": 2, "rounds": 8, "block_time": 0.002, "warmup": 2, "budget": 2},
    "layers": [{"name": "pw", "in_channels": 32, "out_channels": 64, "input_size": 14, "experts": 4}],
}
SUITE_PATH = "suites/ab-test.yaml"

# Appended to an implementation's module: every eager call of CLASS.METHOD spins until it has lasted FACTOR times as long.
SPIN_WAIT = '''
import time as _planted_time

_unplanted = CLASS.METHOD


def _planted(self, *args, **kwargs):
    if torch.compiler.is_compiling():
        return _unplanted(self, *args, **kwargs)
    started = _planted_time.perf_counter()
    out = _unplanted(self, *args, **kwargs)
    deadline = started + FACTOR * (_planted_time.perf_counter() - started)
    while _planted_time.perf_counter() < deadline:
        pass
    return out


CLASS.METHOD = _planted
'''

# A test-only implementation whose step is mostly a fixed amount of interpreter work.
BUSY_IMPL = '''
from condconv_bench.impls.static import Static
from condconv_bench.core.registry import register_impl

WORK = {work}


@register_impl("busy")
class Busy(Static):
    """The static layer plus a fixed loop: its instruction count is set by WORK."""

    def forward(self, *args, **kwargs):
        sum(range(WORK))
        return super().forward(*args, **kwargs)
'''


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                   check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """This project's code, its suite for the test and a first commit."""
    root = tmp_path / "project"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in ("condconv_bench", "impls", "suites"):
        shutil.copytree(PROJECT / folder, root / folder, ignore=ignore)
    shutil.copy(PROJECT / "pyproject.toml", root)
    (root / SUITE_PATH).write_text(yaml.safe_dump(SUITE))
    _git(root, "init", "--quiet")
    _git(root, "add", ".")
    _git(root, "commit", "--quiet", "-m", "base")
    return root


def _plant_spin_wait(repo: Path, factor: float, module: str = "grouped_conv", cls: str = "GroupedConv", method: str = "forward") -> None:
    path = repo / "impls" / f"{module}.py"
    plant = SPIN_WAIT.replace("CLASS", cls).replace("METHOD", method).replace("FACTOR", repr(factor))
    path.write_text(path.read_text() + plant)


@pytest.mark.timing
@pytest.mark.slow
def test_planted_slowdown_fails_exactly_its_cases(repo: Path) -> None:
    _plant_spin_wait(repo, 1.5)
    result = run_ab_gate("HEAD", str(repo / SUITE_PATH), repo, count_instructions=False)
    assert [c.impl for c in result.failures] == ["grouped_conv"], [(c.case_id, c.verdict, c.timing) for c in result.cases]
    (slower,) = result.failures
    # Its size is not asserted tightly: on a shared 2-core runner a planted 1.5x measured 1.3-1.7x.
    assert 1.2 < slower.timing.ratio.estimate < 2.5 and slower.verdict == "slower"
    assert result.exit_code == 1
    assert all(c.verdict == "unchanged" for c in result.cases if c.impl != "grouped_conv")
    text, markdown = ab_report.render_text(result), ab_report.render_markdown(result)
    assert text.splitlines()[-1].startswith("FAIL: 1 of 3 cases regress") and "FAIL slower" in text
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and "head/base" not in line]
    assert len(rows) == 1 and slower.case_id in rows[0]  # unchanged cases are not listed


MODEL_SUITE = {
    "name": "ab-model-test", "impls": ["as_shipped", "batched_matmul"], "batch_sizes": [8], "devices": ["cpu"], "threads": [1],
    "timing": {"processes": 2, "rounds": 8, "block_time": 0.002, "warmup": 2, "budget": 2},
    "layers": [{"name": "tiny", "kind": "model", "model": "ab_timm_net:net", "input_size": 14}],
}
# A model of timm's own CondConv layers, which every revision's convert() recognises (a model of
# this package's layers would be the installed package's, which an aliased tree does not own).
TIMM_NET = """
import torch
from torch import nn
from condconv_bench.cases.models.sources import import_timm


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        condconv = import_timm().layers.CondConv2d
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.routing = nn.Linear(32, 4)
        self.expand = condconv(32, 128, 1, num_experts=4)
        self.project = condconv(128, 32, 1, num_experts=4)

    def forward(self, x):
        x = self.stem(x)
        routing = torch.sigmoid(self.routing(x.mean((2, 3))))
        return self.project(torch.relu(self.expand(x, routing)), routing)


def net():
    return Net()
"""


@pytest.mark.timing
@pytest.mark.slow
def test_a_model_is_converted_by_each_sides_own_code(repo: Path, tmp_path: Path, monkeypatch) -> None:
    """A model case converts the model by strategy name: each side must convert it with its own
    revision's convert() and strategies, and resolve `as_shipped`, which no registry names."""
    (tmp_path / "ab_timm_net.py").write_text(TIMM_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    (repo / "suites" / "ab-model.yaml").write_text(yaml.safe_dump(MODEL_SUITE))
    _git(repo, "add", ".")
    _git(repo, "commit", "--quiet", "-m", "model suite")
    _plant_spin_wait(repo, 4.0, "batched_matmul", "BatchedMatmul", "conditional_forward")
    result = run_ab_gate("HEAD", str(repo / "suites" / "ab-model.yaml"), repo, count_instructions=False)
    verdicts = {c.impl: c.verdict for c in result.cases}
    assert verdicts == {"as_shipped": "unchanged", "batched_matmul": "slower"}, [(c.case_id, c.verdict, c.note, c.timing) for c in result.cases]


@pytest.mark.timing
@pytest.mark.slow
def test_unchanged_code_passes_with_every_case_compared(repo: Path, monkeypatch) -> None:
    # Run from the checkout's root with its worker module broken: the instrument's must be used.
    (repo / "condconv_bench/measure/worker.py").write_text("raise SystemExit(\"the checkout's worker ran\")\n")
    monkeypatch.chdir(repo)
    result = run_ab_gate("HEAD", SUITE_PATH, repo, count_instructions=False)
    assert result.passed and result.exit_code == 0
    assert [c.verdict for c in result.cases] == ["unchanged"] * 3
    # The verdict above is the behaviour; the estimate only has to be sane (a shared machine moved it past 1.1 in a fresh clone).
    assert all(0.8 < c.timing.ratio.estimate < 1.25 and c.timing.samples >= 16 for c in result.cases), [c.timing.ratio for c in result.cases]


# The last commit before the package was split into layered subpackages: its registry, contract
# and model workload sit at the package root, where the head keeps none of them.
BEFORE_THE_LAYERS = "5b5e648062bcdd8ab6ccb1e1780c69790fb09379"


@pytest.mark.timing
@pytest.mark.slow
def test_a_head_in_the_layered_layout_compares_every_case_with_a_base_from_before_it(tmp_path: Path, monkeypatch) -> None:
    archive = subprocess.run(["git", "-C", str(PROJECT), "archive", BEFORE_THE_LAYERS, "condconv_bench", "impls", "suites", "pyproject.toml"],
                             capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f"this clone lacks {BEFORE_THE_LAYERS[:7]} (shallow?): {archive.stderr.decode().strip()}")
    root = tmp_path / "project"
    root.mkdir()
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    assert (root / "condconv_bench" / "registry.py").is_file() and not (root / "condconv_bench" / "core").exists()
    (tmp_path / "ab_timm_net.py").write_text(TIMM_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    (root / "suites" / "ab-model.yaml").write_text(yaml.safe_dump(MODEL_SUITE))
    _git(root, "init", "--quiet")
    _git(root, "add", ".")
    _git(root, "commit", "--quiet", "-m", "base: before the layers")
    for folder in ("condconv_bench", "impls"):
        shutil.rmtree(root / folder)
        shutil.copytree(PROJECT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(PROJECT / "pyproject.toml", root)
    # A model suite takes both modules from each side: the registry reads the suite, the model
    # workload converts the model and resolves `as_shipped`.
    result = run_ab_gate("HEAD", str(root / "suites" / "ab-model.yaml"), root, count_instructions=False)
    assert result.passed and [c.verdict for c in result.cases] == ["unchanged"] * 2, [(c.case_id, c.verdict, c.note) for c in result.cases]
    assert sorted(c.impl for c in result.cases) == ["as_shipped", "batched_matmul"]


def test_cases_new_removed_or_redefined_are_listed_not_failed(repo: Path) -> None:
    changed = dict(SUITE, impls=["static", "grouped_conv", "naive_moe"])
    changed["layers"] = [dict(SUITE["layers"][0], input_size=7)]
    (repo / SUITE_PATH).write_text(yaml.safe_dump(changed))
    result = run_ab_gate("HEAD", str(repo / SUITE_PATH), repo, count_instructions=False)
    notes = {c.impl: c.note for c in result.cases}
    assert result.passed and {c.verdict for c in result.cases} == {"not compared"}
    assert notes == {
        "static": "the suite defines it differently in base and head",
        "grouped_conv": "the suite defines it differently in base and head",
        "naive_moe": "only in head",
        "batched_matmul": "only in base",
    }


@pytest.mark.callgrind
def test_instruction_gate_catches_three_percent_more_work(repo: Path, monkeypatch) -> None:
    """Also run from the checkout's root, with its harness broken: `python -m` there would import
    the checkout's worker modules instead of the instrument's, and every count would be lost."""
    reason = instructions.unavailable_reason()
    if reason:
        pytest.skip(reason)
    suite = dict(SUITE, impls=["static", "busy"])
    (repo / SUITE_PATH).write_text(yaml.safe_dump(suite))
    (repo / "impls" / "busy.py").write_text(BUSY_IMPL.format(work=20_000))
    _git(repo, "add", ".")
    _git(repo, "commit", "--quiet", "-m", "busy")
    (repo / "impls" / "busy.py").write_text(BUSY_IMPL.format(work=20_600))  # 3% more loop
    for module in ("condconv_bench/measure/worker.py", "condconv_bench/gate/ab/count_worker.py"):
        (repo / module).write_text("raise SystemExit(\"the checkout's harness ran instead of the instrument's\")\n")
    monkeypatch.chdir(repo)
    result = run_ab_gate("HEAD", SUITE_PATH, repo)
    by_impl = {c.impl: c for c in result.cases}
    assert result.instructions_unavailable is None
    assert 1.02 < by_impl["busy"].instructions.ratio < 1.035, by_impl["busy"].instructions
    assert abs(by_impl["static"].instructions.ratio - 1) < 0.005, by_impl["static"].instructions
    assert [c.impl for c in result.failures] == ["busy"]
    assert any(p.startswith("instructions +") for p in by_impl["busy"].problems)


def test_a_failed_instruction_count_fails_the_gate_with_the_reason(repo: Path, monkeypatch) -> None:
    monkeypatch.setattr(instructions, "unavailable_reason", lambda: None)
    monkeypatch.setattr(instructions, "_command", lambda folder: [sys.executable, "-c", "raise SystemExit('planted: callgrind broke')"])
    result = run_ab_gate("HEAD", str(repo / SUITE_PATH), repo)
    assert not result.passed and len(result.failures) == len(result.cases) == 3
    for case in result.failures:
        assert case.instructions is None
        assert "instructions not counted" in case.problems[-1]
        assert "callgrind process failed (exit code 1): planted: callgrind broke" in case.problems[-1]


def test_instruction_changes_within_the_jitter_of_one_step_do_not_count() -> None:
    t = ABSettings()
    smallest_step_jitter = InstructionCounts(73_140, 74_921)  # +2.4%, seen on unchanged code
    assert instructions_verdict(smallest_step_jitter, t) == "same"
    planted = InstructionCounts(182_421, 190_450)  # +4.4%, a planted loop
    assert instructions_verdict(planted, t) == "more"
    assert instructions_verdict(InstructionCounts(60_902_678, 60_910_152), t) == "same"  # +7,474 but +0.01%
    assert instructions_verdict(InstructionCounts(190_450, 182_421), t) == "fewer"


def test_instructions_without_valgrind_are_skipped_with_the_reason(monkeypatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert "valgrind is not installed" in instructions.unavailable_reason()


def test_a_bad_ref_is_one_line_exit_2(repo: Path) -> None:
    result = CliRunner().invoke(main, ["gate", "ab", "no-such-ref", "--repo", str(repo)])
    assert result.exit_code == 2, result.output
    assert "no such commit" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_options_of_the_other_gate_are_refused_not_ignored(repo: Path) -> None:
    for other in (["--memory-threshold", "0.2"], ["--comparison", "floor"], ["--baseline", "x.json"]):
        result = CliRunner().invoke(main, ["gate", "ab", "HEAD", "--repo", str(repo), *other])
        assert result.exit_code == 2 and "No such option" in result.output, (other, result.output)


def test_the_old_spelling_still_gates_with_a_deprecation_line(repo: Path) -> None:
    result = CliRunner().invoke(main, ["gate", "--repo", str(repo), "--against", "no-such-ref"])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 2, result.output
    assert "deprecated" in lines[0] and f"gate ab no-such-ref --repo {repo}" in lines[0]
    assert "no such commit" in lines[1] and "Traceback" not in result.output


def test_outside_a_repository_is_exit_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["gate", "ab", "HEAD", "--repo", str(tmp_path)])
    assert result.exit_code == 2 and "not inside a git repository" in result.output


def test_a_served_tree_imports_its_own_modules_and_is_forgotten_after(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for folder in ("condconv_bench", "impls"):
        shutil.copytree(PROJECT / folder, tree / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "pyproject.toml", tree)
    grouped = tree / "impls" / "grouped_conv.py"
    grouped.write_text(grouped.read_text().replace('"""Fold the batch into groups', '"""REVISED. Fold the batch into groups'))
    alias = aliases.alias_for("test")
    with aliases.serving({alias: tree}):
        import importlib

        revised = importlib.import_module(f"{alias}.core.registry").get_impl("grouped_conv")
        worker = importlib.import_module(f"{alias}.measure.worker")
        assert revised.__doc__.startswith("REVISED") and revised.__module__ == f"{alias}.impls.grouped_conv"
        assert revised.__mro__[1].__module__ == f"{alias}.core.contract"  # its own base class, not the installed one
        dispatching = importlib.import_module(f"{alias}.core.registry").get_impl("auto")
        assert dispatching.__module__ == f"{alias}.dispatch.dispatching_layers"  # the selectors a suite names resolve in the tree too
        assert worker.condconv_bench.__name__ == alias  # `import condconv_bench.cases.workload` bound to the alias
    from condconv_bench.core.registry import get_impl

    assert not get_impl("grouped_conv").__doc__.startswith("REVISED")
    assert not [name for name in sys.modules if name.startswith(alias)]
