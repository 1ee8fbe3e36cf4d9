"""The process-wide autotune switch, for models whose layers were built elsewhere.

`set_autotune(True)` or `CONDCONV_BENCH_AUTOTUNE=1` makes every `auto` layer behave as
`strategy="autotune"`; with `compiled=True` autotuning layers measure inductor-compiled variants
instead, recorded under the mode `<mode>+compiled`, which the lookup prefers while the model is
being compiled.
"""

from __future__ import annotations

import os
from dataclasses import replace

from condconv_bench.dispatch.table import Query

AUTOTUNE_VARIABLE = "CONDCONV_BENCH_AUTOTUNE"
DEFAULT_BUDGET_S = 0.5
COMPILED_SUFFIX = "+compiled"

_switch = {"enabled": os.environ.get(AUTOTUNE_VARIABLE, "") not in ("", "0"), "budget_s": DEFAULT_BUDGET_S, "compiled": False}


def set_autotune(enabled: bool = True, budget_s: float = DEFAULT_BUDGET_S, compiled: bool = False) -> None:
    """Make every `auto` layer autotune (the switch for models built elsewhere), with this budget
    in seconds per input signature; with `compiled`, autotuning layers measure the strategies
    compiled by inductor, for a model about to be run under torch.compile."""
    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    _switch.update(enabled=bool(enabled), budget_s=float(budget_s), compiled=bool(compiled))


def autotune_enabled() -> bool:
    return bool(_switch["enabled"])


def default_budget_s() -> float:
    return float(_switch["budget_s"])


def for_compile() -> bool:
    """Whether autotuning measures compiled variants (set_autotune(..., compiled=True))."""
    return bool(_switch["compiled"])


def compiled_query(query: Query) -> Query:
    """The query whose entry holds the choice measured among compiled variants."""
    return replace(query, mode=query.mode + COMPILED_SUFFIX)
