"""Snapshots of a run's figures, from a run directory or a committed baseline file.

A baseline is the part of a run a regression gate needs, in a small JSON file meant to be
committed and reviewed: per case the latency summary and raw samples (thinned to at most
`MAX_SAMPLES` quantiles), the ratio to the `static` floor measured in the same run, FLOP counts,
peak memory and equivalence, plus the environment it came from. Cases are sorted, numbers are
rounded to 4 significant digits and each sample list sits on one line, so a baseline update
reads as a short diff in a pull request.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from condconv_bench.atomic import write_text_atomically
from condconv_bench.errors import ResultsError, first_problem
from condconv_bench.core.case import GROUP_KEYS, Role
from condconv_bench.run.directory import RunDirectory
from condconv_bench.run.metadata import SuiteRecord
from condconv_bench.set_aside import set_aside
from condconv_bench.timing.samples import Timing

BASELINE_FORMAT = "condconv-bench-baseline"
# 2: identity fields per case, machine fingerprint and matmul peaks in the environment;
# 3: a case's ratio to its floor is `vs_floor`, as in result rows (version 2 called it `ratio_to_static`);
# 4: `probed_dispatch`, the strategy a dispatcher's FLOPs and peak memory were measured with.
BASELINE_VERSION = 4
READABLE_VERSIONS = (2, 3, 4)
MAX_SAMPLES = 64  # enough for rank tests; more only lengthens the file


@dataclass(frozen=True)
class CaseFigures:
    """What a gate compares for one case, with the identity fields it is reported by."""

    impl: str
    threads: int
    status: str
    reason: str | None
    samples_s: tuple[float, ...]  # per-call times (thinned); empty unless status is ok
    latency_median_s: float | None
    latency_iqr_s: float | None
    floor_case: str | None  # the floor case of the same group, if it ran
    vs_floor: float | None
    macs_fvcore: int | None
    flops_torch: int | None
    macs_analytic: int | None
    peak_memory_bytes: int | None
    equivalent: bool | None
    max_rel_error: float | None
    probed_dispatch: str | None = None  # a dispatcher's choice behind the figures above (before version 4: unknown)


_CASE_FIGURES = TypeAdapter(CaseFigures)  # validates a baseline's entry, types included


class BaselineDocument(BaseModel):
    """A baseline file, any readable version. Its entries are validated one by one (`CaseFigures`), so a bad
    entry costs that case only."""

    model_config = ConfigDict(extra="allow")

    format: Literal["condconv-bench-baseline"]
    version: Literal[*READABLE_VERSIONS]  # type: ignore[valid-type]
    suite: SuiteRecord
    environment: dict[str, Any] = {}
    cases: dict[str, Any]


@dataclass(frozen=True)
class Snapshot:
    """A run's gate-relevant figures, whichever file they were read from."""

    source: str
    suite_name: str
    suite_sha256: str
    environment: dict[str, Any]
    cases: dict[str, CaseFigures]


def _round(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value != 0:
        return float(f"{value:.4g}")
    return value


def _thin(samples: tuple[float, ...]) -> tuple[float, ...]:
    if len(samples) <= MAX_SAMPLES:
        return samples
    quantiles = (np.arange(MAX_SAMPLES) + 0.5) / MAX_SAMPLES
    return tuple(float(q) for q in np.quantile(np.asarray(samples), quantiles))


def _optional(value: Any, kind: type) -> Any:
    return None if value is None or pd.isna(value) else kind(value)


_STATUS_RANK = {"error": 0, "skipped": 1, "ok": 2}


def _combined_case(rows: list[dict[str, Any]], timings: list[Timing]) -> dict[str, Any]:
    """One case's figures over several runs: the worst status, the least disturbed run's samples
    (lowest median), the largest peak memory."""
    worst = min(rows, key=lambda row: _STATUS_RANK.get(row["status"], 0))
    fastest = min(timings, key=lambda t: t.median_s) if timings and worst["status"] == "ok" else None
    samples = np.asarray(fastest.times_s) if fastest else np.array([])
    peaks = [int(row["peak_memory_bytes"]) for row in rows if not pd.isna(row["peak_memory_bytes"])]
    verdicts = [bool(row["equivalent"]) for row in rows if not pd.isna(row["equivalent"])]
    errors = [float(row["max_rel_error"]) for row in rows if not pd.isna(row["max_rel_error"])]
    choices = sorted({str(row["probed_dispatch"]) for row in rows if not pd.isna(row["probed_dispatch"])})
    return {
        "impl": str(worst["impl"]),
        "threads": int(worst["threads"]),
        "status": worst["status"],
        "reason": _optional(worst["reason"], str),
        "samples_s": _thin(tuple(map(float, samples))),
        "latency_median_s": float(np.median(samples)) if len(samples) else None,
        "latency_iqr_s": float(np.subtract(*np.percentile(samples, [75, 25]))) if len(samples) else None,
        "macs_fvcore": _optional(worst["macs_fvcore"], int),
        "flops_torch": _optional(worst["flops_torch"], int),
        "macs_analytic": _optional(worst["macs_analytic"], int),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "equivalent": all(verdicts) if verdicts else None,
        "max_rel_error": max(errors) if errors else None,
        "probed_dispatch": " | ".join(choices) if choices else None,  # several where the runs chose differently
    }


def snapshot_of_runs(paths: list[Path]) -> Snapshot:
    """The figures of one or more run directories of a suite, combined per case.

    Each case's timing comes from the run in which it was fastest: interference from other work
    on a shared machine only ever slows a run down — seen here, one of two runs had a stretch of
    consecutive cases 1.3× slower — so the least disturbed run is the best estimate of the code's
    speed, the reasoning behind timeit's minimum. Several runs (separate processes) also even out
    process-level effects such as memory placement.
    """
    runs = [RunDirectory.open(path) for path in paths]
    metadata = [run.metadata() for run in runs]
    names = {m["suite"]["name"] for m in metadata}
    if len(names) != 1:
        raise ResultsError(f"cannot combine runs of different suites ({', '.join(sorted(names))}): {', '.join(map(str, paths))}")
    rows: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, list[Timing]] = {}
    groups: dict[str, tuple[Any, ...]] = {}
    for run in runs:
        samples = run.samples()
        for row in run.results().to_dict("records"):
            rows.setdefault(row["case_id"], []).append(row)
            groups[row["case_id"]] = tuple(row[c] for c in GROUP_KEYS) + (row["role"],)
            if row["case_id"] in samples and row["status"] == "ok":
                timings.setdefault(row["case_id"], []).append(samples[row["case_id"]])
    combined = {case_id: _combined_case(case_rows, timings.get(case_id, [])) for case_id, case_rows in rows.items()}
    floors = {key[:-1]: case_id for case_id, key in groups.items() if key[-1] == Role.FLOOR and combined[case_id]["latency_median_s"]}
    cases = {}
    for case_id, figures in combined.items():
        floor = floors.get(groups[case_id][:-1])
        median, floor_median = figures["latency_median_s"], combined[floor]["latency_median_s"] if floor else None
        cases[case_id] = CaseFigures(
            **figures, floor_case=floor, vs_floor=median / floor_median if median and floor_median else None
        )
    suite = metadata[0]["suite"]
    source = ", ".join(str(p) for p in paths)
    environment = {**metadata[0].get("environment", {}), "matmul_peaks": metadata[0].get("matmul_peaks", []),
                   "memory_bandwidths": metadata[0].get("memory_bandwidths", [])}
    return Snapshot(source, suite["name"], suite["sha256"], environment, cases)


def _dumps(document: dict[str, Any]) -> str:
    """Indented JSON with every list of numbers kept on one line."""
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"


def save_baseline(run_dirs: list[Path], output: Path) -> Path:
    """Write the baseline of one or more runs of a suite to `output` (folders created as needed)."""
    snapshot = snapshot_of_runs(run_dirs)
    document = {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_runs": [str(path) for path in run_dirs],
        "suite": {"name": snapshot.suite_name, "sha256": snapshot.suite_sha256},
        "environment": snapshot.environment,
        "cases": {
            case_id: {key: _round(value) if not isinstance(value, tuple) else [_round(v) for v in value]
                      for key, value in asdict(figures).items()}
            for case_id, figures in sorted(snapshot.cases.items())
        },
    }
    return write_text_atomically(output, _dumps(document))


def _load_baseline_file(path: Path) -> Snapshot:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: baseline file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: not a valid baseline (invalid JSON: {exc})") from None
    if not isinstance(document, dict) or document.get("format") != BASELINE_FORMAT:
        raise ResultsError(f"{path}: not a condconv-bench baseline (format is not {BASELINE_FORMAT!r})")
    if document.get("version") not in READABLE_VERSIONS:
        raise ResultsError(f"{path}: baseline version {document.get('version')!r}, this condconv-bench reads "
                           f"{' and '.join(map(str, READABLE_VERSIONS))}")
    try:
        envelope = BaselineDocument.model_validate(document)
    except ValidationError as exc:
        raise ResultsError(f"{path}: corrupt baseline ({first_problem(exc)})") from None
    cases = {}
    for case_id, figures in envelope.cases.items():
        try:
            cases[case_id] = _CASE_FIGURES.validate_python(_current_names(figures, envelope.version))
        except ValidationError as exc:
            set_aside(path, f"case {case_id}", first_problem(exc))
    return Snapshot(str(path), envelope.suite.name, envelope.suite.sha256, envelope.environment, cases)


def _current_names(figures: Any, version: int) -> Any:
    """A case entry of a baseline file with this version's field names."""
    if version == 2 and isinstance(figures, dict) and "ratio_to_static" in figures:
        figures = {("vs_floor" if key == "ratio_to_static" else key): value for key, value in figures.items()}
    return figures


def load_snapshot(paths: str | Path | list[Path]) -> Snapshot:
    """A baseline file, or one or more run directories (combined per case), read the same way."""
    paths = [Path(p) for p in paths] if isinstance(paths, list) else [Path(paths)]
    if len(paths) == 1 and not paths[0].is_dir():
        return _load_baseline_file(paths[0])
    return snapshot_of_runs(paths)
