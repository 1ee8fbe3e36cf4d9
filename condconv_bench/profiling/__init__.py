"""What the profiler tells about a call, never the timed blocks.

- `session`: the one way this package starts torch.profiler (quiet; a Ctrl-C waits for its stop);
- `phases`: where a step's time goes (routing, mixing, layout, product, epilogue, backward);
- `traces`: per-case traces in the layout the TensorBoard profiler plugin reads;
- `peak_memory`: peak memory one call allocates, from the profiler's memory events;
- `model_stages`: a whole model's time per stage and phase, converted beside its floor.
"""
