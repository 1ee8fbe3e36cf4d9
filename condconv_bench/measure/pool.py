"""Fresh worker processes for one run, each of which measures every group.

pyperf's lesson: a process's own state — where its buffers landed, what its allocator holds,
which kernel paths its libraries settled on — shifts results, so one process's samples are not
independent draws of what the next invocation will see. A run therefore starts N fresh workers
(all of them before the first measurement, so start-up load does not overlap any timing) and
measures every group in each; the spread between workers is what a second invocation would
see, and the statistics count it.

Workers are visited one at a time: timing never overlaps, on any core. A worker that dies or
stops answering is replaced, and the visit comes back as a failure for the runner to record.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

from condconv_bench.machine.allocators import worker_environment
from condconv_bench.measure.protocol import BUILDING, READY, TIMING, Visit, VisitResult, read_message, write_message

WORKER_MODULE = "condconv_bench.measure.worker"
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class WorkerFailure:
    """A visit that produced nothing: the worker died or timed out, while building `culprit` if known."""

    reason: str
    culprit: str | None = None


class _Worker:
    def __init__(self, env: dict[str, str], home: str) -> None:
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            [sys.executable, "-m", WORKER_MODULE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env,
            cwd=home,
        )
        self.ready = False

    def wait_until_ready(self) -> None:
        if not self.ready:
            if read_message(self.process.stdout.fileno(), time.monotonic() + START_TIMEOUT_S) != READY:  # type: ignore[union-attr]
                raise EOFError("worker process started with an unexpected message")
            self.ready = True

    def _log_lines(self) -> list[str]:
        self.log.seek(0)
        return [line.strip() for line in self.log.read().decode(errors="replace").splitlines() if line.strip()]

    def last_words(self) -> tuple[str, str | None]:
        """The last line the worker wrote other than its progress marks, and the case it was building."""
        lines = self._log_lines()
        marks = [line for line in lines if line.startswith((BUILDING, TIMING))]
        culprit = marks[-1][len(BUILDING):] if marks and marks[-1].startswith(BUILDING) else None
        said = [line for line in lines if not line.startswith((BUILDING, TIMING))]
        return (said[-1] if said else ""), culprit

    def stop(self) -> None:
        if self.process.poll() is None:
            try:
                write_message(self.process.stdin.fileno(), None)  # type: ignore[union-attr]
                self.process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()
        self.log.close()


class WorkerPool:
    """`size` worker processes under one allocator policy; use as a context manager.

    `environment` sets variables in the workers' environment, or removes those it maps to None:
    the caller says what a worker must not inherit from the user's shell (the runner: the
    machine's autotune cache) and what it needs (an A/B gate: its source trees, and
    the worker's setup hook, `protocol.SETUP_VARIABLE`, to serve them).
    """

    def __init__(self, size: int, allocator: str, environment: Mapping[str, str | None] | None = None) -> None:
        env = dict(os.environ)
        for name, value in (environment or {}).items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        # Workers import what this process can import (tests' `module:Class` implementations too).
        env["PYTHONPATH"] = os.pathsep.join(path for path in sys.path if path)
        self.env = worker_environment(allocator, env)
        self.size = size
        self._workers: list[_Worker] = []
        self._home: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> WorkerPool:
        # Workers start in an empty directory: `python -m` puts the working directory first on the
        # module path, and in a checkout of another revision (where an A/B gate runs) that would
        # import the checkout's `condconv_bench` instead of the instrument's.
        self._home = tempfile.TemporaryDirectory(prefix="condconv-bench-worker-")
        self._workers = [_Worker(self.env, self._home.name) for _ in range(self.size)]
        return self

    def __exit__(self, *exc_info: object) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []
        if self._home is not None:
            self._home.cleanup()
            self._home = None

    def visit(self, index: int, visit: Visit, timeout_s: float) -> VisitResult | WorkerFailure:
        """Send `visit` to worker `index` and wait for its answer at most `timeout_s`.

        Every worker must have started (imported what it needs) before any is visited, and a
        replacement is waited for at once, so a worker's start-up never runs beside a timing.
        """
        for other in range(self.size):
            self._ensure_ready(other)
        worker = self._workers[index]
        try:
            write_message(worker.process.stdin.fileno(), visit)  # type: ignore[union-attr]
            return read_message(worker.process.stdout.fileno(), time.monotonic() + timeout_s)  # type: ignore[union-attr]
        except (EOFError, OSError, TimeoutError) as exc:
            return self._replace(index, exc, timeout_s)

    def _ensure_ready(self, index: int) -> None:
        try:
            self._workers[index].wait_until_ready()
        except (EOFError, OSError, TimeoutError) as exc:
            self._replace(index, exc, START_TIMEOUT_S)

    def _replace(self, index: int, exc: BaseException, timeout_s: float) -> WorkerFailure:
        """Stop worker `index` and start a fresh one in its place; returns what happened to the old one."""
        worker = self._workers[index]
        if isinstance(exc, TimeoutError):
            reason = f"worker process gave no answer within {timeout_s:.0f} s"
            worker.process.kill()
        else:
            worker.process.wait()
            code = worker.process.returncode
            reason = f"worker process died ({f'signal {-code}' if code < 0 else f'exit code {code}'})"
        last, culprit = worker.last_words()
        worker.stop()
        self._workers[index] = _Worker(self.env, self._home.name)  # type: ignore[union-attr]
        try:
            self._workers[index].wait_until_ready()
        except (EOFError, OSError, TimeoutError):
            pass  # its first visit reports the failure
        return WorkerFailure(reason + (f": {last}" if last else ""), culprit)
