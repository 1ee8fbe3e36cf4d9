"""What every gate returns: its failures, whether it passed, and the exit code that says so."""

from __future__ import annotations

from collections.abc import Sequence

from condconv_bench.errors import EXIT_FAILURE, EXIT_OK


class GateVerdict:
    """A gate's outcome from its `failures`: passed, and the exit code that says so (0 or 1)."""

    failures: Sequence[object]

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_FAILURE
