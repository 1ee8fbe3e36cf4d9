"""Fused: a native CPU kernel that mixes each example's kernel tile by tile and uses it at once.

Idea. Every other exact strategy either materialises the B per-example kernels `Σ_e α_be W_e`
(grouped_conv, batched_matmul: B·C_out·C_in·k² floats written and read again through L3 or
DRAM) or runs E convolutions. This one never holds more than a few small tiles of a mixed kernel:
a work item (a 64-channel block of the output, up to 4 examples) mixes its tile of each
example's kernel into a buffer that stays in L1/L2 and multiplies it with that example's input
right away, while the tile is hot (`fused.cpp`). The experts are read once per call; nothing
kernel-sized is written. Mixing still costs B·E·P multiply-adds (the analytic MACs count it).

Paths, by layer:
- 1×1 (stride 1, no padding), channels_last input: experts re-laid out once as `W_eᵀ` in
  64-column blocks (a cached layout, `expert_layout("fused_pw_cl")`); an own micro-kernel (6×64
  on AVX-512, 6×16 on AVX2 with FMA3; K cut into ≤256-wide chunks so the E expert slabs of a chunk
  stay in L2). NCHW input:
  the same mixing over contiguous slabs of each expert, no packing; at 7×7 (where mixing is
  E/49 of the product's work) K is chunked likewise when the batch has more than one group and a
  chunk's expert slabs and mixed tiles fit the core's L2 (a 512 KB L2 takes none).
- linear: with one pixel per example, mixing a kernel costs as much as the E expert outputs, so
  the kernel computes `Σ_e α_be (W_e x_b)` with α in the micro-kernel's epilogue, streaming the
  experts once (E× the static layer's MACs at batch > 1, as every exact linear CondConv).
- depthwise (groups = C_in = C_out), any stride/padding/dilation: a direct channels-last conv,
  each (example, 64-channel block) mixing its taps once into L1. An NCHW block is transposed to
  channels-last in L2 and back (copying the whole tensor through DRAM each way had cost more
  than the convolution).
- other k×k with groups 1 (and strided or padded 1×1): `F.unfold`, then the NCHW fused product.
- backward, without running the forward again: grad_x of a 1×1 layer is the same fused kernel on
  the transposed experts, of a stride-1 depthwise layer the depthwise kernel on the flipped taps,
  of any other depthwise layer a native scatter through the mixed taps; the weight and routing
  gradients come from the per-example kernel gradients G_b (one `bmm` of `g_bᵀ x_b` for 1×1, a
  native pass over the output gradient for depthwise, ATen's convolution backward of the
  batch-as-groups conv for k×k, which also gives their grad_x); linear backward is torch ops
  without any mixed kernel.
- bfloat16, on CPUs with AVX512-BF16: the 1×1 and linear products take bf16 pairs (vdpbf16ps, the
  experts packed in pairs of K rows) with every sum in fp32, the output rounded once; depthwise
  and k×k layers run the float32 kernels on float32 copies.

Refused, with one line (`unsupported_reason`, so suites skip those cases and `auto` never picks
it there): devices other than the CPU, dtypes other than float32 and bfloat16, bfloat16 without
AVX512-BF16, grouped layers that are not depthwise (`unsuited_reason` too, so `convert()` runs
another strategy there). A direct call on such a layer raises `ImplUnavailableError` with that line.

Build. The C++ is compiled once per machine with `-march=native` (`machine.native_build`: cached
under the user's cache folder, keyed by source, flags, torch, compiler and CPU features) at the
first `create_impl("fused", …)` of a process, ~20 s on a 2-core machine, then ~0.2 s per
process. Without a C++ compiler or ninja it is listed unavailable, with the reason.

Under torch.compile, for inference, it is one custom operator (`condconv_bench::fused_inference_…`)
that the compiled graph calls: the native kernel runs there, the rest of the model is compiled
around it. A pybind11 call is opaque to `torch.export`, `torch.jit.trace` (fvcore), FlopCounterMode
and to autograd under torch.compile, so there `fused` runs the same contractions as torch ops (the
mix then the batch-as-groups conv; for linear the E expert products): the FLOP counters then
cross-check the analytic count, an exported graph is exact (and portable to other runtimes), and a
compiled training step differentiates the composition.

Source: own work (issue 25); no public CondConv has a fused CPU kernel. `CONDCONV_FUSED_GENERIC=1`
builds the portable C++ loops instead of the AVX-512 or AVX2 intrinsics (a separate cache entry), to
test them. On AVX2 the forward 1×1, linear and depthwise kernels, mixing and the NCHW↔channels-last
transposes have intrinsics; the backward's own loops (depthwise kernel gradients and scatter) are
the portable ones there.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
import torch.nn.functional as F

from condconv_bench.core.contract import CondConvBase
from condconv_bench.core.flops import AnalyticMacs, expert_products_macs
from condconv_bench.core.registry import register_impl
from condconv_bench.core.spec import LayerSpec, Pair
from condconv_bench.core.traffic import Traffic, compulsory_traffic, unfold_bytes
from condconv_bench.errors import ImplUnavailableError
from condconv_bench.machine import native_build

# -ffp-contract=fast lets the portable loops use FMAs too; -march=native is why the cache is per CPU.
# -fopenmp: `at::parallel_for` is inlined into the extension as an OpenMP pragma, which the compiler
# drops without it (the kernel then ran on one thread whatever torch.set_num_threads said: 2.1-2.8x
# the static layer at 2 threads in the mobile suite). Only the compile gets the flag: the GOMP
# symbols resolve to the OpenMP runtime torch has already loaded, so the kernel shares torch's
# thread pool and thread count instead of starting a second runtime.
_CFLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-fopenmp")
_GENERIC_VARIABLE = "CONDCONV_FUSED_GENERIC"
_COL_BLOCK = 64  # kColBlock in fused.cpp: the packed experts' column block


@functools.cache
def native_source() -> native_build.NativeSource:
    """The kernel's source and flags as built here (the portable loops under CONDCONV_FUSED_GENERIC=1).

    Described once per process, as the module is loaded once: building it (a path, the
    environment) on every layer call had cost ~6 µs of a tiny layer's 37."""
    generic = ("-DFUSED_FORCE_GENERIC",) if os.environ.get(_GENERIC_VARIABLE) == "1" else ()
    return native_build.NativeSource("condconv_fused", Path(__file__).with_name("fused.cpp"), _CFLAGS + generic, "the fused kernel")


def _native() -> ModuleType:
    return native_build.load_native(native_source())


def _is_depthwise(spec: LayerSpec) -> bool:
    return spec.kind == "conv2d" and spec.groups == spec.in_channels == spec.out_channels and spec.groups > 1


def _layer_refusal(spec: LayerSpec) -> str | None:
    if spec.kind == "conv2d" and spec.groups != 1 and not _is_depthwise(spec):
        return f"has no kernel for grouped layers (groups={spec.groups}): only groups 1 and depthwise (groups = C_in = C_out)"
    return None


def _dtype_refusal(dtype: torch.dtype) -> str | None:
    if dtype == torch.float32:
        return None
    if dtype != torch.bfloat16:
        return f"runs float32 and bfloat16 only (no {str(dtype).removeprefix('torch.')} kernel)"
    if os.environ.get(_GENERIC_VARIABLE) == "1":
        return "has no bfloat16 kernel in its portable build (CONDCONV_FUSED_GENERIC=1)"
    if not torch.cpu._is_avx512_bf16_supported():
        return "runs bfloat16 only on CPUs with AVX512-BF16 (vdpbf16ps), which this one lacks"
    return None


def _refusal(spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> str | None:
    if device.type != "cpu":
        return f"is CPU-only (a C++ kernel built for this machine's CPU), not {device.type}"
    return _dtype_refusal(dtype) or _layer_refusal(spec)


@register_impl("fused")
class Fused(CondConvBase):
    """Native CPU kernel: mixes each example's kernel tile by tile in cache and uses it at once."""

    batch_fixed_export = "under a tracer it runs the batch as a grouped conv's groups, which ONNX's Conv takes as a fixed attribute"
    materialises_kernels = False
    dispatchable = True
    native = True

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        self.prepare()  # the build happens here, once per machine, never inside a timed call

    @classmethod
    def prepare(cls) -> None:
        _native()

    @classmethod
    def description(cls) -> str:
        """The class's line, with how the kernel is built here; an unavailable build's reason is
        `list`'s own column, not repeated."""
        status = native_build.build_status(native_source())
        return super().description() if status.startswith("unavailable: ") else f"{super().description()} [{status}]"

    @classmethod
    def unavailable_reason(cls) -> str | None:
        return native_build.unavailable_reason(native_source())

    @classmethod
    def unsupported_reason(cls, spec: LayerSpec, device: torch.device, dtype: torch.dtype) -> str | None:
        """Where the kernel cannot be built (no compiler) it runs no layer at all: said here too, so
        that everything that asks whether a layer is supported skips it with that reason."""
        unavailable = cls.unavailable_reason()
        if unavailable is not None:
            return f"fused {unavailable}"
        reason = _refusal(spec, device, dtype)
        return None if reason is None else f"fused {reason}"

    @classmethod
    def unsuited_reason(cls, spec: LayerSpec) -> str | None:
        return _layer_refusal(spec)

    @classmethod
    def analytic_macs(cls, spec: LayerSpec, batch_size: int, input_size: Pair) -> AnalyticMacs:
        """Convs: route, mix (tile by tile, but every tile once), one conv. Linear: no mixing of
        kernels, the E expert products instead (the mixed bias still is a mix)."""
        if spec.kind == "linear":
            return expert_products_macs(spec, batch_size, input_size)
        return super().analytic_macs(spec, batch_size, input_size)

    @classmethod
    def analytic_bytes(cls, spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
        return fused_traffic(spec, batch_size, input_size, itemsize)

    def conditional_forward(self, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        return fused_forward(self, x, routing_weights)


def fused_traffic(spec: LayerSpec, batch_size: int, input_size: Pair, itemsize: int) -> Traffic:
    """The compulsory bytes (every expert read once: the packed layouts are cached across calls),
    no kernels, the mixed bias `(B, C_out)` where the layer has bias, and im2col columns for k×k
    layers other than depthwise (and the strided gather of a strided 1×1); depthwise reads and
    writes its tensors once in either layout (the transposes happen in cache)."""
    traffic = compulsory_traffic(spec, batch_size, input_size, itemsize)
    bias = batch_size * spec.out_channels * itemsize if spec.bias else 0
    if _is_depthwise(spec):
        return replace(traffic, kernels=bias)
    return replace(traffic, kernels=bias, columns=unfold_bytes(spec, batch_size, input_size, itemsize))


# ---------------------------------------------------------------------------------------------
# Dispatch: the native paths, or the composition where a tracer or counter must see torch ops.


def seen_by_tracer() -> bool:
    """Whether the call is being traced or counted by something that sees only torch ops."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing():
        return True
    if torch._C._len_torch_dispatch_stack() == 0:  # the usual case, answered without listing modes
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(type(mode).__name__ in ("_FlopCounterMode", "FlopCounterMode", "ProxyTorchDispatchMode", "FakeTensorMode")
               for mode in _get_current_dispatch_mode_stack())


def fused_forward(layer: CondConvBase, x: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
    """The strategy, on `layer`'s shared parameters (so `auto` may run it on its own)."""
    spec = layer.spec
    weight, bias = layer.weight, layer.bias
    tensors = (x, weight, bias, routing_weights)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    reason = _refusal(spec, x.device, x.dtype) or _operand_refusal(x, weight, routing_weights)
    if seen_by_tracer():
        if torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not needs_grad and reason is None:
            return fused_inference(x, weight, bias, routing_weights, _layer_fields(spec))
        return composition(spec, x, weight, bias, routing_weights)
    if reason is not None:
        raise ImplUnavailableError(f"fused {reason}")
    if needs_grad:
        return _FusedFunction.apply(x, weight, bias, routing_weights, layer)
    return _forward(spec, layer.expert_layout, x, weight, bias, routing_weights.contiguous())


def _operand_refusal(x: torch.Tensor, weight: torch.Tensor, routing_weights: torch.Tensor) -> str | None:
    for name, t in (("weights", weight), ("routing weights", routing_weights)):
        if t.dtype != x.dtype or not t.is_cpu:
            return f"got {name} in {t.dtype} on {t.device}: it must be in x's dtype ({x.dtype}) on the CPU"
    return None


Layout = Callable[[str, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]  # CondConvBase.expert_layout


def _forward(spec: LayerSpec, layout: Layout, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             alpha: torch.Tensor) -> torch.Tensor:
    """The native paths; `layout` gives the experts re-laid out (a layer's cache, or built afresh)."""
    if x.dtype == torch.bfloat16:
        return _forward_bf16(spec, layout, x, weight, bias, alpha)
    if spec.kind == "linear":
        return _forward_linear(x, layout("fused_pw_cl", _pack_pointwise_cl), bias, alpha, spec.out_channels)
    if _is_depthwise(spec):
        return _forward_depthwise(spec, x, layout("fused_dw", _pack_depthwise), bias, alpha)
    if spec.is_pointwise and spec.stride == (1, 1):
        if _is_channels_last(x):
            return _forward_pointwise_cl(x, layout("fused_pw_cl", _pack_pointwise_cl), bias, alpha, spec.out_channels)
        return _forward_pointwise_nchw(x, weight, bias, alpha)
    return _forward_unfolded(spec, x, weight, bias, alpha)


def _forward_bf16(spec: LayerSpec, layout: Layout, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  alpha: torch.Tensor) -> torch.Tensor:
    """bfloat16: linear and 1×1 layers (stride 1) run the bf16 kernels, whose products and mixing
    take bf16 pairs (vdpbf16ps) and keep every sum in fp32. Depthwise and k×k layers have no bf16
    kernel yet: they run the float32 kernels on float32 copies."""
    alpha32 = alpha.float()
    bias32 = None if bias is None else bias.float()
    if spec.kind == "linear":
        return _forward_linear(x, layout("fused_pw_cl", _pack_pointwise_cl), bias32, alpha32, spec.out_channels).to(x.dtype)
    if spec.is_pointwise and spec.stride == (1, 1) and spec.groups == 1:
        if _is_channels_last(x):
            packed = layout("fused_pw_cl_pairs", lambda w: _pair_experts(_pack_pointwise_cl(w)))
            return _forward_pointwise_cl(x, packed, bias32, alpha32, spec.out_channels)
        return _forward_pointwise_nchw(x, layout("fused_pw_nchw_pairs", lambda w: _pair_experts(_even_channels(w))), bias32, alpha32)

    def float_layout(name: str, build: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        return layout(f"{name}_float32", lambda w: build(w.float()))

    return _forward(spec, float_layout, x.float(), float_layout("experts", lambda w: w), bias32, alpha32).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Under torch.compile: the native kernel as a custom operator, for inference.


def _layer_fields(spec: LayerSpec) -> list[int]:
    """What the operator needs of a spec, as the integers an operator may take."""
    return [int(spec.kind == "linear"), spec.in_channels, spec.out_channels, spec.num_experts, *spec.kernel_size,
            *spec.stride, *spec.padding, *spec.dilation, spec.groups]


def _spec_of(fields: list[int]) -> LayerSpec:
    linear, in_channels, out_channels, experts, kh, kw, sh, sw, ph, pw, dh, dw, groups = fields
    if linear:
        return LayerSpec("linear", in_channels, out_channels, experts)
    return LayerSpec("conv2d", in_channels, out_channels, experts, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups)


# Named after the module: the A/B gate imports two revisions of this file into one process, and an
# operator's name can be registered once.
_OPERATOR = "condconv_bench::fused_inference_" + re.sub(r"\W", "_", __name__)


@torch.library.custom_op(_OPERATOR, mutates_args=())
def fused_inference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], alpha: torch.Tensor,
                    layer: list[int]) -> torch.Tensor:
    """The fused forward as one operator, so that a graph compiled by torch.compile calls the native
    kernel instead of tracing the composition. A compiled graph keeps no cache between calls, so
    the experts' re-laid-out copy (channels_last 1×1 and linear layers) is built on every call."""
    return _forward(_spec_of(layer), _fresh_layout(weight), x, weight, bias, alpha.contiguous())


@fused_inference.register_fake
def _fused_inference_shape(x, weight, bias, alpha, layer):
    """The output as the native paths make it: channels_last where the input is."""
    spec = _spec_of(layer)
    if spec.kind == "linear":
        return x.new_empty(x.shape[0], spec.out_channels)
    out = x.new_empty(x.shape[0], spec.out_channels, *spec.output_size((x.shape[2], x.shape[3])))
    return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else out


def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


def _pack_pointwise_cl(weight: torch.Tensor) -> torch.Tensor:
    """(E, N, K[, 1, 1]) → (E, nblk, K, 64): `W_eᵀ` in 64-column blocks, zero-padded, so that
    mixing a block of `K_bᵀ` reads one contiguous slab per expert. bfloat16: K zero-padded to even
    and each pair of K rows interleaved, (E, nblk, K/2, 64·2), the order vdpbf16ps reads (the
    linear kernel reads that; the 1×1 kernel's mixing wants `_pair_experts` of it)."""
    experts, n = weight.shape[:2]
    w = weight.reshape(experts, n, -1)
    blocks = -(-n // _COL_BLOCK)
    if blocks * _COL_BLOCK != n:
        w = F.pad(w, (0, 0, 0, blocks * _COL_BLOCK - n))
    packed = w.reshape(experts, blocks, _COL_BLOCK, -1).transpose(2, 3)
    if weight.dtype != torch.bfloat16:
        return packed.contiguous()
    k = packed.shape[2]
    if k % 2:
        packed = F.pad(packed, (0, 0, 0, 1))
    return packed.reshape(experts, blocks, -1, 2, _COL_BLOCK).transpose(3, 4).reshape(experts, blocks, -1, 2 * _COL_BLOCK).contiguous()


def _pair_experts(packed: torch.Tensor) -> torch.Tensor:
    """bfloat16 experts `(E, …, L)` → `(E/2, …, 2L)`: each value beside the same value of the next
    expert (a zero expert pads an odd E), so that mixing two experts is one vdpbf16ps."""
    experts = packed.shape[0]
    if experts % 2:
        packed = torch.cat([packed, packed.new_zeros(1, *packed.shape[1:])])
    pairs = packed.reshape(-1, 2, packed[0].numel()).transpose(1, 2)
    return pairs.reshape(-1, *packed.shape[1:-1], 2 * packed.shape[-1]).contiguous()


def _even_channels(rows: torch.Tensor) -> torch.Tensor:
    """bfloat16 rows (…, K) with K zero-padded to even, as the packed experts are; the experts
    `(E, N, K[, 1, 1])` become `(E, N, K)`."""
    rows = rows.reshape(*rows.shape[:3]) if rows.dim() == 5 else rows
    return F.pad(rows, (0, 1)) if rows.shape[-1] % 2 else rows


def _pack_depthwise(weight: torch.Tensor) -> torch.Tensor:
    """(E, C, 1, kh, kw) → (E, kh·kw, C): taps outermost, so that channels are contiguous."""
    return weight.reshape(*weight.shape[:2], -1).transpose(1, 2).contiguous()


def _mixed_bias(bias: torch.Tensor | None, alpha: torch.Tensor, padded_to: int | None = None) -> torch.Tensor | None:
    if bias is None:
        return None
    mixed = alpha @ bias
    if padded_to is not None and padded_to != mixed.shape[1]:
        mixed = F.pad(mixed, (0, padded_to - mixed.shape[1]))
    return mixed.contiguous()


def _forward_pointwise_cl(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor, n: int) -> torch.Tensor:
    batch, k, h, w = x.shape
    bias_mix = _mixed_bias(bias, alpha, packed.shape[1] * _COL_BLOCK)
    rows = x.permute(0, 2, 3, 1).reshape(batch, h * w, k)
    if x.dtype == torch.bfloat16:
        out = _native().pw_forward_cl_bf16(_even_channels(rows).contiguous(), packed, alpha, bias_mix, n)
    else:
        out = _native().pw_forward_cl(rows, packed, alpha, bias_mix, n)
    return out.view(batch, h, w, n).permute(0, 3, 1, 2)


def _forward_pointwise_nchw(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor) -> torch.Tensor:
    """`weight`: the experts `(E, N, K[, 1, 1])`; for bfloat16 `x`, `_pair_experts(_even_channels(…))` of them."""
    batch, k, h, w = x.shape
    experts, n = weight.shape[:2]
    if x.dtype == torch.bfloat16:
        out = _native().pw_forward_nchw_bf16(x.contiguous().view(batch, k, h * w), weight, alpha, _mixed_bias(bias, alpha))
        return out.view(batch, n, h, w)
    columns = x.contiguous().view(batch, k, h * w)
    out = _native().pw_forward_nchw(columns, weight.reshape(experts, n, k).contiguous(), alpha, _mixed_bias(bias, alpha), False)
    return out.view(batch, n, h, w)


def _forward_unfolded(spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      alpha: torch.Tensor) -> torch.Tensor:
    """k×k with groups 1, and strided or padded 1×1: im2col of the batch, then the NCHW product."""
    batch = x.shape[0]
    out_h, out_w = spec.output_size((x.shape[2], x.shape[3]))
    if spec.is_pointwise:  # strided, unpadded: a gather, not an unfold
        columns = x[:, :, :: spec.stride[0], :: spec.stride[1]].contiguous().view(batch, spec.in_channels, -1)
    else:
        columns = F.unfold(x, spec.kernel_size, spec.dilation, spec.padding, spec.stride).contiguous()
    experts = weight.shape[0]
    out = _native().pw_forward_nchw(columns, weight.reshape(experts, spec.out_channels, -1).contiguous(), alpha,
                                    _mixed_bias(bias, alpha), False)
    out = out.view(batch, spec.out_channels, out_h, out_w)
    return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else out


def _forward_depthwise(spec: LayerSpec, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                       alpha: torch.Tensor) -> torch.Tensor:
    """Channels-last in and out, or NCHW in and out: the kernel transposes NCHW blocks in cache."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec.kernel_size, spec.stride, spec.padding, spec.dilation
    planar = not _is_channels_last(x)
    rows = x.contiguous() if planar else x.permute(0, 2, 3, 1)
    out = _native().dw_forward(rows, packed, alpha, _mixed_bias(bias, alpha), kh, kw, sh, sw, ph, pw, dh, dw, planar)
    return out if planar else out.permute(0, 3, 1, 2)


def _forward_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """For bfloat16 `x` the output is float32 (the caller rounds it once)."""
    bias_mix = _mixed_bias(bias, alpha, packed.shape[1] * _COL_BLOCK)
    if x.dtype == torch.bfloat16:
        return _native().linear_forward_bf16(_even_channels(x).contiguous(), packed, alpha, bias_mix, n)
    return _native().linear_forward(x.contiguous(), packed, alpha, bias_mix, n)


# ---------------------------------------------------------------------------------------------
# The composition: what tracers see, and the depthwise and k×k backward.


def composition(spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                alpha: torch.Tensor) -> torch.Tensor:
    """The fused kernel's contractions as differentiable torch ops. Convs: the mix `(B, E) @ (E, P)`
    then the batch-as-groups conv; linear: the E expert products, then the α-weighted sum."""
    batch, experts = alpha.shape
    if spec.kind == "linear":
        z = (x @ weight.reshape(experts * spec.out_channels, -1).t()).view(batch, experts, spec.out_channels)
        out = (z * alpha.unsqueeze(2)).sum(1)
        return out if bias is None else out + alpha @ bias
    kernels = (alpha @ weight.reshape(experts, -1)).view(batch * spec.out_channels, *weight.shape[2:])
    out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), kernels, None, spec.stride, spec.padding, spec.dilation, spec.groups * batch)
    out = out.view(batch, spec.out_channels, *out.shape[2:])
    return out if bias is None else out + (alpha @ bias).view(batch, -1, 1, 1)


class _FusedFunction(torch.autograd.Function):
    """Forward by the native kernel; backward without mixed kernels for 1×1 and linear layers."""

    @staticmethod
    def forward(ctx, x, weight, bias, alpha, layer):  # type: ignore[override]
        alpha = alpha.contiguous()
        ctx.spec = layer.spec
        ctx.save_for_backward(x, weight, bias, alpha)
        return _forward(layer.spec, layer.expert_layout, x, weight, bias, alpha)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        spec = ctx.spec
        x, weight, bias, alpha = ctx.saved_tensors
        needs = ctx.needs_input_grad[:4]
        grad = grad.contiguous() if spec.kind == "linear" else grad
        if spec.kind == "linear":
            return (*linear_backward(x, weight, bias, alpha, grad, needs), None)
        if spec.is_pointwise and spec.stride == (1, 1) and spec.groups == 1:
            return (*_backward_pointwise(x, weight, bias, alpha, grad, needs), None)
        return (*_backward_conv(spec, x, weight, bias, alpha, grad, needs), None)


def linear_backward(x, weight, bias, alpha, grad, needs):
    """grad_x = (α⊗g) @ W_flat and grad_W = (α⊗g)ᵀ x without forming a mixed kernel; grad_α from
    the expert outputs, recomputed in one product over the batch."""
    need_x, need_w, need_b, need_a = needs
    experts, n, k = weight.shape
    batch = x.shape[0]
    scaled = (alpha.unsqueeze(2) * grad.unsqueeze(1)).reshape(batch, experts * n)  # dL/dz_be = α_be g_b
    grad_x = scaled @ weight.reshape(experts * n, k) if need_x else None
    grad_w = (scaled.t() @ x).view(experts, n, k) if need_w else None
    grad_b = alpha.t() @ grad if need_b and bias is not None else None
    grad_a = None
    if need_a:
        z = x @ weight.reshape(experts * n, k).t()
        grad_a = torch.bmm(z.view(batch, experts, n), grad.unsqueeze(2)).squeeze(2)
        if bias is not None:
            grad_a = grad_a + grad @ bias.t()
    return grad_x, grad_w, grad_b, grad_a


def _backward_pointwise(x, weight, bias, alpha, grad, needs):
    """grad_x_b = K_bᵀ g_b is the forward kernel on the transposed experts (fused, native), and
    G_b = g_bᵀ x_b (one bmm) gives the rest (`expert_grads`).

    An NCHW float32 gradient mixes the experts as they are, transposing each mixed tile in cache;
    other gradients take a transposed copy of all E experts per call. The copy had been 44% of a
    192→1152 7×7 layer's training step at batch 1. At batch 8, timed alone, the copy is 4–7%
    faster (its cost is fixed, the in-kernel transposition's grows with the batch), but inside
    `efficientnet_cc_b0_8e`, where the copies (85.6 MB per step) go through memory, the model's
    training step at batch 8 ran at 0.97–0.98× its floor with the in-kernel way and 1.02–1.12×
    with the copy from a batch of E on (two runs each)."""
    need_x, need_w, _, need_a = needs
    batch, k, h, w = x.shape
    experts, n = weight.shape[:2]
    grad_x = None
    if need_x and grad.dtype == torch.float32 and not _is_channels_last(grad):
        rows = grad.contiguous().view(batch, n, h * w)
        grad_x = _native().pw_forward_nchw(rows, weight.reshape(experts, n, k).contiguous(), alpha, None, True).view_as(x)
    elif need_x:
        transposed = weight.reshape(experts, n, k).transpose(1, 2)
        grad_x = _forward(LayerSpec("conv2d", n, k, experts), _fresh_layout(transposed), grad, transposed, None, alpha)
    per_example = None
    if need_w or need_a:
        per_example = torch.bmm(grad.reshape(batch, n, h * w), x.reshape(batch, k, h * w).transpose(1, 2))
    return (grad_x, *expert_grads(per_example, weight, bias, alpha, grad, needs))


def _backward_conv(spec, x, weight, bias, alpha, grad, needs):
    """Depthwise and k×k layers, without running the forward again.

    Depthwise layers are native throughout. The per-example kernel gradients G_b (B·C·k²
    floats) are one pass over the output gradient (`dw_kernel_grad`); ATen's weight gradient of
    the batch-as-groups conv, used before, took 30–40× the forward for 5×5 taps. grad_x of a
    stride-1 layer is the fused forward kernel on the flipped taps (a transposed stride-1
    convolution is a convolution with the kernel flipped and the padding d·(k−1)−p), faster than
    the scatter (`dw_input_grad`) that every other stride and padding takes: ATen's input gradient
    of the batch-as-groups conv took 16× the static layer's at stride 2. k×k layers still take G_b
    and grad_x from ATen's convolution backward of the batch-as-groups conv."""
    need_x, need_w, _, need_a = needs
    batch, experts = alpha.shape
    if not _is_depthwise(spec):
        kernels = (alpha @ weight.reshape(experts, -1)).view(batch * spec.out_channels, *weight.shape[2:])
        grad_x, per_example, _ = torch.ops.aten.convolution_backward(
            grad.reshape(1, -1, *grad.shape[2:]), x.reshape(1, -1, *x.shape[2:]), kernels, None, spec.stride, spec.padding,
            spec.dilation, False, (0, 0), spec.groups * batch, (need_x, need_w or need_a, False))
        if grad_x is not None:
            grad_x = grad_x.view_as(x)
            grad_x = grad_x.contiguous(memory_format=torch.channels_last) if _is_channels_last(x) else grad_x
        return (grad_x, *expert_grads(per_example, weight, bias, alpha, grad, needs))
    grad_x = _depthwise_input_grad(spec, x, weight, alpha, grad) if need_x else None
    per_example = _depthwise_kernel_grads(spec, x, grad) if need_w or need_a else None
    return (grad_x, *expert_grads(per_example, weight, bias, alpha, grad, needs))


def _depthwise_input_grad(spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, alpha: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
    flippable = spec.stride == (1, 1) and all(
        d * (k - 1) >= p for d, k, p in zip(spec.dilation, spec.kernel_size, spec.padding))
    if flippable:
        flipped = weight.flip(-2, -1)
        padding = tuple(d * (k - 1) - p for d, k, p in zip(spec.dilation, spec.kernel_size, spec.padding))
        return _forward(replace(spec, padding=padding, bias=False), _fresh_layout(flipped), grad, flipped, None, alpha)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec.kernel_size, spec.stride, spec.padding, spec.dilation
    planar = not _is_channels_last(x)
    rows = grad.float().contiguous() if planar else grad.float().permute(0, 2, 3, 1).contiguous()
    out = _native().dw_input_grad(rows, _pack_depthwise(weight.float()), alpha.float(), x.shape[2], x.shape[3],
                                  kh, kw, sh, sw, ph, pw, dh, dw, planar)
    return (out if planar else out.permute(0, 3, 1, 2)).to(x.dtype)


def _depthwise_kernel_grads(spec: LayerSpec, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """G (B, C·k²) in float32, the gradient sums in the layout the input came in (bfloat16 is
    widened first: there is no bfloat16 depthwise kernel)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = spec.kernel_size, spec.stride, spec.padding, spec.dilation
    planar = not _is_channels_last(x)
    x, grad = x.float(), grad.float()
    if planar:
        x_rows, grad_rows = x.contiguous(), grad.contiguous()
    else:
        x_rows = x.permute(0, 2, 3, 1).contiguous()
        grad_rows = grad.permute(0, 2, 3, 1).contiguous()
    return _native().dw_kernel_grad(x_rows, grad_rows, kh, kw, sh, sw, ph, pw, dh, dw, planar).view(x.shape[0], -1)


def _fresh_layout(weight: torch.Tensor) -> Layout:
    """A `Layout` that re-lays out `weight` (not a layer's own) on every call."""
    return lambda name, build: build(weight)


def expert_grads(per_example, weight, bias, alpha, grad, needs):
    """From G_b = ∂L/∂K_b (the per-example kernel gradients, or None where neither grad_W nor
    grad_α is needed): grad_W = αᵀ G and grad_α = G · W (two GEMMs, in G's dtype: a kernel may
    give G in float32 for bf16 layers), and the mixed bias's share of grad_b and grad_α."""
    _, need_w, need_b, need_a = needs
    batch, experts = alpha.shape
    grad_w = grad_b = grad_a = None
    if per_example is not None:
        per_example = per_example.reshape(batch, -1)
        if need_w:
            grad_w = (alpha.t().to(per_example.dtype) @ per_example).to(weight.dtype).view_as(weight)
        if need_a:
            grad_a = (per_example @ weight.reshape(experts, -1).t().to(per_example.dtype)).to(alpha.dtype)
    if bias is not None and (need_b or need_a):
        summed = grad.sum((2, 3))
        if need_b:
            grad_b = alpha.t() @ summed
        if need_a:
            grad_a = grad_a + summed @ bias.t()
    return grad_w, grad_b, grad_a
