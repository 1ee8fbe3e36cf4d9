"""Choosing a strategy per layer and input: everything the `auto` and `autotune` layers decide with.

- `table`: dispatch tables, what `condconv-bench tune` measured (and the package ships), and
  the lookup rule for layers and batch sizes a table never saw;
- `tuning`: measuring the candidate strategies in the user's own process, on the call's input;
- `cache`: what this machine has measured, kept per machine between processes, with the evidence
  a later process needs to confirm a choice before trusting it;
- `switch`: the process-wide autotune switch (`set_autotune`, `CONDCONV_BENCH_AUTOTUNE`);
- `layer`: the dispatching layer itself (registry keys `auto` and `autotune`), on which the
  public `CondConv2d` and `CondConvLinear` are built.
"""
