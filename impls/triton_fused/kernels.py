"""The Triton kernels of `triton_fused`, and the launchers that size their grids.

Imported only when a layer first runs: `@triton.jit` decides at import whether the kernels are
compiled for the GPU or run by Triton's interpreter (`TRITON_INTERPRET=1`, which executes them on
CPU tensors with NumPy), and that choice lasts for the process. `INTERPRETED` records it.

Every kernel forms an example's kernel tile on chip — `Σ_e α_be·W_e[tile]`, mixed in float32
registers from the E expert tiles — and uses it at once, so no per-example kernel is ever written
to memory. Indices are computed from the tensors' strides, so NCHW, channels_last and
non-contiguous inputs need no copy. Grids are one-dimensional, ordered (group, output-channel
tile, example, pixel tile) from slowest to fastest: programs that read the same expert tiles are
launched together, so that those tiles can be served from L2 rather than DRAM (the intent; no GPU
has measured it yet).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

INTERPRETED = bool(triton.knobs.runtime.interpret)

# Tiles: at least 16 (tl.dot's smallest operand), at most 64 here. Chosen by size, not autotuned:
# autotuning must not run under the interpreter, and no GPU has tuned them yet.
_SMALLEST, _LARGEST = 16, 64
_DEPTHWISE_CHANNELS = 32
# Multiply-adds may contract to FMAs, as `fused` builds with -ffp-contract=fast (said explicitly:
# Triton 3.9 warns when it is left to its default, which changes in 3.10).
_OPTIONS = {"enable_fp_fusion": True}


def widen_dot(dtype: torch.dtype) -> bool:
    """Whether `tl.dot` must get float32 operands: Triton's interpreter (3.9) multiplies bfloat16's
    raw 16-bit patterns (it stores bfloat16 as NumPy uint16). Widening computes the same products:
    a bfloat16 × bfloat16 product is exact in float32, as in the GPU's float32 accumulation."""
    return INTERPRETED and dtype == torch.bfloat16


def tile(extent: int, largest: int = _LARGEST) -> int:
    """The tile for a dimension of `extent`: the next power of two, clamped to [16, `largest`]."""
    return max(_SMALLEST, min(largest, triton.next_power_of_2(max(1, extent))))


# Only `tl` builtins and this module's own jit functions are called in the kernels: Triton's own
# jit helpers (`tl.cdiv`, `tl.sum`, `tl.zeros`) are bound when triton is first imported, and if that happened
# before TRITON_INTERPRET was set (torch.compile imports triton), the interpreter cannot call them.


@triton.jit
def _cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _program_tile(inner_tiles, batch, outer_tiles):
    """This program's (inner tile, example, outer tile, group): the inner tile varies fastest and
    the outer (output-channel) tile slowest, so programs sharing expert tiles run together."""
    pid = tl.program_id(0)
    per_outer = inner_tiles * batch
    return pid % inner_tiles, (pid // inner_tiles) % batch, (pid // per_outer) % outer_tiles, pid // (per_outer * outer_tiles)


@triton.jit
def _dot(a, b, WIDEN: tl.constexpr):
    """`a @ b` in float32 with IEEE products (no TF32); see `widen_dot` for WIDEN."""
    if WIDEN:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _source_pixels(pixels, width_out, tap_h, tap_w, height_src, width_src,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TRANSPOSED: tl.constexpr):
    """Where output pixel `pixels` reads its tap (`TRANSPOSED`: which output pixel an input pixel's
    gradient reads through that tap), as row and column tensors and whether they exist."""
    row = pixels[:, None] // width_out
    col = pixels[:, None] % width_out
    if TRANSPOSED:
        shifted_h = row + pad_h - tap_h[None, :] * dil_h
        shifted_w = col + pad_w - tap_w[None, :] * dil_w
        src_h = shifted_h // stride_h
        src_w = shifted_w // stride_w
        valid = (shifted_h >= 0) & (shifted_w >= 0) & (shifted_h % stride_h == 0) & (shifted_w % stride_w == 0)
    else:
        src_h = row * stride_h - pad_h + tap_h[None, :] * dil_h
        src_w = col * stride_w - pad_w + tap_w[None, :] * dil_w
        valid = (src_h >= 0) & (src_w >= 0)
    return src_h, src_w, valid & (src_h < height_src) & (src_w < width_src)


@triton.jit
def _implicit_gemm(src, experts, alpha, bias, dst,
                   batch, num_experts, height_src, width_src, height_dst, width_dst,
                   out_per_group, in_per_group, groups, kernel_h, kernel_w,
                   stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                   s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w,
                   TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, WIDEN: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One example's convolution as an implicit GEMM, its kernel mixed per K step.

    Forward: dst = output (pixels × output channels), reduced over (input channel, tap) of the
    group. TRANSPOSED: dst = grad of the input (pixels × input channels), reduced over (output
    channel, tap), reading the incoming gradient `src` — the same mixed kernel, transposed.
    Experts are `(E, C_out, C_in/groups·kh·kw)` contiguous.
    """
    taps = kernel_h * kernel_w
    per_expert = out_per_group * groups * in_per_group * taps
    cols = in_per_group if TRANSPOSED else out_per_group  # dst channels per group
    reduced = (out_per_group if TRANSPOSED else in_per_group) * taps
    pixel_tile, example, col_tile, group = _program_tile(_cdiv(height_dst * width_dst, BLOCK_M), batch, _cdiv(cols, BLOCK_N))

    pixels = pixel_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    local_cols = col_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    pixel_ok = pixels < height_dst * width_dst
    col_ok = local_cols < cols
    src_base = src + example.to(tl.int64) * s_b
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, reduced, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < reduced
        channel = ks // taps  # the reduced channel, within the group
        tap_h = (ks % taps) // kernel_w
        tap_w = ks % kernel_w
        src_h, src_w, inside = _source_pixels(pixels, width_dst, tap_h, tap_w, height_src, width_src,
                                              stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TRANSPOSED)
        src_channel = group * (out_per_group if TRANSPOSED else in_per_group) + channel
        patch = tl.load(src_base + src_channel[None, :] * s_c + src_h * s_h + src_w * s_w,
                       mask=inside & pixel_ok[:, None] & k_ok[None, :], other=0.0)
        if TRANSPOSED:  # experts[e, group·out + channel, col, tap]
            offsets = ((group * out_per_group + channel[:, None]) * in_per_group + local_cols[None, :]) * taps + (ks % taps)[:, None]
        else:  # experts[e, group·out + col, channel, tap]
            offsets = (group * out_per_group + local_cols[None, :]) * (in_per_group * taps) + ks[:, None]
        w_ok = k_ok[:, None] & col_ok[None, :]
        mixed = tl.full((BLOCK_K, BLOCK_N), 0.0, tl.float32)
        for e in range(num_experts):
            a = tl.load(alpha + example * num_experts + e).to(tl.float32)
            mixed += a * tl.load(experts + e * per_expert + offsets, mask=w_ok, other=0.0).to(tl.float32)
        acc += _dot(patch, mixed.to(patch.dtype), WIDEN)
    dst_cols = group * cols + local_cols
    if HAS_BIAS:
        acc += tl.load(bias + example * (groups * cols) + dst_cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    rows = pixels // width_dst
    columns = pixels % width_dst
    out = dst + example.to(tl.int64) * d_b + dst_cols[None, :] * d_c + rows[:, None] * d_h + columns[:, None] * d_w
    tl.store(out, acc.to(dst.dtype.element_ty), mask=pixel_ok[:, None] & col_ok[None, :])


@triton.jit
def _implicit_gemm_weight_grad(grad, x, per_example,
                               batch, height, width, height_out, width_out,
                               out_per_group, in_per_group, groups, kernel_h, kernel_w,
                               stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                               g_b, g_c, g_h, g_w, s_b, s_c, s_h, s_w, WIDEN: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Each example's weight gradient `G_b = g_bᵀ · im2col(x_b)`, `(B, C_out, C_in/groups·kh·kw)`
    in float32: what the experts' and the routing weights' gradients are then read from."""
    taps = kernel_h * kernel_w
    reduced = in_per_group * taps
    k_tile, example, n_tile, group = _program_tile(_cdiv(reduced, BLOCK_K), batch, _cdiv(out_per_group, BLOCK_N))

    outs = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = k_tile * BLOCK_K + tl.arange(0, BLOCK_K)
    n_ok = outs < out_per_group
    k_ok = ks < reduced
    channel = group * in_per_group + ks // taps
    tap_h = (ks % taps) // kernel_w
    tap_w = ks % kernel_w
    grad_base = grad + example.to(tl.int64) * g_b
    x_base = x + example.to(tl.int64) * s_b
    acc = tl.full((BLOCK_N, BLOCK_K), 0.0, tl.float32)
    for m0 in range(0, height_out * width_out, BLOCK_M):
        pixels = m0 + tl.arange(0, BLOCK_M)
        pixel_ok = pixels < height_out * width_out
        src_h, src_w, inside = _source_pixels(pixels, width_out, tap_h, tap_w, height, width,
                                              stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, False)
        columns = tl.load(x_base + channel[None, :] * s_c + src_h * s_h + src_w * s_w,
                          mask=inside & pixel_ok[:, None] & k_ok[None, :], other=0.0)
        rows, cols = pixels // width_out, pixels % width_out
        g = tl.load(grad_base + (group * out_per_group + outs)[:, None] * g_c + rows[None, :] * g_h + cols[None, :] * g_w,
                    mask=n_ok[:, None] & pixel_ok[None, :], other=0.0)
        acc += _dot(g, columns, WIDEN)
    out = per_example + (example.to(tl.int64) * (groups * out_per_group) + group * out_per_group + outs[:, None]) * reduced + ks[None, :]
    tl.store(out, acc, mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def _depthwise(src, experts, alpha, bias, dst,
               batch, channels, num_experts, height_src, width_src, height_dst, width_dst,
               kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
               s_b, s_c, s_h, s_w, d_b, d_c, d_h, d_w,
               TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """A direct depthwise convolution (TRANSPOSED: its input gradient); each tap's weights are
    mixed for the channel block once and used on a block of pixels. Experts `(E, C, kh·kw)`."""
    taps = kernel_h * kernel_w
    pixel_tile, example, chan_tile, _ = _program_tile(_cdiv(height_dst * width_dst, BLOCK_M), batch, _cdiv(channels, BLOCK_C))
    pixels = pixel_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    chans = chan_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    pixel_ok = pixels < height_dst * width_dst
    chan_ok = chans < channels
    src_base = src + example.to(tl.int64) * s_b
    acc = tl.full((BLOCK_M, BLOCK_C), 0.0, tl.float32)
    for t in range(taps):
        tap_h = tl.full((1,), 0, tl.int32) + t // kernel_w
        tap_w = tl.full((1,), 0, tl.int32) + t % kernel_w
        src_h, src_w, inside = _source_pixels(pixels, width_dst, tap_h, tap_w, height_src, width_src,
                                              stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, TRANSPOSED)
        values = tl.load(src_base + chans[None, :] * s_c + src_h * s_h + src_w * s_w,
                         mask=inside & pixel_ok[:, None] & chan_ok[None, :], other=0.0)
        mixed = tl.full((BLOCK_C,), 0.0, tl.float32)
        for e in range(num_experts):
            a = tl.load(alpha + example * num_experts + e).to(tl.float32)
            mixed += a * tl.load(experts + (e * channels + chans) * taps + t, mask=chan_ok, other=0.0).to(tl.float32)
        acc += values.to(tl.float32) * mixed[None, :]
    if HAS_BIAS:
        acc += tl.load(bias + example * channels + chans, mask=chan_ok, other=0.0).to(tl.float32)[None, :]
    rows, cols = pixels // width_dst, pixels % width_dst
    out = dst + example.to(tl.int64) * d_b + chans[None, :] * d_c + rows[:, None] * d_h + cols[:, None] * d_w
    tl.store(out, acc.to(dst.dtype.element_ty), mask=pixel_ok[:, None] & chan_ok[None, :])


@triton.jit
def _depthwise_weight_grad(grad, x, per_example,
                           batch, channels, height, width, height_out, width_out,
                           kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                           g_b, g_c, g_h, g_w, s_b, s_c, s_h, s_w,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Each example's depthwise weight gradient `G_b[c, tap] = Σ_pixels g·x(shifted)`, float32."""
    taps = kernel_h * kernel_w
    _, example, chan_tile, _ = _program_tile(1, batch, _cdiv(channels, BLOCK_C))
    chans = chan_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    chan_ok = chans < channels
    for t in range(taps):
        tap_h = tl.full((1,), 0, tl.int32) + t // kernel_w
        tap_w = tl.full((1,), 0, tl.int32) + t % kernel_w
        acc = tl.full((BLOCK_C,), 0.0, tl.float32)
        for m0 in range(0, height_out * width_out, BLOCK_M):
            pixels = m0 + tl.arange(0, BLOCK_M)
            pixel_ok = pixels < height_out * width_out
            src_h, src_w, inside = _source_pixels(pixels, width_out, tap_h, tap_w, height, width,
                                                  stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, False)
            values = tl.load(x + example.to(tl.int64) * s_b + chans[None, :] * s_c + src_h * s_h + src_w * s_w,
                             mask=inside & pixel_ok[:, None] & chan_ok[None, :], other=0.0)
            rows, cols = pixels // width_out, pixels % width_out
            g = tl.load(grad + example.to(tl.int64) * g_b + chans[None, :] * g_c + rows[:, None] * g_h + cols[:, None] * g_w,
                        mask=pixel_ok[:, None] & chan_ok[None, :], other=0.0)
            acc += tl.reduce(values.to(tl.float32) * g.to(tl.float32), 0, _add)
        tl.store(per_example + (example.to(tl.int64) * channels + chans) * taps + t, acc, mask=chan_ok)


@triton.jit
def _linear(x, experts, alpha, bias, out, batch, num_experts, n_out, n_in,
            x_b, x_k, w_e, w_n, w_k, o_b, o_n,
            HAS_BIAS: tl.constexpr, WIDEN: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`out_b = Σ_e α_be·(W_e x_b)` for a tile of examples: one pixel per example, so mixing a
    kernel per example would cost as much as the E products; α scales the input tile instead,
    and the E products are `tl.dot`s over a tile of examples (tensor cores in bfloat16 and float16)."""
    example_tiles = _cdiv(batch, BLOCK_B)
    pid = tl.program_id(0)
    examples = (pid % example_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    outs = (pid // example_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    b_ok = examples < batch
    n_ok = outs < n_out
    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, n_in, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < n_in
        inputs = tl.load(x + examples[:, None].to(tl.int64) * x_b + ks[None, :] * x_k,
                         mask=b_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        for e in range(num_experts):
            a = tl.load(alpha + examples * num_experts + e, mask=b_ok, other=0.0).to(tl.float32)
            w = tl.load(experts + e * w_e + ks[:, None] * w_k + outs[None, :] * w_n, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc += _dot((inputs * a[:, None]).to(w.dtype), w, WIDEN)
    if HAS_BIAS:
        acc += tl.load(bias + examples[:, None] * n_out + outs[None, :], mask=b_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    tl.store(out + examples[:, None].to(tl.int64) * o_b + outs[None, :] * o_n, acc.to(out.dtype.element_ty),
             mask=b_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers: shapes in, grids out.


def conv(src: torch.Tensor, experts: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
         dst: torch.Tensor, geometry: tuple[int, ...], groups: int, transposed: bool) -> torch.Tensor:
    """Forward (dst = output) or input gradient (`transposed`, dst = grad_x) of a groups ≥ 1 layer.
    `geometry` is (kh, kw, sh, sw, ph, pw, dh, dw); experts `(E, C_out, C_in/groups, kh, kw)`."""
    kernel_h, kernel_w = geometry[:2]
    num_experts, c_out, in_per_group = experts.shape[:3]
    out_per_group = c_out // groups
    cols = in_per_group if transposed else out_per_group
    reduced = (out_per_group if transposed else in_per_group) * kernel_h * kernel_w
    batch, _, height_dst, width_dst = dst.shape
    block_m, block_n, block_k = tile(height_dst * width_dst), tile(cols), tile(reduced, 32)
    grid = (groups * triton.cdiv(cols, block_n) * batch * triton.cdiv(height_dst * width_dst, block_m),)
    _implicit_gemm[grid](src, experts, alpha, bias if bias is not None else alpha, dst,
                         batch, num_experts, src.shape[2], src.shape[3], height_dst, width_dst,
                         out_per_group, in_per_group, groups, *geometry,
                         *src.stride(), *dst.stride(),
                         TRANSPOSED=transposed, HAS_BIAS=bias is not None, WIDEN=widen_dot(src.dtype),
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_OPTIONS)
    return dst


def conv_weight_grad(grad: torch.Tensor, x: torch.Tensor, experts: torch.Tensor, groups: int,
                     geometry: tuple[int, ...]) -> torch.Tensor:
    """Per-example weight gradients `(B, C_out, C_in/groups·kh·kw)`, float32, for experts `(E, C_out, C_in/groups, kh, kw)`."""
    kernel_h, kernel_w = geometry[:2]
    c_out, in_per_group = experts.shape[1:3]
    batch, _, height_out, width_out = grad.shape
    out_per_group = c_out // groups
    reduced = in_per_group * kernel_h * kernel_w
    per_example = torch.empty(batch, c_out, reduced, device=x.device, dtype=torch.float32)
    block_m, block_n, block_k = tile(height_out * width_out), tile(out_per_group), tile(reduced)
    grid = (groups * triton.cdiv(out_per_group, block_n) * batch * triton.cdiv(reduced, block_k),)
    _implicit_gemm_weight_grad[grid](grad, x, per_example, batch, x.shape[2], x.shape[3], height_out, width_out,
                                     out_per_group, in_per_group, groups, *geometry, *grad.stride(), *x.stride(), WIDEN=widen_dot(x.dtype),
                                     BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, **_OPTIONS)
    return per_example


def depthwise(src: torch.Tensor, experts: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None,
              dst: torch.Tensor, geometry: tuple[int, ...], transposed: bool) -> torch.Tensor:
    """Depthwise forward or (`transposed`) input gradient; experts `(E, C, 1, kh, kw)`."""
    batch, channels, height_dst, width_dst = dst.shape
    block_m, block_c = tile(height_dst * width_dst), tile(channels, _DEPTHWISE_CHANNELS)
    grid = (triton.cdiv(channels, block_c) * batch * triton.cdiv(height_dst * width_dst, block_m),)
    _depthwise[grid](src, experts, alpha, bias if bias is not None else alpha, dst,
                     batch, channels, experts.shape[0], src.shape[2], src.shape[3], height_dst, width_dst,
                     *geometry, *src.stride(), *dst.stride(),
                     TRANSPOSED=transposed, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_C=block_c, **_OPTIONS)
    return dst


def depthwise_weight_grad(grad: torch.Tensor, x: torch.Tensor, geometry: tuple[int, ...]) -> torch.Tensor:
    """Per-example depthwise weight gradients `(B, C, kh·kw)`, float32."""
    kernel_h, kernel_w = geometry[:2]
    batch, channels, height_out, width_out = grad.shape
    per_example = torch.empty(batch, channels, kernel_h * kernel_w, device=x.device, dtype=torch.float32)
    block_c = tile(channels, _DEPTHWISE_CHANNELS)
    grid = (triton.cdiv(channels, block_c) * batch,)
    _depthwise_weight_grad[grid](grad, x, per_example, batch, channels, x.shape[2], x.shape[3], height_out, width_out,
                                 *geometry, *grad.stride(), *x.stride(), BLOCK_M=tile(height_out * width_out), BLOCK_C=block_c, **_OPTIONS)
    return per_example


def linear(x: torch.Tensor, experts: torch.Tensor, alpha: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`Σ_e α_be·(W_e x_b)` (+ mixed bias) for a batch `x` `(B, C_in)`; experts `(E, C_out, C_in)`."""
    batch = x.shape[0]
    w_e, w_n, w_k = experts.stride()
    n_out, n_in = experts.shape[1:]
    out = torch.empty(batch, n_out, device=x.device, dtype=x.dtype)
    block_b, block_n, block_k = tile(batch), tile(n_out), tile(n_in, 32)
    grid = (triton.cdiv(batch, block_b) * triton.cdiv(n_out, block_n),)
    _linear[grid](x, experts, alpha, bias if bias is not None else alpha, out, batch, experts.shape[0], n_out, n_in,
                  *x.stride(), w_e, w_n, w_k, *out.stride(),
                  HAS_BIAS=bias is not None, WIDEN=widen_dot(x.dtype), BLOCK_B=block_b, BLOCK_N=block_n, BLOCK_K=block_k, **_OPTIONS)
    return out
