"""The `condconv-bench` command: a thin click shell over the library, one module per family of commands.

Every command parses options, calls one library function and renders what it returns. Errors of
the `CondConvBenchError` family become `error: …` lines on stderr and the error's exit code
(0 ok, 1 equivalence failure or regression, 2 bad input), never a traceback; a row a reader sets
aside (`RowSetAside`) becomes one `warning: …` line.
"""

from condconv_bench.cli import dispatching, gates, runs  # noqa: F401  (each registers its commands on `main`)
from condconv_bench.cli.app import main

__all__ = ["main"]
