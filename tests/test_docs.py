"""The README quotes the code's constants by name; each quoted value must be the code's."""

from __future__ import annotations

import re
import tomllib
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


def _layout_table() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## How the code is laid out")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_the_layout_section_lists_every_package_and_root_module_in_the_contracts_order() -> None:
    package = README.parent / "condconv_bench"
    listed = re.findall(r"`([a-z_]+(?:/|\.py))`", _layout_table())
    packages = {f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()}
    modules = {p.name for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    assert packages | modules | {"impls/", "suites/"} <= set(listed), "README's layout omits " + ", ".join(sorted(packages | modules - set(listed)))
    layers = tomllib.loads((README.parent / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"][0]["layers"]
    level = {name.strip(): index for index, layer in enumerate(reversed(layers)) for name in layer.split("|")}
    levels = [level[name] for name in (n.rstrip("/").removesuffix(".py") for n in listed) if name in level]
    assert levels == sorted(levels) and set(levels) == set(level.values())  # bottom to top: the contract lists them top to bottom
