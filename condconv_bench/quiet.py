"""Silence for native libraries that write straight to file descriptor 2.

Kineto (behind torch.profiler) prints `USDT … profiler_start/stop` lines on every profile, at
any KINETO_LOG_LEVEL; per case that would bury the progress bar and the error lines users need.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Point fd 2 at /dev/null for the block; Python exceptions still propagate normally."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
