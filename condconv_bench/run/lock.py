"""One writer per run directory: a second run into it fails at once instead of interleaving rows."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from condconv_bench.errors import ResultsError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold the run directory `path` for this process, or raise ResultsError if another run holds it.

    An OS lock on `DIR/.lock` (filelock), released when the process ends, so a killed run never
    leaves a stale lock behind.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise ResultsError(f"{folder}: another condconv-bench run is writing this directory") from None
    try:
        yield
    finally:
        lock.release()
