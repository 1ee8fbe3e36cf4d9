"""One torch.profiler session, quiet and whole: the only way this package starts the profiler.

Kineto (behind torch.profiler) prints `USDT … profiler_start/stop` lines on every profile, at
any KINETO_LOG_LEVEL; per case that would bury the progress bar and the error lines users need,
so file descriptor 2 points at /dev/null for the session.

A Ctrl-C that lands inside the profiler's own start or stop leaves it half enabled: it went on
recording memory events after the block, and the interpreter died of SIGSEGV at exit (a run
killed by signal 11 after printing how to resume). SIGINT is therefore held for the session,
which lasts one case's few profiled calls, and delivered as KeyboardInterrupt once the profiler
has stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any

from torch.profiler import profile


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _sigint_held() -> Iterator[None]:
    """Hold SIGINT for the block and raise it after; a no-op off the main thread, where Python
    delivers no signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        signal.raise_signal(signal.SIGINT)  # to the handler of before: KeyboardInterrupt, the default's exit, or ignored


@contextlib.contextmanager
def profiler_session(**options: Any) -> Iterator[profile]:
    """`torch.profiler.profile(**options)` with native stderr silenced and Ctrl-C held until it stops."""
    with _sigint_held(), _native_stderr_silenced(), profile(**options) as prof:
        yield prof
