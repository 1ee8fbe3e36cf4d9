"""Runtimes: where a deployed CondConv runs instead of eager PyTorch, and how a strategy gets there.

CondConv is shipped as an exported graph run by an inference runtime, and batch-as-groups bakes
the batch size into such a graph (ONNX's `Conv.group` is a fixed attribute), so whether a
strategy exports with a dynamic batch, and how fast it is there, are facts to measure per strategy.

- `catalog`: the runtime names a suite may give, the packages each needs and their versions;
- `export`: a module exported to ONNX with a dynamic batch, or at a fixed batch, or not at all;
- `graphs`: an exported graph loaded into a runtime, callable like the module it came from.
"""
