"""The README quotes the code's constants by name; each quoted value must be the code's."""

from __future__ import annotations

import re
from pathlib import Path

from condconv_bench.dispatch import autotuning

README = Path(__file__).resolve().parents[1] / "README.md"
QUOTED = re.compile(r"`([A-Z][A-Z_]+)` \((\d+(?:\.\d+)?)(%?)\)")


def test_every_constant_the_readme_quotes_has_the_codes_value() -> None:
    quoted = QUOTED.findall(README.read_text(encoding="utf-8"))
    assert len(quoted) >= 10  # the autotune section quotes its rule's constants
    for name, value, percent in quoted:
        expected = float(value) / (100 if percent else 1)
        assert getattr(autotuning, name) == expected, f"README quotes {name} as {value}{percent}, the code has {getattr(autotuning, name)}"
