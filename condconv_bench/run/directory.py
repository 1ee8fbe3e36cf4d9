"""The run directory: one row per case, appended the moment the case finishes.

Layout: `run.json` (schema version, suite and its hash, environment), `results.csv` (one row per
case, columns in `COLUMNS` order), `samples.jsonl` (raw timing samples per case) and, when
profiled, `traces/`. Each row is written with one `write` and fsynced, so a crash or `kill -9`
loses at most the case in progress, and a half-written last line is dropped on resume and load.
The schema version is checked on every read: results written by another format are refused, not
misread (pyperf keeps its format history the same way).
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from condconv_bench.atomic import write_text_atomically
from condconv_bench.errors import ResultsError, first_problem
from condconv_bench.profiling.phases import phases_of
from condconv_bench.set_aside import set_aside
from condconv_bench.timing.samples import Timing

# Schema history: 1 — first release; 2 — `dispatched` column (what `auto` ran); 3 — interleaved
# rounds in worker processes: `role`, paired ratios with intervals, ties, `processes`,
# `process_spread`, `stopped_because`, `tf32`; `noisy` means "not reproducible"; 4 — each case's
# limits (`limit_s`, `vs_limit`, …) and the run's memory bandwidths; 5 — `probed_dispatch`. Version 3
# and 4 directories still load (their missing cells are empty), but a run is only continued in its
# own version.
SCHEMA_VERSION = 5
READABLE_VERSIONS = (3, 4, 5)
RUN_FILE = "run.json"
RESULTS_FILE = "results.csv"
SAMPLES_FILE = "samples.jsonl"
PROFILES_FILE = "profiles.jsonl"
TRACES_DIR = "traces"

class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")  # what readers do not use is kept as written


class SuiteRecord(_Record):
    name: str
    sha256: str
    gate: dict[str, Any] = {}


class MatmulPeak(BaseModel):
    device: str
    dtype: str
    threads: int
    flops_per_s: float = Field(gt=0)
    dense_flops_per_s: float | None = Field(default=None, gt=0)  # since version 4: best of matmul and 1x1 conv
    depthwise_flops_per_s: float | None = Field(default=None, gt=0)  # since version 4


class MemoryBandwidth(BaseModel):
    """A device's measured bandwidths at one thread count (`machine_peak.memory_bandwidths`)."""

    model_config = ConfigDict(extra="allow")

    device: str
    threads: int
    dram_bytes_per_s: float = Field(gt=0)
    llc_bytes_per_s: float = Field(gt=0)
    llc_bytes: int | None = None


class RunMetadata(_Record):
    """`run.json`, any readable version: what readers rely on is typed; the rest (timing settings,
    allocator, timestamps, the environment's details) is kept as written."""

    schema_version: Literal[*READABLE_VERSIONS]  # type: ignore[valid-type]
    suite: SuiteRecord
    environment: dict[str, Any] = {}
    matmul_peaks: list[MatmulPeak] = []
    memory_bandwidths: list[MemoryBandwidth] = []
    shard: str | None = None


# name → pandas dtype; the order is the CSV's column order.
COLUMNS: dict[str, str] = {
    "case_id": "string",
    "impl": "string",
    "layer": "string",
    "layer_desc": "string",
    "kind": "string",
    "input_size": "string",
    "routing_given": "boolean",
    "batch_size": "Int64",
    "device": "string",
    "dtype": "string",
    "mode": "string",
    "threads": "Int64",
    "memory_format": "string",
    "role": "string",  # floor (the static layer every ratio divides by) | strategy | dispatcher (auto)
    "status": "string",  # ok | skipped | error
    "reason": "string",  # why skipped, or the error's message
    "latency_median_s": "float64",
    "latency_iqr_s": "float64",
    "latency_p10_s": "float64",
    "latency_p90_s": "float64",
    "latency_mean_s": "float64",
    "n_measurements": "Int64",  # timed blocks, over all rounds and worker processes
    "number_per_run": "Int64",  # calls per timed block
    "processes": "Int64",  # worker processes the samples came from
    "vs_floor": "float64",  # median of the paired per-round ratios latency / floor latency
    "vs_floor_ci_low": "float64",  # 95% interval, resampling processes then rounds
    "vs_floor_ci_high": "float64",
    "vs_best": "float64",  # the same against the fastest verified strategy of the group
    "vs_best_ci_low": "float64",
    "vs_best_ci_high": "float64",
    "tied_fastest": "boolean",  # cannot be told apart from the fastest (for auto: matches it)
    "process_spread": "float64",  # max/min over processes of the median ratio to the floor
    "noisy": "boolean",  # not reproducible: the ratio's interval or the process spread is too wide
    "stopped_because": "string",  # why the group's measuring ended (precise, budget, passes)
    "throughput_per_s": "float64",  # examples per second at the median latency
    "first_call_s": "float64",  # the cold first call: compile time for compiled implementations
    "compiled_graphs": "Int64",  # graphs torch.compile built during the first call (0 when eager)
    "tf32": "boolean",  # CUDA only: whether float32 convs/matmuls may use TF32 (the runner turns it off)
    "dispatched": "string",  # what a dispatching implementation (auto, autotune) ran in the timed workers, with shares where builds differed
    "probed_dispatch": "string",  # what it ran in the probing process: the choice its FLOPs, peak memory and equivalence describe
    "macs_fvcore": "Int64",  # MAC (multiply-accumulate), forward
    "flops_torch": "Int64",  # FLOP = 2 × MAC, forward
    "macs_analytic": "Int64",  # MAC, forward, this strategy's cost model
    "macs_analytic_routing": "Int64",
    "macs_analytic_mixing": "Int64",
    "macs_analytic_conv": "Int64",
    "flops_agree": "boolean",
    "flops_problems": "string",
    "fvcore_uncounted_ops": "string",
    "peak_memory_bytes": "Int64",  # allocated during one step (forward, or forward+backward)
    "param_bytes": "Int64",
    "input_bytes": "Int64",
    "output_bytes": "Int64",
    "kernel_bytes": "Int64",  # per-sample kernels the strategy materialises (B·P), 0 if none
    # Limits (`condconv_bench.core.limits`), forward pass of a layer; empty for training and stacks.
    "macs_compulsory": "Int64",  # MAC any exact strategy needs (routing, and mixing + conv or E convs)
    "bytes_compulsory": "Int64",  # bytes any exact strategy moves: experts once, input, routing, output
    "bytes_modelled": "Int64",  # bytes this strategy moves by its traffic model (intermediates twice)
    "limit_s": "float64",  # max(compute, memory) of the compulsory work on this machine's ceilings
    "limit_own_s": "float64",  # the same of this strategy's own modelled work
    "limit_bound": "string",  # compute | memory: what bounds limit_s
    "limit_memory": "string",  # llc (the working set fits in the last-level cache) | dram
    "arithmetic_intensity": "float64",  # FLOP per modelled byte of this strategy
    "vs_limit": "float64",  # latency / limit_s (≥ 1 unless a ceiling or a model is wrong)
    "vs_limit_own": "float64",  # latency / limit_own_s
    "achieved_gflop_per_s": "float64",  # 2 × macs_analytic / latency
    "achieved_gb_per_s": "float64",  # bytes_modelled / latency
    "max_rel_error": "float64",  # worst norm-wise relative error vs the float64 oracle
    "max_abs_error": "float64",
    "worst_tensor": "string",
    "tolerance": "float64",
    "equivalent": "boolean",  # empty for the static floor, which is not CondConv
    "wall_s": "float64",  # the runner's time on the case: its probes and its share of the group's timing
    "timed_s": "float64",  # time inside its timed blocks, all worker processes together
}


LIMIT_COLUMNS = ("macs_compulsory", "bytes_compulsory", "bytes_modelled", "limit_s", "limit_own_s", "limit_bound",
                 "limit_memory", "arithmetic_intensity", "vs_limit", "vs_limit_own", "achieved_gflop_per_s", "achieved_gb_per_s")
# The header each readable version wrote.
HEADERS: dict[int, list[str]] = {
    3: [c for c in COLUMNS if c not in (*LIMIT_COLUMNS, "probed_dispatch")],
    4: [c for c in COLUMNS if c != "probed_dispatch"],
    5: list(COLUMNS),
}


def _format_row(row: dict[str, Any]) -> str:
    unknown = set(row) - set(COLUMNS)
    if unknown:
        raise ValueError(f"result row has columns outside the schema: {sorted(unknown)}")
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(["" if row.get(c) is None else row[c] for c in COLUMNS])
    return buffer.getvalue()


_INT64 = range(-(2**63), 2**63)
_BOOLEANS = {"True": True, "False": False}


def _parse_value(text: str, dtype: str) -> Any:
    if text == "":
        return None
    if dtype == "string":
        return text
    if dtype == "boolean":
        if text not in _BOOLEANS:
            raise ValueError(f"not True or False: {text[:40]!r}")
        return _BOOLEANS[text]
    if dtype == "Int64":
        value = int(text)
        if value not in _INT64:
            raise ValueError(f"beyond a 64-bit integer: {text[:40]}")
        return value
    return float(text)


def _parse_row(fields: list[str], header: list[str]) -> list[Any]:
    """One CSV row written under `header` as typed values in `COLUMNS` order (columns an older
    version did not write are None); ValueError naming the column when a value does not fit."""
    if len(fields) != len(header):
        raise ValueError(f"{len(fields)} fields, the schema has {len(header)}")
    values = dict.fromkeys(COLUMNS)
    for column, text in zip(header, fields):
        try:
            values[column] = _parse_value(text, COLUMNS[column])
        except ValueError as exc:
            raise ValueError(f"column {column}: {str(exc)[:80]}") from None
    return list(values.values())


def _append_durably(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _complete_bytes(path: Path) -> bytes:
    """The file without a trailing half-written line."""
    data = path.read_bytes()
    return data[: data.rfind(b"\n") + 1]


def _complete_text(path: Path) -> str:
    """The complete lines as text; a byte that is not UTF-8 spoils only its own line (as U+FFFD)."""
    return _complete_bytes(path).decode("utf-8", errors="replace")


LOCK_FILE = ".lock"


@contextlib.contextmanager
def writer_lock(path: str | Path) -> Iterator[None]:
    """Hold the run directory for one writer: a second run into it fails at once with one line.

    An advisory `flock` on `DIR/.lock`, released by the kernel when the process ends, so a
    killed run never leaves a stale lock behind.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / LOCK_FILE, "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultsError(f"{folder}: another condconv-bench run is writing this directory") from None
        yield


class RunDirectory:
    """A run's folder on disk; every method reads or writes the files directly, nothing is cached."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def results_file(self) -> Path:
        return self.path / RESULTS_FILE

    @property
    def samples_file(self) -> Path:
        return self.path / SAMPLES_FILE

    @property
    def profiles_file(self) -> Path:
        return self.path / PROFILES_FILE

    @property
    def traces_dir(self) -> Path:
        return self.path / TRACES_DIR

    @classmethod
    def create(cls, path: str | Path, metadata: dict[str, Any]) -> RunDirectory:
        """A new run directory; refuses one that already holds results (use resume)."""
        run = cls(path)
        if run.results_file.exists():
            raise ResultsError(f"{run.results_file}: a run is already here; pass --resume to continue it or choose another -o")
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_metadata({"schema_version": SCHEMA_VERSION, **metadata})
        _append_durably(run.results_file, ",".join(COLUMNS) + "\n")
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDirectory:
        """An existing run directory, with its schema version checked."""
        run = cls(path)
        run.metadata()
        if not run.results_file.exists():
            raise ResultsError(f"{run.results_file}: missing; is {run.path} a condconv-bench run directory?")
        try:
            with run.results_file.open(encoding="utf-8") as handle:
                header = handle.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ResultsError(f"{run.results_file}: cannot be read ({exc})") from None
        version = run.metadata()["schema_version"]
        if header != ",".join(HEADERS[version]):
            raise ResultsError(f"{run.results_file}: header does not match schema version {version}")
        return run

    def metadata(self) -> dict[str, Any]:
        file = self.path / RUN_FILE
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ResultsError(f"{file}: missing; is {self.path} a condconv-bench run directory?") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ResultsError(f"{file}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("schema_version") not in READABLE_VERSIONS:
            found = data.get("schema_version") if isinstance(data, dict) else None
            raise ResultsError(f"{file}: schema_version is {found!r}, this condconv-bench reads "
                               f"{' and '.join(map(str, READABLE_VERSIONS))}")
        try:
            return RunMetadata.model_validate(data).model_dump()
        except ValidationError as exc:
            raise ResultsError(f"{file}: {first_problem(exc)}") from None

    def write_metadata(self, metadata: dict[str, Any]) -> None:
        write_text_atomically(self.path / RUN_FILE, json.dumps(metadata, indent=2, sort_keys=True) + "\n")

    def update_metadata(self, **changes: Any) -> None:
        self.write_metadata({**self.metadata(), **changes})

    def drop_partial_row(self) -> None:
        """Remove a half-written last line left by a crash, before appending again."""
        for file in (self.results_file, self.samples_file, self.profiles_file):
            if file.exists():
                complete = len(_complete_bytes(file))
                if complete != file.stat().st_size:
                    with file.open("r+b") as handle:
                        handle.truncate(complete)

    def append(self, row: dict[str, Any], timing: Timing | None = None) -> None:
        """Persist one finished case: its raw samples first, then the row that marks it done."""
        if timing is not None:
            record = {
                "case_id": row["case_id"], "number_per_run": timing.number_per_run, "times_s": list(timing.times_s),
                "process": list(timing.process), "round": list(timing.round),
            }
            _append_durably(self.samples_file, json.dumps(record) + "\n")
        _append_durably(self.results_file, _format_row(row))

    def append_profile(self, record: dict[str, Any]) -> None:
        """Persist one case's profile summary (trace file name and top operators)."""
        _append_durably(self.profiles_file, json.dumps(record) + "\n")

    def profiles(self) -> list[dict[str, Any]]:
        if not self.profiles_file.exists():
            return []
        records = []
        for number, line in enumerate(_complete_text(self.profiles_file).splitlines(), start=1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                set_aside(self.profiles_file, f"line {number}", str(exc))
                continue
            if not isinstance(record, dict):
                set_aside(self.profiles_file, f"line {number}", "not a JSON object")
                continue
            if "phases_us" in record and phases_of(record) is None:
                set_aside(self.profiles_file, f"line {number} phases", "not a mapping of phase names to microseconds")
                record = {key: value for key, value in record.items() if key not in ("phases_us", "step_us")}
            records.append(record)
        return records

    def results(self) -> pd.DataFrame:
        """All finished rows with the schema's dtypes; a row that does not fit the schema is set aside."""
        try:
            reader = csv.reader(io.StringIO(_complete_text(self.results_file)))
            header = next(reader, [])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ResultsError(f"{self.results_file}: cannot be read as results ({str(exc).splitlines()[0]})") from None
        version = self.metadata()["schema_version"]
        if header != HEADERS[version]:
            raise ResultsError(f"{self.results_file}: header does not match schema version {version}")
        records = []
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                set_aside(self.results_file, f"line {reader.line_num}", str(exc))
                continue
            try:
                records.append(_parse_row(fields, header))
            except ValueError as exc:
                set_aside(self.results_file, f"line {reader.line_num}", str(exc))
        return pd.DataFrame(records, columns=list(COLUMNS)).astype(COLUMNS)

    def completed_case_ids(self) -> set[str]:
        return set(self.results()["case_id"])

    def samples(self) -> dict[str, Timing]:
        """Raw per-call times by case id."""
        if not self.samples_file.exists():
            return {}
        samples = {}
        for number, line in enumerate(_complete_text(self.samples_file).splitlines(), start=1):
            try:
                record = json.loads(line)
                samples[record["case_id"]] = Timing(
                    tuple(map(float, record["times_s"])), int(record["number_per_run"]),
                    tuple(map(int, record.get("process", ()))), tuple(map(int, record.get("round", ()))),
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError, OverflowError) as exc:
                set_aside(self.samples_file, f"line {number}", f"{type(exc).__name__}: {exc}")
        return samples


def load_results(path: str | Path) -> pd.DataFrame:
    """The results of one run directory as a DataFrame (for notebooks)."""
    return RunDirectory.open(path).results()


def merge_runs(sources: list[str | Path], output: str | Path) -> RunDirectory:
    """Join shard directories of one suite into one run directory; refuses mixed suites or duplicates."""
    runs = [RunDirectory.open(source) for source in sources]
    metadata = [run.metadata() for run in runs]
    hashes = {m["suite"]["sha256"] for m in metadata}
    if len(hashes) != 1:
        raise ResultsError(f"cannot merge runs of different suites ({', '.join(str(r.path) for r in runs)})")
    frames = [run.results() for run in runs]
    seen: dict[str, Path] = {}
    for run, frame in zip(runs, frames):
        for case_id in frame["case_id"]:
            if case_id in seen:
                raise ResultsError(f"case {case_id} is in both {seen[case_id]} and {run.path}; shards must not overlap")
            seen[case_id] = run.path
    peaks = [peak for m in metadata for peak in m.get("matmul_peaks", [])]
    merged_meta = {
        **{k: v for k, v in metadata[0].items() if k not in ("shard", "schema_version")},
        "shard": None,
        "matmul_peaks": [dict(p) for p in dict.fromkeys(tuple(sorted(p.items())) for p in peaks)],
        "memory_bandwidths": list({(m["device"], m["threads"]): m for d in metadata for m in d.get("memory_bandwidths", [])}.values()),
        "merged_from": [{"path": str(r.path), "shard": m.get("shard"), "environment": m.get("environment")} for r, m in zip(runs, metadata)],
    }
    target = RunDirectory.create(output, merged_meta)
    for run, frame in zip(runs, frames):
        samples = run.samples()
        for row in frame.astype(object).where(frame.notna(), None).to_dict("records"):
            target.append(row, samples.get(row["case_id"]))
        for record in run.profiles():
            target.append_profile(record)
        if run.traces_dir.is_dir():
            shutil.copytree(run.traces_dir, target.traces_dir, dirs_exist_ok=True)
    return target
