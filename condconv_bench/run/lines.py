"""Append-only line files that survive a crash: each line is written with one `write` and fsynced,
and readers see complete lines only, so a `kill -9` mid-write costs at most the line in progress."""

from __future__ import annotations

import os
from pathlib import Path


def append_durably(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def complete_bytes(path: Path) -> bytes:
    """The file without a trailing half-written line."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def complete_text(path: Path) -> str:
    """The complete lines as text; a byte that is not UTF-8 spoils only its own line (as U+FFFD)."""
    return complete_bytes(path).decode("utf-8", errors="replace")
