"""A stand-in for the few torchvision names timm imports, for machines whose torchvision cannot load.

timm imports torchvision when it is imported, although its EfficientNet code uses none of it:
`timm.layers.create_norm`, `timm.layers.norm_act` and `timm.utils.model` import
`torchvision.ops.misc.FrozenBatchNorm2d`; `timm.data` (which every model module imports for its
mean/std constants) imports `torchvision.transforms`, its `functional` module and
`InterpolationMode`, subclasses `transforms.ToTensor`, and imports six dataset classes. Where the
installed torchvision was built for another torch (pip may offer only CUDA builds: beside a CPU
torch, `import torchvision` fails with `operator torchvision::nms does not exist`), timm cannot be
imported at all.

`install()` then puts modules under those names into `sys.modules`, holding exactly these names.
Each class is a placeholder that raises when instantiated (`InterpolationMode` is a real enum with
torchvision's values, since timm builds lookup tables from it at import time); nothing here
computes anything, so a model that used torchvision would fail loudly instead of running
something else. It is installed only when the real torchvision cannot be imported
(`condconv_bench.cases.models.timm_models`), never over a working one.
"""

from __future__ import annotations

import enum
import sys
import types

from torch import nn

NAMES: dict[str, tuple[str, ...]] = {
    "torchvision.ops.misc": ("FrozenBatchNorm2d",),
    "torchvision.transforms": ("ToTensor",),
    "torchvision.datasets": ("CIFAR100", "CIFAR10", "MNIST", "KMNIST", "FashionMNIST", "ImageFolder"),
}


class InterpolationMode(enum.Enum):
    """torchvision's interpolation modes, with its values (timm maps them to and from names at import)."""

    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _placeholder(module: str, name: str, reason: str) -> type:
    def refuse(self: object, *args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{module}.{name} is condconv-bench's torchvision stand-in, not torchvision ({reason}); "
                           "install the torchvision that matches your torch to use it")

    base = nn.Module if name == "FrozenBatchNorm2d" else object  # timm checks isinstance(m, FrozenBatchNorm2d)
    return type(name, (base,), {"__init__": refuse, "__module__": module})


def install(reason: str) -> None:
    """Put the stand-in modules into `sys.modules`; `reason` (why torchvision failed) goes into every refusal."""
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]  # what a failed import left half-initialised
    modules = {name: types.ModuleType(name, "condconv-bench's torchvision stand-in (see condconv_bench.cases.models.torchvision_standin)")
               for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc", "torchvision.transforms",
                            "torchvision.transforms.functional", "torchvision.datasets")}
    for name, names in NAMES.items():
        for attribute in names:
            setattr(modules[name], attribute, _placeholder(name, attribute, reason))
    modules["torchvision.transforms.functional"].InterpolationMode = InterpolationMode  # type: ignore[attr-defined]
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    modules["torchvision"].__version__ = "0.0.0+condconv-bench-standin"  # type: ignore[attr-defined]
    modules["torchvision"].is_standin = True  # type: ignore[attr-defined]
    sys.modules.update(modules)
