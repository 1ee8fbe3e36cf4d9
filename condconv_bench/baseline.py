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
from typing import Any

import numpy as np
import pandas as pd

from condconv_bench.errors import ResultsError
from condconv_bench.report.tables import FLOOR_IMPL, GROUP_COLUMNS
from condconv_bench.results import RunDirectory

BASELINE_FORMAT = "condconv-bench-baseline"
BASELINE_VERSION = 1
MAX_SAMPLES = 64  # enough for rank tests; more only lengthens the file


@dataclass(frozen=True)
class CaseFigures:
    """What a gate compares for one case."""

    status: str
    reason: str | None
    samples_s: tuple[float, ...]  # per-call times (thinned); empty unless status is ok
    latency_median_s: float | None
    latency_iqr_s: float | None
    floor_case: str | None  # the `static` case of the same group, if it ran
    ratio_to_static: float | None
    macs_fvcore: int | None
    flops_torch: int | None
    macs_analytic: int | None
    peak_memory_bytes: int | None
    equivalent: bool | None
    max_rel_error: float | None


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


def snapshot_of_run(path: Path) -> Snapshot:
    """The figures of a run directory, with the raw samples of each measured case."""
    run = RunDirectory.open(path)
    metadata = run.metadata()
    frame = run.results()
    samples = run.samples()
    floors = frame[(frame["impl"] == FLOOR_IMPL) & (frame["status"] == "ok")].set_index(GROUP_COLUMNS)
    cases = {}
    for row in frame.to_dict("records"):
        key = tuple(row[c] for c in GROUP_COLUMNS)
        floor = floors.loc[key] if key in floors.index else None
        timing = samples.get(row["case_id"]) if row["status"] == "ok" else None
        median = _optional(row["latency_median_s"], float)
        floor_median = None if floor is None else float(floor["latency_median_s"])
        cases[row["case_id"]] = CaseFigures(
            status=row["status"],
            reason=_optional(row["reason"], str),
            samples_s=_thin(timing.times_s) if timing else (),
            latency_median_s=median,
            latency_iqr_s=_optional(row["latency_iqr_s"], float),
            floor_case=None if floor is None else str(floor["case_id"]),
            ratio_to_static=None if median is None or not floor_median else median / floor_median,
            macs_fvcore=_optional(row["macs_fvcore"], int),
            flops_torch=_optional(row["flops_torch"], int),
            macs_analytic=_optional(row["macs_analytic"], int),
            peak_memory_bytes=_optional(row["peak_memory_bytes"], int),
            equivalent=_optional(row["equivalent"], bool),
            max_rel_error=_optional(row["max_rel_error"], float),
        )
    suite = metadata["suite"]
    return Snapshot(str(path), suite["name"], suite["sha256"], metadata.get("environment", {}), cases)


def _dumps(document: dict[str, Any]) -> str:
    """Indented JSON with every list of numbers kept on one line."""
    text = json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False)
    return re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r"\s*\n\s*", " ", m.group(1)) + "]", text) + "\n"


def save_baseline(run_dir: Path, output: Path) -> Path:
    """Write the baseline of `run_dir` to `output` (folders created as needed)."""
    snapshot = snapshot_of_run(run_dir)
    document = {
        "format": BASELINE_FORMAT,
        "version": BASELINE_VERSION,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source_run": str(run_dir),
        "suite": {"name": snapshot.suite_name, "sha256": snapshot.suite_sha256},
        "environment": snapshot.environment,
        "cases": {
            case_id: {key: _round(value) if not isinstance(value, tuple) else [_round(v) for v in value]
                      for key, value in asdict(figures).items()}
            for case_id, figures in sorted(snapshot.cases.items())
        },
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(_dumps(document), encoding="utf-8")
    return output


def _load_baseline_file(path: Path) -> Snapshot:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ResultsError(f"{path}: baseline file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultsError(f"{path}: not a valid baseline (invalid JSON: {exc})") from None
    if not isinstance(document, dict) or document.get("format") != BASELINE_FORMAT:
        raise ResultsError(f"{path}: not a condconv-bench baseline (format is not {BASELINE_FORMAT!r})")
    if document.get("version") != BASELINE_VERSION:
        raise ResultsError(f"{path}: baseline version {document.get('version')!r}, this condconv-bench reads {BASELINE_VERSION}")
    try:
        cases = {
            case_id: CaseFigures(**{**figures, "samples_s": tuple(float(v) for v in figures["samples_s"])})
            for case_id, figures in document["cases"].items()
        }
        return Snapshot(str(path), document["suite"]["name"], document["suite"]["sha256"], document.get("environment", {}), cases)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ResultsError(f"{path}: corrupt baseline ({type(exc).__name__}: {exc})") from None


def load_snapshot(path: str | Path) -> Snapshot:
    """A run directory or a baseline file, read the same way."""
    path = Path(path)
    return snapshot_of_run(path) if path.is_dir() else _load_baseline_file(path)
