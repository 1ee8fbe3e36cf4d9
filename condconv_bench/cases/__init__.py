"""What one benchmark case runs, built the same way in every process.

- `workload`: one CondConv layer, or a stack of blocks; `models/`: whole models by name;
- `inputs`: seeded parameters and inputs; `steps`: the module and its timed step;
- `memory_estimate`: whether a case fits in memory, estimated before anything is allocated.
"""
