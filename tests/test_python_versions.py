"""`requires-python` says what the code needs: no module uses grammar or a standard-library name
newer than the oldest Python it admits.

Grammar is checked by parsing each file as that version (`ast.parse(feature_version=…)`, which
refuses what the parser marks as newer, such as `except*` before 3.11; best effort: it does not
flag `Literal[*names]`, and grammar newer than the interpreter running the tests cannot be parsed
at all); standard-library names by vermin, which knows in which version each module, function
and member appeared (`enum.StrEnum`: 3.11, `itertools.batched`: 3.12).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(PROJECT / "condconv_bench").rglob("*.py"), *(PROJECT / "impls").glob("*.py")])


def oldest_python() -> tuple[int, int]:
    requirement = tomllib.loads((PROJECT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["requires-python"]
    found = re.fullmatch(r">=\s*3\.(\d+)", requirement.strip())
    assert found, f"requires-python {requirement!r} is not a plain lower bound"
    return 3, int(found.group(1))


def grammar_problems(paths: list[Path], version: tuple[int, int]) -> list[str]:
    problems = []
    for path in paths:
        try:
            ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=version)
        except SyntaxError as exc:
            problems.append(f"{path.relative_to(path.parents[1])}:{exc.lineno}: {exc.msg}")
    return problems


def library_problems(paths: list[Path], version: tuple[int, int]) -> str:
    """vermin's report of every name newer than `version`, or "" when there is none."""
    result = subprocess.run([str(Path(sys.executable).with_name("vermin")), "--no-tips", "--violations", "--eval-annotations",
                             f"-t={version[0]}.{version[1]}-", *map(str, paths)], capture_output=True, text=True)
    return "" if result.returncode == 0 else result.stdout


def test_every_module_parses_as_the_oldest_python_admitted() -> None:
    assert grammar_problems(SOURCES, oldest_python()) == []


def test_no_module_uses_a_library_name_newer_than_the_oldest_python_admitted() -> None:
    assert library_problems(SOURCES, oldest_python()) == ""


@pytest.mark.parametrize(("line", "needs"), [
    ("try:\n    pass\nexcept* ValueError:\n    pass\n", (3, 11)),
    ("from enum import StrEnum\n", (3, 11)),
    ("from itertools import batched\n", (3, 12)),
])
def test_a_newer_construct_is_found(tmp_path: Path, line: str, needs: tuple[int, int]) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(line, encoding="utf-8")
    older = (needs[0], needs[1] - 1)
    assert grammar_problems([planted], older) or library_problems([planted], older)
    assert not grammar_problems([planted], needs) and not library_problems([planted], needs)
