"""The machine a measurement runs on: what it is, what it can do, and how it is set up.

- `devices`: is a device here, exact float32, warm libraries, synchronisation;
- `environment`: where a run happened, and whether two runs can be compared at all;
- `allocators`: the worker processes' allocator policy, a recorded setting;
- `ceilings`: the measured matmul and depthwise FLOP/s and memory bandwidths a limit is read against.
"""
