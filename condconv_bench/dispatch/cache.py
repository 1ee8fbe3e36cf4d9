"""What this machine has measured, kept between processes, and trusted only once confirmed.

Autotuning's choices are kept for the process and merged into a per-machine file, named by a hash
of the machine's fingerprint and the torch version, so the next process need not tune again;
`condconv-bench tune` writes its measurements there too. `CONDCONV_BENCH_CACHE` names another
file, or `off` for none.

A choice read from the file is a claim about another moment: one measured while another job
shared the cores can be wrong for every later process. So an entry from the file is a candidate
until this process has confirmed it (`tuning.confirm`: a few interleaved rounds of the choice
against the rivals it was measured against); entries measured or confirmed in this process are
trusted for the rest of it. A measurement too noisy to separate the candidates is kept for the
process and never written to the file (`tuning.NOISY_SPREAD`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from condconv_bench.dispatch.switch import AUTOTUNE_VARIABLE
from condconv_bench.dispatch.table import DispatchTable, Entry, Query
from condconv_bench.machine.environment import machine_fingerprint
from condconv_bench.errors import ResultsError

CACHE_VARIABLE = "CONDCONV_BENCH_CACHE"


def machine_key() -> str:
    """16 hex digits naming this machine (its fingerprint) and this torch build."""
    identity = json.dumps({"machine": machine_fingerprint(), "torch": torch.__version__}, sort_keys=True)
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def cache_path() -> Path | None:
    """`$CONDCONV_BENCH_CACHE`, or `autotune-<machine key>.json` in the user's cache folder for
    condconv-bench (`$XDG_CACHE_HOME/condconv-bench`, else `~/.cache/condconv-bench` on Linux;
    each system's own elsewhere); None for `off`."""
    override = os.environ.get(CACHE_VARIABLE)
    if override is not None:
        return None if override.strip().lower() in ("", "off") else Path(override)
    import platformdirs  # on first use: importing the drop-in layer loads no more than it must

    return platformdirs.user_cache_path("condconv-bench", appauthor=False) / f"autotune-{machine_key()}.json"


class MachineCache:
    """The choices measured on this machine: this process's, and those the cache file holds."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries = {e.identity(): e for e in self._on_disk(warn=True)}
        self._trusted: set[tuple[object, ...]] = set()

    def _on_disk(self, warn: bool = False) -> tuple[Entry, ...]:
        """The file's entries; none if it is missing or broken (a broken cache costs a
        re-measurement and is replaced by the next write, never the model)."""
        if self.path is None or not self.path.exists():
            return ()
        try:
            return DispatchTable.load(self.path).entries
        except ResultsError as exc:
            if warn:
                warnings.warn(f"condconv_bench: {exc}; autotuning afresh", stacklevel=4)
            return ()

    def lookup(self, query: Query) -> Entry | None:
        return self._entries.get(query.identity())

    def trusted(self, query: Query) -> bool:
        """Whether this process measured or confirmed the entry for `query` itself."""
        return query.identity() in self._trusted

    def add(self, entries: list[Entry], persist: bool = True) -> None:
        """Keep `entries` for this process as trusted and, with `persist`, merge them into the
        file as it is now (another process may have added to it); a newer measurement replaces
        an older one of the same query."""
        for entry in entries:
            self._entries[entry.identity()] = entry
            self._trusted.add(entry.identity())
        if self.path is None or not persist:
            return
        merged = {e.identity(): e for e in self._on_disk()}
        merged.update({e.identity(): e for e in entries})
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            DispatchTable(list(merged.values()), str(self.path), measured_on="this machine (autotune cache)").save(self.path)
        except OSError as exc:
            warnings.warn(f"condconv_bench: cannot write the autotune cache {self.path} ({exc}); kept in this process only", stacklevel=3)


@contextmanager
def cache_off() -> Iterator[None]:
    """No cache file inside the block: a benchmark measures tuning itself and leaves the user's
    cache as it found it."""
    before = os.environ.get(CACHE_VARIABLE)
    os.environ[CACHE_VARIABLE] = "off"
    try:
        yield
    finally:
        if before is None:
            del os.environ[CACHE_VARIABLE]
        else:
            os.environ[CACHE_VARIABLE] = before


# What a measuring process must not inherit from the user's shell, for the worker processes
# (`measure.pool.WorkerPool`; None removes a variable): `auto` is measured as the table and
# `autotune` as its own in-process tuning, so neither may read choices a user's earlier process
# left in the machine's cache, nor add to it, nor be switched on globally.
FRESH_MACHINE: dict[str, str | None] = {CACHE_VARIABLE: "off", AUTOTUNE_VARIABLE: None}


@functools.cache
def _cache_for(path: Path | None) -> MachineCache:
    return MachineCache(path)


def forget_this_process() -> None:
    """Drop what this process measured and read; the next lookup starts from the file alone."""
    _cache_for.cache_clear()


def machine_cache() -> MachineCache:
    """The process-wide cache of the file `cache_path()` names now."""
    return _cache_for(cache_path())
