// FlashAttention-style attention on the CPU: tiled forward with an online softmax, and the backward
// pass that recomputes the scores from the saved log-sum-exp (Dao et al., FlashAttention-2, 2023,
// Algorithms 1 and 2). The [Lq, Lk] score matrix is never materialised; one tile of it lives in a
// thread's scratch buffer at a time.
//
// Inputs are float32, bfloat16 or float16, read through their strides (the last dimension contiguous; the
// 16-bit dtypes are widened a block at a time, float16 by F16C in the vector builds): q [B, Hq, Lq, D],
// k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]; query head h reads key/value head h / (Hq / Hkv). Causal is
// bottom-right aligned: query i may attend key j iff j <= i + Lk - Lq.
// The optional mask is bool and broadcastable to [B, Hq, Lq, Lk] (1 to 4 dimensions, aligned at the right):
// it is read through its strides, a broadcast dimension with stride 0.
//
// The tile products go through this file's own register-blocked loops where they beat it (narrow heads,
// small tiles: see own_products), else through the BLAS sgemm that PyTorch itself links (MKL on x86
// wheels), found at load time through a weak symbol; when no such symbol exists the forward takes the
// own loops (the scalar build, and the backward, a plain loop).
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/csrc/utils/pybind.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (the C interface; torch's MKL exports it). Every product here is one tile
// of work that this file's own OpenMP loop already spreads over the cores, so each runs on its calling
// thread: left to itself, MKL threads a tile product called outside a parallel region (a short sequence,
// where this kernel runs on the caller's thread alone) and pays a wake-up of its pool each time, which on
// a 2-core machine took 0.3-3 ms for a [1, 2, 40, 16] call that needs 8 us.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));
// MKL's bfloat16 product with float32 results (torch's MKL exports it): on AMX (or AVX512_BF16) cores it
// multiplies bfloat16 tiles without widening them, 1.5-4x the speed of sgemm on decode and prefill tiles
// (Xeon with AMX: [8, 64] x [64, 128] 1.2 us against 1.7 us, [64, 64] x [64, 64] 1.1 against 4.2 us).
extern "C" void gemm_bf16bf16f32_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                                  const float* alpha, const uint16_t* a, const int* lda, const uint16_t* b,
                                  const int* ldb, const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {
// For one kernel call, MKL runs on its calling thread (inside this file's parallel regions it does so of
// itself: a BLAS call from an OpenMP worker is sequential). The calling thread's OpenMP thread count is
// put back as well: an at::parallel_for inside the scope (the decode kernel used to widen a bfloat16 query
// in one) left it at MKL's 1 after the restore, so that every later torch op and kernel of the caller's
// thread ran on one core (torch.get_num_threads() said 1).
struct SerialBlas {
  int previous = -1;
  int omp_threads = omp_get_max_threads();
  SerialBlas() {
    if (MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialBlas() {
    if (previous >= 0) MKL_Set_Num_Threads_Local(previous);
    if (omp_get_max_threads() != omp_threads) omp_set_num_threads(omp_threads);
  }
};
}  // namespace

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
std::atomic<bool> use_blas{true};  // tests switch it off to check the fallback loop
std::atomic<uint64_t> pack_token{0};  // a kernel call's token under which its AMX products reuse packed blocks

// Row-major C[M, N] = alpha * op(A)[M, K] . op(B)[K, N] + beta * C.
void gemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* A, int lda,
          const float* B, int ldb, float beta, float* C, int ldc) {
  if (M == 0 || N == 0) return;
  if (sgemm_ != nullptr && use_blas.load(std::memory_order_relaxed)) {
    // Column-major BLAS sees every row-major matrix transposed: C^T = op(B)^T . op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    sgemm_(&ta, &tb, &N, &M, &K, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
    return;
  }
  std::vector<float> row(N);
  for (int i = 0; i < M; ++i) {
    std::fill(row.begin(), row.end(), 0.0f);
    for (int p = 0; p < K; ++p) {
      const float a = trans_a ? A[(int64_t)p * lda + i] : A[(int64_t)i * lda + p];
      if (trans_b) {
        for (int j = 0; j < N; ++j) row[j] += a * B[(int64_t)j * ldb + p];
      } else {
        const float* b = B + (int64_t)p * ldb;
#pragma omp simd
        for (int j = 0; j < N; ++j) row[j] += a * b[j];
      }
    }
    float* c = C + (int64_t)i * ldc;
    for (int j = 0; j < N; ++j) c[j] = alpha * row[j] + (beta == 0.0f ? 0.0f : beta * c[j]);
  }
}

// -- AMX bfloat16 tile products --------------------------------------------------------------------------
//
// gemm16 on the AMX tile unit itself, where the CPU and the kernel allow it. MKL's gemm_bf16bf16f32 runs
// there too, but packs both operands into its own layout and sets up its kernel on every call, which at the
// attention kernels' sizes ([64, 64] x [64, 64]: 1.1 us, for about 0.2 us of tile arithmetic) is most of
// the product. Here B is packed straight into the tiles' pair-interleaved ("VNNI") layout, A is read in
// place where its rows fill whole tiles, and C is loaded and stored by the tiles where its rows and columns
// fill them. bfloat16 prefill L=64-512 then takes 0.8-1.0x SDPA's time, where MKL's products took 1.0-1.2x
// (Xeon with AMX). Products are exact and summed in float32 by the tile unit (which takes bfloat16
// subnormal inputs as zero, as MKL's AMX kernels do).
#if defined(__AVX512F__) && defined(__linux__)
#define SWITCHYARD_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>

std::atomic<bool> amx_wanted{true};  // tests switch it off to check MKL's product on the same CPU

// Whether this process may run AMX bfloat16 tiles: the CPU has them (CPUID.7.0:EDX AMX-BF16 and AMX-TILE),
// the OS saves their state (XCR0 bits 17 and 18), and Linux has granted this process the tile data
// (arch_prctl ARCH_REQ_XCOMP_PERM, which torch's oneDNN asks for as well; without it the first tile
// instruction raises SIGILL).
bool amx_usable() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    if (!(d & (1u << 22)) || !(d & (1u << 24))) return false;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return false;  // OSXSAVE, for xgetbv
    unsigned lo = 0, hi = 0;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & (3u << 17)) != (3u << 17)) return false;
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}
bool amx_on() { return amx_wanted.load(std::memory_order_relaxed) && amx_usable(); }
constexpr int kAmxMinRows = 8;  // gemm16 takes the tiles from this many rows of A

// Scratch of one thread's products: B packed, A padded, the tile results.
// b[0] holds the last B packed as B^T (k^T), b[1] the last as B (v), each with what it was packed from: a
// product with the same nonzero `reuse` token (one kernel call's: its inputs do not change during it) and
// the same B takes it as it is (the query heads of one GQA group share their key and value blocks).
struct AmxPacked {
  std::vector<uint32_t> data;
  uint64_t reuse = 0;
  const uint16_t* from = nullptr;
  int ldb = 0, N = 0, K = 0;
};
struct AmxScratch {
  AmxPacked b[2];
  std::vector<uint16_t> a;
  std::vector<float> c;
};
thread_local AmxScratch amx_scratch;

// x[i][j] <- x[j][i] for a 16 x 16 block of 32-bit words: pairs of rows interleaved by 32 and then 64 bits,
// then 128-bit lanes gathered across rows four and eight apart.
__attribute__((target("avx512f,avx512bw")))
inline void transpose16(__m512i (&x)[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    x[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    x[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    x[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    x[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  // x[4a + c] now holds, in 128-bit lane L, column 4L + c of rows 4a .. 4a + 3
  for (int c = 0; c < 4; ++c) {
    for (int h = 0; h < 2; ++h) {
      // lanes 0, 2 (h = 0) or 1, 3 (h = 1) of rows-groups (0, 1) and (2, 3)
      t[c * 4 + h] = _mm512_shuffle_i32x4(x[c], x[4 + c], h == 0 ? 0x88 : 0xDD);
      t[c * 4 + 2 + h] = _mm512_shuffle_i32x4(x[8 + c], x[12 + c], h == 0 ? 0x88 : 0xDD);
    }
  }
  for (int c = 0; c < 4; ++c) {
    // t[4c]: [g0 L0, g0 L2, g1 L0, g1 L2]; t[4c + 2]: the same of g2, g3
    x[c] = _mm512_shuffle_i32x4(t[4 * c], t[4 * c + 2], 0x88);          // lane 0 of g0..g3: column c
    x[8 + c] = _mm512_shuffle_i32x4(t[4 * c], t[4 * c + 2], 0xDD);      // lane 2: column 8 + c
    x[4 + c] = _mm512_shuffle_i32x4(t[4 * c + 1], t[4 * c + 3], 0x88);  // lane 1: column 4 + c
    x[12 + c] = _mm512_shuffle_i32x4(t[4 * c + 1], t[4 * c + 3], 0xDD); // lane 3: column 12 + c
  }
}

// op(B) [K, N] packed in pairs of its rows: dst[r][n] = (op(B)[2r][n], op(B)[2r + 1][n]), r < Kp / 2 and
// n < Np, zero past K and N. trans_b: op(B) = B^T, B [N, K] (the pair is then two adjacent elements of a
// row of B: a transpose of 32-bit words).
__attribute__((target("avx512f,avx512bw")))
void amx_pack_b(bool trans_b, int N, int K, const uint16_t* B, int ldb, int Np, int Kp, uint32_t* dst) {
  const int K2 = K / 2;  // whole pairs
  if (trans_b) {
    // 16 x 16 blocks of 32-bit words (16 rows of B, 16 pairs each), transposed in registers
    for (int r0 = 0; r0 < Kp / 2; r0 += 16) {
      const int w = std::max(0, std::min(16, K2 - r0));  // whole pairs in this block
      const bool half = (K & 1) != 0 && K2 - r0 >= 0 && K2 - r0 < 16;  // and the odd last element
      const __mmask32 m16 = (__mmask32)((1ull << (2 * w + (half ? 1 : 0))) - 1ull);
      for (int n0 = 0; n0 < Np; n0 += 16) {
        __m512i x[16];
        for (int j = 0; j < 16; ++j)
          x[j] = n0 + j < N ? _mm512_maskz_loadu_epi16(m16, B + (int64_t)(n0 + j) * ldb + 2 * r0) : _mm512_setzero_si512();
        transpose16(x);
        for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + (int64_t)(r0 + i) * Np + n0, x[i]);
      }
    }
    return;
  }
  // op(B) = B [K, N]: two rows' elements interleaved, 16 columns at a time
  const __m512i lo_idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                          6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  for (int r = 0; r < Kp / 2; ++r) {
    const int k = 2 * r;
    const uint16_t* b0 = k < K ? B + (int64_t)k * ldb : nullptr;
    const uint16_t* b1 = k + 1 < K ? B + (int64_t)(k + 1) * ldb : nullptr;
    uint32_t* d = dst + (int64_t)r * Np;
    for (int n0 = 0; n0 < Np; n0 += 16) {
      const int w = std::max(0, std::min(16, N - n0));
      const __mmask16 m = (__mmask16)((1u << w) - 1u);
      const __m256i x0 = b0 ? _mm256_maskz_loadu_epi16(m, b0 + n0) : _mm256_setzero_si256();
      const __m256i x1 = b1 ? _mm256_maskz_loadu_epi16(m, b1 + n0) : _mm256_setzero_si256();
      const __m512i v = _mm512_permutex2var_epi16(_mm512_castsi256_si512(x0), lo_idx, _mm512_castsi256_si512(x1));
      _mm512_storeu_si512(d + n0, v);
    }
  }
}

// The tile configuration: every tile 16 rows of 64 bytes (A: 16 x 32 bfloat16; B: 16 pairs of rows x 16
// columns; C: 16 x 16 float32). Loaded at every product, since oneDNN's kernels (SDPA's, a matmul's) may
// have loaded their own on this thread since.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};
__attribute__((target("amx-tile")))
inline void load_tile_config() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}

// Row-major C = alpha * A . op(B) + beta * C (as gemm16) on the tiles: C[0-3] hold a 32 x 32 block of the
// result, A[4-5] and B[6-7] its operands, K in steps of 32.
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))
void amx_gemm16(bool trans_b, int M, int N, int K, float alpha, const uint16_t* A, int lda, const uint16_t* B,
                int ldb, float beta, float* C, int ldc, uint64_t reuse) {
  const int Mp = (M + 15) / 16 * 16, Np = (N + 15) / 16 * 16, Kp = (K + 31) / 32 * 32;
  AmxScratch& s = amx_scratch;
  AmxPacked& packed = s.b[trans_b ? 0 : 1];
  if (s.c.size() < size_t(Mp) * Np) s.c.resize(size_t(Mp) * Np);
  if (reuse == 0 || packed.reuse != reuse || packed.from != B || packed.ldb != ldb || packed.N != N || packed.K != K) {
    if (packed.data.size() < size_t(Kp / 2) * Np) packed.data.resize(size_t(Kp / 2) * Np);
    amx_pack_b(trans_b, N, K, B, ldb, Np, Kp, packed.data.data());
    packed.reuse = reuse, packed.from = B, packed.ldb = ldb, packed.N = N, packed.K = K;
  }
  // A in place when its rows fill whole tiles; else copied into zeros (a tile reads all 16 rows and 32
  // columns, and a garbage column times B's zero pad could be inf * 0)
  const uint16_t* a = A;
  int64_t sa = lda;
  if (M != Mp || K != Kp) {
    if (s.a.size() < size_t(Mp) * Kp) s.a.resize(size_t(Mp) * Kp);
    for (int i = 0; i < Mp; ++i) {
      uint16_t* d = s.a.data() + (int64_t)i * Kp;
      if (i < M) {
        std::memcpy(d, A + (int64_t)i * lda, sizeof(uint16_t) * K);
        std::memset(d + K, 0, sizeof(uint16_t) * (Kp - K));
      } else {
        std::memset(d, 0, sizeof(uint16_t) * Kp);
      }
    }
    a = s.a.data();
    sa = Kp;
  }
  load_tile_config();
  // The result tiles go straight to C where its rows and columns fill them: loaded from C to add to it
  // (beta 1, alpha 1: the product with the values), or stored over it and scaled after (beta 0); else
  // through the scratch tiles and an epilogue.
  const bool direct = M == Mp && N == Np && (beta == 0.0f || (beta == 1.0f && alpha == 1.0f));
  const bool add = direct && beta != 0.0f;
  const int64_t la = sa * 2, lb = int64_t(Np) * 4, lc = direct ? int64_t(ldc) * 4 : int64_t(Np) * 4;
  const uint32_t* bp = packed.data.data();
  float* ct = direct ? C : s.c.data();
  const int64_t sc = direct ? ldc : Np;
  for (int i0 = 0; i0 < Mp; i0 += 32) {
    const bool two_m = i0 + 16 < Mp;
    for (int j0 = 0; j0 < Np; j0 += 32) {
      const bool two_n = j0 + 16 < Np;
      if (add) {
        _tile_loadd(0, ct + (int64_t)i0 * sc + j0, lc);
        if (two_n) _tile_loadd(1, ct + (int64_t)i0 * sc + j0 + 16, lc);
        if (two_m) _tile_loadd(2, ct + (int64_t)(i0 + 16) * sc + j0, lc);
        if (two_m && two_n) _tile_loadd(3, ct + (int64_t)(i0 + 16) * sc + j0 + 16, lc);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int k0 = 0; k0 < Kp; k0 += 32) {
        _tile_loadd(4, a + i0 * sa + k0, la);
        _tile_loadd(6, bp + (int64_t)(k0 / 2) * Np + j0, lb);
        _tile_dpbf16ps(0, 4, 6);
        if (two_n) {
          _tile_loadd(7, bp + (int64_t)(k0 / 2) * Np + j0 + 16, lb);
          _tile_dpbf16ps(1, 4, 7);
        }
        if (two_m) {
          _tile_loadd(5, a + (i0 + 16) * sa + k0, la);
          _tile_dpbf16ps(2, 5, 6);
          if (two_n) _tile_dpbf16ps(3, 5, 7);
        }
      }
      _tile_stored(0, ct + (int64_t)i0 * sc + j0, lc);
      if (two_n) _tile_stored(1, ct + (int64_t)i0 * sc + j0 + 16, lc);
      if (two_m) _tile_stored(2, ct + (int64_t)(i0 + 16) * sc + j0, lc);
      if (two_m && two_n) _tile_stored(3, ct + (int64_t)(i0 + 16) * sc + j0 + 16, lc);
    }
  }
  if (direct) {
    if (alpha != 1.0f) {
      const __m512 va = _mm512_set1_ps(alpha);
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < N; j += 16) _mm512_storeu_ps(C + (int64_t)i * ldc + j, _mm512_mul_ps(va, _mm512_loadu_ps(C + (int64_t)i * ldc + j)));
    }
    return;
  }
  // C = alpha * tiles + beta * C, whole vectors then a masked tail (C is not read where beta is 0)
  const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
  for (int i = 0; i < M; ++i) {
    const float* t = ct + (int64_t)i * Np;
    float* c = C + (int64_t)i * ldc;
    for (int j = 0; j < N; j += 16) {
      const __mmask16 m = N - j >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - j)) - 1u);
      __m512 r = _mm512_mul_ps(va, _mm512_maskz_loadu_ps(m, t + j));
      if (beta != 0.0f) r = _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, c + j), r);
      _mm512_mask_storeu_ps(c + j, m, r);
    }
  }
}

// A decode task's scores, S[R, n] = alpha * Q[R, D] . K[n, D]^T for R <= 16 query rows, as S^T = K . Q^T:
// the key block is the tiles' A operand in place (16 keys by 32 of D a tile, through K's row stride), and
// Q^T, packed once per task (qpack: amx_pack_b's layout of Q as B^T, D / 2 pair-rows of 16 columns, zero
// past R), the B operand. Where the product Q . K^T packs each key block transposed (a 16 x 16 word
// transpose per 32 of D and 16 keys), this transposes the [16 keys, 16 rows] results once, into S: for
// D = 128, a quarter of the shuffles. n % 16 = 0 and D % 32 = 0.
__attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw")))
void amx_scores_t(int R, int n, int D, float alpha, const uint32_t* qpack, const uint16_t* K, int64_t ldk, float* S,
                  int64_t lds) {
  load_tile_config();
  alignas(64) float st[2][16 * 16];
  const __m512 va = _mm512_set1_ps(alpha);
  const int64_t la = ldk * 2;
  for (int j0 = 0; j0 < n; j0 += 32) {
    const bool two = j0 + 16 < n;
    _tile_zero(0);
    _tile_zero(1);
    for (int k0 = 0; k0 < D; k0 += 32) {
      _tile_loadd(6, qpack + (k0 / 2) * 16, 64);
      _tile_loadd(4, K + j0 * ldk + k0, la);
      _tile_dpbf16ps(0, 4, 6);
      if (two) {
        _tile_loadd(5, K + (j0 + 16) * ldk + k0, la);
        _tile_dpbf16ps(1, 5, 6);
      }
    }
    _tile_stored(0, st[0], 64);
    if (two) _tile_stored(1, st[1], 64);
    for (int h = 0; h < (two ? 2 : 1); ++h) {
      __m512i x[16];  // row i: key j0 + 16h + i against the 16 query rows
      for (int i = 0; i < 16; ++i) x[i] = _mm512_load_si512(st[h] + 16 * i);
      transpose16(x);  // row r: query row r against the 16 keys
      for (int r = 0; r < R; ++r) _mm512_storeu_ps(S + r * lds + j0 + 16 * h, _mm512_mul_ps(va, _mm512_castsi512_ps(x[r])));
    }
  }
}
#else
bool amx_on() { return false; }
#endif

// The softmax weights of gemm16's product with v, rounded to bfloat16 (nearest even): AVX512_BF16's
// conversion on CPUs that have it (every CPU with AMX), which like the tile unit takes subnormals as zero
// (weights under 2^-126, whose products the tiles would drop anyway); else bf16_bits.
#if defined(SWITCHYARD_AMX)
bool has_avx512_bf16() {
  static const bool ok = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid_count(7, 1, &a, &b, &c, &d) && (a & (1u << 5)) != 0;
  }();
  return ok;
}
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void round_weights_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
  if (i < n) {
    const __mmask16 m = (__mmask16)((1u << (n - i)) - 1u);
    _mm256_mask_storeu_epi16(dst + i, m, (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i)));
  }
}
#endif
void round_weights(const float* src, c10::BFloat16* dst, int64_t n);

// gemm's row-major C = alpha * A . op(B) + beta * C on bfloat16 A and B (float32 C): on the AMX tiles where
// amx_on(), else through MKL's bfloat16 product; has_gemm16() says whether this process has either.
bool has_gemm16() { return amx_on() || gemm_bf16bf16f32_ != nullptr; }
void gemm16(bool trans_b, int M, int N, int K, float alpha, const c10::BFloat16* A, int lda, const c10::BFloat16* B,
            int ldb, float beta, float* C, int ldc, uint64_t reuse = 0) {
  if (M == 0 || N == 0) return;
#if defined(SWITCHYARD_AMX)
  // A few rows (a decode step's queries of one kv head) fill too little of a tile to repay packing B as B^T
  // (a 16 x 16 word transpose per tile): MKL multiplies them as vectors (1 row against 1024 keys, D = 128:
  // 400 against 170 us a call on the tiles; decode takes 2-16 rows' scores through amx_scores_t instead).
  // B itself (the values) packs by interleaving pairs of rows, which 2 rows repay: GQA decode of 4 rows a
  // kv head (B = 4, Hq = 32, Hkv = 8, Lq = 1, Lk = 1024, D = 128) took 0.60-0.62x SDPA's time with the
  // weights' product on the tiles, 0.86-0.95x through MKL (Xeon with AMX, the scores on the tiles in both);
  // at 1 row, 1.7x against 1.0x.
  if ((M >= (trans_b ? kAmxMinRows : 2) || gemm_bf16bf16f32_ == nullptr) && amx_on()) {
    amx_gemm16(trans_b, M, N, K, alpha, reinterpret_cast<const uint16_t*>(A), lda,
               reinterpret_cast<const uint16_t*>(B), ldb, beta, C, ldc, reuse);
    return;
  }
#endif
  const char ta = trans_b ? 'T' : 'N', tb = 'N';
  gemm_bf16bf16f32_(&ta, &tb, &N, &M, &K, &alpha, reinterpret_cast<const uint16_t*>(B), &ldb,
                    reinterpret_cast<const uint16_t*>(A), &lda, &beta, C, &ldc);
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// 2^x to under 1 ulp for x <= 0 (scores are kept in base 2, scaled by log2(e) in the tile product):
// 2^n * 2^f with n = round(x), |f| <= 1/2, and a degree-6 polynomial fitted to 2^f on [-1/2, 1/2].
// Branch-free, so that the row loops vectorise; 2^-inf is exactly 0, as a masked score must become,
// and 2^NaN is NaN, so that a NaN score shows in its row's result (which then takes the exact path).
#pragma omp declare simd notinbranch
inline float fast_exp2(float x) {
  const float c = x < -126.0f ? -126.0f : x;  // NaN stays NaN (a NaN score must poison its row)
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (c + magic) - magic;
  const float f = c - n;
  float p = 1.4990888e-4f;
  p = p * f + 1.3393083e-3f;
  p = p * f + 9.6196737e-3f;
  p = p * f + 5.5503473e-2f;
  p = p * f + 2.4022637e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -126.0f ? 0.0f : p * two_n;
}

// max(s[0..n)), in 16 independent lanes: a plain max reduction vectorises into one serial chain and
// runs about ten times slower.
inline float row_max(const float* s, int64_t n) {
  float lane[16];
  for (int t = 0; t < 16; ++t) lane[t] = kNegInf;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
#pragma omp simd
    for (int t = 0; t < 16; ++t) lane[t] = s[j + t] > lane[t] ? s[j + t] : lane[t];
  }
  float mx = kNegInf;
  for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  for (int t = 0; t < 16; ++t) mx = lane[t] > mx ? lane[t] : mx;
  return mx;
}

// s[j] = -inf where the flag m[j * step] is 0 (false), for j < n: integer selects, no branch and no store
// that depends on a flag (the flags are bytes, which may alias anything, hence the restrict pointers), so
// that the contiguous case vectorises.
inline void keep_allowed(const uint8_t* __restrict m, int64_t step, float* __restrict s, int64_t n) {
  uint32_t* __restrict bits = reinterpret_cast<uint32_t*>(s);
  constexpr uint32_t kNegInfBits = 0xFF800000u;
  if (step == 1) {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t keep = 0u - uint32_t(m[j] != 0);
      bits[j] = (bits[j] & keep) | (kNegInfBits & ~keep);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t keep = 0u - uint32_t(m[j * step] != 0);
      bits[j] = (bits[j] & keep) | (kNegInfBits & ~keep);
    }
  }
}

struct Problem {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv, group, shift;  // shift = Lk - Lq (the causal diagonal's offset)
  bool causal;
  float scale;
  const bool* mask;  // nullptr when there is none
  // bfloat16 products through gemm16 (the ``fused-bf16gemm`` kernel): q . k^T from the bfloat16 operands, and
  // the softmax weights rounded to bfloat16 (as SDPA's CPU kernels do) for their product with v
  bool gemm16 = false;
  int64_t msb, msh, msi, msj;

  // Bottom-right causal and the caller's mask: disallowed scores of a [rows, n] tile become -inf.
  void mask_tile(float* S, int64_t ldS, int64_t b, int64_t h, int64_t q0, int64_t rows, int64_t k0, int64_t n) const {
    for (int64_t r = 0; r < rows; ++r) {
      float* s = S + r * ldS;
      if (causal) {
        for (int64_t j = std::max<int64_t>(0, q0 + r + shift + 1 - k0); j < n; ++j) s[j] = kNegInf;
      }
      if (mask != nullptr) {
        // branch-free selects: a branch per key on a random mask, and the flags reloaded after every store
        // (bytes alias anything), made a [1, 2, 33, 838] D=80 call with 30% of it masked take 246 us against
        // 155 us unmasked on a Xeon; 147 us now
        const bool* m = mask + b * msb + h * msh + (q0 + r) * msi + k0 * msj;
        if (msj == 0) {
          if (!m[0]) std::fill(s, s + n, kNegInf);
        } else {
          keep_allowed(reinterpret_cast<const uint8_t*>(m), msj, s, n);
        }
      }
    }
  }

  bool allowed(int64_t b, int64_t h, int64_t i, int64_t j) const {
    if (causal && j > i + shift) return false;
    return mask == nullptr || mask[b * msb + h * msh + i * msi + j * msj];
  }

  // True when some position of the tile may be disallowed (so mask_tile has work to do).
  bool tile_needs_mask(int64_t q0, int64_t k0, int64_t n) const {
    return mask != nullptr || (causal && k0 + n - 1 > q0 + shift);
  }

  // Multiply-adds of the whole call.
  int64_t work() const { return B * Hq * Lq * Lk * (D + Dv); }

  // Keys [0, end) hold every key any query in [q0, q0 + rows) may attend.
  int64_t key_end(int64_t q0, int64_t rows) const {
    if (!causal) return Lk;
    return std::min(Lk, std::max<int64_t>(0, q0 + rows + shift));
  }
};

Problem describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                 bool causal, double scale) {
  const auto dt = q.scalar_type();
  TORCH_CHECK((dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf) && k.scalar_type() == dt &&
                  v.scalar_type() == dt,
              "attention: the C++ kernels take float32, bfloat16 or float16 q, k, v of one dtype");
  Problem p{};
  p.B = q.size(0); p.Hq = q.size(1); p.Lq = q.size(2); p.D = q.size(3);
  p.Hkv = k.size(1); p.Lk = k.size(2); p.Dv = v.size(3);
  TORCH_CHECK(p.Hkv > 0 && p.Hq % p.Hkv == 0 && k.size(0) == p.B && v.size(0) == p.B && k.size(3) == p.D &&
                  v.size(1) == p.Hkv && v.size(2) == p.Lk,
              "attention: q [B, Hq, Lq, D], k [B, Hkv, Lk, D] and v [B, Hkv, Lk, Dv] with Hkv dividing Hq");
  p.group = p.Hq / p.Hkv;
  p.shift = p.Lk - p.Lq;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  p.mask = nullptr;
  if (mask.has_value() && mask->defined()) {
    const at::Tensor& m = *mask;
    const int64_t nd = m.dim(), full[4] = {p.B, p.Hq, p.Lq, p.Lk};
    int64_t stride[4] = {0, 0, 0, 0};
    bool fits = m.scalar_type() == at::kBool && nd <= 4;
    for (int64_t d = 1; fits && d <= nd; ++d) {  // the mask's d-th dimension from the right
      const int64_t size = m.size(nd - d);
      fits = size == full[4 - d] || size == 1;
      stride[4 - d] = size == 1 ? 0 : m.stride(nd - d);
    }
    TORCH_CHECK(fits, "attention: the mask must be bool and broadcastable to [B, Hq, Lq, Lk]");
    p.mask = m.data_ptr<bool>();
    p.msb = stride[0]; p.msh = stride[1]; p.msi = stride[2]; p.msj = stride[3];
  }
  return p;
}

int threads() { return std::max(1, at::get_num_threads()); }

// Threads for a call of ``work`` multiply-adds: one below about 2^17 (waking a team costs more than the
// work itself, and far more on a loaded machine).
int threads_for(int64_t work) { return work < (int64_t(1) << 17) ? 1 : threads(); }

}  // namespace

namespace {

// -- SIMD helpers: one vector of W floats per instruction-set level (16-bit loads widen in-register) --
#if defined(__AVX512F__)
constexpr int64_t W = 16;
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vbcast(float x) { return _mm512_set1_ps(x); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vload(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vec vload(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
// lanes [0, n) from p and zeros above (n < W): the decode loops' last, partial vector of a row whose width
// is no multiple of W (the masked-off lanes are never read, so a row that ends a tensor is safe)
inline __mmask16 first_lanes(int64_t n) { return static_cast<__mmask16>((1u << n) - 1); }
inline vec vload_part(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(first_lanes(n), p); }
inline vec vload_part(const c10::BFloat16* p, int64_t n) {
  const __m256i h = _mm256_maskz_loadu_epi16(first_lanes(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vec vload_part(const c10::Half* p, int64_t n) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(n), p)); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec a) { _mm512_storeu_ps(p, a); }
inline void vstore_part(float* p, vec a, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), a); }  // lanes [0, n)
// c times the four sums of a0..a3, in one reduction tree (a horizontal sum each would cost twice the
// shuffles). Each sum's tree: b[l] = a[l] + a[l + 8], then ((b0 + b1) + (b2 + b3)) + ((b4 + b5) + (b6 + b7)).
inline void vsum4(vec a0, vec a1, vec a2, vec a3, float c, float* out) {
  const __m256 b0 = _mm256_add_ps(_mm512_castps512_ps256(a0), _mm512_extractf32x8_ps(a0, 1));
  const __m256 b1 = _mm256_add_ps(_mm512_castps512_ps256(a1), _mm512_extractf32x8_ps(a1, 1));
  const __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(a2), _mm512_extractf32x8_ps(a2, 1));
  const __m256 b3 = _mm256_add_ps(_mm512_castps512_ps256(a3), _mm512_extractf32x8_ps(a3, 1));
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
  const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out, _mm_mul_ps(sum, _mm_set1_ps(c)));
}
// vsum4 for four rows at once: c * the sums of a[r][0..4) in lanes 4r..4r+3, each by vsum4's own tree (the
// same bits), the sixteen reduced together in full vectors: 45 shuffles and adds where four vsum4 take about
// 80 and the 256-bit halves. Pairs of accumulators fold their halves (lane l + lane l + 8), then adjacent
// lanes are added twice within 128-bit lanes, then the 128-bit lanes holding b0..3 and b4..7 of a sum.
inline vec fold_halves(vec x, vec y) {  // [x.lo + x.hi, y.lo + y.hi]
  return _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
}
inline vec add_pairs(vec x, vec y) {  // per 128-bit lane: [x0 + x1, x2 + x3, y0 + y1, y2 + y3]
  return _mm512_add_ps(_mm512_shuffle_ps(x, y, 0x88), _mm512_shuffle_ps(x, y, 0xDD));
}
inline vec vsum16(const vec (&a)[4][4], float c) {
  vec v[8];
  for (int t = 0; t < 4; ++t) {
    v[t] = fold_halves(a[0][t], a[1][t]);
    v[4 + t] = fold_halves(a[2][t], a[3][t]);
  }
  const vec z0 = add_pairs(add_pairs(v[0], v[1]), add_pairs(v[2], v[3]));
  const vec z1 = add_pairs(add_pairs(v[4], v[5]), add_pairs(v[6], v[7]));
  // 128-bit lanes of z0: [row 0's b0..3 sums, row 0's b4..7, row 1's b0..3, row 1's b4..7]; z1 rows 2, 3
  const vec sums = _mm512_add_ps(_mm512_shuffle_f32x4(z0, z1, 0x88), _mm512_shuffle_f32x4(z0, z1, 0xDD));
  return _mm512_mul_ps(sums, _mm512_set1_ps(c));
}
inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
inline vec vmax(vec a, vec b) { return _mm512_max_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm512_mul_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm512_sub_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline float vhmax(vec a) { return _mm512_reduce_max_ps(a); }
// a with its lanes from k on (k in [0, W)) set to -inf.
inline vec vkeep(vec a, int64_t k) {
  return _mm512_mask_blend_ps(static_cast<__mmask16>((1u << k) - 1), _mm512_set1_ps(kNegInf), a);
}
// 2^x as fast_exp2 does, with scalef for 2^n: max(-126, x) keeps a NaN (the second operand is returned
// when one is NaN) and keeps 2^n * p normal, and the zeroing mask (not-less-than, true when unordered) makes
// x < -126 exactly 0, as a masked score's weight must be, while a NaN stays. No lane ever makes a subnormal:
// Intel cores take a microcode assist for each one (an earlier max(-200, x), whose masked and padding lanes
// underflowed inside scalef, ran a B=1 H=2 L=40 D=16 causal forward at 2.2x its time on a Xeon with
// AVX512_FP16 and AMX; Zen 4 pays nothing for them).
inline vec vexp2(vec x) {
  const vec c = _mm512_max_ps(_mm512_set1_ps(-126.0f), x);
  const vec n = _mm512_roundscale_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vec f = _mm512_sub_ps(c, n);
  vec p = _mm512_set1_ps(1.4990888e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3393083e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6196737e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5503473e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022637e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.0f), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(live, p, n);
}
#elif defined(__AVX2__)
constexpr int64_t W = 8;
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vbcast(float x) { return _mm256_set1_ps(x); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vload(const c10::BFloat16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vec vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
// lanes [0, n) from p and zeros above (n < W), as on AVX-512: float32 by a masked load, 16-bit through a
// zeroed copy (AVX2 has no 16-bit masked load)
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vec vload_part(const float* p, int64_t n) { return _mm256_maskload_ps(p, first_lanes(n)); }
template <typename T>
inline vec vload_part(const T* p, int64_t n) {
  uint16_t tmp[8] = {};
  std::memcpy(tmp, p, n * sizeof(uint16_t));
  return vload(reinterpret_cast<const T*>(tmp));
}
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline void vstore(float* p, vec a) { _mm256_storeu_ps(p, a); }
inline void vstore_part(float* p, vec a, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), a); }  // lanes [0, n)
inline void vsum4(vec a0, vec a1, vec a2, vec a3, float c, float* out) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out, _mm_mul_ps(sum, _mm_set1_ps(c)));
}
inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
inline vec vmax(vec a, vec b) { return _mm256_max_ps(a, b); }
inline vec vmul(vec a, vec b) { return _mm256_mul_ps(a, b); }
inline vec vsub(vec a, vec b) { return _mm256_sub_ps(a, b); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline float vhmax(vec a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
}
inline vec vkeep(vec a, int64_t k) {
  const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(k)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_blendv_ps(_mm256_set1_ps(kNegInf), a, _mm256_castsi256_ps(keep));
}
// 2^x as fast_exp2 does: max(-126, x) keeps a NaN (the second operand is returned when one is NaN), and
// the final select (not-less-than, true when unordered) zeroes x < -126 but keeps a NaN.
inline vec vexp2(vec x) {
  const vec c = _mm256_max_ps(_mm256_set1_ps(-126.0f), x);
  const vec n = _mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const vec f = _mm256_sub_ps(c, n);
  vec p = _mm256_set1_ps(1.4990888e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3393083e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6196737e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5503473e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022637e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const vec r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_and_ps(r, _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_NLT_UQ));
}
#else
constexpr int64_t W = 1;
using vec = float;
inline vec vzero() { return 0.0f; }
inline vec vbcast(float x) { return x; }
inline vec vload(const float* p) { return *p; }
inline vec vload(const c10::BFloat16* p) { return static_cast<float>(*p); }
inline vec vload(const c10::Half* p) { return static_cast<float>(*p); }
template <typename T>
inline vec vload_part(const T* p, int64_t) { return vload(p); }  // never called: W = 1 leaves no part
inline vec vfma(vec a, vec b, vec c) { return a * b + c; }
inline void vstore(float* p, vec a) { *p = a; }
inline void vstore_part(float* p, vec a, int64_t) { *p = a; }  // never called: W = 1 leaves no part
inline void vsum4(vec a0, vec a1, vec a2, vec a3, float c, float* out) {
  out[0] = c * a0; out[1] = c * a1; out[2] = c * a2; out[3] = c * a3;
}
inline float vsum(vec a) { return a; }
inline vec vmax(vec a, vec b) { return a > b ? a : b; }
inline vec vmul(vec a, vec b) { return a * b; }
inline vec vsub(vec a, vec b) { return a - b; }
inline vec vadd(vec a, vec b) { return a + b; }
inline float vhmax(vec a) { return a; }
inline vec vkeep(vec a, int64_t k) { return k > 0 ? a : kNegInf; }
inline vec vexp2(vec x) { return fast_exp2(x); }
#endif

inline double widen(float x) { return x; }
inline double widen(c10::BFloat16 x) { return static_cast<float>(x); }
inline double widen(c10::Half x) { return static_cast<float>(x); }

// A [B, H, L, D] tensor read through its strides; the last dimension is contiguous.
template <typename T>
struct Rows {
  const T* p;
  int64_t sb, sh, sl;
  const T* at(int64_t b, int64_t h, int64_t l) const { return p + b * sb + h * sh + l * sl; }
};

template <typename T>
Rows<T> rows_of(const at::Tensor& t) {
  return {t.data_ptr<T>(), t.stride(0), t.stride(1), t.stride(2)};
}

// Whether a[0..n) is all finite: no value's exponent bits all set. The vector loops OR compare masks, with
// no horizontal sum (the x * 0 sum this replaces ended in sixteen dependent scalar adds, called twice a
// result row: 8% of a bfloat16 [1, 8, 64, 64] prefill on a Xeon).
inline bool all_finite(const float* a, int64_t n) {
  int64_t i = 0;
#if defined(__AVX512F__)
  const __m512i e = _mm512_set1_epi32(0x7F800000);
  __mmask16 bad = 0;
  for (; i + 16 <= n; i += 16) bad |= _mm512_cmpeq_epi32_mask(_mm512_and_si512(_mm512_loadu_si512(a + i), e), e);
  if (bad != 0) return false;
#elif defined(__AVX2__)
  const __m256i e = _mm256_set1_epi32(0x7F800000);
  __m256i bad = _mm256_setzero_si256();
  for (; i + 8 <= n; i += 8) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + i));
    bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(x, e), e));
  }
  if (!_mm256_testz_si256(bad, bad)) return false;
#endif
  bool fine = true;
  for (; i < n; ++i) fine = fine && std::isfinite(a[i]);
  return fine;
}

// A dtype's values as unsigned integers of their width, and its exponent field (all ones: inf or NaN).
template <typename T>
struct Bits;
template <>
struct Bits<float> {
  using U = uint32_t;
  static constexpr U expo = 0x7F800000u;
};
template <>
struct Bits<c10::BFloat16> {
  using U = uint16_t;
  static constexpr U expo = 0x7F80;
};
template <>
struct Bits<c10::Half> {
  using U = uint16_t;
  static constexpr U expo = 0x7C00;
};

// Whether the n values at p are all finite, read as their bits: inf and NaN have every bit of the exponent
// field `expo` set, so the minimum of (bits & expo) ^ expo is 0 exactly where one of them is. One pass that
// vectorises as an integer min (no float arithmetic, so no subnormal ever costs an assist), in blocks so
// that a non-finite value ends the scan early.
template <typename U>
bool bits_finite(const U* p, int64_t n, U expo) {
  constexpr int64_t kBlock = int64_t(1) << 12;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = std::min(n, b + kBlock);
    U low = expo;
#pragma omp simd reduction(min : low)
    for (int64_t i = b; i < e; ++i) {
      const U f = static_cast<U>((p[i] & expo) ^ expo);
      low = f < low ? f : low;
    }
    if (low == 0) return false;
  }
  return true;
}

// Whether a row of q is finite: float32 by all_finite, 16-bit rows from their bits.
template <typename T>
inline bool row_finite(const T* a, int64_t n) {
  if constexpr (std::is_same<T, float>::value) {
    return all_finite(a, n);
  } else {
    using U = typename Bits<T>::U;
    return bits_finite(reinterpret_cast<const U*>(a), n, Bits<T>::expo);
  }
}

// A result row the fast path may have got wrong: its query holds inf or NaN, its output is not finite, or
// its lse is NaN or +inf. Finite inputs never produce one (but for overflow); a non-finite key or value
// reaches a row only as NaN or inf (0 * NaN at a masked key included), and NaN or inf never turns finite.
inline bool suspect(bool q_bad, const float* out, int64_t Dv, float lse) {
  return q_bad || !all_finite(out, Dv) || lse != lse || lse == std::numeric_limits<float>::infinity();
}

// One result row by the op's plain rules, in float64: each key is selected by the mask before any product,
// so a masked key or value has no influence whatever it holds; attended inf and NaN follow IEEE arithmetic
// as the plain math does (a NaN or +inf score makes the row NaN, with lse NaN or +inf); a row that attends
// nothing gets 0 and lse -inf. The rare path of every forward kernel here.
template <typename T>
void exact_row(const Problem& p, const float* q, const Rows<T>& K, const Rows<T>& V, int64_t b, int64_t h,
               int64_t i, float* out, float* lse) {
  const int64_t hk = h / p.group;
  const double ninf = -std::numeric_limits<double>::infinity();
  std::vector<double> s(p.Lk, ninf), acc(p.Dv, 0.0);
  bool nan = false;
  double m = ninf;
  for (int64_t j = 0; j < p.Lk; ++j) {
    if (!p.allowed(b, h, i, j)) continue;
    const T* k = K.at(b, hk, j);
    double dot = 0.0;
    for (int64_t d = 0; d < p.D; ++d) dot += static_cast<double>(q[d]) * widen(k[d]);
    s[j] = dot * static_cast<double>(p.scale);
    if (s[j] != s[j]) nan = true;
    else if (s[j] > m) m = s[j];
  }
  if (nan || m == -ninf) {
    std::fill(out, out + p.Dv, std::numeric_limits<float>::quiet_NaN());
    *lse = nan ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
    return;
  }
  if (m == ninf) {
    std::fill(out, out + p.Dv, 0.0f);
    *lse = kNegInf;
    return;
  }
  double l = 0.0;
  for (int64_t j = 0; j < p.Lk; ++j) {
    if (!p.allowed(b, h, i, j)) continue;
    const double w = std::exp(s[j] - m);  // 0 for an attended -inf score, and 0 * inf is NaN, as in IEEE
    l += w;
    const T* v = V.at(b, hk, j);
    for (int64_t d = 0; d < p.Dv; ++d) acc[d] += w * widen(v[d]);
  }
  for (int64_t d = 0; d < p.Dv; ++d) out[d] = static_cast<float>(acc[d] / l);
  *lse = static_cast<float>(m + std::log(l));
}

// -- decode: few query rows, many keys (flash-decoding) -------------------------------------------------

constexpr int64_t kDecodeMaxLq = 8;     // query rows per head up to which the decode path is always taken
constexpr int64_t kDecodeWideLq = 32;   // and up to which it is taken under GQA or below kDecodeGemmRows rows
// Keys per block of the row loops: as many as keep a float32 block of keys within kDecodeBlockBytes (32-128
// keys), so that the key and the value block stay in a 32 KiB L1 for every query row. Longer blocks cut the
// online softmax's per-block work (a row's max, sum and rescale): bfloat16 MHA decode B=4 H=16 Lq=8 Lk=128
// D=64 took 134 us at 32 keys, 121 at 64 and 117 at 128 (Xeon, three runs each). By D alone, not the dtype:
// a 16-bit call takes the float32 call's blocks, so its rows are that call's rounded, bit for bit.
constexpr int64_t kDecodeBlockBytes = 16 << 10;
inline int64_t decode_block(int64_t D) {
  int64_t keys = 32;
  while (keys < 128 && 2 * keys * D * int64_t(sizeof(float)) <= kDecodeBlockBytes) keys *= 2;
  return keys;
}
constexpr int64_t kDecodeMinSplit = 256;  // keys per split at least, so that the merge stays negligible
// From this many query rows per kv head (group * Lq) on, the rows share each key and value block through
// the tile products (BLAS), on blocks this long, widened to float32 once for all the rows. Below it each
// row runs the SIMD dot and axpy loops over an L1-resident block (8 rows: 0.7-0.95x the time of BLAS on
// 8 x 128 tiles, float32, Zen 4; at 16 rows neither wins), two rows at a time so that each load of a key
// or value vector, bfloat16 widened in the register, serves both. (Widening a bfloat16 block once into a
// float32 buffer for the rows instead, as this did from 8 rows on, took 1.06-1.6x the time of the paired
// loads at 8 rows, D = 128, Zen 4, both levels.)
constexpr int64_t kDecodeGemmRows = 16;
constexpr int64_t kScoresTRows = 16;  // fused-bf16gemm's scores as K . Q^T (amx_scores_t) up to this many rows
constexpr int64_t kDecodeGemmBlock = 128;
// Query rows the decode loops take at a time below kDecodeGemmRows: four on AVX-512 (4 x 4 score and 4 x 4
// value accumulators fit its 32 registers), two on AVX2 (16 registers). On a Xeon with AVX512_FP16 and AMX,
// whose 512-bit shuffles share port 5 with the FMAs, each bfloat16 key or value vector's widening then
// serves four rows' multiply-adds instead of two: MHA decode at B = 4, H = 16, Lq = 8, Lk = 128, D = 64 took
// 0.90x the pairs' time in float32 and 0.84x in bfloat16 there.
constexpr int64_t kDecodeRows = W >= 16 ? 4 : 2;

// The decode kernel takes few query rows: up to kDecodeMaxLq per head always, up to kDecodeWideLq where its
// tasks beat the prefill tiles. Measured on Zen 4 (float32 and bfloat16, Lk 128-4096, paired): under GQA
// its tasks read each key and value block once for the whole group (Lq 10-32: 0.67-0.93x the tiles' time
// on AVX-512, 0.78-0.95x on AVX2). MHA heads of 9-15 rows take its SIMD row loops: 0.68-0.92x on AVX-512,
// but 0.84-1.13x on AVX2, so only on AVX-512; MHA heads of 16 rows and more ran 1.04-1.09x (the tiles' own
// products beat its BLAS ones), so they keep the tiles. Those rows take it where the keys outnumber them
// kDecodeWideKeys times at least: a short square prefill (GQA L = 16, Lk = Lq) is one small block per task,
// and there the tiles took 0.78-0.80x its time (Xeon with AVX512_FP16 and AMX, float32, B = 1-2, causal).
// Float32 MHA heads of up to kNarrowD dims take the prefill tiles from kNarrowMinLq rows on: a score there
// is a single multiply-add vector, and the row loops' horizontal sums cost more than the product itself.
// Xeon with AVX512_FP16 and AMX, paired against SDPA, B 1-8, H 1-16, Lk 512-3000, D = 16, Lq 4-8: the rows
// took 0.90-1.24x SDPA's time on AVX-512 and 1.09-1.38x on AVX2 (each level holding torch to it), the
// tiles 0.78-1.04x and 0.82-1.02x. At Lq = 3 the tiles lost (1.00-1.28x against 0.79-1.15x). 16-bit heads
// keep the rows (0.47-0.79x SDPA's time; the tiles 0.58-0.80x), as do D = 24 and 32, where neither path
// beats SDPA reliably (AVX-512, Lq 5-8: D = 24 rows 1.17-1.39x, tiles 0.99-1.33x; D = 32 rows 0.89-1.26x,
// tiles 0.93-1.17x).
constexpr int64_t kNarrowD = 16, kNarrowMinLq = 4;
constexpr int64_t kDecodeWideKeys = 4;
inline bool takes_decode(int64_t Lq, int64_t Lk, int64_t D, int64_t Dv, int64_t group, bool f32) {
  if (f32 && group == 1 && Lq >= kNarrowMinLq && D <= kNarrowD && Dv <= kNarrowD) return false;
  return Lq <= kDecodeMaxLq || (Lq <= kDecodeWideLq && Lk >= kDecodeWideKeys * Lq &&
                                (group > 1 || (W >= 16 && Lq < kDecodeGemmRows)));
}

// dst[0..n) = src[0..n) widened to float32: a bfloat16 is the top half of a float32 (the loop vectorises).
inline void widen_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }
inline void widen_row(const c10::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d = reinterpret_cast<uint32_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = uint32_t(s[i]) << 16;
}
// float16 widened (exact): F16C eight at a time in the vector builds, c10's conversion for the rest.
inline void widen_row(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// bfloat16 rounded to nearest even from float32, NaN as 0x7FC0: the bits torch's own cast gives (branch-free,
// so that row loops vectorise).
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  const uint16_t r = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  return (u & 0x7FFFFFFFu) > 0x7F800000u ? uint16_t(0x7FC0) : r;
}

// dst[0..n) = src[0..n) in the output dtype (float32 copied, bfloat16 and float16 rounded to nearest even).
inline void store_row(const float* src, float* dst, int64_t n) {
  if (src != dst) std::memcpy(dst, src, n * sizeof(float));
}
inline void store_row(const float* src, c10::BFloat16* dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < n; ++i) d[i] = bf16_bits(src[i]);
}
void round_weights(const float* src, c10::BFloat16* dst, int64_t n) {
#if defined(SWITCHYARD_AMX)
  if (has_avx512_bf16()) return round_weights_bf16(src, dst, n);
#endif
  store_row(src, dst, n);
}
// float16 rounded to nearest even (overflow to inf, NaN kept), as torch's own cast: F16C eight at a time in
// the vector builds, c10's conversion (the same rounding) for the rest.
inline void store_row(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

// Where a result row is computed: in the output itself for float32; in a float32 row buffer for a 16-bit
// output, which store_row then rounds into it.
inline float* result_row(float* o, std::vector<float>&) { return o; }
inline float* result_row(c10::BFloat16*, std::vector<float>& buf) { return buf.data(); }
inline float* result_row(c10::Half*, std::vector<float>& buf) { return buf.data(); }

// n rows of width D at src (row stride ld) as float32 rows: in place for float32 (ld_out = ld), widened
// into buf for bfloat16 and float16 (any D).
template <typename T>
const float* block_as_float(const T* src, int64_t ld, int64_t n, int64_t D, float* buf, int64_t& ld_out) {
  if constexpr (std::is_same<T, float>::value) {
    ld_out = ld;
    return src;
  } else {
    for (int64_t j = 0; j < n; ++j) widen_row(src + j * ld, buf + j * D, D);
    ld_out = D;
    return buf;
  }
}

// The decode loops take the query rows NR at a time (1, 2 or 4): each load of a key or value vector serves
// every row, each row keeping the arithmetic it has alone (the same bits whatever NR). A row's work is as
// many multiply-adds as loads otherwise, and a 512-bit load takes a cycle of Zen 4's load ports as an FMA
// takes its FMA pipes.

// The loops also prefetch the key and value rows about kAheadBytes ahead into L1, within the task's own
// keys (past them lie another task's rows, maybe another core's): the hardware's streams alone left the
// loads waiting on the L3. Measured on a Xeon with AVX512_FP16 and AMX, paired against SDPA, MHA decode at
// B = 1-16, H = 16, Lk 128-8192: at Lq = 1, bfloat16 took 0.74-0.90x the time without on AVX-512 and
// 0.7-0.95x on AVX2 (at Lq = 8: 0.91-0.98x and 1.03x); float32 0.9-1.05x on AVX-512 but 0.94-1.07x on
// AVX2 (a float32 row is twice the loads, and the prefetches compete with them), so AVX2's float32 loops
// go without. 1 KiB and 4 KiB ahead did no better, 8 KiB worse; a non-temporal hint (NTA) took 2x the time
// (the next call found the keys in memory).
constexpr int64_t kAheadBytes = 2048;
struct Ahead {
  int64_t rows;   // how far ahead, in rows (0: no prefetch)
  int64_t avail;  // rows from the block's first that are the task's own
};
template <typename T>
inline Ahead ahead_of(int64_t width, int64_t avail) {
  if (W < 16 && sizeof(T) == sizeof(float)) return {0, 0};
  return {std::max<int64_t>(1, kAheadBytes / (width * int64_t(sizeof(T)))), avail};
}
// prefetch row j + a.rows (n elements from p) where it is the task's own
template <typename T>
inline void prefetch_ahead(const T* p, int64_t stride, int64_t j, int64_t n, const Ahead& a) {
  if (j + a.rows >= a.avail) return;
  const char* c = reinterpret_cast<const char*>(p + (j + a.rows) * stride);
  for (int64_t b = 0; b < n * int64_t(sizeof(T)); b += 64) __builtin_prefetch(c + b, 0, 3);
}

// a[r][t] = q[r] . k_t over [0, D) for the NR rows and the four keys at kr (lane-wise partial sums; four
// keys share each load of a row of q).
// A width D that is no multiple of W ends in a partial vector: the keys' lanes past D load as zeros, and
// the queries are packed with zeros there (decode_fwd), so those lanes add 0.
template <int NR, typename T>
inline void dot4(const float* const* q, const T* const* kr, int64_t D, vec (&a)[NR][4]) {
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < 4; ++t) a[r][t] = vzero();
  const int64_t whole = D - D % W;
  for (int64_t d = 0; d < whole; d += W) {
    vec kv[4];
    for (int t = 0; t < 4; ++t) kv[t] = vload(kr[t] + d);
    for (int r = 0; r < NR; ++r) {
      const vec qv = vload(q[r] + d);
      for (int t = 0; t < 4; ++t) a[r][t] = vfma(qv, kv[t], a[r][t]);
    }
  }
  if (whole < D) {
    vec kv[4];
    for (int t = 0; t < 4; ++t) kv[t] = vload_part(kr[t] + whole, D - whole);
    for (int r = 0; r < NR; ++r) {
      const vec qv = vload(q[r] + whole);
      for (int t = 0; t < 4; ++t) a[r][t] = vfma(qv, kv[t], a[r][t]);
    }
  }
}

// s[r][0..n) = c * (q[r] . k_j) for the NR rows and the n keys at k, k + skn, ...
template <int NR, typename T>
inline void score_rows(const float* const* q, const T* k, int64_t skn, int64_t n, int64_t D, float c,
                       float* const* s, const Ahead& ahead) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (NR == 4) {
    // sixteen keys at a time: four vsum16 results, transposed by their 128-bit lanes into one vector of
    // sixteen scores per row, stored whole (the softmax's full-width loads of s then forward from these
    // stores; after four 128-bit ones each, a load waited for them to reach the cache)
    for (; j + 16 <= n; j += 16) {
      vec g[4];
      for (int u = 0; u < 4; ++u) {
        const T* kr[4] = {k + (j + 4 * u) * skn, k + (j + 4 * u + 1) * skn, k + (j + 4 * u + 2) * skn,
                          k + (j + 4 * u + 3) * skn};
        for (int t = 0; t < 4; ++t) prefetch_ahead(k, skn, j + 4 * u + t, D, ahead);
        vec a[4][4];
        dot4<4>(q, kr, D, a);
        g[u] = vsum16(a, c);
      }
      const vec t0 = _mm512_shuffle_f32x4(g[0], g[1], 0x44), t1 = _mm512_shuffle_f32x4(g[0], g[1], 0xEE);
      const vec t2 = _mm512_shuffle_f32x4(g[2], g[3], 0x44), t3 = _mm512_shuffle_f32x4(g[2], g[3], 0xEE);
      vstore(s[0] + j, _mm512_shuffle_f32x4(t0, t2, 0x88));
      vstore(s[1] + j, _mm512_shuffle_f32x4(t0, t2, 0xDD));
      vstore(s[2] + j, _mm512_shuffle_f32x4(t1, t3, 0x88));
      vstore(s[3] + j, _mm512_shuffle_f32x4(t1, t3, 0xDD));
    }
  }
#endif
  for (; j + 4 <= n; j += 4) {
    const T* kr[4] = {k + j * skn, k + (j + 1) * skn, k + (j + 2) * skn, k + (j + 3) * skn};
    for (int t = 0; t < 4; ++t) prefetch_ahead(k, skn, j + t, D, ahead);
    vec a[NR][4];
    dot4<NR>(q, kr, D, a);
#if defined(__AVX512F__)
    if constexpr (NR == 4) {
      const vec g = vsum16(a, c);
      for (int r = 0; r < 4; ++r) _mm_storeu_ps(s[r] + j, _mm512_extractf32x4_ps(g, r));
      continue;
    }
#endif
    for (int r = 0; r < NR; ++r) vsum4(a[r][0], a[r][1], a[r][2], a[r][3], c, s[r] + j);
  }
  for (; j < n; ++j) {
    const T* kj = k + j * skn;
    const int64_t whole = D - D % W;
    for (int r = 0; r < NR; ++r) {
      vec a = vzero();
      for (int64_t d = 0; d < whole; d += W) a = vfma(vload(q[r] + d), vload(kj + d), a);
      if (whole < D) a = vfma(vload(q[r] + whole), vload_part(kj + whole, D - whole), a);
      s[r][j] = c * vsum(a);
    }
  }
}

// acc[r][d0, d0 + NV * W) += sum_j p[r][j] * v_j[d0, ...) for the NR rows: NR * NV independent
// accumulators held in registers.
template <int NR, int NV, typename T>
inline void axpy_block(float* const* acc, const float* const* p, const T* v, int64_t svn, int64_t n, int64_t d0,
                       const Ahead& ahead = Ahead{0, 0}) {
  vec a[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NV; ++t) a[r][t] = vload(acc[r] + d0 + t * W);
  for (int64_t j = 0; j < n; ++j) {
    vec pj[NR];
    for (int r = 0; r < NR; ++r) pj[r] = vbcast(p[r][j]);
    const T* vr = v + j * svn + d0;
    prefetch_ahead(v + d0, svn, j, NV * W, ahead);
    for (int t = 0; t < NV; ++t) {
      const vec vv = vload(vr + t * W);
      for (int r = 0; r < NR; ++r) a[r][t] = vfma(pj[r], vv, a[r][t]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NV; ++t) vstore(acc[r] + d0 + t * W, a[r][t]);
}

// axpy_block<NR, 1> on the last, partial vector of the values (lanes [d0, Dv), Dv - d0 < W): the
// accumulators and values load and store only those lanes, so rows packed at Dv (the prefill tiles) are
// safe as well as rows padded to whole vectors (decode_fwd).
template <int NR, typename T>
inline void axpy_part(float* const* acc, const float* const* p, const T* v, int64_t svn, int64_t n, int64_t d0,
                      int64_t Dv) {
  const int64_t m = Dv - d0;
  vec a[NR];
  for (int r = 0; r < NR; ++r) a[r] = vload_part(acc[r] + d0, m);
  for (int64_t j = 0; j < n; ++j) {
    const vec vv = vload_part(v + j * svn + d0, m);
    for (int r = 0; r < NR; ++r) a[r] = vfma(vbcast(p[r][j]), vv, a[r]);
  }
  for (int r = 0; r < NR; ++r) vstore_part(acc[r] + d0, a[r], m);
}

template <int NR, typename T>
inline void axpy_rows(float* const* acc, const float* const* p, const T* v, int64_t svn, int64_t n, int64_t Dv,
                      const Ahead& ahead) {
  // NR x kWide accumulators beside NR broadcasts: two rows fit AVX2's 16 registers at 4, four rows
  // AVX-512's 32 at 4
  constexpr int kWide = NR == 1 || (W >= 16 && NR == 2) ? 8 : 4;
  int64_t d0 = 0;
  for (; d0 + kWide * W <= Dv; d0 += kWide * W) axpy_block<NR, kWide>(acc, p, v, svn, n, d0, ahead);
  for (; d0 + 4 * W <= Dv; d0 += 4 * W) axpy_block<NR, 4>(acc, p, v, svn, n, d0, ahead);
  for (; d0 + W <= Dv; d0 += W) axpy_block<NR, 1>(acc, p, v, svn, n, d0, ahead);
  if (d0 < Dv) axpy_part<NR>(acc, p, v, svn, n, d0, Dv);
}

// Online-softmax update of one row with its block of base-2 scores s[0..n) (overwritten by the weights);
// returns false when the row has attended nothing yet (its weights are all 0 and nothing is to be added).
inline bool softmax_update(float* s, int64_t n, float& m, float& l, float* acc, int64_t Dv) {
  // Row max in four vector lanes (a single max chain would serialise on its latency).
  vec x0 = vbcast(kNegInf), x1 = x0, x2 = x0, x3 = x0;
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    x0 = vmax(x0, vload(s + j));
    x1 = vmax(x1, vload(s + j + W));
    x2 = vmax(x2, vload(s + j + 2 * W));
    x3 = vmax(x3, vload(s + j + 3 * W));
  }
  for (; j + W <= n; j += W) x0 = vmax(x0, vload(s + j));
  float mx = vhmax(vmax(vmax(x0, x1), vmax(x2, x3)));
  for (; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
  const float m_new = std::max(m, mx);
  if (m_new == kNegInf) {
    // Nothing attended so far, or only NaN scores (the max drops NaN): a NaN makes l NaN, which the row's
    // result check sends to the exact path (a head whose keys all hold a NaN came out 0)
    for (j = 0; j < n; ++j)
      if (s[j] != s[j]) l = s[j];
    return false;
  }
  const vec mv = vbcast(m_new);
  vec a0 = vzero(), a1 = vzero();
  j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const vec e0 = vexp2(vsub(vload(s + j), mv)), e1 = vexp2(vsub(vload(s + j + W), mv));
    vstore(s + j, e0);
    vstore(s + j + W, e1);
    a0 = vadd(a0, e0);
    a1 = vadd(a1, e1);
  }
  for (; j + W <= n; j += W) {
    const vec e0 = vexp2(vsub(vload(s + j), mv));
    vstore(s + j, e0);
    a0 = vadd(a0, e0);
  }
  float sum = vsum(vadd(a0, a1));
  for (; j < n; ++j) {
    s[j] = fast_exp2(s[j] - m_new);
    sum += s[j];
  }
  const float alpha = fast_exp2(m - m_new);
  l = l * alpha + sum;
  m = m_new;
  if (alpha != 1.0f) {
    const vec av = vbcast(alpha);
    int64_t d = 0;
    for (; d + W <= Dv; d += W) vstore(acc + d, vmul(av, vload(acc + d)));
    for (; d < Dv; ++d) acc[d] *= alpha;
  }
  return true;
}

// softmax_update of R rows at once (rows s + u * lds, accumulators acc + u * Dv), interleaved so that the
// rows' dependency chains (max, exponentials, sum, rescale) overlap: each row takes softmax_update's very
// operations in its order, so the bits are the same. A row that has attended nothing yet gets weights 0.
template <int R>
inline void softmax_rows(float* s, int64_t lds, int64_t n, float* m, float* l, float* acc, int64_t Dv) {
  vec x0[R], x1[R], x2[R], x3[R];
  for (int u = 0; u < R; ++u) x0[u] = x1[u] = x2[u] = x3[u] = vbcast(kNegInf);
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W) {
    for (int u = 0; u < R; ++u) {
      const float* r = s + u * lds + j;
      x0[u] = vmax(x0[u], vload(r));
      x1[u] = vmax(x1[u], vload(r + W));
      x2[u] = vmax(x2[u], vload(r + 2 * W));
      x3[u] = vmax(x3[u], vload(r + 3 * W));
    }
  }
  for (; j + W <= n; j += W)
    for (int u = 0; u < R; ++u) x0[u] = vmax(x0[u], vload(s + u * lds + j));
  float m_new[R];
  bool live[R];
  vec mv[R];
  for (int u = 0; u < R; ++u) {
    float mx = vhmax(vmax(vmax(x0[u], x1[u]), vmax(x2[u], x3[u])));
    const float* r = s + u * lds;
    for (int64_t t = j; t < n; ++t) mx = r[t] > mx ? r[t] : mx;
    m_new[u] = std::max(m[u], mx);
    live[u] = m_new[u] != kNegInf;
    if (!live[u]) {  // as softmax_update: a NaN score makes l NaN
      for (int64_t t = 0; t < n; ++t)
        if (r[t] != r[t]) l[u] = r[t];
    }
    mv[u] = vbcast(live[u] ? m_new[u] : 0.0f);  // a dead row's weights are zeroed below
  }
  vec a0[R], a1[R];
  for (int u = 0; u < R; ++u) a0[u] = a1[u] = vzero();
  j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    for (int u = 0; u < R; ++u) {
      float* r = s + u * lds + j;
      const vec e0 = vexp2(vsub(vload(r), mv[u])), e1 = vexp2(vsub(vload(r + W), mv[u]));
      vstore(r, e0);
      vstore(r + W, e1);
      a0[u] = vadd(a0[u], e0);
      a1[u] = vadd(a1[u], e1);
    }
  }
  for (; j + W <= n; j += W) {
    for (int u = 0; u < R; ++u) {
      float* r = s + u * lds + j;
      const vec e0 = vexp2(vsub(vload(r), mv[u]));
      vstore(r, e0);
      a0[u] = vadd(a0[u], e0);
    }
  }
  for (int u = 0; u < R; ++u) {
    float* r = s + u * lds;
    if (!live[u]) {
      std::fill(r, r + n, 0.0f);
      continue;
    }
    float sum = vsum(vadd(a0[u], a1[u]));
    for (int64_t t = j; t < n; ++t) {
      r[t] = fast_exp2(r[t] - m_new[u]);
      sum += r[t];
    }
    const float alpha = fast_exp2(m[u] - m_new[u]);
    l[u] = l[u] * alpha + sum;
    m[u] = m_new[u];
    if (alpha != 1.0f) {
      float* a = acc + u * Dv;
      const vec av = vbcast(alpha);
      int64_t d = 0;
      for (; d + W <= Dv; d += W) vstore(a + d, vmul(av, vload(a + d)));
      for (; d < Dv; ++d) a[d] *= alpha;
    }
  }
}

// softmax_rows over the rows of a [rows, n] score tile, R at a time. The bfloat16 tile products take four
// (their prefill 5-10% faster on a Xeon with AMX); the float32 tiles one, since four made long float32
// prefill 8% slower with AVX-512 (L=2048, 256-key blocks).
template <int R>
inline void softmax_tile(float* s, int64_t lds, int64_t rows, int64_t n, float* m, float* l, float* acc, int64_t Dv) {
  int64_t r = 0;
  if constexpr (R > 1) {
    for (; r + R <= rows; r += R) softmax_rows<R>(s + r * lds, lds, n, m + r, l + r, acc + r * Dv, Dv);
  }
  for (; r < rows; ++r) {
    float* x = s + r * lds;
    if (!softmax_update(x, n, m[r], l[r], acc + r * Dv, Dv)) std::fill(x, x + n, 0.0f);
  }
}

// A thread's scratch array, left uninitialised (a std::vector zeroes it as it is made: the prefill tiles'
// score, accumulator and weight blocks, and the decode kernel's, are written before they are read, and
// zeroing them cost a short bfloat16 call a few percent).
template <typename T>
struct Buffer {
  std::unique_ptr<T[]> p;
  int64_t n;
  explicit Buffer(int64_t size) : p(size > 0 ? new T[size] : nullptr), n(size) {}
  T* data() { return p.get(); }
  T* begin() { return p.get(); }
  T* end() { return p.get() + n; }
};

// Split-K decode (Dao et al., "Flash-Decoding", 2023): one task is (batch, kv head, key split) and takes
// every query row of the kv head's group at once (G * Lq rows), so each key and value row is read once
// for the whole group; the splits' partial softmaxes are merged by their log-sum-exp. D and Dv may be any
// width: a row's last, partial vector loads masked (heads of 72 took the prefill tiles before, 2x SDPA's
// time at MHA decode on AVX-512). Returns whether some row took the exact path.
template <typename T, typename TO>
bool decode_fwd(const Problem& p, const Rows<T>& Q, const Rows<T>& K, const Rows<T>& V, TO* O, float* LSE) {
  const int64_t R = p.group * p.Lq, base = p.B * p.Hkv, nt = threads_for(p.B * p.Hq * p.Lq * p.Lk * (p.D + p.Dv));
  const int64_t kend = p.key_end(0, p.Lq);
  constexpr bool bf16 = std::is_same<T, c10::BFloat16>::value;
  const bool g16 = bf16 && p.gemm16;  // every block through gemm16, whatever R
  const bool tiles = R >= kDecodeGemmRows || g16;  // the group's rows are one contiguous [R, D] block of q
  // gemm16's scores as S^T = K . Q^T on the tiles (amx_scores_t) for whole blocks of 16 keys, from 2 rows:
  // MHA decode at Lq = 8, Lk = 128 (B = 1-4, H = 16) then took 0.75-0.82x SDPA's time, against 1.0-1.1x
  // with each key block packed transposed; GQA at 16 rows (Hq = 32, Hkv = 8, Lq = 4) 0.27x against 0.37x
  // (Xeon with AMX, with the values' product on the tiles in both). One row did better through MKL.
  const bool st = g16 && R >= 2 && R <= kScoresTRows && p.D % 32 == 0 && amx_on();
  const int64_t KB = tiles ? kDecodeGemmBlock : decode_block(p.D);
  int64_t splits = 1;
  while (base * splits < 4 * nt && kend >= 2 * splits * kDecodeMinSplit) splits *= 2;
  const int64_t chunk = ((kend + splits - 1) / splits + KB - 1) / KB * KB;
  splits = chunk == 0 ? 1 : (kend + chunk - 1) / chunk;
  const int64_t stride = p.Dv + 2;  // a partial row: acc[Dv], m, l
  // the rows' packed queries and accumulators, each padded to whole vectors (zeros past D: see dot4)
  const int64_t Dp = (p.D + W - 1) / W * W, Dvp = (p.Dv + W - 1) / W * W;
  std::vector<float> part(splits > 1 ? base * splits * R * stride : 0);
  const float c = p.scale * kLog2e;
  std::atomic<bool> rare{false};

  // A row's result, written in the output dtype (a 16-bit row computed in `buf`, Dv floats, and rounded
  // where it is stored); `qrow` holds its query as float32 (D floats: the row itself, or widened into it).
  auto finish = [&](int64_t b, int64_t hk, int64_t r, float m, float l, const float* acc, const float* qrow,
                    std::vector<float>& buf) {
    const int64_t h = hk * p.group + r / p.Lq, i = r % p.Lq, row = (b * p.Hq + h) * p.Lq + i;
    float* out = result_row(O + row * p.Dv, buf);
    const bool alive = l > 0.0f;
    const float inv = alive ? 1.0f / l : 0.0f;
    for (int64_t d = 0; d < p.Dv; ++d) out[d] = acc[d] * inv;
    LSE[row] = alive ? (m + std::log2(l)) * kLn2 : (l == 0.0f ? kNegInf : l);
    if (suspect(!all_finite(qrow, p.D), out, p.Dv, LSE[row])) {
      exact_row(p, qrow, K, V, b, h, i, out, LSE + row);
      rare.store(true, std::memory_order_relaxed);
    }
    if constexpr (!std::is_same<TO, float>::value) store_row(out, O + row * p.Dv, p.Dv);
  };
  // The R query rows of kv head hk of batch b as one contiguous float32 [R, D] block (widened for 16-bit
  // q, copied for float32: q may be strided), so that no pass over q precedes the kernel.
  auto query_row = [&](int64_t b, int64_t hk, int64_t r) { return Q.at(b, hk * p.group + r / p.Lq, r % p.Lq); };
  auto pack_queries = [&](int64_t b, int64_t hk, float* dst) {
    for (int64_t r = 0; r < R; ++r) {
      widen_row(query_row(b, hk, r), dst + r * Dp, p.D);
      std::fill(dst + r * Dp + p.D, dst + (r + 1) * Dp, 0.0f);
    }
  };

  // Row r of kv head bk (b * Hkv + hk) from its splits' partial rows, merged by their log-sum-exp; run by
  // the task that finishes the head's last split (no second parallel region, no barrier before the merge:
  // at B = 1, H = 4, Lq = 3, Lk = 585, D = 80 a second region cost about 4 us of a 30 us call on 2 threads).
  std::unique_ptr<std::atomic<int64_t>[]> done(splits > 1 ? new std::atomic<int64_t>[base] : nullptr);
  for (int64_t i = 0; splits > 1 && i < base; ++i) done[i].store(0, std::memory_order_relaxed);
  auto merge = [&](int64_t bk, int64_t r, float* acc, float* qrow, std::vector<float>& rowbuf) {
    const float* first = part.data() + (bk * splits * R + r) * stride;
    float M = kNegInf;
    for (int64_t sp = 0; sp < splits; ++sp) M = std::max(M, first[sp * R * stride + p.Dv]);
    std::fill(acc, acc + p.Dv, 0.0f);
    float L = 0.0f;
    for (int64_t sp = 0; sp < splits; ++sp) {
      const float* src = first + sp * R * stride;
      if (src[p.Dv] == kNegInf) {  // this split attended nothing for the row, or only NaN scores
        if (src[p.Dv + 1] != src[p.Dv + 1]) L = src[p.Dv + 1];
        continue;
      }
      const float w = std::exp2(src[p.Dv] - M);
      L += w * src[p.Dv + 1];
#pragma omp simd
      for (int64_t d = 0; d < p.Dv; ++d) acc[d] += w * src[d];
    }
    const int64_t b = bk / p.Hkv, hk = bk % p.Hkv;
    int64_t unused = 0;
    const float* q = block_as_float(query_row(b, hk, r), Q.sl, 1, p.D, qrow, unused);
    finish(b, hk, r, M, L, acc, q, rowbuf);
  };

#pragma omp parallel num_threads(std::min(nt, base * splits)) if (nt > 1 && base * splits > 1)
  {
    Buffer<float> S(R * KB), acc(R * Dvp), qs_all(R * Dp);  // written before they are read
    std::vector<float> m(R), l(R), rowbuf(p.Dv);
    // the tiles' key and value blocks as float32 (16-bit ones widened into these, once for all the rows)
    Buffer<float> kbuf(tiles && !g16 && !std::is_same<T, float>::value ? KB * p.D : 0);
    Buffer<float> vbuf(tiles && !g16 && !std::is_same<T, float>::value ? KB * p.Dv : 0);
    // gemm16's operands: the rows' queries as they are, and the weights rounded to bfloat16
    Buffer<T> q16(g16 ? R * p.D : 0), p16(g16 ? R * KB : 0);
    Buffer<uint32_t> qpack(st ? p.D / 2 * 16 : 0);  // q16 packed as amx_scores_t's B operand
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < base * splits; ++t) {
      const int64_t bk = t / splits, sp = t % splits, b = bk / p.Hkv, hk = bk % p.Hkv;
      const int64_t lo = sp * chunk, hi = std::min(kend, lo + chunk);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      pack_queries(b, hk, qs_all.data());
      if (g16)
        for (int64_t r = 0; r < R; ++r) std::copy(query_row(b, hk, r), query_row(b, hk, r) + p.D, q16.data() + r * p.D);
#if defined(SWITCHYARD_AMX)
      if (st) amx_pack_b(true, R, p.D, reinterpret_cast<const uint16_t*>(q16.data()), p.D, 16, p.D, qpack.data());
#endif
      // the rows against n keys at kb and values at vb (float32, bfloat16 or float16), kDecodeRows at a time
      // (then two, then one); a row that has attended nothing yet adds no values
      auto each_row = [&](int64_t k0, int64_t n, const T* kb, int64_t skn, const T* vb, int64_t svn) {
        // the first rows prefetch the task's next key and value rows (the later ones find this block in L1)
        const Ahead kahead = ahead_of<T>(p.D, hi - k0), vahead = ahead_of<T>(p.Dv, hi - k0), none{0, 0};
        for (int64_t r = 0; r < R;) {
          const int nr = R - r >= kDecodeRows ? int(kDecodeRows) : R - r == 3 && kDecodeRows > 3 ? 3
                                                               : R - r >= 2 ? 2 : 1;
          const float* qs[kDecodeRows];
          float* ss[kDecodeRows];
          float* as[kDecodeRows];
          bool all_live = true;
          for (int u = 0; u < nr; ++u) {
            qs[u] = qs_all.data() + (r + u) * Dp;
            ss[u] = S.data() + (r + u) * KB;
            as[u] = acc.data() + (r + u) * Dvp;
          }
          if (nr == 4) {
            score_rows<4>(qs, kb, skn, n, p.D, c, ss, r == 0 ? kahead : none);
          } else if (nr == 3) {
            score_rows<3>(qs, kb, skn, n, p.D, c, ss, r == 0 ? kahead : none);
          } else if (nr == 2) {
            score_rows<2>(qs, kb, skn, n, p.D, c, ss, r == 0 ? kahead : none);
          } else {
            score_rows<1>(qs, kb, skn, n, p.D, c, ss, r == 0 ? kahead : none);
          }
          bool live[kDecodeRows];
          for (int u = 0; u < nr; ++u) {
            const int64_t h = hk * p.group + (r + u) / p.Lq, i = (r + u) % p.Lq;
            if (p.tile_needs_mask(i, k0, n)) p.mask_tile(ss[u], KB, b, h, i, 1, k0, n);
            live[u] = softmax_update(ss[u], n, m[r + u], l[r + u], as[u], p.Dv);
            all_live = all_live && live[u];
          }
          if (all_live && nr == 4) {
            axpy_rows<4>(as, ss, vb, svn, n, p.Dv, r == 0 ? vahead : none);
          } else if (all_live && nr == 3) {
            axpy_rows<3>(as, ss, vb, svn, n, p.Dv, r == 0 ? vahead : none);
          } else if (all_live && nr == 2) {
            axpy_rows<2>(as, ss, vb, svn, n, p.Dv, r == 0 ? vahead : none);
          } else {
            for (int u = 0; u < nr; ++u)
              if (live[u]) axpy_rows<1>(as + u, ss + u, vb, svn, n, p.Dv, r == 0 && u == 0 ? vahead : none);
          }
          r += nr;
        }
      };
      // the causal diagonal and the caller's mask on the R rows' scores of the n keys from k0, in S
      auto mask_block = [&](int64_t k0, int64_t n) {
        for (int64_t r = 0; r < R; ++r) {
          const int64_t h = hk * p.group + r / p.Lq, i = r % p.Lq;
          if (p.tile_needs_mask(i, k0, n)) p.mask_tile(S.data() + r * KB, KB, b, h, i, 1, k0, n);
        }
      };
      for (int64_t k0 = lo; k0 < hi; k0 += KB) {
        const int64_t n = std::min(KB, hi - k0);
        const T* kb = K.at(b, hk, k0);
        const T* vb = V.at(b, hk, k0);
        if (!tiles) {
          each_row(k0, n, kb, K.sl, vb, V.sl);
          continue;
        }
        if constexpr (bf16) {
          if (g16) {
#if defined(SWITCHYARD_AMX)
            if (st && n % 16 == 0)
              amx_scores_t(R, n, p.D, c, qpack.data(), reinterpret_cast<const uint16_t*>(kb), K.sl, S.data(), KB);
            else
#endif
              gemm16(true, R, n, p.D, c, q16.data(), p.D, kb, K.sl, 0.0f, S.data(), KB);
            mask_block(k0, n);
            softmax_tile<4>(S.data(), KB, R, n, m.data(), l.data(), acc.data(), Dvp);
            for (int64_t r = 0; r < R; ++r) round_weights(S.data() + r * KB, p16.data() + r * KB, n);
            gemm16(false, R, p.Dv, n, 1.0f, p16.data(), KB, vb, V.sl, 1.0f, acc.data(), Dvp);
            continue;
          }
        }
        int64_t ldk = 0, ldv = 0;
        const float* kf = block_as_float(kb, K.sl, n, p.D, kbuf.data(), ldk);
        const float* vf = block_as_float(vb, V.sl, n, p.Dv, vbuf.data(), ldv);
        gemm(false, true, R, n, p.D, c, qs_all.data(), Dp, kf, ldk, 0.0f, S.data(), KB);
        mask_block(k0, n);
        softmax_tile<1>(S.data(), KB, R, n, m.data(), l.data(), acc.data(), Dvp);
        gemm(false, false, R, p.Dv, n, 1.0f, S.data(), KB, vf, ldv, 1.0f, acc.data(), Dvp);
      }
      if (splits == 1) {
        for (int64_t r = 0; r < R; ++r)
          finish(b, hk, r, m[r], l[r], acc.data() + r * Dvp, qs_all.data() + r * Dp, rowbuf);
        continue;
      }
      for (int64_t r = 0; r < R; ++r) {
        float* dst = part.data() + ((bk * splits + sp) * R + r) * stride;
        std::copy(acc.data() + r * Dvp, acc.data() + r * Dvp + p.Dv, dst);
        dst[p.Dv] = m[r];
        dst[p.Dv + 1] = l[r];
      }
      // the head's last split to finish merges its rows (acq_rel: every split's partial rows are visible)
      if (done[bk].fetch_add(1, std::memory_order_acq_rel) == splits - 1)
        for (int64_t r = 0; r < R; ++r) merge(bk, r, acc.data(), qs_all.data(), rowbuf);
    }
  }
  return rare.load();
}

// -- small calls: a few thousand multiply-adds in all ----------------------------------------------------

// Each result row computed on its own, straight from q, k and v, for calls of up to kSmallWork
// multiply-adds (B * Hq * Lq * Lk * (D + Dv)) and kSmallMaxLk keys: the tiles' scratch buffers, key
// transposes and four-row blocks cost more than such a call's arithmetic. Up to kSmallWideWork where the
// head dims are wide (D + Dv >= kSmallWideDims): a row's dot products then take several vectors each, and
// their horizontal sums count for less. Measured on Zen 4 (AVX-512 and AVX2 builds, paired): the rows took
// 0.6-0.8x the tiles' time at 2^11 multiply-adds and at [1, 4, 8, 32] or [1, 1, 12, 20, 64], but 1.1-2x it
// for narrow heads from [1, 2, 16, 16] on ([1, 1, 32, 16]: 9.4 us against 4.6 us).
constexpr int64_t kSmallWork = int64_t(1) << 12;
constexpr int64_t kSmallWideWork = int64_t(1) << 15;
constexpr int64_t kSmallWideDims = 64;
constexpr int64_t kSmallMaxLk = 256;

inline bool takes_small(const Problem& p) {
  const int64_t work = p.work();
  return p.Lk <= kSmallMaxLk && (work <= kSmallWork || (work <= kSmallWideWork && p.D + p.Dv >= kSmallWideDims));
}

// a . b over n values (any n: whole vectors, then the tail one by one); b float32, bfloat16 or float16.
template <typename T>
inline float dot_row(const float* a, const T* b, int64_t n) {
  vec acc = vzero();
  int64_t d = 0;
  for (; d + W <= n; d += W) acc = vfma(vload(a + d), vload(b + d), acc);
  float t = vsum(acc);
  for (; d < n; ++d) t += a[d] * static_cast<float>(b[d]);
  return t;
}

// Every row on the caller's thread, straight from q, k and v in their own dtype: its scores into a stack
// buffer (a disallowed key is never read), max, base-2 weights, and the weighted sum of the value rows,
// written in the output dtype. A suspect row takes exact_row, as on the tiles.
template <typename T, typename TO>
bool small_fwd(const Problem& p, const Rows<T>& Q, const Rows<T>& K, const Rows<T>& V, TO* O, float* LSE) {
  const float c = p.scale * kLog2e;
  float s[kSmallMaxLk];
  std::vector<float> qrow(std::is_same<T, float>::value ? 0 : p.D), orow(std::is_same<TO, float>::value ? 0 : p.Dv);
  bool rare = false;
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t h = 0; h < p.Hq; ++h) {
      const int64_t hk = h / p.group;
      for (int64_t i = 0; i < p.Lq; ++i) {
        const int64_t row = (b * p.Hq + h) * p.Lq + i, n = p.key_end(i, 1);
        int64_t ld = 0;
        const float* q = block_as_float(Q.at(b, h, i), Q.sl, 1, p.D, qrow.data(), ld);
        float* out = result_row(O + row * p.Dv, orow);
        float m = kNegInf;
        bool nan = false;
        for (int64_t j = 0; j < n; ++j) {
          s[j] = p.mask == nullptr || p.allowed(b, h, i, j) ? c * dot_row(q, K.at(b, hk, j), p.D) : kNegInf;
          m = s[j] > m ? s[j] : m;  // a NaN score is passed over here and shows in its weight
          nan = nan || s[j] != s[j];
        }
        std::fill(out, out + p.Dv, 0.0f);
        // NaN scores alone (the max passed them all over): l NaN, so that the check below takes the exact path
        float l = m == kNegInf && nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
        if (m != kNegInf) {  // else the row attends nothing (or only -inf or NaN scores): 0 and lse -inf
          for (int64_t j = 0; j < n; ++j) {
            if (p.mask != nullptr && !p.allowed(b, h, i, j)) continue;  // its value row is never read
            const float w = fast_exp2(s[j] - m);
            l += w;
            const T* vr = V.at(b, hk, j);
            for (int64_t d = 0; d < p.Dv; ++d) out[d] += w * static_cast<float>(vr[d]);
          }
        }
        const bool alive = l > 0.0f;
        const float inv = alive ? 1.0f / l : 0.0f;
        for (int64_t d = 0; d < p.Dv; ++d) out[d] *= inv;
        LSE[row] = alive ? (m + std::log2(l)) * kLn2 : (l == 0.0f ? kNegInf : l);
        if (suspect(!all_finite(q, p.D), out, p.Dv, LSE[row])) {
          exact_row(p, q, K, V, b, h, i, out, LSE + row);
          rare = true;
        }
        store_row(out, O + row * p.Dv, p.Dv);
      }
    }
  }
  return rare;
}

// -- the prefill tiles' products, our own -----------------------------------------------------------------

// MKL's sgemm is the faster product on large tiles with wide heads. On narrow heads and small tiles these
// register-blocked loops beat it (see own_products), and their score tile comes out with the causal
// diagonal and the block's tail already at -inf, so that the softmax takes whole vectors.
std::atomic<int> tile_products{0};  // 0: by size; 1: always these loops; 2: always gemm (tests and benchmarks)

// Where these loops take the products, measured against MKL on Zen 4 over L = 24-1024, D = 16-128 (paired,
// the whole forward): with AVX-512, 0.82-0.97x the time for head dims up to 96 and 0.96-1.03x at 128;
// with AVX2, 0.87-0.97x for head dims up to 32 and 1.00-1.15x from 64 on, but 0.96-1.01x for tiles of
// at most 2^16 multiply-adds (where MKL's per-call cost counts most). Without vectors they took 1.7-5.8x
// MKL's time, so the scalar build keeps to BLAS where there is one.
#if defined(__AVX512F__)
constexpr int64_t kOwnMaxD = 96, kOwnSmallTileMaxD = 128;
#elif defined(__AVX2__)
constexpr int64_t kOwnMaxD = 32, kOwnSmallTileMaxD = 64;
#else
constexpr int64_t kOwnMaxD = 0, kOwnSmallTileMaxD = 0;
#endif
constexpr int64_t kOwnSmallTile = int64_t(1) << 16;  // rows x keys x head dim

inline bool own_products(int64_t rows, int64_t keys, int64_t D, int64_t Dv) {
  const int mode = tile_products.load(std::memory_order_relaxed);
  if (mode != 0) return mode == 1;
  if (sgemm_ == nullptr || !use_blas.load(std::memory_order_relaxed)) return W > 1;
  const int64_t d = std::max(D, Dv);
  return d <= kOwnMaxD || (d <= kOwnSmallTileMaxD && rows * keys * d <= kOwnSmallTile);
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// KT[d * ldt + j] = K[j][d] for the block's n keys, and 0 for j in [n, ldt) (ldt a multiple of W), so that
// the score loop below takes whole vectors of keys. Those columns' scores are set to -inf there whatever
// they hold; the 0 keeps their arithmetic on plain finite values (not an earlier block's keys).
// In the vector builds, 8 x 8 blocks go through registers (eight row loads, 24 shuffles, eight stores):
// the strided scalar copy it replaces took a quarter of a B=2 H=8 L=16 D=64 causal forward (one thread,
// Xeon with AVX512_FP16 and AMX) and, per task and key block, about a fifth of the block's multiply-adds'
// time at 128 x 256 x 64.
inline void transpose_keys(const float* K, int64_t ldk, int64_t n, int64_t D, float* KT, int64_t ldt) {
  int64_t j0 = 0;
#if defined(__AVX2__)
  for (; j0 + 8 <= n; j0 += 8) {
    int64_t d0 = 0;
    for (; d0 + 8 <= D; d0 += 8) {
      const float* k = K + j0 * ldk + d0;
      const __m256 r0 = _mm256_loadu_ps(k), r1 = _mm256_loadu_ps(k + ldk), r2 = _mm256_loadu_ps(k + 2 * ldk),
                   r3 = _mm256_loadu_ps(k + 3 * ldk), r4 = _mm256_loadu_ps(k + 4 * ldk),
                   r5 = _mm256_loadu_ps(k + 5 * ldk), r6 = _mm256_loadu_ps(k + 6 * ldk),
                   r7 = _mm256_loadu_ps(k + 7 * ldk);
      const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
      const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
      const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
      const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
      const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
      float* kt = KT + d0 * ldt + j0;
      _mm256_storeu_ps(kt, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(kt + ldt, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(kt + 2 * ldt, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(kt + 3 * ldt, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(kt + 4 * ldt, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(kt + 5 * ldt, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(kt + 6 * ldt, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(kt + 7 * ldt, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (; d0 < D; ++d0)
      for (int64_t j = j0; j < j0 + 8; ++j) KT[d0 * ldt + j] = K[j * ldk + d0];
  }
#endif
  for (int64_t d = 0; d < D; ++d) {  // the keys left (all of them in the scalar build), then the zero columns
    float* kt = KT + d * ldt;
    for (int64_t j = j0; j < n; ++j) kt[j] = K[j * ldk + d];
    std::fill(kt + n, kt + ldt, 0.0f);
  }
}

// S[r][0..ldt) = c * (q_r . k_j) for R rows, and -inf from column end[r] on (the keys past the block, and
// those causal hides from row r): a broadcast of q_r[d] times a vector of KT's row d, two vectors of keys at
// a time, so each load of KT serves R rows and 2R chains of multiply-adds run at once. The -inf is set in
// registers: scalar stores into a row just stored as vectors would stall the softmax's vector loads.
template <int R>
inline void score_tile_rows(const float* Q, int64_t ldq, const float* KT, int64_t ldt, int64_t D, float c,
                            const int64_t* end, float* S, int64_t lds) {
  const vec cv = vbcast(c);
  auto store = [&](int r, int64_t j, vec a) {
    a = vmul(cv, a);
    if (j + W > end[r]) a = vkeep(a, std::max<int64_t>(0, end[r] - j));
    vstore(S + r * lds + j, a);
  };
  int64_t j = 0;
  for (; j + 2 * W <= ldt; j += 2 * W) {
    vec a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = vzero();
    for (int64_t d = 0; d < D; ++d) {
      const vec k0 = vload(KT + d * ldt + j), k1 = vload(KT + d * ldt + j + W);
      for (int r = 0; r < R; ++r) {
        const vec qv = vbcast(Q[r * ldq + d]);
        a[r][0] = vfma(qv, k0, a[r][0]);
        a[r][1] = vfma(qv, k1, a[r][1]);
      }
    }
    for (int r = 0; r < R; ++r) {
      store(r, j, a[r][0]);
      store(r, j + W, a[r][1]);
    }
  }
  if (j < ldt) {  // one vector left
    vec a[R];
    for (int r = 0; r < R; ++r) a[r] = vzero();
    for (int64_t d = 0; d < D; ++d) {
      const vec k0 = vload(KT + d * ldt + j);
      for (int r = 0; r < R; ++r) a[r] = vfma(vbcast(Q[r * ldq + d]), k0, a[r]);
    }
    for (int r = 0; r < R; ++r) store(r, j, a[r]);
  }
}

// S = c * Q KT for ``rows`` rows, four at a time; row r's scores from column end[r] on are -inf.
inline void score_tile(const float* Q, int64_t ldq, const float* KT, int64_t ldt, int64_t rows, int64_t D, float c,
                       const int64_t* end, float* S, int64_t lds) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) score_tile_rows<4>(Q + r * ldq, ldq, KT, ldt, D, c, end + r, S + r * lds, lds);
  for (; r < rows; ++r) score_tile_rows<1>(Q + r * ldq, ldq, KT, ldt, D, c, end + r, S + r * lds, lds);
}

// acc[R rows, Dv] += P[R rows, n] V[n, Dv]: the decode loops' axpy_block on whole vectors (R x 2 accumulators
// in registers), then a last, partial vector loaded and stored masked. (Its columns one at a time, as this
// took them before, cost a prefill with heads of 24 on AVX-512 1.7-2.4x SDPA's time, eight scalar
// multiply-adds a key and row beside one vector.)
template <int R>
inline void value_tile_block(const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t n, float* acc,
                             int64_t Dv) {
  float* accs[R];
  const float* ps[R];
  for (int r = 0; r < R; ++r) accs[r] = acc + r * Dv, ps[r] = P + r * ldp;
  int64_t d0 = 0;
  for (; d0 + 2 * W <= Dv; d0 += 2 * W) axpy_block<R, 2>(accs, ps, V, ldv, n, d0);
  for (; d0 + W <= Dv; d0 += W) axpy_block<R, 1>(accs, ps, V, ldv, n, d0);
  if (d0 < Dv) axpy_part<R>(accs, ps, V, ldv, n, d0, Dv);  // the last Dv % W columns
}

// acc[rows, Dv] += P[rows, n] V[n, Dv], four rows at a time.
inline void value_tile(const float* P, int64_t ldp, const float* V, int64_t ldv, int64_t rows, int64_t n, float* acc,
                       int64_t Dv) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) value_tile_block<4>(P + r * ldp, ldp, V, ldv, n, acc + r * Dv, Dv);
  for (; r < rows; ++r) value_tile_block<1>(P + r * ldp, ldp, V, ldv, n, acc + r * Dv, Dv);
}

// -- prefill: FlashAttention-2 tiles --------------------------------------------------------------------

// The query tile of a call: the caller's largest, halved (down to 32) until the tasks (heads x query tiles)
// number 4 per thread the call runs on; a call on one thread keeps it whole, so that each key block is
// transposed and each task set up as few times as possible.
int64_t query_tile(const Problem& p, int64_t block_q) {
  const int nt = threads_for(p.work());
  if (nt == 1) return block_q;
  while (block_q > 32 && p.B * p.Hq * ((p.Lq + block_q - 1) / block_q) < 4 * int64_t(nt)) block_q /= 2;
  return block_q;
}

// q, k and v are read through their strides (last dimension contiguous): float32 in place, 16-bit dtypes
// widened one block at a time inside each task, so a call makes no copy of them first (a bfloat16 call at
// L=16 spent more on its widening copies and the rounding of its output, each a parallel region, than on
// its tiles). Each output row is written in the output dtype TO (float32, or bfloat16 / float16 rounded here).
// `own`: the tiles' products go through this file's loops, not gemm (forward's own_products choice).
template <typename T, typename TO>
bool prefill_fwd(const Problem& p, const Rows<T>& Qr, const Rows<T>& Kr, const Rows<T>& Vr, TO* O, float* LSE,
                 int64_t block_q, int64_t block_k, bool own) {
  // Tiles no larger than the sequences, so that short calls allocate small scratch buffers.
  const int64_t BQ = std::max<int64_t>(1, std::min(block_q, p.Lq)), BK = std::max<int64_t>(1, std::min(block_k, p.Lk));
  const int64_t nqb = (p.Lq + BQ - 1) / BQ;
  const int64_t heads = p.B * p.Hq;
  const int64_t tasks = nqb * heads;
  std::atomic<bool> rare{false};
  const int nt = threads_for(p.work());
  const int64_t SK = round_up(BK, W);  // the score tile's row stride: whole vectors of keys

  // The bfloat16 tile products of a GQA group's query heads (consecutive tasks) share their packed key
  // and value blocks: a thread takes the group's tasks together where that leaves each thread some, and its
  // products reuse what the previous task packed, under this call's token (6% of a [2, 8, 2, 64, 64]
  // bfloat16 call's time went to packing).
  const bool shares = std::is_same<T, c10::BFloat16>::value && p.gemm16 && !own && p.group > 1;
  const uint64_t reuse = shares ? pack_token.fetch_add(1, std::memory_order_relaxed) + 1 : 0;
  const int chunk = shares && tasks / p.group >= nt ? int(p.group) : 1;

#pragma omp parallel num_threads(nt) if (nt > 1 && tasks > 1)
  {
    constexpr bool bf16 = std::is_same<T, c10::BFloat16>::value;
    const bool g16 = bf16 && p.gemm16 && !own;  // both products through gemm16 (the weights rounded into p16)
    Buffer<float> S(BQ * SK), acc(BQ * p.Dv);  // written before they are read (acc zeroed per task)
    std::vector<float> m(BQ), l(BQ), KT(own ? p.D * SK : 0);
    std::vector<int64_t> end(own ? BQ : 0);
    // 16-bit blocks widened for the float32 products; gemm16 reads them as they are, and widens only a query
    // row that takes the exact path (these buffers are zeroed as they are made: 80 KB of them took several
    // microseconds of a 30 us bfloat16 call)
    const bool widen = !std::is_same<T, float>::value && !g16;
    std::vector<float> qbuf(widen ? BQ * p.D : g16 ? p.D : 0), kbuf(widen ? BK * p.D : 0), vbuf(widen ? BK * p.Dv : 0);
    std::vector<float> orow(std::is_same<TO, float>::value ? 0 : p.Dv);
    Buffer<T> p16(g16 ? BQ * SK : 0);
    // The last query blocks attend the most keys under causal: hand them out first.
#pragma omp for schedule(dynamic, chunk)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t qb = nqb - 1 - t / heads, bh = t % heads;
      const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
      const int64_t q0 = qb * BQ, rows = std::min(BQ, p.Lq - q0);
      int64_t ldq = 0;  // gemm16 reads the queries as they are: a row is widened only for the exact path
      const float* Qb = g16 ? nullptr : block_as_float(Qr.at(b, h, q0), Qr.sl, rows, p.D, qbuf.data(), ldq);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t kend = p.key_end(q0, rows);
      for (int64_t k0 = 0; k0 < kend; k0 += BK) {
        const int64_t n = std::min(BK, kend - k0);
        int64_t ldk = 0, ldv = 0;
        float* s0 = S.data();
        if constexpr (bf16) {
          if (g16) {
            gemm16(true, rows, n, p.D, p.scale * kLog2e, Qr.at(b, h, q0), Qr.sl, Kr.at(b, hk, k0), Kr.sl, 0.0f, s0, SK,
                   reuse);
            if (p.tile_needs_mask(q0, k0, n)) p.mask_tile(s0, SK, b, h, q0, rows, k0, n);
            softmax_tile<4>(s0, SK, rows, n, m.data(), l.data(), acc.data(), p.Dv);
            for (int64_t r = 0; r < rows; ++r) round_weights(s0 + r * SK, p16.data() + r * SK, n);
            gemm16(false, rows, p.Dv, n, 1.0f, p16.data(), SK, Vr.at(b, hk, k0), Vr.sl, 1.0f, acc.data(), p.Dv, reuse);
            continue;
          }
        }
        const float* kb = block_as_float(Kr.at(b, hk, k0), Kr.sl, n, p.D, kbuf.data(), ldk);
        int64_t width = n;  // the score columns the softmax takes
        if (own) {
          // Whole vectors of keys: the columns past the block's n keys, and those causal hides, score -inf
          // (weight 0); the product with the values reads only the n keys.
          width = round_up(n, W);
          for (int64_t r = 0; r < rows; ++r)
            end[r] = p.causal ? std::clamp<int64_t>(q0 + r + p.shift + 1 - k0, 0, n) : n;
          transpose_keys(kb, ldk, n, p.D, KT.data(), width);
          score_tile(Qb, ldq, KT.data(), width, rows, p.D, p.scale * kLog2e, end.data(), s0, SK);
          if (p.mask != nullptr) p.mask_tile(s0, SK, b, h, q0, rows, k0, n);
        } else {
          gemm(false, true, rows, n, p.D, p.scale * kLog2e, Qb, ldq, kb, ldk, 0.0f, s0, SK);
          if (p.tile_needs_mask(q0, k0, n)) p.mask_tile(s0, SK, b, h, q0, rows, k0, n);
        }
        softmax_tile<1>(s0, SK, rows, width, m.data(), l.data(), acc.data(), p.Dv);
        const float* vb = block_as_float(Vr.at(b, hk, k0), Vr.sl, n, p.Dv, vbuf.data(), ldv);
        if (own) value_tile(s0, SK, vb, ldv, rows, n, acc.data(), p.Dv);
        else gemm(false, false, rows, p.Dv, n, 1.0f, s0, SK, vb, ldv, 1.0f, acc.data(), p.Dv);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t row = bh * p.Lq + q0 + r;
        float* out = result_row(O + row * p.Dv, orow);
        const float* a = acc.data() + r * p.Dv;
        const bool alive = l[r] > 0.0f;
        const float inv = alive ? 1.0f / l[r] : 0.0f;
        for (int64_t d = 0; d < p.Dv; ++d) out[d] = a[d] * inv;
        LSE[row] = alive ? (m[r] + std::log2(l[r])) * kLn2 : (l[r] == 0.0f ? kNegInf : l[r]);
        const bool q_bad = Qb != nullptr ? !all_finite(Qb + r * ldq, p.D) : !row_finite(Qr.at(b, h, q0 + r), p.D);
        if (suspect(q_bad, out, p.Dv, LSE[row])) {
          const float* qr = Qb != nullptr ? Qb + r * ldq : (widen_row(Qr.at(b, h, q0 + r), qbuf.data(), p.D), qbuf.data());
          exact_row(p, qr, Kr, Vr, b, h, q0 + r, out, LSE + row);
          rare.store(true, std::memory_order_relaxed);
        }
        store_row(out, O + row * p.Dv, p.Dv);
      }
    }
  }
  return rare.load();
}

}  // namespace

namespace {

// ``t`` itself where the kernels can read it in place: contiguous rows (the last stride 1) that do not
// overlap (the row stride at least a row, as a BLAS leading dimension must be; an expanded sequence
// dimension has stride 0); else a contiguous copy.
at::Tensor in_place(const at::Tensor& t) {
  return t.stride(3) == 1 && t.stride(2) >= t.size(3) ? t : t.contiguous();
}

// The forward with o in ``out`` (float32, or q's dtype): the small path and the prefill tiles write each
// row in that dtype themselves; the decode kernel writes float32, rounded after.
std::tuple<at::Tensor, at::Tensor, bool> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask, bool causal, double scale,
                                                 int64_t block_q, int64_t block_k, at::ScalarType out,
                                                 bool gemm16 = false) {
  Problem p = describe(q, k, v, mask, causal, scale);
  p.gemm16 = gemm16 && q.scalar_type() == at::kBFloat16;
  TORCH_CHECK(block_q > 0 && block_k > 0, "attention: tile sizes must be positive");
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options().dtype(at::kFloat));
  // Every path reads q, k and v in place through their strides, float32, bfloat16 or float16.
  const at::Tensor qq = in_place(q), kk = in_place(k), vv = in_place(v);
  const bool small = takes_small(p);
  const bool decode = !small && takes_decode(p.Lq, p.Lk, p.D, p.Dv, p.group, q.scalar_type() == at::kFloat);
  if (!small && !decode) block_q = query_tile(p, block_q);
  // The tiles' products: own_products' choice; MKL on the calling thread where any product may go to it
  // (the small path makes none).
  const bool own = !small && !decode && !p.gemm16 &&
                   own_products(std::min(block_q, p.Lq), std::min(block_k, p.Lk), p.D, p.Dv);
  at::Tensor o = at::empty({p.B, p.Hq, p.Lq, p.Dv}, q.options().dtype(out));
  std::optional<SerialBlas> serial;
  if (!small && !own) serial.emplace();
  auto run = [&](auto element, auto output) -> bool {
    using T = decltype(element);
    using TO = decltype(output);
    const Rows<T> Q = rows_of<T>(qq), K = rows_of<T>(kk), V = rows_of<T>(vv);
    if (small) return small_fwd(p, Q, K, V, o.data_ptr<TO>(), lse.data_ptr<float>());
    if (!decode) return prefill_fwd(p, Q, K, V, o.data_ptr<TO>(), lse.data_ptr<float>(), block_q, block_k, own);
    return decode_fwd(p, Q, K, V, o.data_ptr<TO>(), lse.data_ptr<float>());
  };
  // o is float32 (asked for) or q's dtype
  const bool wide = out == at::kFloat;
  bool rare;
  switch (q.scalar_type()) {
    case at::kBFloat16: rare = wide ? run(c10::BFloat16(), 0.0f) : run(c10::BFloat16(), c10::BFloat16()); break;
    case at::kHalf: rare = wide ? run(c10::Half(), 0.0f) : run(c10::Half(), c10::Half()); break;
    default: rare = run(0.0f, 0.0f);
  }
  return {o, lse, rare};
}

}  // namespace

// Forward: (o [B, Hq, Lq, Dv] float32, lse [B, Hq, Lq] float32, rare). Decode shapes (Lq <= 8, head dims
// a multiple of the vector width) take the split-K kernel; the rest the FlashAttention-2 tiles, or, for a
// few thousand multiply-adds, a row at a time on the caller's thread. A row that may attend nothing gets
// o = 0 and lse = -inf. Non-finite inputs cost the common path nothing: each row's result is checked where
// it is written, and a suspect row (see ``suspect``) is recomputed by ``exact_row``; ``rare`` says whether
// any row was, so that the backward pass knows to take the exact path.
std::tuple<at::Tensor, at::Tensor, int64_t> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const std::optional<at::Tensor>& mask,
                                                          bool causal, double scale, int64_t block_q, int64_t block_k) {
  auto [o, lse, rare] = forward(q, k, v, mask, causal, scale, block_q, block_k, at::kFloat);
  return {o, lse, rare ? 1 : 0};
}

// The eager call without a graph (plugins/fused/attention.py's lean path, through pybind11 only), the
// caller's mask as it is (any broadcastable shape): (o in q's dtype, lse), each row of a 16-bit o rounded
// where it is written.
std::tuple<at::Tensor, at::Tensor> attention_fwd_eager(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       const std::optional<at::Tensor>& mask, bool causal, double scale,
                                                       int64_t block_q, int64_t block_k) {
  auto [o, lse, rare] = forward(q, k, v, mask, causal, scale, block_q, block_k, q.scalar_type());
  return {o, lse};
}

// attention_fwd_eager with bfloat16 products through MKL's gemm_bf16bf16f32 (the ``fused-bf16gemm`` kernel):
// the decode kernel takes every query row group through it, the prefill tiles their products. Other
// dtypes, and calls small enough for the row path, run as attention_fwd_eager.
std::tuple<at::Tensor, at::Tensor> attention_fwd_eager_gemm16(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v,
                                                              const std::optional<at::Tensor>& mask, bool causal,
                                                              double scale, int64_t block_q, int64_t block_k) {
  TORCH_CHECK(has_gemm16(), "attention: this process's MKL has no gemm_bf16bf16f32");
  auto [o, lse, rare] = forward(q, k, v, mask, causal, scale, block_q, block_k, q.scalar_type(), true);
  return {o, lse};
}

// Which path a call of these sizes (float32 q, or 16-bit) takes: 0 the small rows, 1 the decode kernel, 2
// the prefill tiles.
int64_t attention_path(int64_t B, int64_t Hq, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t Dv, bool f32) {
  Problem p{};
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.Lk = Lk; p.D = D; p.Dv = Dv;
  if (takes_small(p)) return 0;
  return takes_decode(Lq, Lk, D, Dv, Hkv > 0 ? Hq / Hkv : 1, f32) ? 1 : 2;
}

// Whether this process can run attention_fwd_eager_gemm16.
bool attention_has_gemm16() { return has_gemm16(); }

// gemm16 itself on tensors, for the tests: c = alpha * a . op(b) + beta * c (a [M, K] and b [N, K] with
// trans_b, else [K, N], bfloat16 with contiguous rows; c [M, N] float32, contiguous), in place.
void attention_gemm16(const at::Tensor& a, const at::Tensor& b, bool trans_b, double alpha, double beta, at::Tensor& c) {
  TORCH_CHECK(has_gemm16(), "attention: this process has no bfloat16 product");
  TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && c.scalar_type() == at::kFloat &&
                  a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.stride(1) == 1 && b.stride(1) == 1 && c.is_contiguous(),
              "attention_gemm16: bfloat16 a and b with contiguous rows, contiguous float32 c");
  const int M = a.size(0), K = a.size(1), N = trans_b ? b.size(0) : b.size(1);
  TORCH_CHECK((trans_b ? b.size(1) : b.size(0)) == K && c.size(0) == M && c.size(1) == N, "attention_gemm16: shapes");
  SerialBlas serial;
  gemm16(trans_b, M, N, K, float(alpha), a.data_ptr<c10::BFloat16>(), a.stride(0), b.data_ptr<c10::BFloat16>(),
         b.stride(0), float(beta), c.data_ptr<float>(), N);
}

// s = alpha * q . k^T through amx_scores_t, the decode tasks' scores on the tiles (tests): q [R, D] with
// 2 <= R <= 16, k [n, D] with rows strided as the caller's, n % 16 = 0, D % 32 = 0; s [R, n] contiguous.
void attention_scores_t(const at::Tensor& q, const at::Tensor& k, double alpha, at::Tensor& s) {
#if defined(SWITCHYARD_AMX)
  TORCH_CHECK(amx_on(), "attention_scores_t: no AMX tiles in this build, CPU or process");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 && s.scalar_type() == at::kFloat &&
                  q.dim() == 2 && k.dim() == 2 && s.dim() == 2 && q.is_contiguous() && k.stride(1) == 1 &&
                  s.is_contiguous(),
              "attention_scores_t: contiguous bfloat16 q, bfloat16 k with contiguous rows, contiguous float32 s");
  const int R = q.size(0), D = q.size(1), n = k.size(0);
  TORCH_CHECK(R >= 2 && R <= kScoresTRows && n % 16 == 0 && D % 32 == 0 && k.size(1) == D && s.size(0) == R &&
                  s.size(1) == n,
              "attention_scores_t: shapes");
  std::vector<uint32_t> qpack(D / 2 * 16);
  const uint16_t* q16 = reinterpret_cast<const uint16_t*>(q.data_ptr<c10::BFloat16>());
  amx_pack_b(true, R, D, q16, D, 16, D, qpack.data());
  amx_scores_t(R, n, D, float(alpha), qpack.data(), reinterpret_cast<const uint16_t*>(k.data_ptr<c10::BFloat16>()),
               k.stride(0), s.data_ptr<float>(), n);
#else
  TORCH_CHECK(false, "attention_scores_t: no AMX tiles in this build");
#endif
}

// Whether gemm16 runs on the AMX tiles (this build, CPU and process allow it, and it is switched on); `on`
// switches it (tests take MKL's product on the same CPU with it off). Returns the previous switch.
bool attention_gemm16_amx() { return amx_on(); }
bool attention_use_amx(bool on) {
#if defined(SWITCHYARD_AMX)
  return amx_wanted.exchange(on);
#else
  return false;
#endif
}

// Whether shapes with Lq query rows, Lk keys, head dims D, Dv and `group` query heads per kv head (float32
// q, or 16-bit) take the decode kernel.
bool attention_takes_decode(int64_t Lq, int64_t Lk, int64_t D, int64_t Dv, int64_t group, bool f32) {
  return takes_decode(Lq, Lk, D, Dv, group, f32);
}

// Backward: (dq, dk, dv), float32. ``delta`` is rowsum(o * do) minus the cotangent of lse (when there
// is one), so dS = P * (dP - delta). One task is one (batch, key/value head, key block): it owns its
// rows of dk and dv, walks every query head of its group and every query block that can attend the
// block, and adds its share of dq into the query block under that block's lock.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& dout, const at::Tensor& lse,
    const at::Tensor& delta, const std::optional<at::Tensor>& mask, bool causal, double scale, int64_t block_q,
    int64_t block_k) {
  const Problem p = describe(q, k, v, mask, causal, scale);
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.is_contiguous() && k.is_contiguous() && v.is_contiguous(),
              "attention: the backward takes contiguous float32 q, k, v");
  TORCH_CHECK(dout.scalar_type() == at::kFloat && dout.is_contiguous(), "attention: dout must be contiguous float32");
  TORCH_CHECK(lse.is_contiguous() && delta.is_contiguous(), "attention: lse and delta must be contiguous");
  const SerialBlas serial;
  at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  const float* dO = dout.data_ptr<float>();
  const float* LSE = lse.data_ptr<float>();
  const float* DELTA = delta.data_ptr<float>();
  float* dQ = dq.data_ptr<float>();
  float* dK = dk.data_ptr<float>();
  float* dV = dv.data_ptr<float>();
  TORCH_CHECK(block_q > 0 && block_k > 0, "attention: tile sizes must be positive");
  // Tiles no larger than the sequences, so that short calls allocate small scratch buffers.
  const int64_t BQ = std::max<int64_t>(1, std::min(block_q, p.Lq)), BK = std::max<int64_t>(1, std::min(block_k, p.Lk));
  const int64_t nqb = (p.Lq + BQ - 1) / BQ, nkb = (p.Lk + BK - 1) / BK;
  const int64_t kv_heads = p.B * p.Hkv;
  const int64_t tasks = nkb * kv_heads;
  std::vector<omp_lock_t> locks(p.B * p.Hq * nqb);
  for (auto& lock : locks) omp_init_lock(&lock);

#pragma omp parallel num_threads(threads())
  {
    std::vector<float> P(BQ * BK), dS(BQ * BK), dq_tile(BQ * p.D);
    // Under causal the first key blocks are attended by the most queries: hand them out first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t kb = t / kv_heads, bk = t % kv_heads;
      const int64_t b = bk / p.Hkv, hk = bk % p.Hkv;
      const int64_t k0 = kb * BK, n = std::min(BK, p.Lk - k0);
      const float* Kb = K + (bk * p.Lk + k0) * p.D;
      const float* Vb = V + (bk * p.Lk + k0) * p.Dv;
      float* dKb = dK + (bk * p.Lk + k0) * p.D;
      float* dVb = dV + (bk * p.Lk + k0) * p.Dv;
      // Under causal, query i reaches key k0 only when i >= k0 - shift.
      const int64_t first_q = p.causal ? std::max<int64_t>(0, k0 - p.shift) : 0;
      for (int64_t h = hk * p.group; h < (hk + 1) * p.group; ++h) {
        const int64_t bh = b * p.Hq + h;
        for (int64_t qb = first_q / BQ; qb < nqb; ++qb) {
          const int64_t q0 = qb * BQ, rows = std::min(BQ, p.Lq - q0);
          const float* Qb = Q + (bh * p.Lq + q0) * p.D;
          const float* dOb = dO + (bh * p.Lq + q0) * p.Dv;
          const float* lse_b = LSE + bh * p.Lq + q0;
          const float* delta_b = DELTA + bh * p.Lq + q0;
          float* p0 = P.data();
          gemm(false, true, rows, n, p.D, p.scale * kLog2e, Qb, p.D, Kb, p.D, 0.0f, p0, BK);
          if (p.tile_needs_mask(q0, k0, n)) p.mask_tile(p0, BK, b, h, q0, rows, k0, n);
          for (int64_t r = 0; r < rows; ++r) {
            float* s = p0 + r * BK;
            const float lse_r = lse_b[r] * kLog2e;
            if (lse_r == kNegInf) {  // a row that attends nothing has P = 0
              std::fill(s, s + n, 0.0f);
              continue;
            }
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) s[j] = fast_exp2(s[j] - lse_r);
          }
          gemm(true, false, n, p.Dv, rows, 1.0f, p0, BK, dOb, p.Dv, 1.0f, dVb, p.Dv);  // dV += P^T dO
          float* ds0 = dS.data();
          gemm(false, true, rows, n, p.Dv, 1.0f, dOb, p.Dv, Vb, p.Dv, 0.0f, ds0, BK);  // dP = dO V^T
          for (int64_t r = 0; r < rows; ++r) {
            const float* pr = p0 + r * BK;
            float* d = ds0 + r * BK;
            const float dr = delta_b[r];
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) d[j] = pr[j] == 0.0f ? 0.0f : pr[j] * (d[j] - dr);
          }
          gemm(true, false, n, p.D, rows, p.scale, ds0, BK, Qb, p.D, 1.0f, dKb, p.D);  // dK += scale dS^T Q
          gemm(false, false, rows, p.D, n, p.scale, ds0, BK, Kb, p.D, 0.0f, dq_tile.data(), p.D);  // scale dS K
          omp_lock_t* lock = &locks[bh * nqb + qb];
          omp_set_lock(lock);
          float* dQb = dQ + (bh * p.Lq + q0) * p.D;
          const float* src = dq_tile.data();
#pragma omp simd
          for (int64_t i = 0; i < rows * p.D; ++i) dQb[i] += src[i];
          omp_unset_lock(lock);
        }
      }
    }
  }
  for (auto& lock : locks) omp_destroy_lock(&lock);
  return {dq, dk, dv};
}

// -- the finite check in front of a library call ------------------------------------------------------

// t (4-D, its last dimension contiguous) holds only finite values; contiguous tensors in one run (split
// over the threads from 2^18 values: a [2, 8, 512, 64] bfloat16 q, k and v took about 40 us on one).
constexpr int64_t kFiniteParallel = int64_t(1) << 18;
// From this many values in all, q, k and v share the threads as one run (below 3 * kFiniteParallel): bfloat16
// [2, 8, 128, 64] q, k and v took 11 us on one thread and 9 us on two, [1, 8, 128, 64] 5.5 and 4.5 us; at
// [1, 8, 64, 64] (2^16.6 values) two threads took 3.3-3.8 us against 2.6 us on one (Xeon, paired with SDPA).
constexpr int64_t kFiniteShared = int64_t(1) << 17;
template <typename U>
bool tensor_finite(const at::Tensor& t, U expo) {
  const U* base = static_cast<const U*>(t.data_ptr());
  const int64_t n = t.numel();
  if (t.is_contiguous() && n >= kFiniteParallel && threads() > 1) {  // a large one: the cores share it
    const int nt = threads();
    int bad = 0;
#pragma omp parallel for num_threads(nt) reduction(| : bad)
    for (int s = 0; s < nt; ++s) {
      const int64_t lo = n * s / nt, hi = n * (s + 1) / nt;
      bad |= bits_finite(base + lo, hi - lo, expo) ? 0 : 1;
    }
    return bad == 0;
  }
  if (t.is_contiguous()) return bits_finite(base, n, expo);
  const int64_t D = t.size(3);
  for (int64_t b = 0; b < t.size(0); ++b)
    for (int64_t h = 0; h < t.size(1); ++h)
      for (int64_t l = 0; l < t.size(2); ++l)
        if (!bits_finite(base + b * t.stride(0) + h * t.stride(1) + l * t.stride(2), D, expo)) return false;
  return true;
}

// Whether q, k and v hold only finite values: 1 yes, 0 no, -1 when a tensor is not one this reads (not
// 4-D, its last dimension strided, or a dtype other than float32, bfloat16 and float16), which
// the caller then checks itself. One thread, but for contiguous tensors of kFiniteParallel values or more.
// f(t's values as unsigned integers of their width, the exponent field of its dtype) for float32, bfloat16
// or float16 t.
template <typename F>
bool with_bits(const at::Tensor& t, F f) {
  switch (t.scalar_type()) {
    case at::kFloat: return f(static_cast<const uint32_t*>(t.data_ptr()), Bits<float>::expo);
    case at::kBFloat16: return f(static_cast<const uint16_t*>(t.data_ptr()), Bits<c10::BFloat16>::expo);
    default: return f(static_cast<const uint16_t*>(t.data_ptr()), Bits<c10::Half>::expo);
  }
}

int64_t attention_all_finite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) {
    if (t->dim() != 4 || !t->device().is_cpu() || (t->numel() > 0 && t->size(3) > 1 && t->stride(3) != 1)) return -1;
    const auto dt = t->scalar_type();
    if (dt != at::kFloat && dt != at::kBFloat16 && dt != at::kHalf) return -1;
  }
  const bool same = k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type();
  const bool flat = q.is_contiguous() && k.is_contiguous() && v.is_contiguous();
  const int64_t total = q.numel() + k.numel() + v.numel();
  if (same && flat && total >= kFiniteShared && total < 3 * kFiniteParallel && threads() > 1) {
    // q, k and v as one run of values, shared by the threads
    const at::Tensor* ts[3] = {&q, &k, &v};
    const int nt = threads();
    int bad = 0;
#pragma omp parallel for num_threads(nt) reduction(| : bad)
    for (int s = 0; s < nt; ++s) {
      int64_t lo = total * s / nt, hi = total * (s + 1) / nt;
      for (const at::Tensor* t : ts) {  // this thread's part of each tensor in turn
        const int64_t n = t->numel(), a = std::min(lo, n), b = std::min(hi, n);
        if (a < b) bad |= with_bits(*t, [&](auto base, auto expo) { return bits_finite(base + a, b - a, expo); }) ? 0 : 1;
        lo = std::max<int64_t>(0, lo - n);
        hi = std::max<int64_t>(0, hi - n);
      }
    }
    return bad == 0 ? 1 : 0;
  }
  for (const at::Tensor* t : {&q, &k, &v})
    if (t->numel() > 0 && !with_bits(*t, [&](auto, auto expo) { return tensor_finite(*t, expo); })) return 0;
  return 1;
}

// Asks for the tile products on BLAS (on = true) or on the fallback loop; returns whether BLAS is in use.
bool attention_use_blas(bool on) {
  use_blas.store(on);
  return on && sgemm_ != nullptr;
}

// Which products the prefill tiles take: 0 by size (the default), 1 always this file's own loops, 2 always
// gemm; returns the mode in force. For tests and benchmarks.
int64_t attention_tile_products(int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "attention: tile product mode must be 0, 1 or 2");
  tile_products.store(static_cast<int>(mode));
  return mode;
}

TORCH_LIBRARY_FRAGMENT(SWITCHYARD_NS, m) {
  m.def("attention_fwd", &attention_fwd);
  m.def("attention_tile_products", &attention_tile_products);
  m.def("attention_bwd", &attention_bwd);
  m.def("attention_use_blas", &attention_use_blas);
  m.def("attention_takes_decode", &attention_takes_decode);
}

// The eager forward as a plain Python function as well (the no-grad CPU call of
// plugins/fused/attention.py): through torch.ops a call costs about 1.8 us more (its arguments parsed
// into IValues, the dispatcher), a fifth of a tiny call's time. The GIL is released while it runs.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attention_fwd_eager", &attention_fwd_eager, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("attention_fwd_eager_gemm16", &attention_fwd_eager_gemm16, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("attention_path", &attention_path);
  m.def("attention_has_gemm16", &attention_has_gemm16);
  m.def("attention_gemm16_amx", &attention_gemm16_amx);
  m.def("attention_use_amx", &attention_use_amx);
  m.def("attention_scores_t", &attention_scores_t, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("attention_gemm16", &attention_gemm16, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("attention_all_finite", &attention_all_finite, pybind11::call_guard<pybind11::gil_scoped_release>());
}
