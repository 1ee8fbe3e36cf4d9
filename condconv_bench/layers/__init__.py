"""The public drop-in layers, and what a model builds from them.

- `condconv`: `CondConv2d` and `CondConvLinear`, which pick their strategy (`dispatch/`);
- `same_padding`: TensorFlow's "SAME" padding in front of `CondConv2d`, as timm's `tf_` models pad;
- `blocks`: EfficientNet-CondConv inverted-residual blocks built from any implementation.
"""
