// Fused CondConv forward kernels for CPU (fp32; bf16 products where the CPU has AVX512-BF16).
//
// The per-example kernel K_b = sum_e alpha[b,e] * W_e is never materialised for the whole
// batch: each work item (channel block, example) mixes only its own small tile of K_b into a
// thread-local buffer that stays in L1/L2, and multiplies it with the example's input right
// away, while the tile is hot. Materialising B kernels first (the bmm strategies) writes and
// re-reads B * C_out * C_in floats through L3/DRAM, which is what made them slow.
//
// The build is per machine (-march=native), so each vector path is compiled only where the
// compiler's target has it: AVX-512 (16 floats a register, 32 registers), else AVX2 with FMA3
// (8 floats, 16 registers: the forward 1x1, linear and depthwise kernels, and mixing), else the
// portable loops below.

// Only what the kernels use: tensors, at::empty, at::parallel_for and the pybind11 casters for
// tensors. <torch/extension.h> (all of libtorch's C++ API) took 2.2x as long to compile here.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include <unistd.h>

#if defined(__AVX512F__) && !defined(FUSED_FORCE_GENERIC)
#define FUSED_AVX512 1
#define FUSED_AVX2 0
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && !defined(FUSED_FORCE_GENERIC)
#define FUSED_AVX512 0
#define FUSED_AVX2 1
#include <immintrin.h>
#else
#define FUSED_AVX512 0
#define FUSED_AVX2 0
#endif

// The bfloat16 kernels need vdpbf16ps (AVX512-BF16: AMD Zen 4, Intel Cooper Lake and Sapphire
// Rapids on); elsewhere they are not built and the Python side refuses bfloat16 with the reason.
#if FUSED_AVX512 && defined(__AVX512BF16__)
#define FUSED_BF16 1
#else
#define FUSED_BF16 0
#endif

namespace {

// Output-channel block of the channels-last 1x1 kernel: 4 zmm wide, so one k step of the
// micro-kernel is 4 loads of the mixed tile + 6 broadcasts for 24 FMAs (load ports keep up).
constexpr int64_t kColBlock = 64;
// Rows of the micro-kernel: 6 x 4 accumulators + 4 B vectors + 1 broadcast fit in 32 zmm.
constexpr int kMR = 6;
// Pixels of a last, partly filled vector that the NCHW kernel computes as dot products.
constexpr int64_t kDotColumns = 4;
// Output-channel rows per NCHW work item at most (8 micro-kernel stripes share one mixed tile),
// and where the input an example group streams per row block outgrows half an L2 (see
// pw_forward_nchw), kWideRowBlock.
constexpr int64_t kRowBlock = 48;
constexpr int64_t kWideRowBlock = 64;
// Depthwise channel block: the mixed taps (k*k x 64) stay in L1 for a whole output plane.
constexpr int64_t kDwBlock = 64;

bool has_bf16() { return FUSED_BF16; }

const char* isa_name() {
#if FUSED_AVX512
  return "avx512";
#elif FUSED_AVX2
  return "avx2";
#else
  return "generic";
#endif
}

// One vector of floats in the build's extension, for loops written once for both (mixing groups).
#if FUSED_AVX512
using VecF = __m512;
constexpr int64_t kLanes = 16;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vset1(float a) { return _mm512_set1_ps(a); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm512_storeu_ps(p, v); }
inline VecF vfmadd(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
#elif FUSED_AVX2
using VecF = __m256;
constexpr int64_t kLanes = 8;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vset1(float a) { return _mm256_set1_ps(a); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, VecF v) { _mm256_storeu_ps(p, v); }
inline VecF vfmadd(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
#endif

#if FUSED_AVX2
// AVX2 has no mask registers: vmaskmovps takes a vector whose lanes' sign bits say which to
// touch. The first n lanes (n <= 8) of a vector.
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// ---------------------------------------------------------------------------------------------
// dst[i] = sum_e alpha[e] * src[e * e_stride + i], i < len.
// Accumulating all experts in registers before the single store keeps it at one load per FMA;
// summing expert by expert into dst would add a load and a store of dst per expert.
void mix(int64_t E, const float* alpha, const float* src, int64_t e_stride, int64_t len, float* dst) {
#if FUSED_AVX512
  int64_t i = 0;
  for (; i + 64 <= len; i += 64) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t e = 0; e < E; ++e) {
      const float* s = src + e * e_stride + i;
      __m512 w = _mm512_set1_ps(alpha[e]);
      a0 = _mm512_fmadd_ps(w, _mm512_loadu_ps(s), a0);
      a1 = _mm512_fmadd_ps(w, _mm512_loadu_ps(s + 16), a1);
      a2 = _mm512_fmadd_ps(w, _mm512_loadu_ps(s + 32), a2);
      a3 = _mm512_fmadd_ps(w, _mm512_loadu_ps(s + 48), a3);
    }
    _mm512_storeu_ps(dst + i, a0);
    _mm512_storeu_ps(dst + i + 16, a1);
    _mm512_storeu_ps(dst + i + 32, a2);
    _mm512_storeu_ps(dst + i + 48, a3);
  }
  for (; i < len; i += 16) {
    const int64_t n = std::min<int64_t>(16, len - i);
    const __mmask16 m = (__mmask16)((1u << n) - 1u);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t e = 0; e < E; ++e)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(alpha[e]), _mm512_maskz_loadu_ps(m, src + e * e_stride + i), acc);
    _mm512_mask_storeu_ps(dst + i, m, acc);
  }
#elif FUSED_AVX2
  int64_t i = 0;
  for (; i + 32 <= len; i += 32) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t e = 0; e < E; ++e) {
      const float* s = src + e * e_stride + i;
      const __m256 w = _mm256_set1_ps(alpha[e]);
      a0 = _mm256_fmadd_ps(w, _mm256_loadu_ps(s), a0);
      a1 = _mm256_fmadd_ps(w, _mm256_loadu_ps(s + 8), a1);
      a2 = _mm256_fmadd_ps(w, _mm256_loadu_ps(s + 16), a2);
      a3 = _mm256_fmadd_ps(w, _mm256_loadu_ps(s + 24), a3);
    }
    _mm256_storeu_ps(dst + i, a0);
    _mm256_storeu_ps(dst + i + 8, a1);
    _mm256_storeu_ps(dst + i + 16, a2);
    _mm256_storeu_ps(dst + i + 24, a3);
  }
  for (; i < len; i += 8) {
    const __m256i m = first_lanes(std::min<int64_t>(8, len - i));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t e = 0; e < E; ++e)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(alpha[e]), _mm256_maskload_ps(src + e * e_stride + i, m), acc);
    _mm256_maskstore_ps(dst + i, m, acc);
  }
#else
  for (int64_t i = 0; i < len; ++i) dst[i] = 0.f;
  for (int64_t e = 0; e < E; ++e) {
    const float a = alpha[e];
    const float* s = src + e * e_stride;
    for (int64_t i = 0; i < len; ++i) dst[i] += a * s[i];
  }
#endif
}

// ---------------------------------------------------------------------------------------------
// Micro-kernel: C[M x ncols] = epilogue(A[M x K] (row stride lda) * B[K x ncols] (row stride ldb)).
// A chunk of K is reduced in registers; the epilogue scales rows (the linear layer's alpha),
// adds the previous partial sum of C (K chunks, experts) and the biases, then stores once.
struct Epi {
  const float* bias_col = nullptr;   // per output column (channels-last bias)
  const float* bias_row = nullptr;   // per output row (NCHW bias)
  const float* row_scale = nullptr;  // r[m] *= row_scale[m * row_scale_stride]
  int64_t row_scale_stride = 0;
  bool accumulate = false;           // C += result instead of C = result
};

#if FUSED_AVX512
template <int M, int NV>
inline void store_tile(__m512 (&acc)[M][NV], float* __restrict C, int64_t ldc, __mmask16 st_tail, const Epi& ep) {
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const __mmask16 sm = (v == NV - 1) ? st_tail : (__mmask16)0xFFFF;
    const __m512 bc = ep.bias_col ? _mm512_maskz_loadu_ps(sm, ep.bias_col + 16 * v) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m512 r = acc[m][v];
      if (ep.row_scale) r = _mm512_mul_ps(r, _mm512_set1_ps(ep.row_scale[m * ep.row_scale_stride]));
      if (ep.accumulate) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(sm, C + m * ldc + 16 * v));
      r = _mm512_add_ps(r, bc);
      if (ep.bias_row) r = _mm512_add_ps(r, _mm512_set1_ps(ep.bias_row[m]));
      _mm512_mask_storeu_ps(C + m * ldc + 16 * v, sm, r);
    }
  }
}

template <int M, int NV>
void ukern(int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
           float* __restrict C, int64_t ldc, __mmask16 ld_tail, __mmask16 st_tail, const Epi& ep) {
  __m512 acc[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    __m512 b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = (v == NV - 1) ? _mm512_maskz_loadu_ps(ld_tail, bk + 16 * v) : _mm512_loadu_ps(bk + 16 * v);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512 a = _mm512_set1_ps(A[m * lda + k]);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_fmadd_ps(a, b[v], acc[m][v]);
    }
  }
  store_tile<M, NV>(acc, C, ldc, st_tail, ep);
}

using UKern = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, __mmask16,
                       __mmask16, const Epi&);
#define FUSED_ROW(M) {ukern<M, 1>, ukern<M, 2>, ukern<M, 3>, ukern<M, 4>}
const UKern kUKern[kMR][4] = {FUSED_ROW(1), FUSED_ROW(2), FUSED_ROW(3), FUSED_ROW(4), FUSED_ROW(5), FUSED_ROW(6)};
#undef FUSED_ROW

inline __mmask16 tail_mask(int64_t ncols) {
  const int64_t r = ncols - 16 * ((ncols - 1) / 16);
  return (__mmask16)((1u << r) - 1u);
}
#endif

#if FUSED_AVX2
// 6 rows x 2 vectors (16 columns): 12 accumulators, 2 B vectors and 1 broadcast fill the 16
// registers. Wider stripes are cut into these, each re-reading the A rows from L1. `tail`: the
// lanes of the last vector that are columns of C; with LOAD_TAIL, B's loads are masked by it too
// (B rows not zero-padded past the columns).
// PREFETCH_ROW: B's rows are 64 columns of which this call reads the first 16; it also requests the
// row's other three lines, which the stripe's next calls read (see gemm_stripe's `b_streamed`).
template <int M, int NV, bool LOAD_TAIL, bool PREFETCH_ROW = false>
void ukern_avx2(int64_t K, const float* __restrict A, int64_t lda, const float* __restrict B, int64_t ldb,
                float* __restrict C, int64_t ldc, __m256i tail, const Epi& ep) {
  __m256 acc[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    if (PREFETCH_ROW)
      for (int line = 1; line < 4; ++line) _mm_prefetch(reinterpret_cast<const char*>(bk + 16 * line), _MM_HINT_T1);
    __m256 b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v)
      b[v] = (LOAD_TAIL && v == NV - 1) ? _mm256_maskload_ps(bk + 8 * v, tail) : _mm256_loadu_ps(bk + 8 * v);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m256 a = _mm256_broadcast_ss(A + m * lda + k);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm256_fmadd_ps(a, b[v], acc[m][v]);
    }
  }
  const __m256i all = _mm256_set1_epi32(-1);
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v) {
    const __m256i lanes = v == NV - 1 ? tail : all;
    const __m256 bc = ep.bias_col ? _mm256_maskload_ps(ep.bias_col + 8 * v, lanes) : _mm256_setzero_ps();
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      __m256 r = acc[m][v];
      if (ep.row_scale) r = _mm256_mul_ps(r, _mm256_set1_ps(ep.row_scale[m * ep.row_scale_stride]));
      if (ep.accumulate) r = _mm256_add_ps(r, _mm256_maskload_ps(C + m * ldc + 8 * v, lanes));
      r = _mm256_add_ps(r, bc);
      if (ep.bias_row) r = _mm256_add_ps(r, _mm256_set1_ps(ep.bias_row[m]));
      _mm256_maskstore_ps(C + m * ldc + 8 * v, lanes, r);
    }
  }
}

using UKernAvx2 = void (*)(int64_t, const float*, int64_t, const float*, int64_t, float*, int64_t, __m256i, const Epi&);
#define FUSED_ROW(M) {{ukern_avx2<M, 1, false>, ukern_avx2<M, 1, true>}, {ukern_avx2<M, 2, false>, ukern_avx2<M, 2, true>}}
const UKernAvx2 kUKernAvx2[kMR][2][2] = {FUSED_ROW(1), FUSED_ROW(2), FUSED_ROW(3), FUSED_ROW(4), FUSED_ROW(5), FUSED_ROW(6)};
#undef FUSED_ROW
#endif

// C[M x ncols] = A * B (+biases), M <= kMR, ncols <= 64. `b_padded`: B rows may be read up to the
// next multiple of 16 columns (zero padding), so its loads need no mask. `b_streamed`: B comes
// from memory, read once (the linear layer's experts); on AVX2, whose 16-column chunks each read one
// line in four of B's 64-column rows, the first chunk of a full 6-row stripe then requests the other
// three (the 1280->1000 classifier at batch 8 took 0.70x the time, at batch 32 0.86x).
inline void gemm_stripe(int M, int64_t ncols, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb,
                        bool b_padded, float* C, int64_t ldc, const Epi& ep, bool b_streamed = false) {
#if FUSED_AVX512
  const int nv = (int)((ncols + 15) / 16);
  const __mmask16 st = tail_mask(ncols);
  (void)b_streamed;  // one pass of the 6x64 micro-kernel reads B's rows whole
  kUKern[M - 1][nv - 1](K, A, lda, B, ldb, C, ldc, b_padded ? (__mmask16)0xFFFF : st, st, ep);
#elif FUSED_AVX2
  // One or two rows (the linear layer at batch 1 and 2) take a whole padded 64-column stripe in one
  // and two passes over K: cut into 16-column chunks, each pass would read a quarter of every B
  // row (one line of four, from memory), and one row's 2 accumulators would wait on the FMA latency.
  if (b_padded && ncols == kColBlock && M <= 2) {
    const __m256i all = _mm256_set1_epi32(-1);
    if (M == 1) {
      ukern_avx2<1, 8, false>(K, A, lda, B, ldb, C, ldc, all, ep);
      return;
    }
    Epi half = ep;
    for (int64_t c0 = 0; c0 < kColBlock; c0 += 32) {
      if (ep.bias_col) half.bias_col = ep.bias_col + c0;
      ukern_avx2<2, 4, false>(K, A, lda, B + c0, ldb, C + c0, ldc, all, half);
    }
    return;
  }
  for (int64_t c0 = 0; c0 < ncols; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, ncols - c0), last = n - 8 * ((n - 1) / 8);
    Epi chunk = ep;
    if (chunk.bias_col) chunk.bias_col += c0;
    if (b_streamed && b_padded && ncols == kColBlock && c0 == 0 && M == kMR) {
      ukern_avx2<kMR, 2, false, true>(K, A, lda, B, ldb, C, ldc, first_lanes(last), chunk);
      continue;
    }
    kUKernAvx2[M - 1][(n - 1) / 8][!b_padded && last < 8](K, A, lda, B + c0, ldb, C + c0, ldc, first_lanes(last), chunk);
  }
#else
  (void)b_padded;
  (void)b_streamed;
  float acc[kMR][kColBlock];
  for (int m = 0; m < M; ++m)
    for (int64_t n = 0; n < ncols; ++n) acc[m][n] = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = B + k * ldb;
    for (int m = 0; m < M; ++m) {
      const float a = A[m * lda + k];
      for (int64_t n = 0; n < ncols; ++n) acc[m][n] += a * bk[n];
    }
  }
  for (int m = 0; m < M; ++m)
    for (int64_t n = 0; n < ncols; ++n) {
      float r = acc[m][n];
      if (ep.row_scale) r *= ep.row_scale[m * ep.row_scale_stride];
      if (ep.accumulate) r += C[m * ldc + n];
      C[m * ldc + n] = r + (ep.bias_col ? ep.bias_col[n] : 0.f) + (ep.bias_row ? ep.bias_row[m] : 0.f);
    }
#endif
}

#if FUSED_AVX2
// Columns [0, ncols) of K rows of B (row stride ldb), ncols <= 64, copied into 16-column panels,
// panel-major and zero-padded, for gemm_panels. The NCHW kernel's input rows are P floats apart,
// so the 6x16 kernel's two loads per k touch a new, often split, cache line each, and every row
// stripe of a row block reads them again: past kPackedRows rows (16 KB of lines, half an L1) they
// no longer stay in L1. Packed once per row block, a panel is contiguous and aligned. On a 2-core
// AVX2 EPYC, 672->112 at 14x14 took 0.74-0.90x the time packed; 112->672 (K = 112) took 1.05-1.16x,
// so short K stays unpacked.
constexpr int64_t kPackedRows = 256;

void pack_panels(const float* B, int64_t ldb, int64_t K, int64_t ncols, float* panels) {
  for (int64_t c0 = 0; c0 < ncols; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, ncols - c0);
    const __m256i lo = first_lanes(std::min<int64_t>(8, n)), hi = first_lanes(std::max<int64_t>(0, n - 8));
    float* panel = panels + c0 * K;
    for (int64_t k = 0; k < K; ++k) {
      _mm256_store_ps(panel + k * 16, _mm256_maskload_ps(B + k * ldb + c0, lo));
      _mm256_store_ps(panel + k * 16 + 8, _mm256_maskload_ps(B + k * ldb + c0 + 8, hi));
    }
  }
}

// gemm_stripe with B in pack_panels' layout.
inline void gemm_panels(int M, int64_t ncols, int64_t K, const float* A, int64_t lda, const float* panels, float* C,
                        int64_t ldc, const Epi& ep) {
  for (int64_t c0 = 0; c0 < ncols; c0 += 16) {
    const int64_t n = std::min<int64_t>(16, ncols - c0), last = n - 8 * ((n - 1) / 8);
    Epi chunk = ep;
    if (chunk.bias_col) chunk.bias_col += c0;
    kUKernAvx2[M - 1][(n - 1) / 8][false](K, A, lda, panels + c0 * K, 16, C + c0, ldc, first_lanes(last), chunk);
  }
}
#endif

// Per-thread scratch that is always written before it is read, kept from call to call (grown when
// a call needs more; `Slot` tells apart the buffers one work item holds at once). A buffer
// allocated per call is, past glibc's mmap threshold, a fresh mapping whose pages fault in again
// on every call: in a process with glibc's default thresholds a 32-channel 112x112 depthwise
// layer took 4-7 ms that way, against 0.27 ms for ATen's convolution; and a zero-filled buffer
// for four examples was a memset of up to 0.9 MB per thread and call, which batch 1 paid for
// nothing.
template <typename T, int Slot>
T* thread_scratch(int64_t n) {
  // Cache-line aligned (so no vector load spans two lines), and each slot starts 17 lines further
  // past a page boundary than the last, so that buffers walked in step (the depthwise kernels'
  // input and output blocks) do not alias in L1.
  constexpr int64_t line = 64 / sizeof(T), offset = (Slot * 17 + 1) * line;
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < n + offset) buffer = std::vector<T>(n + offset);
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return reinterpret_cast<T*>((address + 63) / 64 * 64) + offset - line;
}

// This core's L2 in bytes, as glibc reads it from the CPU (cpuid); 0 where it is not known (another
// C library), which makes the blocking that needs a large L2 stand aside.
int64_t l2_bytes() {
#ifdef _SC_LEVEL2_CACHE_SIZE
  static const int64_t bytes = std::max<long>(0, sysconf(_SC_LEVEL2_CACHE_SIZE));
  return bytes;
#else
  return 0;
#endif
}

// The NCHW kernels' output-channel row blocks: at most max_rows rows, all of one even size (the
// last may be shorter), and as many as make the (block, example group) items a multiple of the
// thread count, so that at::parallel_for's contiguous shares give every thread the same rows.
// Blocks of 48 and a remainder left 112 output channels as 48 + 48 + 16: at batch 8 one thread
// took 144 of the 224 row-items, at batch 1 96 of 112.
struct RowBlocks {
  int64_t count, size;
};

RowBlocks row_blocks(int64_t N, int64_t groups, int64_t max_rows) {
  const int64_t threads = at::get_num_threads();
  int64_t count = (N + max_rows - 1) / max_rows;
  while ((count * groups) % threads != 0 && count < N) ++count;
  const int64_t size = ((N + count - 1) / count + 1) / 2 * 2;
  return {(N + size - 1) / size, size};
}

// sum_k a[k] * b[k].
inline float dot(const float* a, const float* b, int64_t K) {
#if FUSED_AVX512
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k), _mm512_loadu_ps(b + k), acc0);
    acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + k + 16), _mm512_loadu_ps(b + k + 16), acc1);
  }
  for (; k < K; k += 16) {
    const __mmask16 m = tail_mask(std::min<int64_t>(16, K - k));
    acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif FUSED_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(b + k), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + k + 8), _mm256_loadu_ps(b + k + 8), acc1);
  }
  for (; k < K; k += 8) {
    const __m256i m = first_lanes(std::min<int64_t>(8, K - k));
    acc0 = _mm256_fmadd_ps(_mm256_maskload_ps(a + k, m), _mm256_maskload_ps(b + k, m), acc0);
  }
  const __m256 sum = _mm256_add_ps(acc0, acc1);
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
#else
  float sum = 0.f;
  for (int64_t k = 0; k < K; ++k) sum += a[k] * b[k];
  return sum;
#endif
}

void check_f32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be float32");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
}

// The mixed bias (B, numel / B) fp32, or nullptr where the layer has none.
const float* bias_of(const c10::optional<at::Tensor>& bias_mix, int64_t numel, const char* what) {
  if (!bias_mix || !bias_mix->defined()) return nullptr;
  check_f32(*bias_mix, "bias");
  TORCH_CHECK(bias_mix->numel() == numel, what, ": bias shape");
  return bias_mix->data_ptr<float>();
}

// ---------------------------------------------------------------------------------------------
// 1x1 conv, channels-last: x (B, P, K), packed experts wp (E, nblk, K, 64) [= W_e^T, column
// blocks zero-padded to 64], alpha (B, E), bias_mix (B, nblk*64) or empty. Returns (B, P, N).
// out_b = x_b @ K_b^T, so the mixed tile must be K_b^T: the experts are packed transposed once
// (cached by the caller), which makes mixing a contiguous stream per expert.
//
// Mixing is the only work the static layer does not do, and it is load-bound (one expert load
// per FMA). Two things keep it cheap: (1) up to kGroup examples are mixed in the same pass, so
// each expert vector loaded feeds kGroup FMAs; (2) K is cut into chunks small enough that the
// E expert slabs of a chunk stay in L2 while every example group of this block uses them
// (a 1152-wide block of 8 experts is 2.4 MB, larger than L2, and was re-read from L3).
constexpr int kGroup = 4;
constexpr int64_t kKChunk = 256;

void mix_group(int64_t E, int G, const float* alpha, int64_t alpha_stride, const float* src, int64_t e_stride,
               int64_t len, float* const* dst) {
#if FUSED_AVX512 || FUSED_AVX2
  const int64_t grouped = G == 1 ? 0 : len - len % (2 * kLanes);
  for (int64_t i = 0; i < grouped; i += 2 * kLanes) {
    VecF acc[kGroup][2];
    for (int g = 0; g < kGroup; ++g) acc[g][0] = acc[g][1] = vzero();
    for (int64_t e = 0; e < E; ++e) {
      const float* s = src + e * e_stride + i;
      const VecF w0 = vload(s), w1 = vload(s + kLanes);
#pragma GCC unroll 4
      for (int g = 0; g < kGroup; ++g) {
        if (g < G) {
          const VecF a = vset1(alpha[g * alpha_stride + e]);
          acc[g][0] = vfmadd(a, w0, acc[g][0]);
          acc[g][1] = vfmadd(a, w1, acc[g][1]);
        }
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < kGroup; ++g) {
      if (g < G) {
        vstore(dst[g] + i, acc[g][0]);
        vstore(dst[g] + i + kLanes, acc[g][1]);
      }
    }
  }
  if (grouped < len)
    for (int g = 0; g < G; ++g) mix(E, alpha + g * alpha_stride, src + grouped, e_stride, len - grouped, dst[g] + grouped);
#else
  for (int g = 0; g < G; ++g) mix(E, alpha + g * alpha_stride, src, e_stride, len, dst[g]);
#endif
}

at::Tensor pw_forward_cl(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& alpha,
                         const c10::optional<at::Tensor>& bias_mix, int64_t N) {
  check_f32(x, "x");
  check_f32(wp, "packed weight");
  check_f32(alpha, "alpha");
  TORCH_CHECK(x.dim() == 3 && wp.dim() == 4 && alpha.dim() == 2, "pw_forward_cl: bad ranks");
  const int64_t B = x.size(0), P = x.size(1), K = x.size(2), E = wp.size(0), nblk = wp.size(1);
  TORCH_CHECK(wp.size(2) == K && wp.size(3) == kColBlock && nblk * kColBlock >= N && alpha.size(0) == B &&
                  alpha.size(1) == E, "pw_forward_cl: shape mismatch");
  const float* bias_p = bias_of(bias_mix, B * nblk * kColBlock, "pw_forward_cl");
  auto out = at::empty({B, P, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wpp = wp.data_ptr<float>();
  const float* ap = alpha.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t nkc = (K + kKChunk - 1) / kKChunk;
  const int64_t kc_max = (K + nkc - 1) / nkc;  // even chunks: no short last chunk
  const int64_t ngrp = (B + kGroup - 1) / kGroup;
  // Block-major order: a thread's consecutive items reuse one expert block for every example
  // group before moving on; at batch 1 the blocks split the expert stream between threads.
  at::parallel_for(0, nblk * ngrp, 1, [&](int64_t begin, int64_t end) {
    float* const tiles = thread_scratch<float, 0>(kGroup * kc_max * kColBlock);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t blk = it / ngrp, grp = it % ngrp;
      const int64_t b0 = grp * kGroup;
      const int G = (int)std::min<int64_t>(kGroup, B - b0);
      const int64_t n0 = blk * kColBlock, ncols = std::min(kColBlock, N - n0);
      float* dst[kGroup];
      for (int g = 0; g < kGroup; ++g) dst[g] = tiles + g * kc_max * kColBlock;
      for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, K - k0);
        mix_group(E, G, ap + b0 * E, E, wpp + (blk * K + k0) * kColBlock, nblk * K * kColBlock, kc * kColBlock, dst);
        for (int g = 0; g < G; ++g) {
          const int64_t b = b0 + g;
          const float* xb = xp + b * P * K + k0;
          float* ob = op + b * P * N + n0;
          Epi ep;
          ep.accumulate = k0 > 0;
          ep.bias_col = (bias_p && k0 == 0) ? bias_p + b * nblk * kColBlock + n0 : nullptr;
          for (int64_t p0 = 0; p0 < P; p0 += kMR) {
            const int M = (int)std::min<int64_t>(kMR, P - p0);
            gemm_stripe(M, ncols, kc, xb + p0 * K, K, dst[g], kColBlock, true, ob + p0 * N, N, ep);
          }
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Linear: x (B, K), packed experts wp (E, nblk, K, 64) (the same packing as the 1x1 kernel),
// alpha (B, E), bias_mix (B, nblk*64) or empty. Returns (B, N).
// With one pixel per example, mixing K_b costs E*N*K FMAs per example -- exactly what the
// expert outputs z_be = W_e x_b cost. So no mixing at all: out_b = sum_e alpha[b,e] (W_e x_b),
// the alpha scaling folded into the micro-kernel's epilogue. Each expert slab of a column block
// (K x 64, L2-sized) is read from memory once and used by every 6-row stripe of the batch,
// so at batch 1 the kernel is one stream over the experts.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& alpha,
                          const c10::optional<at::Tensor>& bias_mix, int64_t N) {
  check_f32(x, "x");
  check_f32(wp, "packed weight");
  check_f32(alpha, "alpha");
  TORCH_CHECK(x.dim() == 2 && wp.dim() == 4 && alpha.dim() == 2, "linear_forward: bad ranks");
  const int64_t B = x.size(0), K = x.size(1), E = wp.size(0), nblk = wp.size(1);
  TORCH_CHECK(wp.size(2) == K && wp.size(3) == kColBlock && nblk * kColBlock >= N && alpha.size(0) == B &&
                  alpha.size(1) == E, "linear_forward: shape mismatch");
  const float* bias_p = bias_of(bias_mix, B * nblk * kColBlock, "linear_forward");
  auto out = at::empty({B, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wpp = wp.data_ptr<float>();
  const float* ap = alpha.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kColBlock, ncols = std::min(kColBlock, N - n0);
      for (int64_t e = 0; e < E; ++e) {
        const float* slab = wpp + (e * nblk + blk) * K * kColBlock;
        for (int64_t b0 = 0; b0 < B; b0 += kMR) {
          const int M = (int)std::min<int64_t>(kMR, B - b0);
          Epi ep;
          ep.row_scale = ap + b0 * E + e;
          ep.row_scale_stride = E;
          ep.accumulate = e > 0;
          // The mixed bias differs per example and per column (a 2-D term the epilogue does not
          // take); it is added once after the last expert, while the stripe is still in L1.
          gemm_stripe(M, ncols, K, xp + b0 * K, K, slab, kColBlock, true, op + b0 * N + n0, N, ep, true);
          if (bias_p && e == E - 1)
            for (int m = 0; m < M; ++m)
              for (int64_t n = 0; n < ncols; ++n) op[(b0 + m) * N + n0 + n] += bias_p[(b0 + m) * nblk * kColBlock + n0 + n];
        }
      }
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// bfloat16, 1x1 and linear: inputs and experts in bf16, every sum in fp32, rounded to bf16 once
// (the linear kernel returns fp32: the caller rounds its small output). vdpbf16ps
// multiplies pairs of bf16 along K and adds both products into one fp32 lane, so the experts are
// packed in pairs of K rows, (E, nblk, K/2, 64 columns x 2) ("VNNI" order), K even; mixing is
// elementwise, so it runs on that order as it is and writes the mixed tile in it.
#if FUSED_BF16
// The bf16 experts are also stored in pairs of experts, (E/2, elements, 2), so that mixing is
// vdpbf16ps too: one instruction adds alpha_2e * W_2e + alpha_2e+1 * W_2e+1 for 16 elements,
// with alpha's pair broadcast. Widening each expert to fp32 for FMAs instead had cost 1.75
// instructions per mixed weight at batch 1, against 6 for the product at 14x14 and 3 at 7x7.
// apairs[b * Ep + ep] = (bf16(alpha[b, 2ep]), bf16(alpha[b, 2ep + 1])) (0 past E), as 32-bit lanes.
std::vector<int32_t> alpha_pairs(const float* alpha, int64_t B, int64_t E) {
  const int64_t Ep = (E + 1) / 2;
  std::vector<int32_t> pairs(B * Ep);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t ep = 0; ep < Ep; ++ep) {
      const uint32_t lo = c10::BFloat16(alpha[b * E + 2 * ep]).x;
      const uint32_t hi = 2 * ep + 1 < E ? c10::BFloat16(alpha[b * E + 2 * ep + 1]).x : 0u;
      pairs[b * Ep + ep] = (int32_t)(lo | (hi << 16));
    }
  return pairs;
}

// dst[g][i] = bf16(sum_e alpha[g, e] * W_e[i]) for g < G, i < len; src points at element 0 of
// expert pair 0, e_stride apart (in bf16 values). Each pair vector loaded feeds the G examples.
void mix_group_bf16(int64_t Ep, int G, const int32_t* apairs, const uint16_t* src, int64_t e_stride, int64_t len,
                    uint16_t* const* dst) {
  for (int64_t i = 0; i < len; i += 32) {
    const int64_t n = std::min<int64_t>(32, len - i);
    const __mmask32 m = n == 32 ? (__mmask32)0xFFFFFFFFu : (__mmask32)((1u << n) - 1u);
    const __mmask16 m_lo = tail_mask(std::min<int64_t>(16, n)), m_hi = n > 16 ? tail_mask(n - 16) : (__mmask16)0;
    __m512 acc[kGroup][2];
    for (int g = 0; g < kGroup; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
    for (int64_t ep = 0; ep < Ep; ++ep) {
      const uint16_t* w = src + ep * e_stride + 2 * i;
      const __m512i w0 = _mm512_maskz_loadu_epi32(m_lo, w), w1 = _mm512_maskz_loadu_epi32(m_hi, w + 32);
#pragma GCC unroll 4
      for (int g = 0; g < kGroup; ++g) {
        if (g < G) {
          const __m512i a = _mm512_set1_epi32(apairs[g * Ep + ep]);
          acc[g][0] = _mm512_dpbf16_ps(acc[g][0], (__m512bh)a, (__m512bh)w0);
          acc[g][1] = _mm512_dpbf16_ps(acc[g][1], (__m512bh)a, (__m512bh)w1);
        }
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < kGroup; ++g)
      if (g < G) _mm512_mask_storeu_epi16(dst[g] + i, m, (__m512i)_mm512_cvtne2ps_pbh(acc[g][1], acc[g][0]));
  }
}

// dst[r * ldd + c] = bf16(src[r * lds + c]) for r < rows, c < cols.
void round_rows_bf16(const float* src, int64_t lds, int64_t rows, int64_t cols, uint16_t* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; c += 16) {
      const __mmask16 m = tail_mask(std::min<int64_t>(16, cols - c));
      const __m256bh v = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + r * lds + c));
      _mm256_mask_storeu_epi16(dst + r * ldd + c, m, (__m256i)v);
    }
}

// C[M x 16*NV] (fp32, epilogue as ukern's) = A[M x 2*Kp] (bf16, row stride lda) * B (bf16 pairs:
// Kp rows of (column, 2), row stride ldb). One step: NV loads of B (a column pair is one 32-bit
// lane, so ld_tail masks columns), M broadcasts of an (a_k, a_k+1) pair.
template <int M, int NV>
void ukern_bf16(int64_t Kp, const uint16_t* __restrict A, int64_t lda, const uint16_t* __restrict B, int64_t ldb,
                float* __restrict C, int64_t ldc, __mmask16 ld_tail, __mmask16 st_tail, const Epi& ep) {
  __m512 acc[M][NV];
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < Kp; ++p) {
    const uint16_t* bp = B + p * ldb;
    __m512i b[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v)
      b[v] = (v == NV - 1) ? _mm512_maskz_loadu_epi32(ld_tail, bp + 32 * v) : _mm512_loadu_si512(bp + 32 * v);
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      int32_t pair;
      std::memcpy(&pair, A + m * lda + 2 * p, sizeof(pair));
      const __m512i a = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)a, (__m512bh)b[v]);
    }
  }
  store_tile<M, NV>(acc, C, ldc, st_tail, ep);
}

using UKernBf16 = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, float*, int64_t, __mmask16, __mmask16,
                           const Epi&);
#define FUSED_ROW(M) {ukern_bf16<M, 1>, ukern_bf16<M, 2>, ukern_bf16<M, 3>, ukern_bf16<M, 4>}
const UKernBf16 kUKernBf16[kMR][4] = {FUSED_ROW(1), FUSED_ROW(2), FUSED_ROW(3), FUSED_ROW(4), FUSED_ROW(5), FUSED_ROW(6)};
#undef FUSED_ROW

// As gemm_stripe; `b_padded`: B rows may be read up to the next multiple of 16 columns.
inline void gemm_stripe_bf16(int M, int64_t ncols, int64_t Kp, const uint16_t* A, int64_t lda, const uint16_t* B,
                             int64_t ldb, bool b_padded, float* C, int64_t ldc, const Epi& ep) {
  const __mmask16 st = tail_mask(ncols);
  kUKernBf16[M - 1][(ncols + 15) / 16 - 1](Kp, A, lda, B, ldb, C, ldc, b_padded ? (__mmask16)0xFFFF : st, st, ep);
}
#endif

// `in_expert_pairs`: wp is (E/2, nblk, K/2, 64 x 2 x 2), the experts also paired for mixing.
void check_bf16_args(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& alpha, bool in_expert_pairs,
                     const char* what) {
  TORCH_CHECK(FUSED_BF16, what, ": this build has no bfloat16 kernel (it needs AVX512-BF16)");
  for (const auto* t : {&x, &wp}) {
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->is_contiguous(), what,
                ": x and the packed weight must be contiguous bfloat16 CPU tensors");
  }
  check_f32(alpha, "alpha");
  const int64_t pairs = in_expert_pairs ? 2 : 1;
  TORCH_CHECK(x.size(-1) % 2 == 0 && wp.dim() == 4 && wp.size(2) * 2 == x.size(-1) &&
                  wp.size(3) == 2 * pairs * kColBlock && (alpha.size(1) + pairs - 1) / pairs == wp.size(0),
              what, ": shape mismatch (K must be even)");
}

// x (B, P, K) bf16, K even; packed experts wp (E/2, nblk, K/2, 256) bf16 (pairs of K rows, then of
// experts); alpha (B, E) and
// bias_mix (B, nblk*64) fp32. Returns (B, P, N) bf16. The loop of pw_forward_cl.
at::Tensor pw_forward_cl_bf16(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& alpha,
                              const c10::optional<at::Tensor>& bias_mix, int64_t N) {
  check_bf16_args(x, wp, alpha, true, "pw_forward_cl_bf16");
  const int64_t B = x.size(0), P = x.size(1), K = x.size(2), Ep = wp.size(0), nblk = wp.size(1), Kp = K / 2;
  TORCH_CHECK(x.dim() == 3 && alpha.size(0) == B && nblk * kColBlock >= N, "pw_forward_cl_bf16: shape mismatch");
  const float* bias_p = bias_of(bias_mix, B * nblk * kColBlock, "pw_forward_cl_bf16");
  auto out = at::empty({B, P, N}, x.options());
#if FUSED_BF16
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wpp = reinterpret_cast<const uint16_t*>(wp.data_ptr<at::BFloat16>());
  const std::vector<int32_t> apairs = alpha_pairs(alpha.data_ptr<float>(), B, alpha.size(1));
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const int64_t nkc = (Kp + kKChunk / 2 - 1) / (kKChunk / 2);
  const int64_t kc_max = (Kp + nkc - 1) / nkc;  // pairs per chunk, chunks even
  const int64_t ngrp = (B + kGroup - 1) / kGroup;
  at::parallel_for(0, nblk * ngrp, 1, [&](int64_t begin, int64_t end) {
    // The examples' output blocks (P x 64) summed over the K chunks in fp32, rounded to bf16 once.
    uint16_t* const tiles = thread_scratch<uint16_t, 0>(kGroup * kc_max * 2 * kColBlock);
    float* const sums = thread_scratch<float, 1>(kGroup * P * kColBlock);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t blk = it / ngrp, b0 = it % ngrp * kGroup;
      const int G = (int)std::min<int64_t>(kGroup, B - b0);
      const int64_t n0 = blk * kColBlock, ncols = std::min(kColBlock, N - n0);
      uint16_t* dst[kGroup];
      for (int g = 0; g < kGroup; ++g) dst[g] = tiles + g * kc_max * 2 * kColBlock;
      for (int64_t p0 = 0; p0 < Kp; p0 += kc_max) {
        const int64_t kc = std::min(kc_max, Kp - p0);
        mix_group_bf16(Ep, G, apairs.data() + b0 * Ep, wpp + (blk * Kp + p0) * 4 * kColBlock, nblk * Kp * 4 * kColBlock,
                       kc * 2 * kColBlock, dst);
        for (int g = 0; g < G; ++g) {
          const int64_t b = b0 + g;
          Epi ep;
          ep.accumulate = p0 > 0;
          ep.bias_col = (bias_p && p0 == 0) ? bias_p + b * nblk * kColBlock + n0 : nullptr;
          float* sum = sums + g * P * kColBlock;
          for (int64_t r0 = 0; r0 < P; r0 += kMR) {
            const int M = (int)std::min<int64_t>(kMR, P - r0);
            gemm_stripe_bf16(M, ncols, kc, xp + (b * P + r0) * K + 2 * p0, K, dst[g], 2 * kColBlock, true,
                             sum + r0 * kColBlock, kColBlock, ep);
          }
        }
      }
      for (int g = 0; g < G; ++g)
        round_rows_bf16(sums + g * P * kColBlock, kColBlock, P, ncols, op + (b0 + g) * P * N + n0, N);
    }
  });
#endif
  return out;
}

// x (B, K) bf16, K even; experts packed as for pw_forward_cl_bf16. Returns (B, N) fp32. The loop
// of linear_forward: no mixing, the expert outputs scaled by alpha in the epilogue.
at::Tensor linear_forward_bf16(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& alpha,
                               const c10::optional<at::Tensor>& bias_mix, int64_t N) {
  check_bf16_args(x, wp, alpha, false, "linear_forward_bf16");
  const int64_t B = x.size(0), K = x.size(1), E = wp.size(0), nblk = wp.size(1), Kp = K / 2;
  TORCH_CHECK(x.dim() == 2 && alpha.size(0) == B && nblk * kColBlock >= N, "linear_forward_bf16: shape mismatch");
  const float* bias_p = bias_of(bias_mix, B * nblk * kColBlock, "linear_forward_bf16");
  auto out = at::empty({B, N}, x.options().dtype(at::kFloat));
#if FUSED_BF16
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* wpp = reinterpret_cast<const uint16_t*>(wp.data_ptr<at::BFloat16>());
  const float* ap = alpha.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, nblk, 1, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * kColBlock, ncols = std::min(kColBlock, N - n0);
      for (int64_t e = 0; e < E; ++e) {
        const uint16_t* slab = wpp + (e * nblk + blk) * Kp * 2 * kColBlock;
        for (int64_t b0 = 0; b0 < B; b0 += kMR) {
          const int M = (int)std::min<int64_t>(kMR, B - b0);
          Epi ep;
          ep.row_scale = ap + b0 * E + e;
          ep.row_scale_stride = E;
          ep.accumulate = e > 0;
          gemm_stripe_bf16(M, ncols, Kp, xp + b0 * K, K, slab, 2 * kColBlock, true, op + b0 * N + n0, N, ep);
          if (bias_p && e == E - 1)
            for (int m = 0; m < M; ++m)
              for (int64_t n = 0; n < ncols; ++n) op[(b0 + m) * N + n0 + n] += bias_p[(b0 + m) * nblk * kColBlock + n0 + n];
        }
      }
    }
  });
#endif
  return out;
}

// x (B, K, P) bf16; experts w (E/2, N, 2K) bf16: (N, K rounded up to even, zero-padded) per expert,
// in pairs of experts; alpha (B, E) and
// bias_mix (B, N) fp32. Returns (B, N, P) bf16. The loop of pw_forward_nchw: out_b = K_b @ x_b, a
// block of output channels mixed from contiguous slabs of each expert, its rows the broadcast
// operand; x's columns are first interleaved in pairs of K rows, one pass (in torch, the same
// interleave took half as long as the whole product).
at::Tensor pw_forward_nchw_bf16(const at::Tensor& x, const at::Tensor& w, const at::Tensor& alpha,
                                const c10::optional<at::Tensor>& bias_mix) {
  TORCH_CHECK(FUSED_BF16, "pw_forward_nchw_bf16: this build has no bfloat16 kernel (it needs AVX512-BF16)");
  for (const auto* t : {&x, &w})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kBFloat16 && t->is_contiguous(),
                "pw_forward_nchw_bf16: x and the weight must be contiguous bfloat16 CPU tensors");
  check_f32(alpha, "alpha");
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && alpha.dim() == 2, "pw_forward_nchw_bf16: bad ranks");
  const int64_t B = x.size(0), Kx = x.size(1), P = x.size(2), Ep = w.size(0), N = w.size(1), K = w.size(2) / 2, Kp = K / 2;
  TORCH_CHECK(K % 2 == 0 && (Kx == K || Kx == K - 1) && alpha.size(0) == B && (alpha.size(1) + 1) / 2 == Ep,
              "pw_forward_nchw_bf16: shape mismatch");
  const float* bias_p = bias_of(bias_mix, B * N, "pw_forward_nchw_bf16");
  auto out = at::empty({B, N, P}, x.options());
#if FUSED_BF16
  auto paired = at::empty({B, Kp, 2 * P}, x.options());
  const auto* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  auto* xp = reinterpret_cast<uint16_t*>(paired.data_ptr<at::BFloat16>());
  at::parallel_for(0, B * Kp, 16, [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / Kp, k = 2 * (it % Kp);
      const uint16_t* even = xs + (b * Kx + k) * P;
      const bool odd_row = k + 1 < Kx;
      for (int64_t p = 0; p < P; p += 16) {
        const __mmask16 m = tail_mask(std::min<int64_t>(16, P - p));
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, even + p));
        const __m512i hi = odd_row ? _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, even + P + p)), 16)
                                   : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(xp + it * 2 * P + 2 * p, m, _mm512_or_si512(lo, hi));
      }
    }
  });
  const auto* wpp = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  const std::vector<int32_t> apairs = alpha_pairs(alpha.data_ptr<float>(), B, alpha.size(1));
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  const RowBlocks blocks = row_blocks(N, B, kRowBlock);
  at::parallel_for(0, blocks.count * B, 1, [&](int64_t begin, int64_t end) {
    uint16_t* const tile = thread_scratch<uint16_t, 0>(blocks.size * K);
    float* const sums = thread_scratch<float, 1>(blocks.size * P);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t rb = it / B, b = it % B;
      const int64_t n0 = rb * blocks.size, rows = std::min(blocks.size, N - n0);
      uint16_t* dst = tile;
      mix_group_bf16(Ep, 1, apairs.data() + b * Ep, wpp + n0 * K * 2, N * K * 2, rows * K, &dst);
      const uint16_t* xb = xp + b * Kp * 2 * P;
      const float* br = bias_p ? bias_p + b * N + n0 : nullptr;
      for (int64_t pc = 0; pc < P; pc += kColBlock) {
        const int64_t ncols = std::min(kColBlock, P - pc);
        for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
          const int M = (int)std::min<int64_t>(kMR, rows - r0);
          Epi ep;
          ep.bias_row = br ? br + r0 : nullptr;
          gemm_stripe_bf16(M, ncols, Kp, tile + r0 * K, K, xb + 2 * pc, 2 * P, false, sums + r0 * P + pc, P, ep);
        }
      }
      round_rows_bf16(sums, P, rows, P, op + (b * N + n0) * P, P);
    }
  });
#endif
  return out;
}

// dst[j * ld_d + i] = src[i * ld_s + j] for i < rows, j < cols. The depthwise kernels turn an NCHW
// block (64 channel planes) into channels-last in L2 and back with it: a copy of the whole tensor
// to channels-last and back, through DRAM, took longer than the convolution itself. The NCHW 1x1
// kernel turns a tile mixed from transposed experts (an input gradient) into rows with it.
#if FUSED_AVX512
inline void transpose16(const float* src, int64_t ld_s, float* dst, int64_t ld_d) {
  __m512 r[16], t[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ld_s);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {  // pairs of rows interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {  // 4x4 transposes within each 128-bit lane
    r[4 * g + 0] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
    r[4 * g + 1] = _mm512_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xEE);
    r[4 * g + 2] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    r[4 * g + 3] = _mm512_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // then the 128-bit lanes of the four row groups
    const __m512 u0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x44), u1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xEE);
    const __m512 u2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x44), u3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xEE);
    _mm512_storeu_ps(dst + k * ld_d, _mm512_shuffle_f32x4(u0, u2, 0x88));
    _mm512_storeu_ps(dst + (4 + k) * ld_d, _mm512_shuffle_f32x4(u0, u2, 0xDD));
    _mm512_storeu_ps(dst + (8 + k) * ld_d, _mm512_shuffle_f32x4(u1, u3, 0x88));
    _mm512_storeu_ps(dst + (12 + k) * ld_d, _mm512_shuffle_f32x4(u1, u3, 0xDD));
  }
}
#endif

#if FUSED_AVX2
// row(k): where source column k's 8 values go (the planar depthwise kernel's padded rows are not
// evenly spaced).
template <typename Row>
inline void transpose8(const float* src, int64_t ld_s, Row row) {
  __m256 r[8], t[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld_s);
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {  // pairs of rows interleaved
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 2
  for (int g = 0; g < 2; ++g) {  // 4x4 transposes within each 128-bit lane
    r[4 * g + 0] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0x44);
    r[4 * g + 1] = _mm256_shuffle_ps(t[4 * g + 0], t[4 * g + 2], 0xEE);
    r[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    r[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {  // then the 128-bit lanes of the two row groups
    _mm256_storeu_ps(row(k), _mm256_permute2f128_ps(r[k], r[4 + k], 0x20));
    _mm256_storeu_ps(row(4 + k), _mm256_permute2f128_ps(r[k], r[4 + k], 0x31));
  }
}
#endif

void transpose(const float* src, int64_t ld_s, int64_t rows, int64_t cols, float* dst, int64_t ld_d) {
  int64_t i0 = 0;
#if FUSED_AVX512 || FUSED_AVX2
  constexpr int64_t S = FUSED_AVX512 ? 16 : 8;  // the square a vector transpose takes
  for (; i0 + S <= rows; i0 += S) {
    int64_t j0 = 0;
    for (; j0 + S <= cols; j0 += S) {
#if FUSED_AVX512
      transpose16(src + i0 * ld_s + j0, ld_s, dst + j0 * ld_d + i0, ld_d);
#else
      transpose8(src + i0 * ld_s + j0, ld_s, [=](int k) { return dst + (j0 + k) * ld_d + i0; });
#endif
    }
    for (int64_t j = j0; j < cols; ++j)
      for (int64_t i = i0; i < i0 + S; ++i) dst[j * ld_d + i] = src[i * ld_s + j];
  }
#endif
  for (int64_t i = i0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[j * ld_d + i] = src[i * ld_s + j];
}

// ---------------------------------------------------------------------------------------------
// 1x1 conv (or im2col'ed k x k), NCHW: x (B, K, P), experts w (E, N, K) in their natural layout,
// alpha (B, E), bias_mix (B, N) or empty. Returns (B, N, P). Here out_b = K_b @ x_b: a block of
// output channels is a contiguous slab of each expert, so no packing is needed. `transposed`: w is
// (E, K, N), a layer's own experts, and out_b = K_b^T @ x_b (that layer's input gradient); each
// expert row gives a contiguous run of the block's columns, mixed, then transposed in cache (a
// transposed copy of all experts per call had been 44% of a 192->1152 layer's step at batch 1).
at::Tensor pw_forward_nchw(const at::Tensor& x, const at::Tensor& w, const at::Tensor& alpha,
                           const c10::optional<at::Tensor>& bias_mix, bool transposed) {
  check_f32(x, "x");
  check_f32(w, "weight");
  check_f32(alpha, "alpha");
  TORCH_CHECK(x.dim() == 3 && w.dim() == 3 && alpha.dim() == 2, "pw_forward_nchw: bad ranks");
  const int64_t B = x.size(0), K = x.size(1), P = x.size(2), E = w.size(0), N = w.size(transposed ? 2 : 1);
  TORCH_CHECK(w.size(transposed ? 1 : 2) == K && alpha.size(0) == B && alpha.size(1) == E,
              "pw_forward_nchw: shape mismatch");
  const float* bias_p = bias_of(bias_mix, B * N, "pw_forward_nchw");
  auto out = at::empty({B, N, P}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wpp = w.data_ptr<float>();
  const float* ap = alpha.data_ptr<float>();
  float* op = out.data_ptr<float>();
  // A last vector of at most kDotColumns pixels (49 = 3 x 16 + 1 at 7x7) would cost the micro-kernel
  // a whole FMA per row and k for those few lanes (a quarter of its work at 7x7): those columns are
  // dot products of the tile's rows instead, 16 k at a time.
  const int64_t last = P % 16;
  const int64_t split = last > 0 && last <= kDotColumns && P > last ? P - last : P;
  // With more than one example group, K may be cut into chunks (a multiple of 32, for mix_group)
  // whose E expert slabs (48 rows x 256 x 8 experts, 393 KB) stay in L2 while every group of the row
  // block mixes from them; unchunked, each group re-reads the row block's experts from L3 (1.8 MB
  // at K = 1152). Chunks cost passes over the groups' outputs instead (read and written once more
  // per extra chunk), so they are taken where the experts a group re-reads (E*K floats per row)
  // exceed four times the output it re-reads and re-writes (2 * kGroup * P * (chunks - 1)), and
  // where a chunk's expert slabs and the group's mixed tiles fit in this core's L2 together.
  // On an AVX-512 EPYC (1 MB L2) that chunks every 7x7 layer of EfficientNet-B0 (0.91-0.96x the
  // time at batch 8) and no 14x14 one (chunked, 672->112 and 480->112 took 1.02-1.08x). On a
  // 2-core AVX2 EPYC (512 KB L2, 590 KB wanted) the chunked 1152->192 and 1152->320 layers took
  // 1.11-1.20x the time of unchunked ones at batch 8 and 32 (672->192 about the same; chunks of
  // K = 128, which fit, 1.19-1.26x), so there none is. One group reads each expert once anyway.
  const int64_t ngrp = (B + kGroup - 1) / kGroup;
  const int64_t chunks = (K + kKChunk - 1) / kKChunk;
  const int64_t kc_chunk = std::min(K, ((K + chunks - 1) / chunks + 31) / 32 * 32);
  const bool chunked = ngrp > 1 && E * K > 8 * kGroup * P * (chunks - 1) &&
                       (E + kGroup) * kRowBlock * kc_chunk * static_cast<int64_t>(sizeof(float)) <= l2_bytes();
  const int64_t kc_max = chunked ? kc_chunk : K;
  // Every row block streams its example group's input (up to kGroup x kc x P floats) once more.
  // Past half an L2 that comes from L3, and fewer, wider blocks pay: at 14x14 with 672 and 480
  // input channels (2.1 and 1.5 MB for four examples) 64-row blocks took 0.79-0.96x the time of
  // 48-row ones; where the input stays in L2 (the expanding layers, at most 350 KB) 1.02x.
  const int64_t group_input = std::min<int64_t>(kGroup, B) * kc_max * P * static_cast<int64_t>(sizeof(float));
  const RowBlocks blocks = row_blocks(N, ngrp, group_input > (512 << 10) ? kWideRowBlock : kRowBlock);
  const int64_t rb_size = blocks.size;
  at::parallel_for(0, blocks.count * ngrp, 1, [&](int64_t begin, int64_t end) {
    float* const tiles = thread_scratch<float, 0>(std::min<int64_t>(kGroup, B) * rb_size * kc_max);
    float* const x_columns = thread_scratch<float, 1>((P - split) * kc_max);
    float* const mixed_t = thread_scratch<float, 2>(transposed ? kc_max * rb_size : 0);
#if FUSED_AVX2
    const bool packed = kc_max > kPackedRows;
    float* const panels = thread_scratch<float, 3>(packed ? kc_max * kColBlock : 0);
#endif
    for (int64_t run = begin; run < end;) {
      const int64_t rb = run / ngrp, run_end = std::min(end, (rb + 1) * ngrp);
      const int64_t n0 = rb * rb_size, rows = std::min(rb_size, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = std::min(kc_max, K - k0);
        for (int64_t it = run; it < run_end; ++it) {
          const int64_t b0 = (it % ngrp) * kGroup;
          const int G = (int)std::min<int64_t>(kGroup, B - b0);
          if (transposed) {  // each row k of the experts holds a contiguous run of the block's columns
            for (int g = 0; g < G; ++g) {
              for (int64_t k = 0; k < kc; ++k)
                mix(E, ap + (b0 + g) * E, wpp + (k0 + k) * N + n0, K * N, rows, mixed_t + k * rb_size);
              transpose(mixed_t, rb_size, kc, rows, tiles + g * rb_size * kc, kc);
            }
          } else {
            // Without chunks a tile's rows are one contiguous run of each expert: one call mixes all.
            const int64_t runs = kc == K ? 1 : rows, len = kc == K ? rows * K : kc;
            float* dst[kGroup];
            for (int64_t r = 0; r < runs; ++r) {
              for (int g = 0; g < G; ++g) dst[g] = tiles + g * rb_size * kc + r * kc;
              mix_group(E, G, ap + b0 * E, E, wpp + (n0 + r) * K + k0, N * K, len, dst);
            }
          }
          for (int g = 0; g < G; ++g) {
            const int64_t b = b0 + g;
            const float* tile = tiles + g * rb_size * kc;
            const float* xb = xp + (b * K + k0) * P;
            float* ob = op + b * N * P;
            const float* br = bias_p && k0 == 0 ? bias_p + b * N + n0 : nullptr;
            for (int64_t pc = 0; pc < split; pc += kColBlock) {
              const int64_t ncols = std::min(kColBlock, split - pc);
#if FUSED_AVX2
              if (packed) pack_panels(xb + pc, P, kc, ncols, panels);
#endif
              for (int64_t r0 = 0; r0 < rows; r0 += kMR) {
                const int M = (int)std::min<int64_t>(kMR, rows - r0);
                Epi ep;
                ep.accumulate = k0 > 0;
                ep.bias_row = br ? br + r0 : nullptr;
#if FUSED_AVX2
                if (packed) {
                  gemm_panels(M, ncols, kc, tile + r0 * kc, kc, panels, ob + (n0 + r0) * P + pc, P, ep);
                  continue;
                }
#endif
                gemm_stripe(M, ncols, kc, tile + r0 * kc, kc, xb + pc, P, false, ob + (n0 + r0) * P + pc, P, ep);
              }
            }
            for (int64_t p = split; p < P; ++p) {
              float* column = x_columns + (p - split) * kc;
              for (int64_t k = 0; k < kc; ++k) column[k] = xb[k * P + p];
              for (int64_t r = 0; r < rows; ++r) {
                float* o = ob + (n0 + r) * P + p;
                *o = (k0 > 0 ? *o : 0.f) + dot(tile + r * kc, column, kc) + (br ? br[r] : 0.f);
              }
            }
          }
        }
      }
      run = run_end;
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Depthwise k x k: x (B, H, W, C) channels-last or (B, C, H, W) planar, packed taps wp (E, T, C)
// with T = kh*kw, alpha (B, E), bias_mix (B, C) or empty; the output in x's layout. Vectorised
// over channels.
//
// Work split: an item is (example, 64-channel block), so that every tap is mixed exactly once
// into a 6.4 KB (5x5) tile. Inside it, one 16-channel vector at a time sweeps the whole output
// plane: its slice of the input (14x14x16 floats, 12.5 KB) stays in L1 for all the rows that
// read it. Sweeping all 64 channels per row instead (50 KB per plane, beyond L1) ran 1.5-1.7x
// slower at batch 8.
struct DwGeom {
  int64_t H, W, C, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo;
  int64_t owa, owb;  // columns whose taps are all inside the image
};

#if FUSED_AVX512
// Output row oh reads input rows ih0 + i * dh for taps i in [ilo, ihi): those inside the image.
struct TapRows {
  int64_t ih0, ilo, ihi;
};

TapRows tap_rows(const DwGeom& g, int64_t oh) {
  const int64_t ih0 = oh * g.sh - g.ph;
  int64_t ilo = 0, ihi = g.kh;
  while (ilo < g.kh && ih0 + ilo * g.dh < 0) ++ilo;
  while (ihi > ilo && ih0 + (ihi - 1) * g.dh >= g.H) --ihi;
  return {ih0, ilo, ihi};
}

// The sliding-window kernels (below) take taps 3 or 5 wide at stride 1 or 2, undilated across.
bool window_shape(const DwGeom& g) { return (g.sw == 1 || g.sw == 2) && g.dw == 1 && (g.kw == 3 || g.kw == 5); }
#endif

#if FUSED_AVX512
// Any stride/dilation: PX output pixels share each tap's weight load.
template <int PX>
inline void dw_pixels(const float* xb, int64_t W, int64_t C, const float* wt, int64_t wstride, int64_t kw,
                      int64_t ilo, int64_t ihi, int64_t jlo, int64_t jhi, int64_t ih0, int64_t iw0, int64_t sw,
                      int64_t dh, int64_t dw, const float* bias, __mmask16 tail, float* op) {
  __m512 acc[PX];
  const __m512 b0 = _mm512_loadu_ps(bias);
#pragma GCC unroll 8
  for (int p = 0; p < PX; ++p) acc[p] = b0;
  for (int64_t i = ilo; i < ihi; ++i) {
    const float* xr = xb + (ih0 + i * dh) * W * C;
    for (int64_t j = jlo; j < jhi; ++j) {
      const __m512 w = _mm512_loadu_ps(wt + (i * kw + j) * wstride);
      const float* xq = xr + (iw0 + j * dw) * C;
#pragma GCC unroll 8
      for (int p = 0; p < PX; ++p) acc[p] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, xq + p * sw * C), w, acc[p]);
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < PX; ++p) _mm512_mask_storeu_ps(op + p * C, tail, acc[p]);
}

// Stride 1 or 2, no horizontal dilation: the PX pixels of a tap row read the (PX - 1) * SW + KW
// input vectors once into registers (a sliding window) instead of PX * KW loads, which halves the
// loads per FMA for 5x5 -- the loop is load-bound otherwise. Columns outside the image load
// zeros, so border pixels take the same path: at 7x7 with 5x5 taps every column is a border
// column, and a per-pixel border path ran at half the speed.
template <int PX, int KW, int SW>
inline void dw_pixels_window(const float* xb, int64_t W, int64_t C, const float* wt, int64_t wstride, int64_t ilo,
                             int64_t ihi, int64_t ih0, int64_t iw0, int64_t dh, const float* bias, __mmask16 tail,
                             float* op) {
  constexpr int NX = (PX - 1) * SW + KW;
  __m512 acc[PX];
  const __m512 b0 = _mm512_loadu_ps(bias);
#pragma GCC unroll 8
  for (int p = 0; p < PX; ++p) acc[p] = b0;
  __mmask16 masks[NX];
#pragma GCC unroll 32
  for (int q = 0; q < NX; ++q) masks[q] = iw0 + q >= 0 && iw0 + q < W ? tail : (__mmask16)0;
  for (int64_t i = ilo; i < ihi; ++i) {
    const float* xr = xb + ((ih0 + i * dh) * W + iw0) * C;
    const float* wrow = wt + i * KW * wstride;
    __m512 xw[NX];
#pragma GCC unroll 32
    for (int q = 0; q < NX; ++q) xw[q] = _mm512_maskz_loadu_ps(masks[q], xr + q * C);
#pragma GCC unroll 8
    for (int j = 0; j < KW; ++j) {
      const __m512 w = _mm512_loadu_ps(wrow + j * wstride);
#pragma GCC unroll 8
      for (int p = 0; p < PX; ++p) acc[p] = _mm512_fmadd_ps(xw[p * SW + j], w, acc[p]);
    }
  }
#pragma GCC unroll 8
  for (int p = 0; p < PX; ++p) _mm512_mask_storeu_ps(op + p * C, tail, acc[p]);
}

// The row's last Wo % PX pixels, as one block of that many.
template <int KW, int SW, int P>
inline void dw_tail_window(int64_t rest, int64_t W, int64_t C, const float* xb, const float* wt, int64_t wstride,
                           int64_t ilo, int64_t ihi, int64_t ih0, int64_t iw0, int64_t dh, const float* bias,
                           __mmask16 tail, float* op) {
  if constexpr (P > 0) {
    if (rest == P)
      dw_pixels_window<P, KW, SW>(xb, W, C, wt, wstride, ilo, ihi, ih0, iw0, dh, bias, tail, op);
    else
      dw_tail_window<KW, SW, P - 1>(rest, W, C, xb, wt, wstride, ilo, ihi, ih0, iw0, dh, bias, tail, op);
  }
}

// 8 pixels at a time: 8 accumulators and up to 19 window vectors stay in the 32 registers.
template <int KW, int SW>
void dw_row_window(int64_t W, int64_t C, int64_t Wo, int64_t pw, const float* xb, const float* wt, int64_t wstride,
                   int64_t ilo, int64_t ihi, int64_t ih0, int64_t dh, const float* bias, __mmask16 tail, float* orow) {
  constexpr int PX = 8;
  int64_t ow = 0;
  for (; ow + PX <= Wo; ow += PX)
    dw_pixels_window<PX, KW, SW>(xb, W, C, wt, wstride, ilo, ihi, ih0, ow * SW - pw, dh, bias, tail, orow + ow * C);
  dw_tail_window<KW, SW, PX - 1>(Wo - ow, W, C, xb, wt, wstride, ilo, ihi, ih0, ow * SW - pw, dh, bias, tail,
                                 orow + ow * C);
}

// One output row of one 16-channel vector (wt: its taps, tap stride wstride).
void dw_row(const DwGeom& g, const float* xb, const float* wt, int64_t wstride, const float* bias, __mmask16 tail,
            int64_t oh, float* orow) {
  const auto [ih0, ilo, ihi] = tap_rows(g, oh);
  const int64_t C = g.C;
  if (window_shape(g)) {
    const auto row = g.sw == 1 ? (g.kw == 5 ? dw_row_window<5, 1> : dw_row_window<3, 1>)
                               : (g.kw == 5 ? dw_row_window<5, 2> : dw_row_window<3, 2>);
    row(g.W, C, g.Wo, g.pw, xb, wt, wstride, ilo, ihi, ih0, g.dh, bias, tail, orow);
    return;
  }
  auto edge = [&](int64_t ow) {
    const int64_t iw0 = ow * g.sw - g.pw;
    int64_t jlo = 0, jhi = g.kw;
    while (jlo < g.kw && iw0 + jlo * g.dw < 0) ++jlo;
    while (jhi > jlo && iw0 + (jhi - 1) * g.dw >= g.W) --jhi;
    dw_pixels<1>(xb, g.W, C, wt, wstride, g.kw, ilo, ihi, jlo, jhi, ih0, iw0, g.sw, g.dh, g.dw, bias, tail,
                 orow + ow * C);
  };
  for (int64_t ow = 0; ow < g.owa; ++ow) edge(ow);
  int64_t ow = g.owa;
  for (; ow + 8 <= g.owb; ow += 8)
    dw_pixels<8>(xb, g.W, C, wt, wstride, g.kw, ilo, ihi, 0, g.kw, ih0, ow * g.sw - g.pw, g.sw, g.dh, g.dw, bias,
                 tail, orow + ow * C);
  for (; ow < g.owb; ++ow)
    dw_pixels<1>(xb, g.W, C, wt, wstride, g.kw, ilo, ihi, 0, g.kw, ih0, ow * g.sw - g.pw, g.sw, g.dh, g.dw, bias,
                 tail, orow + ow * C);
  for (ow = std::max(g.owb, g.owa); ow < g.Wo; ++ow) edge(ow);
}
#endif

#if FUSED_AVX2
// The AVX2 kernel, for any taps, stride and dilation, either layout. The item's block is copied
// into a scratch of 8-channel planes, each with its zero padding written out ((H + 2ph) x Wp
// pixels of 8 floats), so every tap of every output pixel is an in-bounds load that needs no mask
// and that the FMA takes as its memory operand. That frees the registers for PX accumulators
// (PX + 1 in use): a sliding window over unpadded input, whose window vectors held the other
// registers, had 4, each FMA waiting on the one before it, and masked loads at every border; the
// depthwise layers of EfficientNet-B0, batch 1 to 32, NCHW and channels-last, took 0.44-0.88x its
// time (an AVX2 EPYC). A plane per vector is contiguous: with pixels kDwBlock floats apart, one
// vector's lines fell in one L1 set in four, and a padded 14x14 plane no longer stayed in L1.
struct DwPadded {
  int64_t Hp, Wp, px;  // px: output pixels a block computes, 7 where it divides the row (7..112)
  // The last block of a row may run past it, into the next row's first pixels (computed again,
  // correctly, right after) or, in the last row, into slack past the plane.
  int64_t in_plane, out_plane;  // floats from one 8-channel plane to the next, slack included
  std::vector<int64_t> pixel;   // where input pixel h * W + w starts in a plane
};

DwPadded dw_padded(const DwGeom& g) {
  DwPadded pad{g.H + 2 * g.ph, g.W + 2 * g.pw, g.Wo % 7 == 0 ? 7 : g.Wo >= 8 ? 8 : 4, 0, 0, {}};
  pad.in_plane = (pad.Hp * pad.Wp + pad.px * g.sw) * 8;
  pad.out_plane = (g.Ho * g.Wo + pad.px) * 8;
  pad.pixel.reserve(g.H * g.W);
  for (int64_t h = 0; h < g.H; ++h)
    for (int64_t w = 0; w < g.W; ++w) pad.pixel.push_back(((h + g.ph) * pad.Wp + w + g.pw) * 8);
  return pad;
}

// `cols` planes of H x W floats (H*W apart) into the interiors of the padded planes: pixel (h, w)
// of channel c at row h + ph, column w + pw of plane c / 8, lane c % 8.
void transpose_into_padding(const float* src, int64_t cols, const DwGeom& g, const DwPadded& pad, float* dst) {
  const int64_t HW = g.H * g.W;
  const int64_t* const pixel = pad.pixel.data();
  int64_t i0 = 0;
  for (; i0 + 8 <= cols; i0 += 8) {
    float* const plane = dst + i0 / 8 * pad.in_plane;
    int64_t q0 = 0;
    for (; q0 + 8 <= HW; q0 += 8) transpose8(src + i0 * HW + q0, HW, [&](int k) { return plane + pixel[q0 + k]; });
    for (int64_t q = q0; q < HW; ++q)
      for (int64_t i = 0; i < 8; ++i) plane[pixel[q] + i] = src[(i0 + i) * HW + q];
  }
  for (int64_t i = i0; i < cols; ++i)
    for (int64_t q = 0; q < HW; ++q) dst[i0 / 8 * pad.in_plane + pixel[q] + i - i0] = src[i * HW + q];
}

// The same from a channels-last block (pixels `stride` floats apart).
void gather_into_padding(const float* src, int64_t stride, int64_t cols, const DwGeom& g, const DwPadded& pad,
                         float* dst) {
  for (int64_t v = 0; v < cols; v += 8) {
    float* const plane = dst + v / 8 * pad.in_plane;
    const int64_t width = std::min<int64_t>(8, cols - v);
    for (int64_t q = 0; q < g.H * g.W; ++q) {
      if (width == 8)
        _mm256_storeu_ps(plane + pad.pixel[q], _mm256_loadu_ps(src + q * stride + v));
      else
        std::copy_n(src + q * stride + v, width, plane + pad.pixel[q]);
    }
  }
}

// The output planes (pad.out_plane apart) back into the item's block of the output, in x's layout.
void planes_to_output(const float* planes, int64_t cols, const DwGeom& g, const DwPadded& pad, bool planar,
                      float* dst, int64_t stride) {
  const int64_t HWo = g.Ho * g.Wo;
  for (int64_t v = 0; v < cols; v += 8) {
    const float* const plane = planes + v / 8 * pad.out_plane;
    const int64_t width = std::min<int64_t>(8, cols - v);
    if (planar) {
      transpose(plane, 8, HWo, width, dst + v * HWo, HWo);
      continue;
    }
    for (int64_t q = 0; q < HWo; ++q) {
      if (width == 8)
        _mm256_storeu_ps(dst + q * stride + v, _mm256_loadu_ps(plane + q * 8));
      else
        std::copy_n(plane + q * 8, width, dst + q * stride + v);
    }
  }
}

// The padding and the slack of every plane, zeroed once per call and thread: items write only
// the interiors.
void zero_padding(const DwGeom& g, const DwPadded& pad, float* dst) {
  for (int64_t v = 0; v < kDwBlock / 8; ++v) {
    float* const plane = dst + v * pad.in_plane;
    const auto zero = [&](int64_t first, int64_t count) { std::fill_n(plane + first * 8, count * 8, 0.f); };
    zero(0, g.ph * pad.Wp);
    for (int64_t h = g.ph; h < g.ph + g.H; ++h) {
      zero(h * pad.Wp, g.pw);
      zero(h * pad.Wp + g.pw + g.W, pad.Wp - g.pw - g.W);
    }
    zero((g.ph + g.H) * pad.Wp, pad.in_plane / 8 - (g.ph + g.H) * pad.Wp);
  }
}

// out: 8-channel planes of Ho x Wo pixels, pad.out_plane apart. SW: the stride where it is 1 or 2,
// 0 for g.sw.
template <int PX, int SW>
void dw_plane_padded_avx2(const DwGeom& g, const DwPadded& pad, const float* xpad, const float* taps,
                          const float* bias, int64_t cols, float* out) {
  const int64_t step = (SW ? SW : g.sw) * 8, row = pad.Wp * 8;
  for (int64_t v = 0; v < cols; v += 8) {
    const __m256 b0 = _mm256_loadu_ps(bias + v);
    const float* const xv = xpad + v / 8 * pad.in_plane;
    float* const ov = out + v / 8 * pad.out_plane;
    for (int64_t oh = 0; oh < g.Ho; ++oh) {
      const float* const xrow = xv + oh * g.sh * row;
      float* const orow = ov + oh * g.Wo * 8;
      for (int64_t ow = 0; ow < g.Wo; ow += PX) {
        __m256 acc[PX];
#pragma GCC unroll 8
        for (int p = 0; p < PX; ++p) acc[p] = b0;
        for (int64_t i = 0; i < g.kh; ++i) {
          const float* const xr = xrow + i * g.dh * row + ow * step;
          const float* const wr = taps + i * g.kw * kDwBlock + v;
          for (int64_t j = 0; j < g.kw; ++j) {
            const __m256 w = _mm256_loadu_ps(wr + j * kDwBlock);
            const float* const xq = xr + j * g.dw * 8;
#pragma GCC unroll 8
            for (int p = 0; p < PX; ++p) acc[p] = _mm256_fmadd_ps(_mm256_loadu_ps(xq + p * step), w, acc[p]);
          }
        }
#pragma GCC unroll 8
        for (int p = 0; p < PX; ++p) _mm256_storeu_ps(orow + (ow + p) * 8, acc[p]);
      }
    }
  }
}

template <int PX>
void dw_plane_padded_px(const DwGeom& g, const DwPadded& pad, const float* xpad, const float* taps, const float* bias,
                        int64_t cols, float* out) {
  const auto plane = g.sw == 1 ? dw_plane_padded_avx2<PX, 1> : g.sw == 2 ? dw_plane_padded_avx2<PX, 2>
                                                                          : dw_plane_padded_avx2<PX, 0>;
  plane(g, pad, xpad, taps, bias, cols, out);
}

void dw_plane_padded(const DwGeom& g, const DwPadded& pad, const float* xpad, const float* taps, const float* bias,
                     int64_t cols, float* out) {
  const auto plane = pad.px == 7 ? dw_plane_padded_px<7> : pad.px == 8 ? dw_plane_padded_px<8> : dw_plane_padded_px<4>;
  plane(g, pad, xpad, taps, bias, cols, out);
}
#endif

#if !FUSED_AVX512 && !FUSED_AVX2
// Any taps, stride and dilation, one pixel at a time: the portable kernel.
void dw_plane_portable(const DwGeom& g, const float* xb, const float* wt, const float* bias, int64_t cols, float* ob) {
  const int64_t cs = g.C;
  for (int64_t oh = 0; oh < g.Ho; ++oh) {
    float* orow = ob + oh * g.Wo * cs;
    for (int64_t ow = 0; ow < g.Wo; ++ow) {
      float acc[kDwBlock];
      for (int64_t c = 0; c < cols; ++c) acc[c] = bias[c];
      for (int64_t i = 0; i < g.kh; ++i) {
        const int64_t ih = oh * g.sh - g.ph + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t j = 0; j < g.kw; ++j) {
          const int64_t iw = ow * g.sw - g.pw + j * g.dw;
          if (iw < 0 || iw >= g.W) continue;
          const float* xq = xb + (ih * g.W + iw) * cs;
          const float* wq = wt + (i * g.kw + j) * kDwBlock;
          for (int64_t c = 0; c < cols; ++c) acc[c] += xq[c] * wq[c];
        }
      }
      for (int64_t c = 0; c < cols; ++c) orow[ow * cs + c] = acc[c];
    }
  }
}
#endif

// Channel blocks of the depthwise kernels, whose items are (example, block), example-major: the
// multiple of 16 channels, at most kDwBlock, whose items at::parallel_for's contiguous shares
// spread most evenly over the threads (the largest of equals). At batch 1, blocks of 64 gave
// one of two threads all of a 32-channel layer, and 128 of 144 channels (64 + 64 | 16).
// With a whole number of examples per thread any size is even.
struct DwBlocks {
  int64_t count, size;
};

DwBlocks dw_blocks(int64_t C, int64_t B) {
  const int64_t threads = at::get_num_threads();
  const auto blocks_of = [C](int64_t size) { return DwBlocks{(C + size - 1) / size, size}; };
  if (B % threads == 0) return blocks_of(kDwBlock);
  DwBlocks best = blocks_of(kDwBlock);
  int64_t best_load = INT64_MAX;
  for (int64_t size = kDwBlock; size >= 16; size -= 16) {
    const DwBlocks blocks = blocks_of(size);
    const int64_t items = B * blocks.count, share = (items + threads - 1) / threads;
    int64_t load = 0;
    for (int64_t first = 0; first < items; first += share) {
      int64_t channels = 0;
      for (int64_t it = first; it < std::min(items, first + share); ++it)
        channels += std::min(size, C - it % blocks.count * size);
      load = std::max(load, channels);
    }
    if (load < best_load) {
      best = blocks;
      best_load = load;
    }
  }
  return best;
}

// x: (B, H, W, C) channels-last, or (B, C, H, W) when `planar`; the output in the same layout.
at::Tensor dw_forward(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& alpha,
                      const c10::optional<at::Tensor>& bias_mix, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                      int64_t ph, int64_t pw, int64_t dh, int64_t dw, bool planar) {
  check_f32(x, "x");
  check_f32(wp, "packed weight");
  check_f32(alpha, "alpha");
  TORCH_CHECK(x.dim() == 4 && wp.dim() == 3 && alpha.dim() == 2, "dw_forward: bad ranks");
  const int64_t B = x.size(0), C = x.size(planar ? 1 : 3), H = x.size(planar ? 2 : 1), W = x.size(planar ? 3 : 2);
  const int64_t E = wp.size(0), T = kh * kw;
  TORCH_CHECK(wp.size(1) == T && wp.size(2) == C && alpha.size(0) == B && alpha.size(1) == E,
              "dw_forward: shape mismatch");
  const int64_t Ho = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t Wo = (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(Ho > 0 && Wo > 0, "dw_forward: empty output");
  const float* bias_p = bias_of(bias_mix, B * C, "dw_forward");
  auto out = planar ? at::empty({B, C, Ho, Wo}, x.options()) : at::empty({B, Ho, Wo, C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wpp = wp.data_ptr<float>();
  const float* ap = alpha.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const DwBlocks blocks = dw_blocks(C, B);
  // Planar blocks are computed in channels-last scratch whose channel stride is the block's.
  DwGeom g{H, W, planar ? kDwBlock : C, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo, 0, Wo};
  while (g.owa < Wo && g.owa * sw - pw < 0) ++g.owa;
  while (g.owb > g.owa && (g.owb - 1) * sw - pw + (kw - 1) * dw >= W) --g.owb;
#if FUSED_AVX2
  const DwPadded pad = dw_padded(g);
#endif
  at::parallel_for(0, B * blocks.count, 1, [&](int64_t begin, int64_t end) {
    // Mixed taps of up to kGroup examples of one channel block, zero-padded so loads need no mask.
    std::vector<float> wt(std::min<int64_t>(kGroup, B) * T * kDwBlock, 0.f), bias(kDwBlock, 0.f);
#if FUSED_AVX2
    float* const x_planes = thread_scratch<float, 0>(kDwBlock / 8 * pad.in_plane);
    float* const out_planes = thread_scratch<float, 1>(kDwBlock / 8 * pad.out_plane);
    zero_padding(g, pad, x_planes);
#else
    float* const x_cl = thread_scratch<float, 0>(planar ? H * W * kDwBlock : 0);
    float* const out_cl = thread_scratch<float, 1>(planar ? Ho * Wo * kDwBlock : 0);
#endif
    // The share's items go block by block, its examples in groups of kGroup that one pass over the
    // block's experts mixes together (mix_group: each expert vector loaded feeds kGroup FMAs). Item
    // by item, at batch 8 the 7x7 layers and the stride-2 one took 1.03-1.12x the time (two A/B runs
    // on an AVX2 EPYC; 14x14 at stride 1, where mixing is 8/196 of the work, 1.00-1.04x).
    const int64_t nb = blocks.count;
    for (int64_t blk = 0; blk < nb; ++blk) {
      const int64_t c0 = blk * blocks.size, cols = std::min(blocks.size, C - c0);
      // The examples whose item (b, blk) = b * nb + blk lies in [begin, end): a contiguous run.
      const int64_t b_lo = begin > blk ? (begin - blk + nb - 1) / nb : 0;
      const int64_t b_hi = end - 1 >= blk ? (end - 1 - blk) / nb : -1;
      for (int64_t b0 = b_lo; b0 <= b_hi; b0 += kGroup) {
        const int G = (int)std::min<int64_t>(kGroup, b_hi + 1 - b0);
        for (int64_t t = 0; t < T; ++t) {
          float* dst[kGroup];
          for (int i = 0; i < G; ++i) dst[i] = wt.data() + (i * T + t) * kDwBlock;
          mix_group(E, G, ap + b0 * E, E, wpp + t * C + c0, T * C, cols, dst);
        }
        for (int i = 0; i < G; ++i) {
          const int64_t b = b0 + i;
          const float* const taps = wt.data() + i * T * kDwBlock;
          for (int64_t c = 0; c < cols; ++c) bias[c] = bias_p ? bias_p[b * C + c0 + c] : 0.f;
          const float* xb = xp + b * H * W * C + c0;
          float* ob = op + b * Ho * Wo * C + c0;
#if FUSED_AVX2
          if (planar)
            transpose_into_padding(xp + (b * C + c0) * H * W, cols, g, pad, x_planes);
          else
            gather_into_padding(xb, C, cols, g, pad, x_planes);
          dw_plane_padded(g, pad, x_planes, taps, bias.data(), cols, out_planes);
          planes_to_output(out_planes, cols, g, pad, planar, planar ? op + (b * C + c0) * Ho * Wo : ob, C);
#else
          if (planar) {
            transpose(xp + (b * C + c0) * H * W, H * W, cols, H * W, x_cl, kDwBlock);
            xb = x_cl;
            ob = out_cl;
          }
#if FUSED_AVX512
          for (int64_t v = 0; v < cols; v += 16) {
            const __mmask16 tail = tail_mask(std::min<int64_t>(16, cols - v));
            for (int64_t oh = 0; oh < Ho; ++oh)
              dw_row(g, xb + v, taps + v, kDwBlock, bias.data() + v, tail, oh, ob + oh * Wo * g.C + v);
          }
#else
          dw_plane_portable(g, xb, taps, bias.data(), cols, ob);
#endif
          if (planar) transpose(out_cl, kDwBlock, Ho * Wo, cols, op + (b * C + c0) * Ho * Wo, Ho * Wo);
#endif
        }
      }
    }
  });
  return out;
}

// The (example b, channels c0..c0+cols) block of a channels-last (B, HW, C) tensor in place, or of
// a planar (B, C, HW) one transposed into `scratch` (HW x kDwBlock); `stride` gets its pixel stride.
const float* channels_last_block(const float* base, int64_t b, int64_t c0, int64_t cols, int64_t C, int64_t HW,
                                 bool planar, float* scratch, int64_t& stride) {
  if (!planar) {
    stride = C;
    return base + b * HW * C + c0;
  }
  transpose(base + (b * C + c0) * HW, HW, cols, HW, scratch, kDwBlock);
  stride = kDwBlock;
  return scratch;
}

// ---------------------------------------------------------------------------------------------
// Depthwise backward: the per-example kernel gradients G[b, c, i*kw + j] =
//   sum over (oh, ow) of g[b, c, oh, ow] * x[b, c, oh*sh - ph + i*dh, ow*sw - pw + j*dw],
// from which grad_W = alpha^T G and grad_alpha = G W are two small GEMMs. ATen computes this as
// the weight gradient of the batch-as-groups convolution, which for 5x5 taps took 30-40x the
// forward convolution here (a 672-channel 14x14 layer at batch 8: 17.8 ms against 0.45 ms).
// Each work item (example, 64-channel block) keeps its k*k tap sums in registers while it
// streams the output gradient once; its input is copied into a zero-padded channels-last
// scratch first, 16 channels at a time, so that no tap needs a bounds check.

#if FUSED_AVX512
// One 16-channel vector: xpad is (Hp, Wp, 16), acc receives the KH*KW tap sums.
template <int KH, int KW>
void dw_grad_vector(const float* xpad, int64_t Wp, const float* gb, int64_t gs, int64_t Ho, int64_t Wo, int64_t sh,
                    int64_t sw, int64_t dh, int64_t dw, __mmask16 tail, float* acc_out) {
  __m512 acc[KH * KW];
#pragma GCC unroll 64
  for (int t = 0; t < KH * KW; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t oh = 0; oh < Ho; ++oh) {
    const float* xrow = xpad + oh * sh * Wp * 16;
    const float* grow = gb + oh * Wo * gs;
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const __m512 gv = _mm512_maskz_loadu_ps(tail, grow + ow * gs);
      const float* xq = xrow + ow * sw * 16;
#pragma GCC unroll 8
      for (int i = 0; i < KH; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j)
          acc[i * KW + j] = _mm512_fmadd_ps(gv, _mm512_loadu_ps(xq + (i * dh * Wp + j * dw) * 16), acc[i * KW + j]);
    }
  }
#pragma GCC unroll 64
  for (int t = 0; t < KH * KW; ++t) _mm512_storeu_ps(acc_out + t * 16, acc[t]);
}

// Any other kernel size: the tap sums live in L1 instead of registers.
void dw_grad_vector_any(int64_t kh, int64_t kw, const float* xpad, int64_t Wp, const float* gb, int64_t gs,
                        int64_t Ho, int64_t Wo, int64_t sh, int64_t sw, int64_t dh, int64_t dw, __mmask16 tail,
                        float* acc_out) {
  std::fill(acc_out, acc_out + kh * kw * 16, 0.f);
  for (int64_t oh = 0; oh < Ho; ++oh)
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const __m512 gv = _mm512_maskz_loadu_ps(tail, gb + (oh * Wo + ow) * gs);
      const float* xq = xpad + (oh * sh * Wp + ow * sw) * 16;
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) {
          float* a = acc_out + (i * kw + j) * 16;
          _mm512_storeu_ps(a, _mm512_fmadd_ps(gv, _mm512_loadu_ps(xq + (i * dh * Wp + j * dw) * 16), _mm512_loadu_ps(a)));
        }
    }
}
#endif

// x and grad: channels-last (B, H, W, C) and (B, Ho, Wo, C), or both NCHW when `planar`.
// Returns G (B, C, kh*kw), float32.
at::Tensor dw_kernel_grad(const at::Tensor& x, const at::Tensor& grad, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                          int64_t ph, int64_t pw, int64_t dh, int64_t dw, bool planar) {
  check_f32(x, "x");
  check_f32(grad, "grad");
  TORCH_CHECK(x.dim() == 4 && grad.dim() == 4, "dw_kernel_grad: bad ranks");
  const int64_t B = x.size(0), C = x.size(planar ? 1 : 3), H = x.size(planar ? 2 : 1), W = x.size(planar ? 3 : 2);
  const int64_t Ho = grad.size(planar ? 2 : 1), Wo = grad.size(planar ? 3 : 2), T = kh * kw;
  TORCH_CHECK(grad.size(0) == B && grad.size(planar ? 1 : 3) == C, "dw_kernel_grad: shape mismatch");
  TORCH_CHECK(Ho == (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1 && Wo == (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1,
              "dw_kernel_grad: grad's size is not the convolution's output size");
  auto out = at::empty({B, C, T}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const DwBlocks blocks = dw_blocks(C, B);
  at::parallel_for(0, B * blocks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(T * kDwBlock);
    float* const x_cl = thread_scratch<float, 0>(planar ? H * W * kDwBlock : 0);
    float* const g_cl = thread_scratch<float, 1>(planar ? Ho * Wo * kDwBlock : 0);
#if FUSED_AVX512
    // Rows and columns the taps reach, zero where they fall in the padding.
    const int64_t Hp = (Ho - 1) * sh + (kh - 1) * dh + 1, Wp = (Wo - 1) * sw + (kw - 1) * dw + 1;
    float* const xpad = thread_scratch<float, 2>(Hp * Wp * 16);
#endif
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / blocks.count, c0 = it % blocks.count * blocks.size, cols = std::min(blocks.size, C - c0);
      int64_t cs;
      const float* xb = channels_last_block(xp, b, c0, cols, C, H * W, planar, x_cl, cs);
      const float* gb = channels_last_block(gp, b, c0, cols, C, Ho * Wo, planar, g_cl, cs);
#if FUSED_AVX512
      for (int64_t v = 0; v < cols; v += 16) {
        const __mmask16 tail = tail_mask(std::min<int64_t>(16, cols - v));
        for (int64_t r = 0; r < Hp; ++r) {
          const int64_t ih = r - ph;
          for (int64_t q = 0; q < Wp; ++q) {
            const int64_t iw = q - pw;
            const bool inside = ih >= 0 && ih < H && iw >= 0 && iw < W;
            _mm512_storeu_ps(xpad + (r * Wp + q) * 16,
                             inside ? _mm512_maskz_loadu_ps(tail, xb + (ih * W + iw) * cs + v) : _mm512_setzero_ps());
          }
        }
        float* acc = sums.data() + v * T;  // (T, 16) for this vector
        if (kh == 3 && kw == 3)
          dw_grad_vector<3, 3>(xpad, Wp, gb + v, cs, Ho, Wo, sh, sw, dh, dw, tail, acc);
        else if (kh == 5 && kw == 5)
          dw_grad_vector<5, 5>(xpad, Wp, gb + v, cs, Ho, Wo, sh, sw, dh, dw, tail, acc);
        else
          dw_grad_vector_any(kh, kw, xpad, Wp, gb + v, cs, Ho, Wo, sh, sw, dh, dw, tail, acc);
      }
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t t = 0; t < T; ++t) op[(b * C + c0 + c) * T + t] = sums[(c / 16 * T + t) * 16 + c % 16];
#else
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t ih = oh * sh - ph + i * dh;
          if (ih < 0 || ih >= H) continue;
          for (int64_t ow = 0; ow < Wo; ++ow)
            for (int64_t j = 0; j < kw; ++j) {
              const int64_t iw = ow * sw - pw + j * dw;
              if (iw < 0 || iw >= W) continue;
              const float* gq = gb + (oh * Wo + ow) * cs;
              const float* xq = xb + (ih * W + iw) * cs;
              float* a = sums.data() + (i * kw + j) * kDwBlock;
              for (int64_t c = 0; c < cols; ++c) a[c] += gq[c] * xq[c];
            }
        }
      for (int64_t c = 0; c < cols; ++c)
        for (int64_t t = 0; t < T; ++t) op[(b * C + c0 + c) * T + t] = sums[t * kDwBlock + c];
#endif
    }
  });
  return out;
}

// Depthwise backward, grad_x of any stride: each output gradient pixel is scattered through the
// example's mixed taps into a zero-padded channels-last scratch (a transposed convolution), then
// the image's part is copied out. (Stride-1 layers use the forward kernel on flipped taps
// instead.) ATen's input gradient of the batch-as-groups conv, used before, took 16x the static
// layer's at stride 2 (672 channels, 14x14, 5x5 taps, batch 8: 5.7 ms against 0.36 ms).
#if FUSED_AVX512
template <int KH, int KW>
void dw_scatter_vector(float* xpad, int64_t Wp, const float* gb, int64_t gs, int64_t Ho, int64_t Wo, int64_t sh,
                       int64_t sw, int64_t dh, int64_t dw, const float* wt, int64_t wstride, __mmask16 tail) {
  __m512 w[KH * KW];
#pragma GCC unroll 64
  for (int t = 0; t < KH * KW; ++t) w[t] = _mm512_loadu_ps(wt + t * wstride);
  for (int64_t oh = 0; oh < Ho; ++oh)
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const __m512 gv = _mm512_maskz_loadu_ps(tail, gb + (oh * Wo + ow) * gs);
      float* xq = xpad + (oh * sh * Wp + ow * sw) * 16;
#pragma GCC unroll 8
      for (int i = 0; i < KH; ++i)
#pragma GCC unroll 8
        for (int j = 0; j < KW; ++j) {
          float* p = xq + (i * dh * Wp + j * dw) * 16;
          _mm512_storeu_ps(p, _mm512_fmadd_ps(gv, w[i * KW + j], _mm512_loadu_ps(p)));
        }
    }
}

void dw_scatter_vector_any(int64_t kh, int64_t kw, float* xpad, int64_t Wp, const float* gb, int64_t gs, int64_t Ho,
                           int64_t Wo, int64_t sh, int64_t sw, int64_t dh, int64_t dw, const float* wt,
                           int64_t wstride, __mmask16 tail) {
  for (int64_t oh = 0; oh < Ho; ++oh)
    for (int64_t ow = 0; ow < Wo; ++ow) {
      const __m512 gv = _mm512_maskz_loadu_ps(tail, gb + (oh * Wo + ow) * gs);
      float* xq = xpad + (oh * sh * Wp + ow * sw) * 16;
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) {
          float* p = xq + (i * dh * Wp + j * dw) * 16;
          _mm512_storeu_ps(p, _mm512_fmadd_ps(gv, _mm512_loadu_ps(wt + (i * kw + j) * wstride), _mm512_loadu_ps(p)));
        }
    }
}
#endif

// grad: (B, Ho, Wo, C) channels-last or (B, C, Ho, Wo) when `planar`; wp, alpha as dw_forward's.
// Returns grad_x (B, H, W, C), or (B, C, H, W) when `planar`.
at::Tensor dw_input_grad(const at::Tensor& grad, const at::Tensor& wp, const at::Tensor& alpha, int64_t H, int64_t W,
                         int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh,
                         int64_t dw, bool planar) {
  check_f32(grad, "grad");
  check_f32(wp, "packed weight");
  check_f32(alpha, "alpha");
  TORCH_CHECK(grad.dim() == 4 && wp.dim() == 3 && alpha.dim() == 2, "dw_input_grad: bad ranks");
  const int64_t B = grad.size(0), C = grad.size(planar ? 1 : 3);
  const int64_t Ho = grad.size(planar ? 2 : 1), Wo = grad.size(planar ? 3 : 2);
  const int64_t E = wp.size(0), T = kh * kw;
  TORCH_CHECK(wp.size(1) == T && wp.size(2) == C && alpha.size(0) == B && alpha.size(1) == E,
              "dw_input_grad: shape mismatch");
  TORCH_CHECK(Ho == (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1 && Wo == (W + 2 * pw - dw * (kw - 1) - 1) / sw + 1,
              "dw_input_grad: grad's size is not the convolution's output size");
  auto out = planar ? at::empty({B, C, H, W}, grad.options()) : at::empty({B, H, W, C}, grad.options());
  const float* gp = grad.data_ptr<float>();
  const float* wpp = wp.data_ptr<float>();
  const float* ap = alpha.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const DwBlocks blocks = dw_blocks(C, B);
  // The scratch covers every position a tap reaches and the whole image, in padded coordinates.
  const int64_t Hp = std::max((Ho - 1) * sh + (kh - 1) * dh + 1, H + ph);
  const int64_t Wp = std::max((Wo - 1) * sw + (kw - 1) * dw + 1, W + pw);
  at::parallel_for(0, B * blocks.count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> wt(T * kDwBlock, 0.f);
    float* const g_cl = thread_scratch<float, 0>(planar ? Ho * Wo * kDwBlock : 0);
    float* const out_cl = thread_scratch<float, 1>(planar ? H * W * kDwBlock : 0);
    const int64_t xpad_size = Hp * Wp * (FUSED_AVX512 ? 16 : kDwBlock);
    float* const xpad = thread_scratch<float, 2>(xpad_size);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t b = it / blocks.count, c0 = it % blocks.count * blocks.size, cols = std::min(blocks.size, C - c0);
      for (int64_t t = 0; t < T; ++t) mix(E, ap + b * E, wpp + t * C + c0, T * C, cols, wt.data() + t * kDwBlock);
      int64_t cs;
      const float* gb = channels_last_block(gp, b, c0, cols, C, Ho * Wo, planar, g_cl, cs);
      float* ob = planar ? out_cl : op + b * H * W * C + c0;
#if FUSED_AVX512
      for (int64_t v = 0; v < cols; v += 16) {
        const __mmask16 tail = tail_mask(std::min<int64_t>(16, cols - v));
        std::fill_n(xpad, xpad_size, 0.f);
        if (kh == 3 && kw == 3)
          dw_scatter_vector<3, 3>(xpad, Wp, gb + v, cs, Ho, Wo, sh, sw, dh, dw, wt.data() + v, kDwBlock, tail);
        else if (kh == 5 && kw == 5)
          dw_scatter_vector<5, 5>(xpad, Wp, gb + v, cs, Ho, Wo, sh, sw, dh, dw, wt.data() + v, kDwBlock, tail);
        else
          dw_scatter_vector_any(kh, kw, xpad, Wp, gb + v, cs, Ho, Wo, sh, sw, dh, dw, wt.data() + v, kDwBlock,
                                tail);
        for (int64_t ih = 0; ih < H; ++ih)
          for (int64_t iw = 0; iw < W; ++iw)
            _mm512_mask_storeu_ps(ob + (ih * W + iw) * cs + v, tail,
                                  _mm512_loadu_ps(xpad + ((ih + ph) * Wp + iw + pw) * 16));
      }
#else
      std::fill_n(xpad, xpad_size, 0.f);
      for (int64_t oh = 0; oh < Ho; ++oh)
        for (int64_t ow = 0; ow < Wo; ++ow)
          for (int64_t i = 0; i < kh; ++i)
            for (int64_t j = 0; j < kw; ++j) {
              const float* gq = gb + (oh * Wo + ow) * cs;
              const float* wq = wt.data() + (i * kw + j) * kDwBlock;
              float* xq = xpad + ((oh * sh + i * dh) * Wp + ow * sw + j * dw) * kDwBlock;
              for (int64_t c = 0; c < cols; ++c) xq[c] += gq[c] * wq[c];
            }
      for (int64_t ih = 0; ih < H; ++ih)
        for (int64_t iw = 0; iw < W; ++iw)
          std::copy_n(xpad + ((ih + ph) * Wp + iw + pw) * kDwBlock, cols, ob + (ih * W + iw) * cs);
#endif
      if (planar) transpose(out_cl, kDwBlock, H * W, cols, op + (b * C + c0) * H * W, H * W);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("isa", &isa_name, "instruction set the kernels were compiled for");
  m.def("has_bf16", &has_bf16, "whether the bfloat16 kernels were built (AVX512-BF16)");
  m.def("pw_forward_cl_bf16", &pw_forward_cl_bf16, "fused 1x1 CondConv, channels-last, bfloat16");
  m.def("linear_forward_bf16", &linear_forward_bf16, "fused linear CondConv, bfloat16 in, fp32 out");
  m.def("pw_forward_nchw_bf16", &pw_forward_nchw_bf16, "fused 1x1 CondConv, NCHW, bfloat16");
  m.def("pw_forward_cl", &pw_forward_cl, "fused 1x1 CondConv, channels-last");
  m.def("linear_forward", &linear_forward, "fused linear CondConv (expert outputs, alpha in the epilogue)");
  m.def("pw_forward_nchw", &pw_forward_nchw, "fused 1x1 (or im2col) CondConv, NCHW");
  m.def("dw_forward", &dw_forward, "fused depthwise CondConv, channels-last or planar (NCHW)");
  m.def("dw_input_grad", &dw_input_grad, "depthwise CondConv input gradient, any stride");
  m.def("dw_kernel_grad", &dw_kernel_grad, "per-example depthwise kernel gradients (B, C, kh*kw)");
}
