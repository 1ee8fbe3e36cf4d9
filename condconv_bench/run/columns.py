"""The result row's columns: the one definition that a run directory is written and read by and
the README's table of columns is checked against.

Each column has a name, a pandas dtype, a unit, the topic it belongs to, what it means and the
schema version it first appeared in. The CSV's columns are in this order; the header a version
wrote is the columns that existed then, in the same order, so an older directory loads with the
columns it lacks empty. The modules that compute a row's values (the float64 oracle, the FLOP
counters, the limits, the timing verdicts) return typed results; `run.rows` puts them in cells
of these names.

Schema history (pyperf keeps its format's the same way): 1 — first release; 2 — `dispatched`
(what `auto` ran); 3 — interleaved rounds in worker processes: `role`, paired ratios with
intervals, ties, `processes`, `process_spread`, `stopped_because`, `tf32`, and `noisy` means "not
reproducible"; 4 — each case's limits (`limit_s`, `vs_limit`, …), and the run's memory
bandwidths in `run.json`; 5 — `probed_dispatch`; 6 — runtimes: `runtime` (a part of the case's
identity; empty in older runs, which read as `eager`), `export`, `export_reason`, `export_ops`,
`export_s`, and the runtimes' versions in `run.json`; 7 — the ceilings' sentinels (`sentinel`,
`sentinel_best_s`, `sentinel_median_s`, `vs_sentinel`). Versions 3 to 6 still load, but a run is only
continued in its own version.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

SCHEMA_VERSION = 7
READABLE_VERSIONS = (3, 4, 5, 6, 7)

Dtype = Literal["string", "boolean", "Int64", "float64"]


@dataclass(frozen=True)
class Column:
    """One column of a result row."""

    name: str
    dtype: Dtype  # pandas dtype; a CSV cell is empty where the value is missing
    unit: str  # "" where the value has none
    topic: str
    meaning: str
    since: int = 1  # the schema version that added it


def _topic(topic: str, *columns: tuple) -> tuple[Column, ...]:
    return tuple(Column(name, dtype, unit, topic, meaning, *since) for name, dtype, unit, meaning, *since in columns)


COLUMNS: tuple[Column, ...] = (
    *_topic(
        "identity",
        ("case_id", "string", "", "the case's unique id: layer/impl/batch/device/dtype/mode/threads/format, and /runtime unless eager"),
        ("impl", "string", "", "the implementation's registry key"),
        ("layer", "string", "", "the layer's name in the suite"),
        ("layer_desc", "string", "", "the workload in words (kind, channels, kernel, experts)"),
        ("kind", "string", "", "conv2d, linear, stack or model"),
        ("input_size", "string", "px", "the input's spatial size (`HxW`); empty for a linear layer"),
        ("routing_given", "boolean", "", "routing weights are passed in from outside instead of computed"),
        ("batch_size", "Int64", "examples", "examples per call"),
        ("device", "string", "", "cpu, cuda, mps …"),
        ("dtype", "string", "", "the compute dtype"),
        ("mode", "string", "", "inference (forward) or training (forward and backward)"),
        ("threads", "Int64", "", "torch's intra-op threads"),
        ("memory_format", "string", "", "contiguous or channels_last"),
        ("role", "string", "", "floor (the static layer every ratio divides by), strategy or dispatcher (auto, autotune)", 3),
        ("runtime", "string", "", "eager (PyTorch), or the runtime that ran the exported graph: onnxruntime, openvino", 6),
    ),
    *_topic(
        "status",
        ("status", "string", "", "ok, skipped or error; a failing case never stops the suite"),
        ("reason", "string", "", "why it was skipped, or the error's message; for an ok row, which reference equivalence was checked against where it is not the oracle"),
    ),
    *_topic(
        "latency",
        ("latency_median_s", "float64", "s", "median per-call time over all timed blocks"),
        ("latency_iqr_s", "float64", "s", "interquartile range of the per-call times"),
        ("latency_p10_s", "float64", "s", "10th percentile of the per-call times"),
        ("latency_p90_s", "float64", "s", "90th percentile of the per-call times"),
        ("latency_mean_s", "float64", "s", "mean per-call time"),
        ("n_measurements", "Int64", "blocks", "timed blocks, over all rounds and worker processes"),
        ("number_per_run", "Int64", "calls", "calls per timed block"),
        ("processes", "Int64", "", "worker processes the samples came from", 3),
    ),
    *_topic(
        "ratios",
        ("vs_floor", "float64", "ratio", "median of the paired per-round ratios latency / floor latency", 3),
        ("vs_floor_ci_low", "float64", "ratio", "95% interval of `vs_floor`, resampling processes then rounds: low end", 3),
        ("vs_floor_ci_high", "float64", "ratio", "the same interval's high end", 3),
        ("vs_best", "float64", "ratio", "the same paired ratio against the group's fastest verified strategy", 3),
        ("vs_best_ci_low", "float64", "ratio", "95% interval of `vs_best`: low end", 3),
        ("vs_best_ci_high", "float64", "ratio", "95% interval of `vs_best`: high end", 3),
        ("tied_fastest", "boolean", "", "cannot be told apart from the fastest (for a dispatcher: matches it)", 3),
        ("process_spread", "float64", "ratio", "max/min over worker processes of the median ratio to the floor", 3),
        ("noisy", "boolean", "", "not reproducible: the ratio's interval beyond ±5% or the processes more than 10% apart"),
        ("stopped_because", "string", "", "why the group's measuring ended: every ratio precise enough, the time budget, or the passes", 3),
        ("throughput_per_s", "float64", "examples/s", "examples per second at the median latency"),
    ),
    *_topic(
        "first call",
        ("first_call_s", "float64", "s", "the cold first call, timed apart: the compile time for compiled strategies"),
        ("compiled_graphs", "Int64", "graphs", "graphs torch.compile built during the first call (0 when eager)"),
        ("tf32", "boolean", "", "CUDA only: whether float32 convs and matmuls may use TF32 (the runner turns it off)", 3),
    ),
    *_topic(
        "dispatch",
        ("dispatched", "string", "", "what a dispatcher ran in the timed workers, with each choice's share where their builds differed", 2),
        ("probed_dispatch", "string", "", "what it ran in the probing process: the choice the row's FLOPs, peak memory and equivalence describe", 5),
    ),
    *_topic(
        "export",
        ("export", "string", "", "a runtime case only: ok (one graph with a dynamic batch runs at every batch), batch_fixed (exported at this batch) or failed", 6),
        ("export_reason", "string", "", "why the graph is not dynamic (batch_fixed) or not exported (failed): the exporter's or the runtime's reason", 6),
        ("export_ops", "string", "", "the exported graph's ONNX operators with their counts", 6),
        ("export_s", "float64", "s", "exporting and checking the graph (shared by the batches of a dynamic graph)", 6),
    ),
    *_topic(
        "FLOPs",
        ("macs_fvcore", "Int64", "MAC", "fvcore's count of one forward pass"),
        ("flops_torch", "Int64", "FLOP", "torch's FlopCounterMode count of one forward pass (2 FLOP per MAC)"),
        ("macs_analytic", "Int64", "MAC", "the strategy's own cost model, one forward pass"),
        ("macs_analytic_routing", "Int64", "MAC", "of which the routing"),
        ("macs_analytic_mixing", "Int64", "MAC", "of which mixing the experts' kernels"),
        ("macs_analytic_conv", "Int64", "MAC", "of which the conv(s) or linear product(s)"),
        ("flops_agree", "boolean", "", "the three counts agree"),
        ("flops_problems", "string", "", "why a counter failed or disagrees"),
        ("fvcore_uncounted_ops", "string", "", "ops fvcore could not count, with how often they ran"),
    ),
    *_topic(
        "memory",
        ("peak_memory_bytes", "Int64", "B", "allocated during one step (forward, or forward and backward)"),
        ("param_bytes", "Int64", "B", "the parameters"),
        ("input_bytes", "Int64", "B", "the input"),
        ("output_bytes", "Int64", "B", "the output"),
        ("kernel_bytes", "Int64", "B", "per-example kernels the strategy materialises (B·P), 0 if none"),
    ),
    *_topic(
        "limits",
        ("macs_compulsory", "Int64", "MAC", "what any exact strategy must compute: the routing, and mixing then one conv or E convs", 4),
        ("bytes_compulsory", "Int64", "B", "what any exact strategy must move: experts once, input, routing, output", 4),
        ("bytes_modelled", "Int64", "B", "what this strategy moves by its traffic model (intermediates twice)", 4),
        ("limit_s", "float64", "s", "max(compute, memory) of the compulsory work on this machine's ceilings", 4),
        ("limit_own_s", "float64", "s", "the same of this strategy's own modelled work", 4),
        ("limit_bound", "string", "", "compute or memory: what bounds `limit_s`", 4),
        ("limit_memory", "string", "", "llc (the working set fits in the last-level cache) or dram", 4),
        ("arithmetic_intensity", "float64", "FLOP/B", "FLOP per modelled byte of this strategy", 4),
        ("vs_limit", "float64", "ratio", "latency / `limit_s` (≥ 1 unless a ceiling or a model is wrong)", 4),
        ("vs_limit_own", "float64", "ratio", "latency / `limit_own_s`", 4),
        ("sentinel", "string", "", "the ceiling whose kernel the group's rounds timed beside it (`dense`, where the dense peak binds `limit_s`); empty where none", 7),
        ("sentinel_best_s", "float64", "s", "that kernel's fastest block in the run's rounds so far", 7),
        ("sentinel_median_s", "float64", "s", "its median in the group's rounds: over `sentinel_best_s`, how much slower the machine ran then", 7),
        ("vs_sentinel", "float64", "ratio", "median over rounds of latency / the sentinel's time in the same round", 7),
        ("achieved_gflop_per_s", "float64", "GFLOP/s", "2 × `macs_analytic` / latency", 4),
        ("achieved_gb_per_s", "float64", "GB/s", "`bytes_modelled` / latency", 4),
    ),
    *_topic(
        "equivalence",
        ("max_rel_error", "float64", "", "worst norm-wise relative error against the float64 oracle"),
        ("max_abs_error", "float64", "", "worst absolute error"),
        ("worst_tensor", "string", "", "the tensor with the largest relative error (output, grad_weight …)"),
        ("tolerance", "float64", "", "the relative error allowed for this dtype and device"),
        ("equivalent", "boolean", "", "within tolerance and finite; empty for the static floor, which is not CondConv"),
    ),
    *_topic(
        "cost",
        ("wall_s", "float64", "s", "the runner's time on the case: its probes and its share of the group's timing"),
        ("timed_s", "float64", "s", "time inside its timed blocks, all worker processes together"),
    ),
)

DTYPES: dict[str, Dtype] = {column.name: column.dtype for column in COLUMNS}


def header(version: int) -> list[str]:
    """The columns a run directory of `version` wrote, in their order."""
    return [column.name for column in COLUMNS if column.since <= version]
