"""The package's public names, and what importing the drop-in layer costs a model."""

from __future__ import annotations

import subprocess
import sys

import condconv_bench

# The harness's libraries, and the compiler (torch._dynamo alone costs about a second to import).
NOT_FOR_THE_LAYER = ("pandas", "scipy", "fvcore", "pydantic", "matplotlib", "seaborn", "jinja2", "click",
                     "torch._dynamo", "torch._inductor", "sympy")


def test_every_public_name_resolves() -> None:
    for name in condconv_bench.__all__:
        assert getattr(condconv_bench, name) is not None, name
    assert set(dir(condconv_bench)) == set(condconv_bench.__all__)


def test_no_subpackage_shadows_a_public_name() -> None:
    """Importing a subpackage binds it as an attribute of the package: one named like a public
    function (`convert`) would replace that function for everyone who imported the subpackage."""
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(condconv_bench.__path__, "condconv_bench."):
        if not module.name.endswith("__main__"):  # runs the CLI
            importlib.import_module(module.name)
    assert not {name for name in condconv_bench.__all__ if type(getattr(condconv_bench, name)).__name__ == "module"}
    assert callable(condconv_bench.convert) and condconv_bench.convert is condconv_bench.conversion.convert


def test_the_layer_imports_without_the_harness() -> None:
    code = (
        "import sys, torch; from condconv_bench import CondConv2d, CondConvLinear; "
        "CondConv2d(8, 16, 1, num_experts=4)(torch.randn(2, 8, 5, 5)); "
        f"print(' '.join(m for m in {NOT_FOR_THE_LAYER!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"importing and running the layer loaded {loaded}"


def test_convert_imports_without_the_harness_or_timm() -> None:
    """convert() recognises timm's layers by class and attributes: converting a model imports no model library."""
    code = (
        "import sys, torch; from condconv_bench import CondConv2d, convert; "
        "model = torch.nn.Sequential(CondConv2d(8, 16, 1, num_experts=4, strategy='grouped_conv')); "
        "model, replaced = convert(model, 'batched_matmul'); model(torch.randn(2, 8, 5, 5)); assert len(replaced) == 1; "
        f"print(' '.join(m for m in {(*NOT_FOR_THE_LAYER, 'timm', 'torchvision')!r} if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"importing and running convert loaded {loaded}"


def test_every_package_of_the_tree_is_listed_for_installation() -> None:
    """pyproject lists the packages: one left out installs nothing of it (a fresh clone's CLI would not import)."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(init.parent.relative_to(root).parts) for init in (root / "condconv_bench").rglob("__init__.py")}
    found |= {"condconv_bench.impls", "condconv_bench.suites"}  # the top-level impls/ and suites/ folders, installed under the package
    found |= {".".join(("condconv_bench", *init.parent.relative_to(root).parts)) for init in (root / "impls").glob("*/__init__.py")}
    assert found - listed == set()
