"""`python -m condconv_bench` runs the CLI (used where the console script is not on PATH)."""

from condconv_bench.cli import main

main()
