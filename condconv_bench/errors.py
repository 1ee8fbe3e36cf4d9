"""One exception family for everything a user can get wrong.

Each error carries the exit code the CLI returns for it, so the CLI maps errors to codes in one
place and library users can catch `CondConvBenchError` alone. Messages are single lines that name
the file, the field and what was expected, because they are printed as they are.
"""

from __future__ import annotations

from typing import Any, ClassVar

EXIT_OK = 0
EXIT_FAILURE = 1  # equivalence failure, regression, or (with --strict) an error row
EXIT_BAD_INPUT = 2  # malformed suite or results, unknown implementation, unavailable device
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT; the run directory stays resumable


class CondConvBenchError(Exception):
    """Base of every error the CLI reports as one line with an exit code."""

    exit_code: ClassVar[int] = EXIT_BAD_INPUT


class RunInterruptedError(CondConvBenchError):
    """The user stopped a run; what it measured is kept and `--resume` continues it."""

    exit_code: ClassVar[int] = EXIT_INTERRUPTED


class SpecError(CondConvBenchError, ValueError):
    """A layer specification with impossible values; `field` names the offending one."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class SuiteError(CondConvBenchError):
    """A suite file that cannot be read or validated; one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class UnknownImplError(CondConvBenchError, LookupError):
    """An implementation name that is neither registered nor an importable `module:Class`."""


class DuplicateImplError(CondConvBenchError):
    """Two implementations claimed one registry key; silently overriding would mislabel results."""


class ImplUnavailableError(CondConvBenchError):
    """An implementation that cannot run here (no compiler, unsupported device); not a bug."""


class UnmappableLayerError(CondConvBenchError):
    """`convert()` met a CondConv layer it cannot replace exactly; it is refused, never approximated."""


class ModelError(CondConvBenchError):
    """A model a suite names cannot be built: an unknown name, a callable that fails, or its library missing."""


class DeviceUnavailableError(CondConvBenchError):
    """A device asked for on the command line that this machine does not have."""


class ResultsError(CondConvBenchError):
    """A run directory or baseline file that is missing, corrupt or incompatible."""


def first_line(exc: BaseException) -> str:
    """`Type: first line of the message`: how an implementation's failure reads in a result row."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


def first_problem(exc: Any) -> str:
    """`key.path: message` for the first error of a pydantic `ValidationError`: one line that names the field."""
    error = exc.errors()[0]
    return f"{'.'.join(map(str, error['loc'])) or 'document'}: {error['msg']}"
