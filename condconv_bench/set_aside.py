"""A bad row costs that row, never the file: readers set it aside with a line saying where.

One wrong value (a hand edit, a copy cut short, a disk that filled up, a number no column can
hold) must not make a whole run directory, baseline or dispatch table unreadable for `report`,
`merge`, `baseline` and `gate`. Readers drop the row and warn with `RowSetAside`, naming the file,
the line or entry and why; the CLI prints each such warning as one `warning:` line on stderr.
"""

from __future__ import annotations

import warnings
from pathlib import Path


class RowSetAside(UserWarning):
    """A row or entry a reader could not use and left out of what it returned."""


def set_aside(path: str | Path, where: str, why: str) -> None:
    warnings.warn(f"{path}: {where} set aside ({why})", RowSetAside, stacklevel=3)
