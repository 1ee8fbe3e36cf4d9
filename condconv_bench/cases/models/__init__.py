"""Whole models as benchmark workloads: built by name, converted per strategy, compared with their floor.

`AS_SHIPPED` is the implementation name of a model run exactly as its library builds it; it is
here, apart from the workload, so that a suite and a report can name it without importing the
conversion machinery.
"""

AS_SHIPPED = "as_shipped"
