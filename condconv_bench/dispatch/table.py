"""Dispatch tables: which strategy to run for a layer, learned from measurements.

An entry records, for one layer shape on one device type, dtype, mode, thread count, memory
format and allocator at one batch size, the fastest strategy that passed the equivalence check (and by how much
it beat the runner-up), with the evidence a later process needs to confirm it: the rivals it was
measured against, fastest first, the medians, how much the rounds disagreed about the comparison
and the machine's load at the time. A table's document also says which machine it was measured on. `condconv-bench tune` builds a table from a suite's run (`condconv_bench.tune`); the package ships
tables measured on the machines this project was benchmarked on; `CONDCONV_BENCH_DISPATCH` or a
layer's `dispatch_table` argument points at another.

Lookup narrows the entries step by step, keeping the previous set when a step would leave none:
same device type and dtype (else the rule of thumb below); on the CPU, measured on one with the same
widest vector extension (`vector_isa`: AVX-512, AVX2, NEON); same mode (training falls back to
inference entries); same thread count; same memory format; same allocator; the exact layer (signature) or else
the same shape class. Among what is left it takes the entry nearest in batch size and cost on a
log scale. With no entry for the device and dtype at all it falls back to a rule of thumb. An entry
whose strategy cannot run here, or is native code built here for another vector extension than it
was measured with, answers with its fastest measured rival.
"""

from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from condconv_bench.atomic import write_text_atomically
from condconv_bench.errors import ResultsError
from condconv_bench.core.flops import conv_macs
from condconv_bench.set_aside import set_aside
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.machine.environment import vector_isa

TABLE_FORMAT = "condconv-bench-dispatch"
TABLE_VERSION = 3  # 2 added the allocator to every entry; 3 the evidence fields and the table's machine
READABLE_VERSIONS = (2, 3)  # a version-2 entry reads with no evidence
ENVIRONMENT_VARIABLE = "CONDCONV_BENCH_DISPATCH"
RIVALS = 2  # runners-up an entry keeps: what a later process confirms the choice against


def signature(spec: LayerSpec, input_size: Pair) -> str:
    """The shape facts that decide a strategy's cost (not routing kind or bias, which barely do)."""
    if spec.kind == "linear":
        return f"linear {spec.in_channels}>{spec.out_channels} E{spec.num_experts}"
    k, s, p, d = (f"{a}x{b}" for a, b in (spec.kernel_size, spec.stride, spec.padding, spec.dilation))
    return (f"conv2d {spec.in_channels}>{spec.out_channels} k{k} s{s} p{p} d{d} g{spec.groups} "
            f"E{spec.num_experts} @{input_size[0]}x{input_size[1]}")


def shape_class(spec: LayerSpec, input_size: Pair) -> str:
    """A coarse family for layers never tuned: the op's kind and its output's spatial size."""
    if spec.kind == "linear":
        return "linear"
    if spec.is_depthwise:
        kind = "depthwise"
    elif spec.groups > 1:
        kind = "grouped"
    else:
        kind = "pointwise" if spec.kernel_size == (1, 1) else "dense"
    out_h, out_w = spec.output_size(input_size)
    pixels = out_h * out_w
    size = "≤8x8" if pixels <= 64 else "≤16x16" if pixels <= 256 else "≤32x32" if pixels <= 1024 else ">32x32"
    return f"{kind} {size}"


def rule_of_thumb(spec: LayerSpec) -> str:
    """The strategy to use with no measurement at all: what won most often on this project's CPU
    runs of the mobile suite (grouped_conv on depthwise layers, batched_matmul on dense ones,
    stacked_moe on the classifier)."""
    if spec.kind == "linear":
        return "stacked_moe"
    return "grouped_conv" if spec.groups > 1 else "batched_matmul"


def _runs_here(key: str, query: Query) -> bool:
    """Whether strategy `key` can run the query's layer in this process: a table measured where a
    native strategy was built (`fused`) is also read where it cannot be (no C++ compiler), and its
    entries then fall back to their fastest measured rival that can run."""
    import torch

    from condconv_bench.core.registry import dispatchable_impls

    cls = dispatchable_impls().get(key)
    return cls is not None and cls.runs(query.spec, torch.device(query.device), getattr(torch, query.dtype))


def _as_measured(key: str, entry: Entry) -> bool:
    """Whether `key` here is what `entry` measured: a native strategy built for another vector
    extension is another program (on an AVX2 EPYC, fused's portable loops ran 2.5–4.7× the static
    layer on mobile's 1×1 layers, its AVX2 kernels 1.1–1.9×; its AVX-512 kernels 1.0–1.3× on an AVX-512 one)."""
    from condconv_bench.core.registry import dispatchable_impls

    cls = dispatchable_impls().get(key)
    return not (cls is not None and cls.native and entry.vector_isa and entry.vector_isa != vector_isa())


@dataclass(frozen=True)
class Entry:
    device: str  # device type: cpu, cuda, mps
    dtype: str
    mode: str  # inference | training
    threads: int
    memory_format: str
    allocator: str  # the process's allocator policy (`condconv_bench.machine.allocators.current`)
    signature: str
    shape_class: str
    batch_size: int
    conv_macs_per_example: int
    strategy: str
    margin: float  # runner-up latency / winner latency (1.0 when only one strategy was measured)
    layer: str  # the layer's name in the suite it was tuned on
    rivals: tuple[str, ...] = ()  # the other strategies still in the race at the end, fastest first
    medians_s: dict[str, float] = field(default_factory=dict)  # per-call median of the strategy and its rivals
    spread: float = 0.0  # IQR / median of the runner-up / choice ratio over the rounds (0: not recorded)
    load: float = -1.0  # the machine's 1-minute load average per CPU while it was measured (-1: not recorded)
    # The widest vector extension of the CPU it was measured on (`environment.vector_isa`; empty:
    # not recorded). A native strategy's entry holds only where its build targets the same one.
    vector_isa: str = ""

    @classmethod
    def from_json(cls, raw: object) -> Entry:
        """An entry read from a table file; ValueError naming the field when it does not fit.

        Checked by hand rather than with pydantic: the layer reads tables, and pulling pydantic
        into every model that uses it would cost more than the check.
        """
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        known = {f.name: f for f in fields(cls)}
        required = {name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING}
        missing, extra = sorted(required - set(raw)), sorted(set(raw) - set(known))
        if missing or extra:
            raise ValueError(f"fields missing {missing}" if missing else f"unknown fields {extra}")
        values = {}
        for name, value in raw.items():
            kind = str(known[name].type)
            if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[kind]):
                raise ValueError(f"{name}: {str(value)[:40]!r} is not {kind}")
            if kind == "tuple[str, ...]":
                if not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name}: not a list of strategy names")
                value = tuple(value)
            elif kind == "dict[str, float]" and not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()):
                raise ValueError(f"{name}: not a mapping of strategy names to seconds")
            values[name] = value
        if values["batch_size"] < 1:
            raise ValueError(f"batch_size: {values['batch_size']} is below 1")
        return cls(**values)

    def identity(self) -> tuple[object, ...]:
        """Everything that makes this entry a measurement of one query (`Query.identity`)."""
        return (self.device, self.dtype, self.mode, self.threads, self.memory_format, self.allocator,
                self.signature, self.batch_size)


_JSON_TYPES: dict[str, type | tuple[type, ...]] = {
    "str": str, "int": int, "float": (int, float), "tuple[str, ...]": list, "dict[str, float]": dict,
}


@dataclass(frozen=True)
class Query:
    """What a layer asks the table, once per new input shape."""

    spec: LayerSpec
    input_size: Pair
    device: str
    dtype: str
    mode: str
    threads: int
    memory_format: str
    allocator: str
    batch_size: int

    def identity(self) -> tuple[object, ...]:
        """What an entry measured for exactly this query shares with it (see `Entry.identity`)."""
        return self.entry("", 1.0, "").identity()

    def entry(self, strategy: str, margin: float, layer: str, rivals: tuple[str, ...] = (),
              medians_s: dict[str, float] | None = None, spread: float = 0.0, load: float = -1.0, vector_isa: str = "") -> Entry:
        """The entry recording `strategy` as measured fastest for this query (by `margin`), with
        the evidence of that measurement (see `Entry`), on a CPU with `vector_isa`."""
        return Entry(
            device=self.device, dtype=self.dtype, mode=self.mode, threads=self.threads, memory_format=self.memory_format,
            allocator=self.allocator, signature=signature(self.spec, self.input_size),
            shape_class=shape_class(self.spec, self.input_size), batch_size=self.batch_size,
            conv_macs_per_example=conv_macs(self.spec, 1, self.input_size), strategy=strategy, margin=round(margin, 4),
            layer=layer, rivals=tuple(rivals), medians_s={k: float(f"{v:.4g}") for k, v in (medians_s or {}).items()},
            spread=round(spread, 4), load=round(load, 3), vector_isa=vector_isa,
        )


def _narrow(entries: list[Entry], keep: Any) -> list[Entry]:
    narrowed = [e for e in entries if keep(e)]
    return narrowed or entries


class DispatchTable:
    """A set of measured entries and the lookup rule described in the module docstring."""

    def __init__(self, entries: list[Entry], source: str = "", measured_on: str = "") -> None:
        self.entries = tuple(entries)
        self.source = source
        self.measured_on = measured_on  # the machine and torch build, in words (`condconv-bench list` shows it)

    def covers(self, device: str, dtype: str) -> bool:
        """Whether any entry was measured on this device type and dtype (else `choose` guesses)."""
        return any(e.device == device and e.dtype == dtype for e in self.entries)

    def measured_under(self, device: str, dtype: str) -> set[tuple[str, int]]:
        """The (allocator, threads) pairs this table's entries for a device and dtype were measured under."""
        return {(e.allocator, e.threads) for e in self.entries if e.device == device and e.dtype == dtype}

    def provenance(self) -> list[str]:
        """Where the table's entries come from, a line per device, dtype, CPU vector extension, allocator and thread count."""
        counts: dict[tuple[str, str, str, str, int], int] = {}
        for e in self.entries:
            key = (e.device, e.dtype, e.vector_isa, e.allocator, e.threads)
            counts[key] = counts.get(key, 0) + 1
        return [f"{n} entries for {device} {dtype}, measured{f' on {isa}' if isa else ''} under allocator {allocator} with {threads} threads"
                for (device, dtype, isa, allocator, threads), n in sorted(counts.items())]

    def choose(self, query: Query) -> str:
        """The nearest entry's strategy, or its fastest rival, that runs here (see `_runs_here`), else the rule of thumb."""
        candidates = [e for e in self.entries if e.device == query.device and e.dtype == query.dtype]
        runs = functools.cache(lambda key: _runs_here(key, query))
        # An entry whose strategy cannot run here, or not as it was measured (a native build for
        # another vector extension), answers with its fastest rival that can (the same
        # measurement's runner-up); one with none gives way to the nearest entry that has one.
        answer = {id(e): next((key for key in (e.strategy, *e.rivals) if runs(key) and _as_measured(key, e)), None)
                  for e in candidates}
        candidates = [e for e in candidates if answer[id(e)] is not None]
        if not candidates:
            return rule_of_thumb(query.spec)
        exact = signature(query.spec, query.input_size)
        family = shape_class(query.spec, query.input_size)
        if query.device == "cpu":  # measured on a CPU like this one (a GPU's speed does not depend on its host's)
            candidates = _narrow(candidates, lambda e: e.vector_isa == vector_isa())
        candidates = _narrow(candidates, lambda e: e.mode == query.mode)
        candidates = _narrow(candidates, lambda e: e.threads == query.threads)
        candidates = _narrow(candidates, lambda e: e.memory_format == query.memory_format)
        candidates = _narrow(candidates, lambda e: e.allocator == query.allocator)
        candidates = _narrow(_narrow(candidates, lambda e: e.shape_class == family), lambda e: e.signature == exact)
        macs = max(1, conv_macs(query.spec, 1, query.input_size))

        def distance(entry: Entry) -> float:
            return abs(math.log2(query.batch_size / entry.batch_size)) + abs(math.log2(macs / max(1, entry.conv_macs_per_example)))

        return answer[id(min(candidates, key=distance))]

    def to_json(self) -> str:
        document = {"format": TABLE_FORMAT, "version": TABLE_VERSION, "measured_on": self.measured_on,
                    "entries": [asdict(e) for e in self.entries]}
        return json.dumps(document, indent=1, sort_keys=True) + "\n"

    def save(self, path: Path) -> Path:
        return write_text_atomically(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> DispatchTable:
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
            if document.get("format") != TABLE_FORMAT or document.get("version") not in READABLE_VERSIONS:
                raise ValueError(f"not a {TABLE_FORMAT} file of version {' or '.join(map(str, READABLE_VERSIONS))}")
            raw_entries = document["entries"]
            if not isinstance(raw_entries, list):
                raise ValueError("entries is not a list")
            measured_on = document.get("measured_on", "")
            if not isinstance(measured_on, str):
                raise ValueError("measured_on is not a string")
        except FileNotFoundError:
            raise ResultsError(f"{path}: dispatch table not found") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
            raise ResultsError(f"{path}: not a valid dispatch table ({exc})") from None
        entries = []
        for index, raw in enumerate(raw_entries):
            try:
                entries.append(Entry.from_json(raw))
            except ValueError as exc:
                set_aside(path, f"entries[{index}]", str(exc))
        return cls(entries, str(path), measured_on)

    @classmethod
    def merged(cls, tables: list[DispatchTable]) -> DispatchTable:
        return cls([e for t in tables for e in t.entries], ", ".join(t.source for t in tables),
                   "; ".join(t.measured_on for t in tables if t.measured_on))


@functools.lru_cache(maxsize=None)
def _load_cached(path: str) -> DispatchTable:
    return DispatchTable.load(path)


def default_table() -> DispatchTable:
    """`$CONDCONV_BENCH_DISPATCH` if set, else the tables shipped with the package (merged)."""
    override = os.environ.get(ENVIRONMENT_VARIABLE)
    if override:
        return _load_cached(override)
    folder = resources.files("condconv_bench") / "dispatch_tables"
    paths = sorted(str(p) for p in folder.iterdir() if str(p).endswith(".json")) if folder.is_dir() else []
    return DispatchTable.merged([_load_cached(p) for p in paths])


def resolve_table(table: DispatchTable | str | Path | None) -> DispatchTable:
    """A table given as an object or a path, or the default one."""
    if table is None:
        return default_table()
    return table if isinstance(table, DispatchTable) else _load_cached(str(table))
