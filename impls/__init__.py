"""Built-in CondConv implementations, one module per registry key (installed as `condconv_bench.impls`).

Each module's docstring states the idea, where it comes from and its limits. Adding a module
here with `@register_impl("<key>")` is all it takes for the registry, the CLI, suites and the
oracle tests to pick it up.
"""
