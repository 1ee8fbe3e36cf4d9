"""`convert()`: a model's CondConv layers replaced by this project's, weights copied exactly.

- `swap`: finding the layers, replacing them, and checking the result;
- `adapters/`: one module per kind of layer `convert()` knows (timm's `CondConv2d`, this
  project's own), and the `condconv_bench.adapters` entry-point group for others.

`convert` and `find_layers` are re-exported here, where they lived before this package existed.
"""

from condconv_bench.conversion.swap import convert, find_layers

__all__ = ["convert", "find_layers"]
