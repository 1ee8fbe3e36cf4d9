"""Shipped benchmark suites (YAML), installed as `condconv_bench.suites` so `condconv-bench run mobile` works anywhere."""
