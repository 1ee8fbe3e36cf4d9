"""The machine's measured matmul throughput: the ceiling that achieved GFLOP/s is read against.

A dense square matmul is the best case for any BLAS or tensor-core path, so its FLOP/s is a
practical peak for the device, dtype and thread count a case ran with. Reports show each
strategy's achieved FLOP/s (analytic FLOPs / latency) beside it.
"""

from __future__ import annotations

import torch

from condconv_bench.timing import measure

# Large enough to reach the steady state, small enough to measure in well under a second.
_SIZE = {"cpu": 1024, "cuda": 8192, "mps": 4096}


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, threads: int, min_run_time: float = 0.3) -> float:
    """FLOP/s of an n×n @ n×n matmul (n per device type) at the median latency."""
    n = _SIZE.get(device.type, 2048)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    previous = torch.get_num_threads()
    try:
        with torch.inference_mode():
            timing = measure(lambda: a @ b, threads=threads, min_run_time=min_run_time, warmup=2)
    finally:
        torch.set_num_threads(previous)
    return 2 * n**3 / timing.median_s
