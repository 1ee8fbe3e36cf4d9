"""Two source trees of `condconv_bench` in one process, each under a package name of its own.

A paired A/B measurement needs the base and the head implementation of a case in the same
process, timed in the same rounds. Both cannot be imported as `condconv_bench`, so each tree is
served under an alias (`condconv_bench_rev_base`, `condconv_bench_rev_head`): a meta-path finder
maps `<alias>.x.y` to the tree's file for `condconv_bench.x.y` (honouring the package
directories its `pyproject.toml` declares, such as `impls/` for `condconv_bench.impls`) and
rewrites, in the syntax tree, every import of `condconv_bench` to the alias. A revision's
modules then import each other, never the installed package: each tree has its own registry,
base classes and module state, while the installed harness drives both.

The rewritten code is compiled in memory and never cached: a `.pyc` written next to a source
file would be picked up by the ordinary import of that file.
"""

from __future__ import annotations

import ast
import importlib.abc
import importlib.util
import json
import os
import sys
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType


from condconv_bench.measure.protocol import SETUP_VARIABLE

PACKAGE = "condconv_bench"
ALIAS_PREFIX = "condconv_bench_rev_"
TREES_VARIABLE = "CONDCONV_BENCH_TREES"  # JSON {alias: root}: worker processes serve the same trees


def alias_for(side: str) -> str:
    return ALIAS_PREFIX + side


def package_directories(root: Path) -> dict[str, Path]:
    """Directory of each `condconv_bench` package in a source tree, by package name."""
    directories = {PACKAGE: root / PACKAGE}
    try:
        config = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return directories
    mapped = config.get("tool", {}).get("setuptools", {}).get("package-dir", {})
    directories.update({name: root / folder for name, folder in mapped.items() if name.startswith(PACKAGE + ".")})
    return directories


class _ImportRenamer(ast.NodeTransformer):
    """`condconv_bench…` → `<alias>…` in import statements; names bound by them stay as written."""

    def __init__(self, alias: str) -> None:
        self.alias = alias

    def _renamed(self, name: str) -> str:
        return self.alias + name[len(PACKAGE):] if name == PACKAGE or name.startswith(PACKAGE + ".") else name

    def visit_Import(self, node: ast.Import) -> ast.AST | list[ast.AST]:
        statements: list[ast.AST] = [node]
        for name in node.names:
            renamed = self._renamed(name.name)
            if renamed != name.name and name.asname is None and "." in name.name:
                # `import condconv_bench.x` binds `condconv_bench`: bind it to the alias package instead.
                statements.append(ast.Assign([ast.Name(PACKAGE, ast.Store())], ast.Name(self.alias, ast.Load())))
            elif renamed != name.name and name.asname is None:
                name.asname = PACKAGE
            name.name = renamed
        return [ast.copy_location(s, node) for s in statements]

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        if node.level == 0 and node.module:
            node.module = self._renamed(node.module)
        return node


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, alias: str) -> None:
        self.alias = alias

    def exec_module(self, module: ModuleType) -> None:
        path = module.__spec__.origin  # type: ignore[union-attr]
        tree = _ImportRenamer(self.alias).visit(ast.parse(Path(path).read_bytes(), filename=path))
        exec(compile(ast.fix_missing_locations(tree), path, "exec", dont_inherit=True), module.__dict__)


class AliasFinder(importlib.abc.MetaPathFinder):
    """Serves the modules of the tree at `root` under the package name `alias`."""

    def __init__(self, alias: str, root: Path) -> None:
        self.alias, self.root = alias, root
        self.directories = package_directories(root)
        self.loader = _AliasLoader(alias)

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != self.alias and not fullname.startswith(self.alias + "."):
            return None
        real = PACKAGE + fullname[len(self.alias):]
        package = max((p for p in self.directories if real == p or real.startswith(p + ".")), key=len)
        location = self.directories[package].joinpath(*real[len(package):].split(".")[1:])
        if (location / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(
                fullname, location / "__init__.py", loader=self.loader, submodule_search_locations=[str(location)])
        if location.with_suffix(".py").is_file():
            return importlib.util.spec_from_file_location(fullname, location.with_suffix(".py"), loader=self.loader)
        return None


def _install(trees: dict[str, Path]) -> list[AliasFinder]:
    finders = [AliasFinder(alias, Path(root)) for alias, root in trees.items()]
    sys.meta_path[:0] = finders
    return finders


@contextmanager
def serving(trees: dict[str, Path]) -> Iterator[None]:
    """Serve each tree under its alias while the block runs; afterwards forget the aliases and
    every module imported under them, so a later gate can serve other trees under the same names."""
    finders = _install(trees)
    try:
        yield
    finally:
        for finder in finders:
            sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] in trees]:
            del sys.modules[name]


def environment_for(trees: dict[str, Path]) -> dict[str, str]:
    """Environment variables that make a worker process serve the same trees: the trees, and the
    worker's setup hook naming `install_from_environment`."""
    return {TREES_VARIABLE: json.dumps({alias: str(root) for alias, root in trees.items()}),
            SETUP_VARIABLE: f"{__name__}:{install_from_environment.__name__}"}


def install_from_environment() -> None:
    """In a worker process: serve the trees its parent served (`environment_for`), for good."""
    text = os.environ.get(TREES_VARIABLE)
    if text:
        _install({alias: Path(root) for alias, root in json.loads(text).items()})
