"""A result row as one CSV line and back, typed by the column definition (`run.columns`).

Writing refuses a cell outside the schema, so a misspelt column fails at once instead of vanishing;
reading checks every value against its column's dtype and names the column that does not fit, so
one bad cell costs its row only.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from condconv_bench.run.columns import DTYPES, Dtype


def format_row(row: dict[str, Any]) -> str:
    """One CSV line in the schema's column order; a missing or None cell is empty."""
    unknown = set(row) - set(DTYPES)
    if unknown:
        raise ValueError(f"result row has columns outside the schema: {sorted(unknown)}")
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(["" if row.get(c) is None else row[c] for c in DTYPES])
    return buffer.getvalue()


_INT64 = range(-(2**63), 2**63)
_BOOLEANS = {"True": True, "False": False}


def _parse_value(text: str, dtype: Dtype) -> Any:
    if text == "":
        return None
    if dtype == "string":
        return text
    if dtype == "boolean":
        if text not in _BOOLEANS:
            raise ValueError(f"not True or False: {text[:40]!r}")
        return _BOOLEANS[text]
    if dtype == "Int64":
        value = int(text)
        if value not in _INT64:
            raise ValueError(f"beyond a 64-bit integer: {text[:40]}")
        return value
    return float(text)


def parse_row(fields: list[str], header: list[str]) -> list[Any]:
    """One CSV row written under `header` as typed values in the schema's column order (columns an
    older version did not write are None); ValueError naming the column when a value does not fit."""
    if len(fields) != len(header):
        raise ValueError(f"{len(fields)} fields, the schema has {len(header)}")
    values = dict.fromkeys(DTYPES)
    for column, text in zip(header, fields):
        try:
            values[column] = _parse_value(text, DTYPES[column])
        except ValueError as exc:
            raise ValueError(f"column {column}: {str(exc)[:80]}") from None
    return list(values.values())
