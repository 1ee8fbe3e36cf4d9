"""The regression gates: pass or fail a change. Nothing here imports `report/` (which renders verdicts).

Two gates share the rank statistics (`statistics`) and the pass-or-fail verdict
(`verdict.GateVerdict`):
- `ab/`: `gate ab REF`, the working tree and a git revision measured side by side on one
  machine (latency, instruction counts); the gate that can judge latency anywhere.
- `baseline_gate`: `gate RUN_DIR --baseline FILE`, a run against a committed snapshot
  (`baseline`) compared case by case (`compare`): FLOPs, equivalence, errors and memory on any
  machine, latency only on the machine that made the baseline.
"""
