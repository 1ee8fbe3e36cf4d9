"""Native strategies' C++ code, built once per machine into a cache and loaded on first use.

A native strategy (`impls/fused.py` with `impls/fused.cpp` beside it) is compiled with
`torch.utils.cpp_extension.load` and `-march=native`, so the binary is valid only on a CPU with
the same features: the cache folder is named by a hash of the source, the flags, the torch and
Python versions, the compiler and the CPU's feature flags, under the per-user cache root the
autotune cache uses (`$XDG_CACHE_HOME/condconv-bench/native`, else `~/.cache/condconv-bench/native`
on Linux). A home directory shared by machines with different CPUs therefore holds one build per
CPU, never a wrong one. torch's own file lock in the build folder makes concurrent builders (the
worker processes of one run) wait for the first one.

Nothing here compiles at import, nor in `toolchain_missing`/`build_status`, which only look at
PATH and the cache folder: `condconv-bench list` stays instant. The first `load_native` of a
process compiles when the cache misses (one stderr line, e.g. `compiling the fused kernel… (18 s)`;
~20 s on a 2-core machine) or imports the cached library (~0.2 s). A machine without a C++
compiler or `ninja` gets a one-line reason instead, which the strategy reports as unavailable.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from condconv_bench.errors import ImplUnavailableError
from condconv_bench.machine.environment import cpu_flags, vector_isa

# Compilers `torch.utils.cpp_extension` uses on Linux and macOS: `$CXX`, else `c++` (g++ where
# `c++` is missing). Windows needs MSVC and other flags, which the native strategies do not pass.
_COMPILERS = ("c++", "g++", "clang++")
# One compile job unless the user says otherwise: a shared 2-core machine runs tests beside it.
_DEFAULT_JOBS = "1"
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


class NativeBuildError(ImplUnavailableError):
    """Native code that cannot be built or loaded here: no compiler, no ninja, a compiler error."""


@dataclass(frozen=True)
class NativeSource:
    """One extension: its module name prefix, C++ file, compiler flags and a label for messages."""

    name: str  # e.g. "condconv_fused"; the hash is appended, so variants coexist in one process
    source: Path
    cflags: tuple[str, ...]
    label: str  # e.g. "the fused kernel"

    def key(self) -> str:
        """16 hex digits naming this source as built on this machine with this toolchain."""
        digest = hashlib.sha256()
        for part in (self.source.read_bytes(), torch.__version__.encode(), " ".join(self.cflags).encode(),
                     " ".join(cpu_flags()).encode(), platform.machine().encode(), sys.version.encode(), str(compiler() or "").encode()):
            digest.update(part)
            digest.update(b"\0")
        return digest.hexdigest()[:16]

    def module_name(self) -> str:
        return f"{self.name}_{self.key()}"

    def build_dir(self) -> Path:
        return cache_root() / self.module_name()

    def cached_library(self) -> Path | None:
        """The built library in the cache, if this machine has built this source already."""
        folder = self.build_dir()
        return next(iter(sorted(folder.glob(f"{self.module_name()}*.so"))), None) if folder.is_dir() else None


def cache_root() -> Path:
    """Where native builds are kept: the user's cache folder for condconv-bench, `native/`."""
    import platformdirs

    return platformdirs.user_cache_path("condconv-bench", appauthor=False) / "native"


def compiler() -> str | None:
    """The C++ compiler torch's extension builder would use, as a path, or None."""
    configured = os.environ.get("CXX")
    if configured:
        return shutil.which(configured)
    return next(filter(None, (shutil.which(name) for name in _COMPILERS)), None)


def toolchain_missing() -> str | None:
    """Why native code cannot be built here at all, in one line, or None; looks at PATH only."""
    if platform.system() == "Windows":
        return "native strategies are built with gcc/clang flags; Windows (MSVC) is not supported"
    if compiler() is None:
        return "needs a C++ compiler to build its native code (c++, g++ or $CXX on PATH); none was found"
    if shutil.which("ninja") is None:
        return "needs ninja to build its native code (`pip install ninja`, or the venv's bin on PATH); it is not on PATH"
    return None


def unavailable_reason(source: NativeSource) -> str | None:
    """Why `source` cannot run here, or None: cheap enough for every dispatch decision (no hashing
    of the source once it is loaded)."""
    if source.name in _loaded:
        return None
    return _failed.get(source.name) or toolchain_missing()


def build_status(source: NativeSource) -> str:
    """How `source` is built on this machine, for `condconv-bench list`: loaded, cached or not yet."""
    missing = unavailable_reason(source)
    if missing is not None:
        return f"unavailable: {missing}"
    library = source.cached_library()
    if library is None:
        return f"not built yet: compiles at first use (~20 s), {vector_isa()}"
    state = "loaded" if source.name in _loaded else "cached"
    return f"native, {vector_isa()}, {state} at {library.parent}"


def load_native(source: NativeSource) -> ModuleType:
    """The extension module, compiled once per machine (cached on disk) and once imported per process.

    Raises `NativeBuildError` with one line (and the compiler's last output for a compile error);
    the failure is remembered, so later calls and `build_status` answer without compiling again.
    """
    module = _loaded.get(source.name)
    if module is not None:
        return module
    if source.name in _failed:
        raise NativeBuildError(_failed[source.name])
    missing = toolchain_missing()
    if missing is not None:
        raise NativeBuildError(f"{source.label} {missing}")
    from torch.utils import cpp_extension

    folder = source.build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    compiles = source.cached_library() is None
    jobs = os.environ.get("MAX_JOBS")
    os.environ.setdefault("MAX_JOBS", _DEFAULT_JOBS)
    start = time.perf_counter()
    try:
        module = cpp_extension.load(name=source.module_name(), sources=[str(source.source)], extra_cflags=list(source.cflags),
                                    build_directory=str(folder), verbose=False)
    except Exception as exc:  # a compiler error, a missing header, an unloadable library: one cause, kept
        tail = " | ".join(str(exc).strip().splitlines()[-12:])
        _failed[source.name] = f"building {source.label} failed in {folder}: {tail}"
        raise NativeBuildError(_failed[source.name]) from exc
    finally:
        if jobs is None:
            os.environ.pop("MAX_JOBS", None)
    if compiles:
        print(f"compiling {source.label}… ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    _loaded[source.name] = module
    return module
