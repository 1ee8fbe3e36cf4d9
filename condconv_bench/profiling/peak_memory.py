"""Peak memory that one call of a case allocates, measured where the allocations happen.

CUDA: the caching allocator's peak statistics, reset before the call. CPU: `tracemalloc` does not
see torch's allocations and `ru_maxrss` spans the whole process, so the profiler's allocation
events are replayed in time order and the running sum's maximum is the peak (tracemalloc saw 200 B
for a 51 MB output here). A free counts only for a block allocated during the call, matched by
address: the profiler also reports frees of blocks from earlier sessions, with the size it
recorded at that address then, and replaying those made one case's peak 529,952 B, 153,632 B or
376,352 B in 30 identical measurements (19, 6 and 5 times). Both report bytes allocated during the
call above what was allocated before it; the call's output, which is alive at the end, is part of
the peak.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity

from condconv_bench.profiling.session import profiler_session


def _cuda_peak(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del result
    return peak


def _cpu_allocations(prof: Any) -> list[tuple[int, int, int]]:
    """(time, address, bytes: + allocated, - freed) of every CPU allocation event of a session."""
    found = []
    pending = list(prof.profiler.kineto_results.experimental_event_tree())
    while pending:
        event = pending.pop()
        pending.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            found.append((event.start_time_ns, event.extra_fields.ptr, event.extra_fields.alloc_size))
    return found


def _profiled_cpu_peak(fn: Callable[[], object]) -> int:
    with profiler_session(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    del result
    live: dict[int, int] = {}  # address → bytes, of the blocks allocated during the call
    running = peak = 0
    for _, address, nbytes in sorted(_cpu_allocations(prof), key=lambda event: (event[0], event[2] < 0)):
        if nbytes > 0:
            live[address] = nbytes
            running += nbytes
            peak = max(peak, running)
        elif address in live:
            running -= live.pop(address)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak bytes allocated by one call of `fn` on `device`; None where no method exists (MPS)."""
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type == "cpu":
        return _profiled_cpu_peak(fn)
    return None
