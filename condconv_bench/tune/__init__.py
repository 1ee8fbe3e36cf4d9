"""Dispatch decisions made ahead of use: a table from a run, or a machine's cache filled for a model.

- `from_runs`: `condconv-bench tune` (a dispatch table from measured runs) and `tune-model`
  (autotune every layer of a model once, so the per-machine cache holds its choices).
- `measured_entries`: a run's result rows → the table's entries (the fastest verified strategy per group).
"""
