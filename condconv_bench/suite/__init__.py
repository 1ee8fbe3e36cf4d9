"""Suites: a YAML file validated into the grid of cases it names, and the slice a run takes.

- `loader`: a suite file → a validated `Suite` (or every problem, one line each), in stages:
  `schema` (the keys, types and bounds; `timing:` and `gate:` derived from `settings`),
  `messages` (pydantic's errors as key paths), `workloads` (an entry → its layer, stack or model),
  `names` (implementations, models and devices the suite names);
- `grid`: the validated `Suite` and the cases it expands to, in run order;
- `selection`: the command line's filters and a shard's slice.
"""
