"""A run: a suite's cases measured into a run directory, sweep by sweep, nothing measured lost.

- `runner`: the run's loop over sweeps of groups, its metadata, rows appended as measured;
- `probes`: a case's untimed probes (can it run, first call, equivalence, FLOPs, limit, memory);
- `rows`: a case's result row from its probes and its timing verdict;
- `columns`: the result row's columns (names, dtypes, units, meaning, schema versions): the one definition;
- `directory`: the run directory (results, samples, metadata, profiles), read and appended;
- `metadata`, `row_codec`, `lines`, `lock`: `run.json` typed, a row as a CSV line, crash-safe appends, one writer;
- `merge`: shards of one suite joined into one run directory;
- `phase_profile`: `condconv-bench profile`, each strategy's phases for one layer and batch.
"""
