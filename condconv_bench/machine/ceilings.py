"""The machine's measured ceilings: matmul, dense and depthwise-conv FLOP/s, and memory bandwidths.

A dense square matmul is the best case for any BLAS or tensor-core path, so its FLOP/s is a
practical peak for the device, dtype and thread count a case ran with; it tells machines apart
(`environment.machine_differences`). It is not the compute ceiling of every case: on an AMD EPYC
(2 cores) PyTorch's CPU matmul reached 227 GFLOP/s (n = 3072) while oneDNN's 1×1 convolution ran
the same arithmetic at 470–500 GFLOP/s, and a static 1×1 layer of the mobile suite beat a limit
drawn from the matmul peak (0.52×). The *dense* peak used by the limits is therefore the best of
a matmul and a 1×1 convolution (channels-last, a GEMM for the conv library). A depthwise conv,
whose every weight is used only H'·W' times, reaches neither (a static depthwise conv ran at
2–4.5× a limit from the matmul peak), so its own peak is measured: the best of a 3×3 and two 5×5
depthwise convs at EfficientNet-like widths.

Memory bandwidth is measured per device and thread count, with TF32 off like the peak:
`dram` on buffers well beyond the last-level cache (at least 256 MiB on CPU, 1 GiB on CUDA, and
at least four times the LLC), `llc` on buffers that fit in it (an eighth of the LLC, at most
4 MiB), and the `stream` curve on buffers from half to twice the LLC, where a re-read working set
stops fitting (`memory_bandwidths`). Each is the better of a copy (read + write) and a read-only reduction, because a read
stream can outrun a copy (write-allocate traffic is invisible to the count): a ceiling must be
an upper bound, or a case would beat its limit. Bandwidth does not depend on the cases' dtype.

The matmul peak is the median of a few timed blocks (machines are told apart by it); the other
ceilings take the fastest block, since a ceiling must not be lowered by a disturbed block (on a
shared 2-core machine one block of a 2-thread copy ran 100× slow while another process ran).
These are context figures measured in the runner's own process; no verdict depends on them.
The limits of each case (`condconv_bench.core.limits`) are read against them.

A ceiling is the machine at its best moment, while a case's latency is measured at whatever
moment its group ran: on a shared machine two mobile runs put the same static layer's median 8%
apart (up to 30%), so latency over a best-of ceiling drifts as much, and the passes here put the
dense peak 7–9% apart between runs. The dense peak therefore has a *sentinel*: a channels-last
1x1 conv (`sentinel_step`), which the workers time in the same interleaved rounds as the cases
of every group whose limit the dense peak binds. Its fastest block in the whole run
(`fastest_sentinels`) is a best of hundreds of blocks, and its rate there also measures the dense
peak (`core.limits.Ceilings.from_metadata` keeps the higher): within 0.2% between two mobile runs
where the passes were 7% apart, and above them (210–214 GFLOP/s against 169–182 on a 2-core
EPYC). A case's latency over the sentinel's in the same rounds (`vs_sentinel`) is a paired ratio
that a slower moment cancels out of; it is recorded, not folded into `vs_limit`: times the
sentinel's best time over the limit, it reproduced better (56% of the paired mobile rows within
±5% against 46%) but fell below 1 where a group had few rounds (a static 1x1 layer at 0.88 of its
limit at one thread), and a limit must stay an upper bound.

Only the dense peak has one. Tried on two mobile runs: a 5x5 depthwise conv (32x256x14x14), the
depthwise peak's best kernel back to back, ran 1.7–2.7x its fastest block when interleaved with
the cases, and that block differed 17% between the runs; an LLC copy paired worse than no pairing
on the six memory-bound cases. A sentinel that does not slow down with the cases only adds noise.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from condconv_bench.machine.environment import cache_bytes
from condconv_bench.machine.devices import device_unavailable_reason, synchronize, use_exact_float32
from condconv_bench.timing.rounds import Step, calls_per_block, run_rounds, times_of
from condconv_bench.timing.samples import median

from condconv_bench.core.case import TORCH_DTYPES, Case

# Large enough to reach the steady state, small enough to measure in well under a second.
_SIZE = {"cpu": 1024, "cuda": 8192, "mps": 4096}
_BLOCK_S = 0.03
_BLOCKS = 7
_DRAM_MIN_BYTES = {"cpu": 256 * 2**20, "cuda": 2**30}
_LLC_MAX_BUFFER = 4 * 2**20
# Buffers between the two, as multiples of the LLC's size, from half to twice it in steps of 2^(1/4):
# where a re-read working set stops fitting, the rate falls steeply (on a 2-core EPYC with a 32 MiB
# L3, 48-52 GB/s at 32 MiB and 37-40 at 41 MiB), so a limit read at the nearest smaller buffer of a
# coarser grid (one LLC for a 41 MiB set) is far below what the machine can do.
_STREAM_LLC_MULTIPLES = tuple(2 ** (step / 4) for step in range(-4, 5))
# (batch, C_in, H, W, C_out) of the 1x1 conv that joins the matmul in the dense peak.
_DENSE_CONV = {"cpu": (16, 256, 14, 14, 512), "cuda": (64, 1024, 28, 28, 1024)}
# (batch, channels, H, W, k) depthwise convs; the best of them is the depthwise peak.
_DEPTHWISE = ((32, 256, 14, 14, 3), (32, 256, 14, 14, 5), (32, 512, 7, 7, 5))
# (batch, C_in, H, W, C_out) of the dense sentinel: about a millisecond on a CPU, so that it adds
# little to a group's rounds, and faster per FLOP than `_DENSE_CONV` at its best block here.
_DENSE_SENTINEL = (8, 256, 14, 14, 256)
SENTINELS = ("dense",)  # the ceilings that have one (`core.limits.CaseLimits.binding_ceiling` names)


def _block_seconds(step: Callable[[], object], device: torch.device, threads: int) -> list[float]:
    """Seconds per call of `step` in each of a few timed blocks, at `threads` threads: rounds of
    one step, back to back (nothing runs between them, so none starts with an untimed call)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = lambda: synchronize(device)  # noqa: E731
    try:
        with torch.inference_mode():
            numbers = calls_per_block({"step": step}, _BLOCK_S, 2, time.perf_counter, sync)
            blocks = run_rounds({"step": step}, numbers, _BLOCKS, random.Random(0), time.perf_counter, sync, warm=False)
            return times_of(blocks, "step")
    finally:
        torch.set_num_threads(previous)


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of an n×n @ n×n matmul (n per device type) at the median of a few timed blocks."""
    n = _SIZE.get(device.type, 2048)
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=generator).to(device=device, dtype=dtype)
    use_exact_float32(device)  # the peak of the arithmetic the cases run: IEEE float32, not TF32
    return 2 * n**3 / median(_block_seconds(lambda: a @ b, device, threads))


def dense_peak_flops(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of the faster of an n×n matmul and a channels-last 1×1 conv, each at its fastest block."""
    n = _SIZE.get(device.type, 2048)
    a = torch.randn(n, n).to(device=device, dtype=dtype)
    b = torch.randn(n, n).to(device=device, dtype=dtype)
    use_exact_float32(device)
    matmul = 2 * n**3 / min(_block_seconds(lambda: a @ b, device, threads))
    batch, in_channels, height, width, out_channels = _DENSE_CONV.get(device.type, _DENSE_CONV["cuda"])
    x = torch.randn(batch, in_channels, height, width).to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(out_channels, in_channels, 1, 1).to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    conv = 2 * batch * in_channels * height * width * out_channels / min(_block_seconds(lambda: F.conv2d(x, w), device, threads))
    return max(matmul, conv)


def depthwise_peak_flops(device: torch.device, dtype: torch.dtype, threads: int) -> float:
    """FLOP/s of the fastest of a few depthwise convs ("same" padding), each at its fastest block."""
    use_exact_float32(device)
    best = 0.0
    for batch, channels, height, width, k in _DEPTHWISE:
        x = torch.randn(batch, channels, height, width).to(device=device, dtype=dtype)
        w = torch.randn(channels, 1, k, k).to(device=device, dtype=dtype)
        seconds = min(_block_seconds(lambda: F.conv2d(x, w, padding=k // 2, groups=channels), device, threads))
        best = max(best, 2 * batch * channels * height * width * k * k / seconds)
    return best


def last_level_cache_bytes(device: torch.device) -> int | None:
    """The size of the cache that keeps a layer's tensors between calls: CPU 0's L3 (else L2),
    a CUDA device's L2; None where the system does not say."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size) or None
    return cache_bytes("L3") or cache_bytes("L2")


def _bandwidth(device: torch.device, threads: int, nbytes: int) -> float:
    """Bytes/s of the better of a copy (2·nbytes moved) and a sum (nbytes read) of an nbytes buffer."""
    source = torch.ones(nbytes // 4, device=device)  # written in full, so every page is mapped before timing
    target = torch.empty_like(source)
    copy_s = min(_block_seconds(lambda: target.copy_(source), device, threads))
    read_s = min(_block_seconds(lambda: source.sum(), device, threads))
    return max(2 * nbytes / copy_s, nbytes / read_s)


def memory_bandwidths(device: torch.device, threads: int) -> dict[str, Any]:
    """Sustained DRAM and last-level-cache bandwidth (bytes/s) of `device` at `threads` threads,
    with the buffer sizes used, the LLC size the limits compare working sets with, and
    `stream_bytes_per_s`: `[buffer bytes, bytes/s]` of buffers from half to twice the LLC.

    Why the curve: a working set re-read call after call does not step from the LLC's bandwidth to
    DRAM's at the LLC's size. On a 2-core slice of an AMD EPYC (32 MiB L3, shared with other
    tenants), re-reading a buffer ran at 150 GB/s at 16 MiB, 70–86 at 24, 48–52 at 32 and 37–40
    at 41 MiB (a CondConv classifier's experts): the model "up to the LLC's size from the LLC, the
    rest from DRAM" put that 41 MiB layer's limit at 2.5× the time a plain read of its bytes took."""
    use_exact_float32(device)
    llc = last_level_cache_bytes(device)
    dram_buffer = max(_DRAM_MIN_BYTES.get(device.type, 2**30), 4 * (llc or 0))
    llc_buffer = min(_LLC_MAX_BUFFER, llc // 8) if llc else _LLC_MAX_BUFFER
    stream_buffers = sorted({int(llc * m) // 4 * 4 for m in _STREAM_LLC_MULTIPLES}) if llc else []
    return {
        "dram_bytes_per_s": _bandwidth(device, threads, dram_buffer),
        "llc_bytes_per_s": _bandwidth(device, threads, llc_buffer),
        "llc_bytes": llc,
        "dram_buffer_bytes": dram_buffer,
        "llc_buffer_bytes": llc_buffer,
        "stream_bytes_per_s": [[size, _bandwidth(device, threads, size)] for size in stream_buffers],
    }


def best_stream(earlier: list[list[float]], later: list[list[float]]) -> list[list[float]]:
    """Two `stream_bytes_per_s` curves merged, the higher rate at each buffer size."""
    rates = {int(size): rate for size, rate in earlier}
    for size, rate in later:
        rates[int(size)] = max(rates.get(int(size), 0.0), rate)
    return [[size, rates[size]] for size in sorted(rates)]


def sentinel_step(kind: str, device: torch.device, dtype: torch.dtype) -> Step:
    """The sentinel of a ceiling in `SENTINELS`: for `dense`, a channels-last 1x1 conv."""
    batch, in_channels, height, width, out_channels = _DENSE_SENTINEL
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, height, width, generator=generator).to(device=device, dtype=dtype)
    w = torch.randn(out_channels, in_channels, 1, 1, generator=generator).to(device=device, dtype=dtype)
    x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    return lambda: F.conv2d(x, w)


def sentinel_work(kind: str, device: torch.device) -> float:
    """FLOPs of one call of `kind`'s sentinel."""
    batch, in_channels, height, width, out_channels = _DENSE_SENTINEL
    return 2.0 * batch * in_channels * height * width * out_channels


# Ceilings are upper bounds, and another process's burst only ever lowers a measurement (once, a
# 2-thread LLC copy measured 0.8 GB/s against 100 GB/s a minute before): each is taken as the best
# of a few passes over all of them, so a burst must last the whole measurement to lower it.
CEILING_PASSES = 3
# What `best_ceilings` keeps the best of; the matmul peak (a median that tells machines apart) is
# kept as first measured.
CEILING_FIELDS = ("dense_flops_per_s", "depthwise_flops_per_s", "dram_bytes_per_s", "llc_bytes_per_s")


def _best(measure: Callable[[], float], passes: int) -> float:
    return max(measure() for _ in range(passes))


def matmul_peaks_of(cases: list[Case], passes: int = CEILING_PASSES) -> list[dict[str, Any]]:
    """The machine's matmul, dense and depthwise-conv FLOP/s for each device, dtype and thread count the cases use."""
    peaks = []
    for device, dtype, threads in dict.fromkeys((c.device, c.dtype, c.threads) for c in cases):
        if device_unavailable_reason(torch.device(device)) is None:
            target, torch_dtype = torch.device(device), TORCH_DTYPES[dtype]
            peaks.append({"device": device, "dtype": dtype, "threads": threads,
                          "flops_per_s": matmul_peak_flops(target, torch_dtype, threads),
                          "dense_flops_per_s": _best(lambda: dense_peak_flops(target, torch_dtype, threads), passes),
                          "depthwise_flops_per_s": _best(lambda: depthwise_peak_flops(target, torch_dtype, threads), passes)})
    return peaks


def memory_bandwidths_of(cases: list[Case], passes: int = CEILING_PASSES) -> list[dict[str, Any]]:
    """The machine's DRAM and last-level-cache bandwidth for each device and thread count the cases use."""
    measured = []
    for device, threads in dict.fromkeys((c.device, c.threads) for c in cases):
        if device_unavailable_reason(torch.device(device)) is None:
            each = [memory_bandwidths(torch.device(device), threads) for _ in range(passes)]
            best = {key: max(p[key] for p in each) for key in ("dram_bytes_per_s", "llc_bytes_per_s")}
            stream: list[list[float]] = []
            for p in each:
                stream = best_stream(stream, p.get("stream_bytes_per_s", []))
            measured.append({"device": device, "threads": threads, **each[0], **best, "stream_bytes_per_s": stream})
    return measured


def sentinel_entry(kind: str, case: Case, seconds: float) -> dict[str, Any]:
    """What `run.json` keeps of a sentinel's fastest block in a group of `case`'s context."""
    return {"device": case.device, "dtype": case.dtype, "threads": case.threads, "sentinel": kind, "seconds": seconds,
            "per_s": sentinel_work(kind, torch.device(case.device)) / seconds}


def fastest_sentinels(earlier: list[dict[str, Any]], later: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sentinel entries (`device`, `dtype`, `threads`, `sentinel`, `seconds`: its fastest block in
    some groups' rounds, `per_s`: its rate there) merged per context and kind, keeping the fastest."""
    merged = {(e["device"], e["dtype"], int(e["threads"]), e["sentinel"]): dict(e) for e in earlier}
    for entry in later:
        kept = merged.setdefault((entry["device"], entry["dtype"], int(entry["threads"]), entry["sentinel"]), dict(entry))
        if entry["seconds"] < kept["seconds"]:
            kept.update(seconds=entry["seconds"], per_s=entry["per_s"])
    return list(merged.values())


def sentinel_best_seconds(metadata: dict[str, Any], device: str, dtype: str, threads: int, kind: str) -> float | None:
    """`kind`'s fastest sentinel block in a run's rounds so far (`run.json`) for one context; None before any."""
    entry = next((e for e in metadata.get("sentinels", [])
                  if (e["device"], e["dtype"], int(e["threads"]), e["sentinel"]) == (device, dtype, threads, kind)), None)
    return None if entry is None else entry["seconds"]


def best_ceilings(earlier: list[dict[str, Any]], later: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries of two measurements of `matmul_peaks_of` or `memory_bandwidths_of`, merged per
    context with the higher of each ceiling and a count of the measurements behind it.

    Why a run measures again between its sweeps: a ceiling is an upper bound, and a moment in
    which another tenant loads the shared machine only lowers it; measurements spread over the run
    make one disturbed moment (the run's start) cost nothing. It does not make `vs_limit` as
    reproducible as `vs_floor`: the latencies themselves drift between runs (two mobile runs on one
    machine: the static layers' medians 8% apart, within 5% in 31% of cases), and a best-of ceiling
    does not follow a slower machine, while a paired ratio cancels it: the sentinels (module docstring)."""
    def context(entry: dict[str, Any]) -> tuple[Any, ...]:
        return entry["device"], entry.get("dtype"), int(entry["threads"])

    merged = {context(entry): dict(entry) for entry in earlier}
    for entry in later:
        kept = merged.setdefault(context(entry), {**entry, "measurements": 0})
        for field in CEILING_FIELDS:
            if field in entry:
                kept[field] = max(kept.get(field) or 0.0, entry[field])
        if "stream_bytes_per_s" in entry:
            kept["stream_bytes_per_s"] = best_stream(kept.get("stream_bytes_per_s", []), entry["stream_bytes_per_s"])
        kept["measurements"] = kept.get("measurements", 1) + 1
    return list(merged.values())
