"""`torch.compile` (inductor) of the batch-as-groups strategy, specialised per input shape.

Why grouped_conv: it is what users get today when they compile timm's CondConv models
(`benchmark.py --torchcompile`), so this measures the compiler on the common open-source path,
including its known cost: inductor specialises `groups = g·B`, so every new batch size compiles
again (pytorch PR #114351). `dynamic=False` makes that explicit instead of hiding it behind a
dynamic-shape graph. Compilation happens on the first call for a shape; the runner times that
call apart from latency and counts the graphs it compiled.
Unavailable, with the reason, where inductor cannot build: no C++ compiler for CPU, no Triton
for CUDA, or a backend failure while compiling a case.
"""

from __future__ import annotations

import torch

from condconv_bench.errors import ImplUnavailableError
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec
from condconv_bench.impls.grouped_conv import GroupedConv

# Every instance shares one code object (CondConvBase.forward), and dynamo keeps at most
# `recompile_limit` variants per code object, and `accumulated_recompile_limit` in all, before it
# falls back to eager; a suite compiles one per layer shape and batch size (server: 288). The limits
# are raised (never lowered) once, on first use — patching them around each call instead costs
# ~16 µs per call, which would be timed — and a hit is made a hard error, so a case can never
# silently time eager code under the name `compiled`. Older torch names them `cache_size_limit`,
# `accumulated_cache_size_limit` and `fail_on_cache_limit_hit`.
_RECOMPILE_LIMIT = 4096
_LIMITS = (("recompile_limit", "cache_size_limit"), ("accumulated_recompile_limit", "accumulated_cache_size_limit"))
_FAIL_ON_HIT = ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit")


def configure_compiler() -> None:
    """Raise the recompile limits, fail on a hit, and compile in-process: inductor's default pool
    of compile worker processes starts in the background and competes with the measurements.
    Imported here, not at module level: the registry imports every strategy, and the compiler's
    modules cost a second that a model using only the eager strategies should not pay."""
    import torch._dynamo.config as dynamo_config
    import torch._inductor.config as inductor_config

    for names in _LIMITS:
        name = next((n for n in names if hasattr(dynamo_config, n)), None)
        if name is not None:
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), _RECOMPILE_LIMIT))
    fail = next((n for n in _FAIL_ON_HIT if hasattr(dynamo_config, n)), None)
    if fail is not None:
        setattr(dynamo_config, fail, True)
    inductor_config.compile_threads = 1


def _build_reason(device_type: str) -> str | None:
    """Why inductor cannot build code for `device_type` here, or None."""
    if device_type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception as exc:  # inductor raises its own types, none of them public
            return f"inductor needs a C++ compiler for CPU: {exc}"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor needs Triton for CUDA, and it is not installed"
    return None


@register_impl("compiled")
class Compiled(GroupedConv):
    """torch.compile (inductor, dynamic=False) of grouped_conv; compile timed apart."""

    compiles = True

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        configure_compiler()
        self._compiled_forward = torch.compile(super().forward, dynamic=False)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Unavailable machine-wide only where inductor can build for none of this machine's devices
        (`list` says so up front); where it can build for one, the other's cases are skipped alone."""
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python/platform"
        devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
        reasons = [_build_reason(device) for device in devices]
        return None if None in reasons else "; ".join(reasons)  # type: ignore[arg-type]

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        return _build_reason(device.type)

    def eager_module(self) -> GroupedConv:
        eager = GroupedConv(self.spec).to(device=self.weight.device, dtype=self.weight.dtype)
        eager.load_state_dict(self.state_dict())
        return eager

    def forward(self, x: torch.Tensor, routing_weights: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return self._compiled_forward(x, routing_weights)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise ImplUnavailableError(f"inductor could not compile this case: {str(exc).splitlines()[0]}") from exc
