"""Models by name: `timm:<model name>` (timm's registry) or `package.module:callable` (returns an `nn.Module`).

timm is optional (`pip install "condconv-bench[models]"`), so nothing imports it until a model
needs it, and a missing timm is a reason to skip, said with the line that installs it. Any other
module a suite names must import: `check_name` refuses an unknown name before anything runs, with
the closest known name, as the registry does for implementations. timm
imports torchvision when it is imported; where the installed torchvision cannot be imported
(built for another torch), timm is imported with `torchvision_standin` in its place, which holds
only the names timm imports and refuses to be used.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from types import ModuleType

from torch import nn

from condconv_bench.errors import ModelError, first_line
from condconv_bench.cases.models import torchvision_standin

TIMM = "timm"
INSTALL_LINE = 'pip install "condconv-bench[models]" and the torchvision built for your torch (see the README)'


def split(source: str) -> tuple[str, str]:
    """`timm:efficientnet_b0` → (`timm`, `efficientnet_b0`); `pkg.mod:make` → (`pkg.mod`, `make`)."""
    library, sep, name = source.partition(":")
    if not sep or not library or not name:
        raise ModelError(f"model {source!r}: expected timm:<model name> or package.module:callable")
    return library, name


def unavailable_reason(source: str) -> str | None:
    """Why `source` cannot be built here because timm is missing (with how to install it), or None."""
    library, _ = split(source)
    return f"timm is not installed: {INSTALL_LINE}" if library == TIMM and not _importable(TIMM) else None


def _did_you_mean(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_name(source: str) -> None:
    """Refuse (`ModelError`) a model name its library does not have, without building the model.

    Where timm is not installed nothing is checked: its cases are skipped with the install line.
    """
    library, name = split(source)
    if library == TIMM:
        if not _importable(TIMM):
            return
        timm = import_timm()
        if not timm.is_model(name):
            raise ModelError(f"model {source!r}: timm {timm.__version__} has no model {name!r}{_did_you_mean(name, timm.list_models())}")
        return
    module = _import(source, library)
    if not callable(getattr(module, name, None)):
        public = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise ModelError(f"model {source!r}: {library} has no callable {name!r}{_did_you_mean(name, public)}")


def _import(source: str, library: str) -> ModuleType:
    try:
        return importlib.import_module(library)
    except ImportError as exc:
        raise ModelError(f"model {source!r}: cannot import module {library!r} ({first_line(exc)})") from None


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError, AttributeError):  # a parent that is not a package; an entry of None in sys.modules
        return False


def import_timm() -> ModuleType:
    """timm, with the torchvision stand-in in place where the installed torchvision cannot be imported."""
    if TIMM not in sys.modules and "torchvision" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception as exc:  # a CUDA build beside a CPU torch raises RuntimeError, a missing one ImportError
            torchvision_standin.install(first_line(exc))
    try:
        return importlib.import_module(TIMM)
    except ImportError as exc:
        raise ModelError(f"timm cannot be imported ({first_line(exc)}): {INSTALL_LINE}") from None


def build_model(source: str) -> nn.Module:
    """A freshly initialised model (random weights: nothing is downloaded) from its name."""
    check_name(source)
    library, name = split(source)
    try:
        model = import_timm().create_model(name, pretrained=False) if library == TIMM else getattr(_import(source, library), name)()
    except ModelError:
        raise
    except Exception as exc:  # the model's own code: the suite's entry is what cannot run
        raise ModelError(f"model {source!r} cannot be built: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {source!r}: {name}() returned {type(model).__name__}, not a torch.nn.Module")
    return model
