"""Every file a command produces appears whole or not at all.

A report, baseline or dispatch table cut short by a crash, a full disk or Ctrl-C would be read
back later as corrupt, or worse, as a shorter valid file. Each is written to a temporary file in
the same folder, flushed to disk and renamed over the target: a rename within one file system is
atomic, so a reader sees the old file or the new one. Results rows are appended instead (see
`run/lines.py`), one fsynced write per case.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_bytes_atomically(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` (folders created as needed) so that no reader sees part of it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_bytes_atomically(path, text.encode("utf-8"))
