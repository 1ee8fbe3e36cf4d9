"""Peak memory that one call of a case allocates, measured where the allocations happen.

CUDA: the caching allocator's peak statistics, reset before the call. CPU: `tracemalloc` does not
see torch's allocations and `ru_maxrss` spans the whole process, so the profiler's memory events
are replayed in time order and the running sum's maximum is the peak (tracemalloc saw 200 B for a
51 MB output here). Both report
bytes allocated during the call above what was allocated before it; the call's output, which is
alive at the end, is part of the peak.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity

from condconv_bench.profiler_session import profiler_session


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def _profiled_cpu_peak(fn: Callable[[], object]) -> int:
    with profiler_session(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    events = sorted(
        (event.start_ns(), event.nbytes())
        for event in prof.profiler.kineto_results.events()
        if event.name() == "[memory]" and event.device_type() == DeviceType.CPU
    )
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of `fn` on `device`; None where no method exists (MPS)."""
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type == "cpu":
        return _profiled_cpu_peak(fn)
    return None
