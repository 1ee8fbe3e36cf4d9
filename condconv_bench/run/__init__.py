"""A run: a suite's cases measured into a run directory, sweep by sweep, nothing measured lost.

- `runner`: the run's loop over sweeps of groups, its metadata, rows appended as measured;
- `probes`: a case's untimed probes (can it run, first call, equivalence, FLOPs, limit, memory);
- `rows`: a case's result row from its probes and its timing verdict;
- `directory`: the run directory (results, samples, metadata), its schema and its readers;
- `phase_profile`: `condconv-bench profile`, each strategy's phases for one layer and batch.
"""
