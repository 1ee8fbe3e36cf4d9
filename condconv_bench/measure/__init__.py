"""The instrument: how a group of cases is timed so that a second invocation confirms the verdict.

- `rounds`: interleaved rounds inside one process (paired samples, shuffled order).
- `worker`, `pool`, `protocol`: fresh worker processes that each measure every group.
- `allocators`: the workers' allocator policy, a recorded setting.
- `ratios`: paired ratios with two-level (process, round) bootstrap intervals, and ties.
- `group`: passes over the workers with adaptive stopping, and each case's verdict.
"""
