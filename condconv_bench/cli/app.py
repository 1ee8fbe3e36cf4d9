"""The `condconv-bench` group: errors as one line and an exit code, set-aside rows as warnings, the shared defaults."""

from __future__ import annotations

import warnings
from typing import Any

import click

from condconv_bench.errors import CondConvBenchError
from condconv_bench.set_aside import RowSetAside
from condconv_bench.settings import ABSettings, GateSettings, MeasureSettings


_show_warning = warnings.showwarning
MEASURE_DEFAULTS, GATE_DEFAULTS, AB_DEFAULTS = MeasureSettings(), GateSettings(), ABSettings()  # the defaults the commands' help shows


def _show_set_aside(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    if issubclass(category, RowSetAside):
        click.echo(f"warning: {message}", err=True)
    else:
        _show_warning(message, category, *args, **kwargs)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", RowSetAside)
                warnings.showwarning = _show_set_aside
                return super().invoke(ctx)
        except CondConvBenchError as exc:
            for line in str(exc).splitlines():
                click.echo(f"error: {line}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="condconv-bench")
def main() -> None:
    """Benchmark, verify and compare CondConv implementations.

    Exit codes: 0 ok; 1 an equivalence failure, a regression, or (run --strict) an error row;
    2 bad input (malformed suite or results, unknown implementation, unavailable device or
    allocator); 130 a run stopped with Ctrl-C (resume it with --resume).
    """

