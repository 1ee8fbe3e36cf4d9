"""The import rules the package keeps: lower layers import nothing above them.

Read from the source (every `import` and `from … import`, at module level or inside functions),
so a rule broken by a lazy import inside a function is caught too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = "condconv_bench"

_ABOVE_THE_INSTRUMENT = ("gate", "report", "dispatch", "runner", "probes", "selection", "suite", "cli", "tune", "conversion", "models")
_ABOVE_THE_LAYERS = ("runner", "probes", "selection", "suite", "gate", "report", "cli", "tune", "measure.group", "measure.pool", "measure.worker")

# (modules the rule covers, modules they must not import), by dotted prefix under the package;
# "impls" is the strategies' folder, imported as condconv_bench.impls.
RULES: list[tuple[tuple[str, ...], tuple[str, ...]]] = [
    (("measure",), _ABOVE_THE_INSTRUMENT),  # the instrument knows no gate, report, suite or autotuning
    (("suite",), ("gate", "report", "runner", "probes", "selection", "cli", "tune")),
    (("settings",), tuple(name for name in ("gate", "report", "runner", "suite", "cli", "dispatch", "measure.group"))),
    (("gate",), ("report", "cli", "runner", "tune")),  # the gates return data; report renders it
    (("report",), ("cli", "runner", "tune", "probes")),
    (("layer", "spec", "registry", "modules", "errors", "impls", "dispatch", "adapters", "conversion"), _ABOVE_THE_LAYERS),
]


def _module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root).with_suffix("")
    parts = list(relative.parts)
    if parts[0] == "impls":
        parts = [PACKAGE, *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every project module `path` imports, as dotted names under the package."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found |= {f"{target}.{alias.name}" for alias in node.names}
    return {name for name in found if name == PACKAGE or name.startswith(PACKAGE + ".") or name == "click"}


def _under(name: str, prefix: str) -> bool:
    full = f"{PACKAGE}.{prefix}"
    return name == full or name.startswith(full + ".")


def broken_rules(root: Path) -> list[str]:
    """`module imports target` for every import that breaks a rule, in the tree at `root`."""
    problems = []
    for path in sorted([*(root / PACKAGE).rglob("*.py"), *(root / "impls").glob("*.py")]):
        module = _module_name(path, root)
        imported = _imports(path, module)
        for covered, forbidden in RULES:
            if not any(_under(module, prefix) for prefix in covered):
                continue
            for target in sorted(imported):
                if any(_under(target, prefix) for prefix in forbidden):
                    problems.append(f"{module} imports {target}")
        if not _under(module, "cli") and module != f"{PACKAGE}.__main__":  # `python -m condconv_bench` runs it
            problems += [f"{module} imports {target} (nothing imports the CLI)" for target in sorted(imported) if _under(target, "cli")]
            problems += [f"{module} imports click (only the CLI prints)" for target in imported if target == "click"]
    return sorted(set(problems))


def test_the_package_keeps_its_import_rules() -> None:
    assert broken_rules(PROJECT) == []


@pytest.mark.parametrize(("module", "line", "expected"), [
    ("measure/pool.py", "from condconv_bench.dispatch.cache import CACHE_VARIABLE", "condconv_bench.measure.pool imports condconv_bench.dispatch.cache"),
    ("measure/worker.py", "def f():\n    from ..gate.ab import aliases", "condconv_bench.measure.worker imports condconv_bench.gate.ab"),
    ("suite.py", "import condconv_bench.gate.statistics", "condconv_bench.suite imports condconv_bench.gate.statistics"),
    ("report/tables.py", "from condconv_bench import cli", "condconv_bench.report.tables imports condconv_bench.cli"),
    ("runner.py", "import click", "condconv_bench.runner imports click"),
])
def test_a_broken_rule_is_named(tmp_path: Path, module: str, line: str, expected: str) -> None:
    for folder in (PACKAGE, "impls"):
        for source in (PROJECT / folder).rglob("*.py"):
            target = tmp_path / source.relative_to(PROJECT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    planted = tmp_path / PACKAGE / module
    planted.write_text(planted.read_text(encoding="utf-8") + "\n" + line + "\n", encoding="utf-8")
    assert any(problem.startswith(expected) for problem in broken_rules(tmp_path)), broken_rules(tmp_path)
