"""Where a run happened: the facts that decide whether two runs can be compared at all.

The CPU's model and instruction sets are read from /proc/cpuinfo, as the kernel reports them, and
its caches from sysfs: py-cpuinfo would add the flags CPUID reports (another set, partly under other
names, so every recorded `cpu_flags_sha256` would change), count caches across cores, and spend
about a second in subprocesses of every process that keys the autotune cache; psutil tells neither.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any

import torch


def _cpuinfo(*keys: str) -> str | None:
    """The first value Linux's /proc/cpuinfo gives for any of `keys` (CPU 0's); None without one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def _cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5).stdout
        return out + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def cpu_flags() -> list[str]:
    """The instruction sets the kernel enabled (x86's `flags`, Arm's `Features`), sorted."""
    return sorted((_cpuinfo("flags", "Features") or "").split())


@functools.cache
def vector_isa() -> str:
    """The widest vector extension a `-march=native` build targets here, in words. A native
    strategy's speed depends on it (`fused` has AVX-512 and AVX2 kernels, elsewhere portable loops),
    so runs record it (`run.json`'s environment) and dispatch tables key native strategies' entries by it."""
    flags = set(cpu_flags())
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags:
        return "AVX2"
    if "asimd" in flags:
        return "NEON"
    return platform.machine() or "unknown ISA"


def _caches() -> dict[str, str]:
    """Cache sizes of CPU 0 by level and type, e.g. `{"L1d": "48K", "L2": "2048K", "L3": "491520K"}`."""
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        level, kind, size = (_read(str(index / name)) for name in ("level", "type", "size"))
        suffix = {"Data": "d", "Instruction": "i"}.get(kind or "", "")
        if level and size:
            caches[f"L{level}{suffix}"] = size
    return caches


def cache_bytes(level: str) -> int | None:
    """The size of CPU 0's cache `level` ("L2", "L1d", …) in bytes, or None where sysfs does not say."""
    size = _caches().get(level)
    if not size:
        return None
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)


def machine_fingerprint() -> dict[str, Any]:
    """What tells two machines apart when their CPUs share a label.

    Cloud machines sold under one CPU name differ in cache sizes, enabled instruction sets (AVX-512
    or not decides oneDNN's kernels) and kernel; those are compared exactly. Machines alike in all
    of them can still run 1.3–2× apart, which the measured matmul peak of a run (`matmul_peaks` in
    its metadata) shows; `condconv_bench.gate.compare` reads the two together.
    """
    flags = cpu_flags()
    return {
        "cpu_model": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "caches": _caches(),
        "cpu_flags_sha256": hashlib.sha256(" ".join(flags).encode()).hexdigest()[:16] if flags else None,
        "cpu_flags_count": len(flags),
        "kernel": platform.release(),
        "machine": platform.machine(),
    }


# A machine's own matmul peak moves by up to ~10% between runs on a busy host; machines of one
# label differ by 1.3-2x. Beyond this factor, two runs are taken to come from different machines.
PEAK_TOLERANCE = 1.25


def _peaks(environment: dict[str, Any]) -> dict[tuple[str, str, int], float]:
    return {(p["device"], p["dtype"], int(p["threads"])): float(p["flops_per_s"]) for p in environment.get("matmul_peaks", [])}


def machine_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Why two environments (`describe_environment` plus a run's `matmul_peaks`) are not the same
    machine running the same software; [] when they are."""
    if not before.get("machine") or not after.get("machine"):
        return ["no machine fingerprint on record (save the baseline again with this condconv-bench)"]
    differences = [
        f"{key} differs: {before['machine'].get(key)!r} vs {after['machine'].get(key)!r}"
        for key in ("cpu_model", "logical_cpus", "caches", "cpu_flags_sha256", "kernel", "machine")
        if before["machine"].get(key) != after["machine"].get(key)
    ]
    differences += [f"{key} differs: {before.get(key)!r} vs {after.get(key)!r}"
                    for key in ("torch", "cuda", "cudnn", "gpus") if before.get(key) != after.get(key)]
    peaks_before, peaks_after = _peaks(before), _peaks(after)
    for key in sorted(peaks_before.keys() & peaks_after.keys()):
        factor = peaks_after[key] / peaks_before[key]
        if not 1 / PEAK_TOLERANCE <= factor <= PEAK_TOLERANCE:
            device, dtype, threads = key
            differences.append(f"measured matmul peak ({device} {dtype} t{threads}) differs {factor:.2f}×: "
                               f"{peaks_before[key] / 1e9:.0f} vs {peaks_after[key] / 1e9:.0f} GFLOP/s")
    return differences


def memory_settings() -> dict[str, Any]:
    """Kernel and allocator settings that change how per-call buffers are paged in.

    Transparent huge pages decide whether a freshly mapped buffer of hundreds of MB faults in
    as 4 KiB or 2 MiB pages (several times apart in time); `THP_MEM_ALLOC_ENABLE` makes PyTorch
    ask for them. Neither can be fixed by the harness, so both are recorded.
    """
    return {
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "transparent_hugepage_defrag": _read("/sys/kernel/mm/transparent_hugepage/defrag"),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE"),
    }


_NVIDIA_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit", "mig.mode.current")


def gpu_state() -> list[dict[str, str]]:
    """Per GPU, what `nvidia-smi` says of driver, clocks, power limit and MIG mode; [] without it.

    Clocks below their maximum or a lowered power limit slow every case alike, but make runs of
    one GPU model incomparable; a MIG slice is a different, smaller device.
    """
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(_NVIDIA_SMI_FIELDS)}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [dict(zip(_NVIDIA_SMI_FIELDS, (v.strip() for v in line.split(",")))) for line in out.splitlines() if line.strip()]


def cuda_math_settings() -> dict[str, Any]:
    """Library switches that change what a CUDA case computes or how fast."""
    matmul = torch.backends.cuda.matmul
    return {
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "tf32_matmul": matmul.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "fp16_reduced_precision_reduction": matmul.allow_fp16_reduced_precision_reduction,
        "bf16_reduced_precision_reduction": matmul.allow_bf16_reduced_precision_reduction,
    }


def describe_environment() -> dict[str, Any]:
    """Versions, hardware and thread settings of this process, as JSON-ready values."""
    cuda = torch.cuda.is_available()
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "vector_isa": vector_isa(),  # what native strategies were built for (dispatch tables key them by it)
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cuda_math": cuda_math_settings(),  # as the process started; float32 cases turn TF32 off (row column tf32)
        "gpu_state": gpu_state() if cuda else [],
        "memory": memory_settings(),
        "machine": machine_fingerprint(),
        "git_commit": _git_commit(),
    }


def hardware_label(environment: dict[str, Any], devices: set[str] | None = None) -> str:
    """A short name for a run's hardware, e.g. `NVIDIA H100 / torch 2.13.0`, `EPYC … ×2 / torch 2.13.0`,
    or both joined by `+` when `devices` (the device types the run measured) include a GPU and the CPU."""
    gpus = environment.get("gpus") or []
    cpu = f"{environment.get('cpu_model', '?')} ×{environment.get('cpu_count', '?')}"
    measured = devices if devices is not None else ({"cuda"} if gpus else {"cpu"})
    parts = [gpus[0]] if gpus and measured - {"cpu"} else []
    if "cpu" in measured or not parts:
        parts.append(cpu)
    return f"{' + '.join(parts)} / torch {environment.get('torch', '?')}"
