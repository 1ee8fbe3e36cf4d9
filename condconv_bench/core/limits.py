"""The limit of a case: the least time its work can take on this machine, as a pure function.

`limit_s = max(compute_s, memory_s)` (the roofline): compute is the MACs over the measured FLOP
rate, memory the bytes over the measured bandwidth (`machine.ceilings`). A case gets two limits: that
of the *compulsory* work of the CondConv computation (the routing, and the cheaper of mixing B
kernels then one conv or E convs — `flops.compulsory_macs`; every expert read once, input,
output — `traffic.compulsory_traffic`), which no exact strategy can beat, and
that of the strategy's *own* modelled work (its `analytic_macs` and `analytic_bytes`). Latency over
the first says how far a strategy is from the machine; over the second, whether it is a slow
algorithm (its own limit far above the compulsory one) or slow execution (far above its own).
The static floor is no CondConv: both of its limits are those of the plain layer.

Ceilings, and which one applies:
- Compute: the dense peak (the best of a matmul and a 1×1 conv) for matrix products and convs;
  for the conv of a depthwise layer the measured depthwise-conv peak (the dense peak is out of a
  depthwise conv's reach). Compute seconds are summed over the two kinds of MACs.
- Memory: in a layer benchmark the same input and experts are used call after call, so they stay
  in the last-level cache when they fit. The rule: the compulsory working set (input, output,
  experts, routing) is re-read at the bandwidth measured on the largest buffer no larger than it
  (`Ceilings.stream`: the LLC buffer, buffers from half to twice the LLC, the DRAM buffer), so a set that
  fits moves at LLC bandwidth and one beyond it at what re-reading that much memory reaches
  here; every other byte moves at LLC bandwidth. `limit_memory` says `llc` when the working set
  fits, `dram` when it does not. Runs that measured no curve keep the model they were written
  with: up to the LLC's size at LLC bandwidth, the rest at DRAM bandwidth (optimistic between one
  and two LLCs, where a re-read set already runs near DRAM speed). Inside a model the experts
  stream from DRAM between layers, so a model's limit is higher than its layers' limits.

Limits are modelled for one layer's forward pass (inference rows); training steps and block stacks
have none yet. A case beating its compulsory limit by more than measurement error means a
ceiling or a traffic model is wrong: tests check shipped shapes for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from condconv_bench.core.flops import AnalyticMacs
from condconv_bench.core.traffic import Traffic


@dataclass(frozen=True)
class Ceilings:
    """A device's measured ceilings at one dtype and thread count."""

    dense_flops_per_s: float  # the best of a matmul and a 1x1 conv (`machine.ceilings.dense_peak_flops`)
    depthwise_flops_per_s: float
    dram_bytes_per_s: float
    llc_bytes_per_s: float
    llc_bytes: int | None  # None where the system does not say: everything is taken to fit
    # (buffer bytes, bytes/s) re-read rates from the LLC buffer to the DRAM buffer, by size; () when not measured
    stream: tuple[tuple[int, float], ...] = ()

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any], device: str, dtype: str, threads: int) -> Ceilings | None:
        """The ceilings a run measured for this context, or None when it measured none (before version 4).

        The dense peak is the higher of its passes and its sentinel's rate at the sentinel's fastest
        block in the run's rounds (`sentinels`, version 7; `machine.ceilings` says why)."""
        peak = next((p for p in metadata.get("matmul_peaks", [])
                     if (p["device"], p["dtype"], int(p["threads"])) == (device, dtype, threads)), None)
        memory = next((m for m in metadata.get("memory_bandwidths", [])
                       if (m["device"], int(m["threads"])) == (device, threads)), None)
        if peak is None or memory is None or not peak.get("dense_flops_per_s") or not peak.get("depthwise_flops_per_s"):
            return None
        sentinel = max((float(s["per_s"]) for s in metadata.get("sentinels", [])
                        if (s["device"], s["dtype"], int(s["threads"]), s["sentinel"]) == (device, dtype, threads, "dense")), default=0.0)
        stream = ()
        if memory.get("stream_bytes_per_s"):
            stream = tuple(sorted([(int(memory["llc_buffer_bytes"]), float(memory["llc_bytes_per_s"])),
                                   *((int(size), float(rate)) for size, rate in memory["stream_bytes_per_s"]),
                                   (int(memory["dram_buffer_bytes"]), float(memory["dram_bytes_per_s"]))]))
        return cls(max(float(peak["dense_flops_per_s"]), sentinel), float(peak["depthwise_flops_per_s"]), float(memory["dram_bytes_per_s"]),
                   float(memory["llc_bytes_per_s"]), memory.get("llc_bytes"), stream)


@dataclass(frozen=True)
class Limit:
    """One roofline limit: its seconds, the compute and memory times it is the larger of, and the
    memory level the memory time assumes."""

    seconds: float
    compute_s: float
    memory_s: float
    memory_level: str  # "llc" (the working set fits) or "dram"

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def memory_seconds(moved_bytes: int, working_set_bytes: int, ceilings: Ceilings) -> tuple[float, str]:
    """Seconds to move `moved_bytes` when `working_set_bytes` are re-read call after call, and the level."""
    if ceilings.llc_bytes is None:
        return moved_bytes / ceilings.llc_bytes_per_s, "llc"
    level = "dram" if working_set_bytes > ceilings.llc_bytes else "llc"
    if not ceilings.stream:
        spill = max(0, min(moved_bytes, working_set_bytes - ceilings.llc_bytes))
        return spill / ceilings.dram_bytes_per_s + (moved_bytes - spill) / ceilings.llc_bytes_per_s, level
    rate = next((r for size, r in reversed(ceilings.stream) if size <= working_set_bytes), ceilings.llc_bytes_per_s)
    resident = min(moved_bytes, working_set_bytes)
    return resident / rate + (moved_bytes - resident) / ceilings.llc_bytes_per_s, level


def limit(macs: AnalyticMacs, traffic: Traffic, working_set_bytes: int, depthwise: bool, ceilings: Ceilings) -> Limit:
    """`max(MACs / peak, bytes / bandwidth)` of one forward pass (2 FLOP per MAC)."""
    conv_peak = ceilings.depthwise_flops_per_s if depthwise else ceilings.dense_flops_per_s
    compute = 2 * macs.conv / conv_peak + 2 * (macs.mixing + macs.routing) / ceilings.dense_flops_per_s
    memory, level = memory_seconds(traffic.moved, working_set_bytes, ceilings)
    return Limit(max(compute, memory), compute, memory, level)


@dataclass(frozen=True)
class Work:
    """The MACs and bytes of one forward pass."""

    macs: AnalyticMacs
    traffic: Traffic


@dataclass(frozen=True)
class CaseWork:
    """What a case's two limits are computed from."""

    compulsory: Work  # of the CondConv computation itself (of the plain layer, for the floor)
    own: Work  # of the strategy the case ran
    depthwise: bool


@dataclass(frozen=True)
class CaseLimits:
    """A case's two limits, known before timing, and the work they are computed from."""

    work: CaseWork
    compulsory: Limit  # of the CondConv computation itself: no exact strategy beats it
    own: Limit  # of the strategy's own modelled work

    @property
    def binding_ceiling(self) -> str:
        """The ceiling the compulsory limit is mostly drawn from: `dense` or `depthwise` compute, or
        `llc` or `dram` bandwidth (the names of `machine.ceilings.SENTINELS`)."""
        if self.compulsory.bound == "memory":
            return self.compulsory.memory_level
        return "depthwise" if self.work.depthwise else "dense"

    @property
    def arithmetic_intensity(self) -> float:
        """FLOP per byte the strategy moves by its traffic model."""
        return 2 * self.work.own.macs.total / self.work.own.traffic.moved


def case_limits(work: CaseWork, ceilings: Ceilings) -> CaseLimits:
    """Both limits of a case on these ceilings; both read the compulsory working set from the LLC
    where it fits, as a layer benchmark does call after call."""
    working_set = work.compulsory.traffic.compulsory
    return CaseLimits(
        work,
        limit(work.compulsory.macs, work.compulsory.traffic, working_set, work.depthwise, ceilings),
        limit(work.own.macs, work.own.traffic, working_set, work.depthwise, ceilings),
    )
