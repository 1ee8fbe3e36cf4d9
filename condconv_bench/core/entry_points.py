"""Loading an entry-point group: how other packages add implementations and layer adapters.

Both groups (`condconv_bench.impls`, `condconv_bench.adapters`) load through here, so a plugin
that fails to import is reported the same way in each: as one line naming the entry point and its
target, not as a traceback from deep inside `importlib`. Two installed packages advertising one
name to different objects is an error too: which one `importlib.metadata` happens to list last
must not decide what a result row is labelled.
"""

from __future__ import annotations

import importlib.metadata

from condconv_bench.errors import DuplicateImplError, UnknownImplError


def load_group(group: str) -> dict[str, tuple[object, str]]:
    """Every entry point of `group`, loaded: name → (the object, `entry point NAME = 'VALUE'` to
    name it by in the registry's own errors)."""
    loaded: dict[str, tuple[object, str]] = {}
    values: dict[str, str] = {}
    for point in importlib.metadata.entry_points(group=group):
        if point.name in values:
            if values[point.name] != point.value:
                raise DuplicateImplError(f"entry point {point.name!r} of group {group!r} advertised twice: "
                                         f"{values[point.name]!r} and {point.value!r}")
            continue
        values[point.name] = point.value
        origin = f"entry point {point.name} = {point.value!r}"
        try:
            loaded[point.name] = (point.load(), origin)
        except Exception as exc:  # a third party's import: any failure is theirs, reported in one line
            message = str(exc).strip().splitlines()
            raise UnknownImplError(f"{origin} of group {group!r} cannot be loaded: "
                                   f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")) from None
    return loaded
