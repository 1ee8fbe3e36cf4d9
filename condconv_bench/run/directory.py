"""The run directory: one row per case, appended the moment the case finishes.

Layout: `run.json` (`run.metadata`), `results.csv` (one row per case, columns as `run.columns`
defines them), `samples.jsonl` (raw timing samples per case), `profiles.jsonl` and, when profiled,
`traces/`. Rows and samples are appended durably (`run.lines`), so a crash or `kill -9` loses at
most the case in progress, and a half-written last line is dropped on resume and load. The schema
version is checked on every read: results written by another format are refused, not misread.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pandas as pd
from pydantic import ValidationError

from condconv_bench.atomic import write_text_atomically
from condconv_bench.errors import ResultsError, first_problem
from condconv_bench.profiling.phases import phases_of
from condconv_bench.runtimes.catalog import EAGER
from condconv_bench.run.columns import DTYPES, READABLE_VERSIONS, SCHEMA_VERSION, header
from condconv_bench.run.lines import append_durably, complete_bytes, complete_text
from condconv_bench.run.metadata import RunMetadata
from condconv_bench.run.row_codec import format_row, parse_row
from condconv_bench.set_aside import set_aside
from condconv_bench.timing.samples import Timing

RUN_FILE = "run.json"
RESULTS_FILE = "results.csv"
SAMPLES_FILE = "samples.jsonl"
PROFILES_FILE = "profiles.jsonl"
TRACES_DIR = "traces"


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
    def exports_dir(self) -> Path:
        return self.path / "exports"

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
        append_durably(run.results_file, ",".join(header(SCHEMA_VERSION)) + "\n")
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
                written = handle.readline().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ResultsError(f"{run.results_file}: cannot be read ({exc})") from None
        version = run.metadata()["schema_version"]
        if written != ",".join(header(version)):
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
                complete = len(complete_bytes(file))
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
            append_durably(self.samples_file, json.dumps(record) + "\n")
        append_durably(self.results_file, format_row(row))

    def append_profile(self, record: dict[str, Any]) -> None:
        """Persist one case's profile summary (trace file name and top operators)."""
        append_durably(self.profiles_file, json.dumps(record) + "\n")

    def profiles(self) -> list[dict[str, Any]]:
        if not self.profiles_file.exists():
            return []
        records = []
        for number, line in enumerate(complete_text(self.profiles_file).splitlines(), start=1):
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
            reader = csv.reader(io.StringIO(complete_text(self.results_file)))
            written = next(reader, [])
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise ResultsError(f"{self.results_file}: cannot be read as results ({str(exc).splitlines()[0]})") from None
        version = self.metadata()["schema_version"]
        if written != header(version):
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
                records.append(parse_row(fields, written))
            except ValueError as exc:
                set_aside(self.results_file, f"line {reader.line_num}", str(exc))
        frame = pd.DataFrame(records, columns=list(DTYPES)).astype(DTYPES)
        frame["runtime"] = frame["runtime"].fillna(EAGER)  # versions before 6 ran eager PyTorch only
        return frame

    def completed_case_ids(self) -> set[str]:
        return set(self.results()["case_id"])

    def samples(self) -> dict[str, Timing]:
        """Raw per-call times by case id."""
        if not self.samples_file.exists():
            return {}
        samples = {}
        for number, line in enumerate(complete_text(self.samples_file).splitlines(), start=1):
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
