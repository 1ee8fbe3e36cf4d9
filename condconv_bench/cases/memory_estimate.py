"""Whether a case fits in memory, estimated before anything is allocated.

A suite's numbers are bounded, but a bounded layer can still need more memory than the machine
has (a 4096→4096 conv with 64 experts at batch 256 does); on Linux such a case ends in the
out-of-memory killer, which takes the whole run with it. So each case is estimated first and
`skipped` with its estimate when it cannot fit in the memory available now.

The estimate is an upper bound over the strategies, not a prediction of one. Per CondConv layer:
the experts; the per-example kernels a mixing strategy builds (B·P) and the copy a conv backend
makes of them; the larger of two E-fold activations (the naive mixture's E outputs, or the stacked
mixture's E-fold input and its conv's copy) and an unfold buffer (B · C_in·kh·kw · H·W). Plus the
workload's input and output; all times 3 in training (gradients, and the tensors autograd
saves); plus the same sum, less the unfold buffer, in float64 for the reference (the defining
formula unfolds nothing). On a CPU run of the mobile suite every strategy's measured step peak
stayed below this bound (the closest at 1/1.04 of it, the median at 1/9); a test checks the
bound on the tiny suite.

A workload that can be checked another way when its float64 reference does not fit (a whole
model: against the model as its library ships it, in the case's dtype; see
`Workload.fallback_reference_bytes`) is skipped only when the case does not fit even with that
check's memory in place of the float64 reference's; `oracle_fits` is the one criterion both the
skip and the workload's choice of check use.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import psutil
import torch

from condconv_bench.core.case import Case

if TYPE_CHECKING:
    from condconv_bench.cases.workload import Workload

GIB = 2**30
TRAINING_FACTOR = 3
REFERENCE_ITEMSIZE = 8  # the float64 oracle


def _elements(workload: Workload, batch: int, unfolds: bool) -> int:
    total = math.prod(workload.input_shape(batch)) + math.prod(workload.output_shape(batch))
    for spec, input_size in workload.layer_inputs():
        spatial = math.prod(input_size)
        e_fold = 2 * spec.num_experts * batch * max(spec.in_channels, spec.out_channels) * spatial
        unfold = batch * spec.in_channels * math.prod(spec.kernel_size) * spatial if unfolds and spec.kind == "conv2d" else 0
        total += (spec.num_experts + 2 * batch) * spec.kernel_numel + max(e_fold, unfold)
    return total


def reference_elements(workload: Workload, batch_size: int, training: bool) -> int:
    """The elements a case's reference holds (no unfold buffers), times 3 in training; a fallback
    reference in another dtype takes the same count at its own itemsize."""
    return (TRAINING_FACTOR if training else 1) * _elements(workload, batch_size, unfolds=False)


def case_bytes(workload: Workload, batch_size: int, training: bool, dtype: torch.dtype) -> int:
    """An upper bound on the bytes one case needs on its device without its reference."""
    return (TRAINING_FACTOR if training else 1) * dtype.itemsize * _elements(workload, batch_size, unfolds=True)


def _with_oracle(workload: Workload, batch_size: int, training: bool, dtype: torch.dtype) -> int:
    return case_bytes(workload, batch_size, training, dtype) + REFERENCE_ITEMSIZE * reference_elements(workload, batch_size, training)


def estimated_bytes(case: Case) -> int:
    """An upper bound on the bytes one case needs on its device, its float64 reference included."""
    return _with_oracle(case.workload, case.batch_size, case.mode == "training", case.torch_dtype)


def oracle_fits(workload: Workload, batch_size: int, training: bool, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a case with its float64 reference fits in `device`'s memory now (True where that cannot be told)."""
    available = available_bytes(device)
    return available is None or _with_oracle(workload, batch_size, training, dtype) <= available


def available_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can take now on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    return psutil.virtual_memory().available  # Linux's MemAvailable: free memory plus what can be reclaimed


def memory_reason(case: Case, device: torch.device) -> str | None:
    """Why `case` would not fit in `device`'s memory now, or None if it fits (or cannot be told)."""
    available = available_bytes(device)
    needed = estimated_bytes(case)
    if available is None or needed <= available:
        return None
    training = case.mode == "training"
    fallback = case.workload.fallback_reference_bytes(case.batch_size, training, case.torch_dtype)
    if fallback is not None:
        needed = case_bytes(case.workload, case.batch_size, training, case.torch_dtype) + fallback
        if needed <= available:
            return None
        return (f"needs about {needed / GIB:.1f} GiB by estimate (experts, per-example kernels, activations, "
                f"unfold buffers, the {case.dtype} reference the float64 one falls back to), "
                f"{available / GIB:.1f} GiB available on {device}")
    return (f"needs about {needed / GIB:.1f} GiB by estimate (experts, per-example kernels, activations, "
            f"unfold buffers, the float64 reference), {available / GIB:.1f} GiB available on {device}")
