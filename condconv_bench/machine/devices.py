"""What a device needs before and around a measurement: is it here, exact float32, warm libraries, synchronisation.

Every process that measures (the runner's probes, the worker processes, the machine's ceilings,
the A/B gate) asks these the same way, so a case is measured under the same device state wherever
it runs.
"""

from __future__ import annotations

import torch


def device_unavailable_reason(device: torch.device) -> str | None:
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available on this machine"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    return None


def use_exact_float32(device: torch.device) -> bool | None:
    """Turn TF32 off in cuDNN and cuBLAS on CUDA, so `float32` means IEEE float32 in every strategy.

    By default cuDNN convolutions run float32 in TF32 on tensor cores while cuBLAS matmuls do not,
    so conv-based strategies (and the static floor) would get a 10-bit mantissa and matmul-based
    ones full precision: a float32 ranking would compare different arithmetic. Returns whether
    TF32 is allowed now (False) on CUDA, for the result row; None elsewhere, where it does not apply.
    """
    if device.type != "cuda":
        return None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    return False


def warm_up_device(device: torch.device, dtype: torch.dtype) -> None:
    """One small conv and one batched matmul, so that library handles (cuDNN, cuBLAS) and lazily
    loaded kernels are ready before the first case's cold first call is timed."""
    x = torch.randn(2, 8, 8, 8, device=device, dtype=dtype)
    torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3, device=device, dtype=dtype), padding=1)
    torch.bmm(x.view(2, 8, 64), x.view(2, 64, 8))
    synchronize(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so a clock read after it covers the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
