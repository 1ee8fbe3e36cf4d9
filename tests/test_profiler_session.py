"""A Ctrl-C inside a profiler session waits for the profiler to stop (a half-stopped profiler
killed the interpreter with SIGSEGV at exit), and no module starts the profiler another way."""

from __future__ import annotations

import ast
import signal
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity

from condconv_bench.profiling.session import profiler_session

PACKAGE = Path(__file__).resolve().parents[1] / "condconv_bench"


def test_ctrl_c_in_a_session_arrives_once_the_profiler_has_stopped() -> None:
    found = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own, whatever an earlier test left
    went_on = False
    try:
        with pytest.raises(KeyboardInterrupt):
            with profiler_session(activities=[ProfilerActivity.CPU], profile_memory=True):
                torch.ones(64) * 2
                signal.raise_signal(signal.SIGINT)
                went_on = True
                enabled_inside = torch._C._autograd._profiler_enabled()
            assert False, f"the held Ctrl-C was dropped (blocked here: {signal.pthread_sigmask(signal.SIG_BLOCK, [])})"
        assert went_on and enabled_inside
        assert not torch._C._autograd._profiler_enabled()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, found)
    assert not str(getattr(found, "__module__", "")).startswith("condconv_bench"), f"a session left its SIGINT hold installed: {found!r}"


def _session_interrupted_at(line: int) -> tuple[int, bool]:
    """One session with SIGINT raised at the `line`-th line torch's profiler code runs: (lines it
    ran, whether the profiler was left enabled)."""
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if event == "line" and "profiler" in frame.f_code.co_filename:
            lines += 1
            if lines == line:
                signal.raise_signal(signal.SIGINT)
        return tracer

    sys.settrace(tracer)
    try:
        with profiler_session(activities=[ProfilerActivity.CPU], profile_memory=True):
            torch.ones(64) * 2
    except KeyboardInterrupt:
        pass
    finally:
        sys.settrace(None)
    left_enabled = torch._C._autograd._profiler_enabled()
    if left_enabled:
        torch._C._autograd._disable_profiler()
    return lines, left_enabled


def test_ctrl_c_at_any_line_of_the_profilers_start_or_stop_leaves_it_stopped() -> None:
    # Without the hold, SIGINT at 46 of the 464 lines a session ran (torch 2.13) left the profiler enabled.
    lines, _ = _session_interrupted_at(0)
    assert lines > 100
    assert [line for line in range(1, lines + 1) if _session_interrupted_at(line)[1]] == []


def test_a_session_without_ctrl_c_returns_its_profile() -> None:
    handler = signal.getsignal(signal.SIGINT)
    with profiler_session(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(64) * 2
    assert any(event.name == "aten::mul" for event in prof.events())
    assert signal.getsignal(signal.SIGINT) is handler


def test_only_the_session_module_starts_the_profiler() -> None:
    starters = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "torch.profiler" and any(a.name == "profile" for a in node.names):
                starters.append(path.relative_to(PACKAGE).as_posix())
            if isinstance(node, ast.Attribute) and node.attr == "profile" and ast.unparse(node.value) in ("torch.profiler", "profiler"):
                starters.append(path.relative_to(PACKAGE).as_posix())
    assert starters == ["profiling/session.py"]
