"""Shards of one suite, run on several machines or processes, joined into one run directory.

Merging refuses what would make the joined results lie: runs of different suites, and a case
measured in two shards. Each shard's environment is kept in `merged_from`, and the ceilings the
shards measured are pooled.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from condconv_bench.errors import ResultsError
from condconv_bench.run.directory import RunDirectory


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
