"""Suites: a YAML file validated into the grid of cases it names, and the slice a run takes.

- `loader`: YAML → validated `Suite` → frozen `Case`s;
- `selection`: the command line's filters and a shard's slice.
"""
