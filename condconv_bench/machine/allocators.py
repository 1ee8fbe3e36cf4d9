"""The memory allocator of the worker processes: a recorded setting, because rankings depend on it.

Strategies differ in how much temporary memory one call allocates (per-example kernels, unfolded
inputs of tens to hundreds of MB), so their speed is partly a property of the allocator:

- `glibc`: the C library's default. Blocks above its mmap threshold come straight from mmap and
  are faulted in page by page on every call; the threshold moves with what the process freed
  before (up to 32 MiB), so the same code is fast or slow depending on history, and whether a
  big buffer gets transparent huge pages depends on the whole machine's memory state.
- `fixed` (default): glibc with both thresholds fixed high, so per-call buffers up to 1 GiB are
  reused from the heap instead of being mapped and faulted in afresh on each call. This is the
  steady state that jemalloc and tcmalloc give a long-running process, and it makes every worker
  behave alike. (A fixed 32 MiB threshold, glibc's largest dynamic one, still maps a 180 MB
  unfolded input afresh per call; measured: 27 or 73 ms per call depending on huge pages.)
- `jemalloc`, `tcmalloc`: preloaded into the workers (`LD_PRELOAD`) where the library is
  installed (Debian: `libjemalloc2`, `libgoogle-perftools4`), as Intel's PyTorch CPU tuning
  guides recommend for production.

The policy only ever applies to worker processes, which are started with it; the runner's own
process is never changed.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
from typing import Any

from condconv_bench.errors import CondConvBenchError

ALLOCATORS = ("fixed", "glibc", "jemalloc", "tcmalloc")
FIXED_THRESHOLD = 2**30
_GLIBC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_LIBRARIES = {"jemalloc": ("jemalloc",), "tcmalloc": ("tcmalloc", "tcmalloc_minimal")}
_PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libgoogle-perftools4"}


class AllocatorUnavailableError(CondConvBenchError):
    """The requested allocator cannot be used on this machine."""


def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _library(name: str) -> str | None:
    return next(filter(None, (ctypes.util.find_library(lib) for lib in _LIBRARIES[name])), None)


def worker_environment(name: str, environment: dict[str, str]) -> dict[str, str]:
    """`environment` changed so that a process started with it runs under allocator `name`.

    The user's own MALLOC_* and LD_PRELOAD settings are replaced: a run measures one declared
    policy, and run.json records it.
    """
    if name not in ALLOCATORS:
        raise AllocatorUnavailableError(f"allocator {name!r}: expected one of {', '.join(ALLOCATORS)}")
    env = {key: value for key, value in environment.items() if key not in (*_GLIBC_VARIABLES, "LD_PRELOAD")}
    if name == "fixed":
        if not _is_glibc():
            raise AllocatorUnavailableError("allocator 'fixed' sets glibc's malloc thresholds, and this is not glibc; use glibc")
        env.update(MALLOC_MMAP_THRESHOLD_=str(FIXED_THRESHOLD), MALLOC_TRIM_THRESHOLD_=str(FIXED_THRESHOLD))
    elif name in _LIBRARIES:
        library = _library(name)
        if library is None:
            raise AllocatorUnavailableError(
                f"allocator {name!r}: its library is not installed (Debian: apt-get install {_PACKAGES[name]})"
            )
        env["LD_PRELOAD"] = library
    return env


def current() -> str:
    """The policy this process runs under, told from its environment: a preloaded jemalloc or
    tcmalloc, glibc with the fixed thresholds, plain glibc, or `other` (not glibc)."""
    preloaded = os.environ.get("LD_PRELOAD", "")
    for name in _LIBRARIES:
        if name in preloaded:
            return name
    if not _is_glibc():
        return "other"
    fixed = os.environ.get("MALLOC_MMAP_THRESHOLD_") == str(FIXED_THRESHOLD)
    return "fixed" if fixed else "glibc"


def describe(name: str) -> dict[str, Any]:
    """What run.json records about the policy."""
    if name == "fixed":
        return {"name": name, "mmap_threshold": FIXED_THRESHOLD, "trim_threshold": FIXED_THRESHOLD}
    if name in _LIBRARIES:
        return {"name": name, "preloaded": _library(name)}
    return {"name": name}


def available() -> dict[str, str | None]:
    """Each allocator with the reason it cannot be used here, or None (for `condconv-bench list`)."""
    reasons: dict[str, str | None] = {}
    for name in ALLOCATORS:
        try:
            worker_environment(name, {})
            reasons[name] = None
        except AllocatorUnavailableError as exc:
            reasons[name] = str(exc)
    return reasons
