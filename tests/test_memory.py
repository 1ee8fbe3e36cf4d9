"""Peak memory of one call on CPU, from the profiler's allocation events."""

from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity

from condconv_bench.profiling.peak_memory import peak_memory_bytes
from condconv_bench.profiling.session import profiler_session

CPU = torch.device("cpu")
MIB = 1 << 20


def test_the_peak_is_the_most_bytes_alive_at_once_during_the_call() -> None:
    def call() -> torch.Tensor:
        for _ in range(3):
            temporary = torch.empty(MIB // 4)  # 1 MiB, freed before the next
            del temporary
        return torch.empty(MIB // 2)  # 2 MiB output, alive at the end

    assert peak_memory_bytes(call, CPU) == 2 * MIB


def test_a_block_from_an_earlier_session_freed_during_the_call_does_not_lower_the_peak() -> None:
    # The profiler reports this free (it recorded the block's size in the earlier session) but not
    # its allocation; replayed, the free took 4 MiB off a running sum that never held them.
    held = []
    with profiler_session(activities=[ProfilerActivity.CPU], profile_memory=True):
        held.append(torch.empty(MIB))

    def call() -> torch.Tensor:
        held.clear()
        return torch.empty(MIB // 4)

    assert peak_memory_bytes(call, CPU) == MIB
