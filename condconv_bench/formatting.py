"""How figures read in every output format: durations with units, ratios with ×, bytes in IEC units."""

from __future__ import annotations

import math

import pandas as pd


def missing(value: object) -> bool:
    try:
        return value is None or math.isnan(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return True


def flag(value: object) -> bool:
    """A boolean cell that may be missing (pandas NA): missing reads as False."""
    return not missing(value) and bool(value)


def seconds(value: float | None) -> str:
    """`43.5 µs`, `2.03 ms`, `1.2 s`; `-` for a missing value."""
    if missing(value):
        return "-"
    value = float(value)  # type: ignore[arg-type]
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if value >= 0.9995 * scale:  # 999.6 µs reads as 1 ms, not as 1e+03 µs
            return f"{value / scale:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def duration(value: float) -> str:
    """A wall-clock span for a progress line: `42s`, `7m05s`, `1h02m`."""
    total = int(round(value))
    if total < 60:
        return f"{total}s"
    if total < 3600:
        return f"{total // 60}m{total % 60:02d}s"
    return f"{total // 3600}h{total % 3600 // 60:02d}m"


def ratio(value: float | None) -> str:
    return "-" if missing(value) else f"{float(value):.2f}×"  # type: ignore[arg-type]


def size(value: float | None) -> str:
    """Bytes as `12.3 MiB`."""
    if missing(value):
        return "-"
    value = float(value)  # type: ignore[arg-type]
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.3g} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    return f"{value:.3g} GiB"


def count(value: float | None, unit: str = "") -> str:
    """Large counts as `1.23 G` (with a unit such as `MAC`)."""
    if missing(value):
        return "-"
    value = float(value)  # type: ignore[arg-type]
    for prefix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def scientific(value: float | None) -> str:
    return "-" if missing(value) else f"{float(value):.2e}"  # type: ignore[arg-type]


def interval(estimate: float | None, low: float | None, high: float | None) -> str:
    """`1.23× [1.20–1.27]`: a ratio with its 95% interval."""
    if missing(low) or missing(high):
        return ratio(estimate)
    return f"{ratio(estimate)} [{float(low):.2f}–{float(high):.2f}]"  # type: ignore[arg-type]


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of `frame`'s cells as they are (pipes escaped)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])
