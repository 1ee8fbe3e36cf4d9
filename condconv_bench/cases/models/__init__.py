"""Whole models as benchmark workloads: built by name, converted per strategy, compared with their floor."""
