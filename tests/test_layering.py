"""The import contract: each layer of the package imports only the layers below it.

The contract lives in `pyproject.toml` (`[tool.importlinter]`) and import-linter checks it on the
import graph of every module, imports inside functions included. `impls/` sits outside the
package folder (installed as `condconv_bench.impls`), where import-linter does not look, so the
strategies' own rule is read here from their source: a strategy codes against the contract and
what the machine tells it, nothing that dispatches, measures or reports.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = "condconv_bench"
STRATEGIES_MAY_IMPORT = ("core", "machine", "errors", "impls")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """import-linter over the tree at `root` (its own copy of the package, found first on the path)."""
    return subprocess.run([str(Path(sys.executable).with_name("lint-imports")), "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": ""})


def strategy_imports_out_of_bounds(root: Path) -> list[str]:
    """`impls.x imports y` for each import of a strategy module that leaves its layers."""
    problems = []
    for path in sorted((root / "impls").rglob("*.py")):  # strategies in a folder of their own too
        module = ".".join(path.relative_to(root / "impls").with_suffix("").parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                inside = name.split(".")[1] if name.startswith(PACKAGE + ".") else None
                if inside is not None and inside not in STRATEGIES_MAY_IMPORT:
                    problems.append(f"impls.{module} imports {name}")
    return problems


def test_the_package_keeps_its_import_contract() -> None:
    result = lint_imports(PROJECT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_the_strategies_import_only_the_contract_and_the_machine() -> None:
    assert strategy_imports_out_of_bounds(PROJECT) == []


def _copy(tmp_path: Path) -> Path:
    for folder in (PACKAGE, "impls"):
        shutil.copytree(PROJECT / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


@pytest.mark.parametrize(("module", "line", "expected"), [
    ("measure/pool.py", "def f():\n    from condconv_bench.run import runner", "condconv_bench.measure is not allowed to import condconv_bench.run"),
    ("core/spec.py", "import condconv_bench.dispatch.cache", "condconv_bench.core is not allowed to import condconv_bench.dispatch"),
    ("gate/compare.py", "from condconv_bench.tune import from_runs", "condconv_bench.gate is not allowed to import condconv_bench.tune"),
    ("report/tables.py", "import click", "condconv_bench.report.tables -> click"),
])
def test_a_broken_rule_is_named(tmp_path: Path, module: str, line: str, expected: str) -> None:
    root = _copy(tmp_path)
    planted = root / PACKAGE / module
    planted.write_text(planted.read_text(encoding="utf-8") + "\n" + line + "\n", encoding="utf-8")
    result = lint_imports(root)
    assert result.returncode != 0 and expected in result.stdout, result.stdout + result.stderr


def test_a_strategy_importing_the_instrument_is_named(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    planted = root / "impls" / "static.py"
    planted.write_text(planted.read_text(encoding="utf-8") + "\nfrom condconv_bench.measure.pool import WorkerPool\n", encoding="utf-8")
    assert strategy_imports_out_of_bounds(root) == ["impls.static imports condconv_bench.measure.pool"]
