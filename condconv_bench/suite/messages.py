"""pydantic's validation errors as the suite's one-line messages: `file: layers[3].groups: what is wrong`.

pydantic reports a location as a tuple that mixes keys, list indices and union tags; a user reads
the key path they wrote, so the path is rebuilt by walking the data itself.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import ValidationError

from condconv_bench.suite import schema


def _path_of(loc: tuple[Any, ...], data: Any) -> str:
    """`layers[3].groups` from a pydantic location, skipping union tags that are not keys."""
    path = ""
    for part in loc:
        if isinstance(data, list) and isinstance(part, int) and part < len(data):
            path += f"[{part}]"
            data = data[part]
        elif isinstance(data, dict) and part in data:
            path += f".{part}" if path else str(part)
            data = data[part]
        elif not isinstance(data, (dict, list)):
            break  # a union tag such as 'int' or 'list[int]' under a scalar
        else:
            path += f".{part}" if path else str(part)  # a missing key
            data = None
    return path or "(top level)"


def _describe(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        if key in schema.aliases():  # pydantic takes the first name given and calls the other extra
            return f"the same setting as {schema.aliases()[key]!r}; set it once"
        close = difflib.get_close_matches(key, schema.all_keys(), n=1)
        return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")
    if error["type"] == "missing":
        return "required key is missing"
    if error["type"] == "string_pattern_mismatch":
        return f"may only contain letters, digits, '_', '.' and '-', got {error['input']!r}"
    message = error["msg"]
    if "input" in error and error["type"] not in ("too_short",):
        message += f", got {error['input']!r}"
    return message


def schema_problems(exc: ValidationError, data: Any, prefix: str = "") -> list[str]:
    """One line per key path (`prefix` + the path), its problems joined: a union's alternatives read as 'or'."""
    merged: dict[str, list[str]] = {}
    for error in exc.errors():
        path = _path_of(error["loc"], data)
        text = _describe(error)
        if text not in merged.setdefault(prefix + path, []):
            merged[prefix + path].append(text)
    return [f"{path}: {' or '.join(texts)}" for path, texts in merged.items()]
