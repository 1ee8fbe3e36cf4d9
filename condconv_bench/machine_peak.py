"""The machine's measured matmul throughput: the ceiling that achieved GFLOP/s is read against.

A dense square matmul is the best case for any BLAS or tensor-core path, so its FLOP/s is a
practical peak for the device, dtype and thread count a case ran with. Reports show each
strategy's achieved FLOP/s (analytic FLOPs / latency) beside it. It is a context figure, measured
in the runner's own process: no verdict depends on it.
"""

from __future__ import annotations

import statistics
import time

import torch

from condconv_bench.fixtures import synchronize, use_exact_float32
from condconv_bench.measure.rounds import calls_per_block, time_block

# Large enough to reach the steady state, small enough to measure in well under a second.
_SIZE = {"cpu": 1024, "cuda": 8192, "mps": 4096}
_BLOCK_S = 0.03
_BLOCKS = 7


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of an n×n @ n×n matmul (n per device type) at the median of a few timed blocks."""
    n = _SIZE.get(device.type, 2048)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    use_exact_float32(device)  # the peak of the arithmetic the cases run: IEEE float32, not TF32
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = lambda: synchronize(device)  # noqa: E731
    try:
        with torch.inference_mode():
            step = lambda: a @ b  # noqa: E731
            number = calls_per_block({"matmul": step}, _BLOCK_S, 2, time.perf_counter, sync)["matmul"]
            median_s = statistics.median(time_block(step, number, time.perf_counter, sync) for _ in range(_BLOCKS))
    finally:
        torch.set_num_threads(previous)
    return 2 * n**3 / median_s
