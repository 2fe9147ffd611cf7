// Exact k-nearest-neighbour search on the CPU: blocked brute force and a kd-tree.
//
// Both keep, per query, a bounded max-heap of the k best (value, index) pairs ordered by value and
// then by index, so equal distances come out lower index first. Values are squared L2 distances, or
// negated inner products for metric "ip" (smaller is better in both). Every value that reaches a
// heap is the direct formula sum((q - x)^2) (or sum(q * x)) evaluated in double and rounded once to
// the input type: a query equal to a database point gets exactly 0.
//
// Brute force follows FAISS's IndexFlat (Johnson, Douze, Jegou, "Billion-scale similarity search
// with GPUs", 2017, sec. 3): a tile of queries times a tile of database points through BLAS, the
// expansion |x|^2 - 2 q.x selecting candidates, one running heap per query. The expansion cancels
// badly far from the origin, so (1) both sides are centred on the database mean first (distances do
// not change), and (2) it only selects: a database point is re-ranked by the direct formula whenever
// its expansion value is within a proven rounding bound (`l2_margin`) of the query's current k-th
// best, so no true neighbour is lost to the product's rounding. In low dimension (D <= kDirectMaxD)
// the direct formula is cheaper than the product and selects instead (bound `direct_slack`), and so it
// is for a few l2 queries (FAISS's exhaustive search does so below its BLAS threshold of 20 queries):
// the centring passes and the product's setup would cost more than the distances. Up to D = 32 the
// direct values run along a transposed database tile shared by the query block; above it, and for a
// single query, along each database row read in place (kTransposedMaxD and the counts beside it).
// Extra memory: per thread one [kQueryBlock, kDbTile] tile, one centred database tile and the
// centred query block; heaps of M x k (x the database splits, at most the thread count, when there
// are fewer query blocks than threads). Never [M, N].
//
// The kd-tree (Friedman, Bentley, Finkel, "An algorithm for finding best matches in logarithmic
// expected time", 1977) splits at the median along the dimension of largest spread down to leaves of
// kLeafSize points, on a permuted copy of the database so leaves are contiguous. The search descends
// the near side first and visits the far side only when the cell's distance to the query, kept
// incrementally (Arya and Mount, "Algorithms for fast vector quantization", 1993), can still beat
// the k-th best. Extra memory: the copy (N x D), one node per kLeafSize / 2 points, the M x k heaps.
//
// Extreme magnitudes: the rounding bounds below are relative, so each carries an absolute floor of a
// few subnormal spacings (below the smallest normal a product's error is absolute, and a relative
// slack admits nothing at a k-th best of 0). A selection value that overflowed (inf, or inf - inf =
// NaN) bounds nothing, so it always counts as a candidate and is re-ranked by the direct formula in
// double; a row whose heap still ends short of k is recomputed by the direct formula over every point.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/csrc/utils/pybind.h>
#include <omp.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));
extern "C" void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
                       const double* beta, double* c, const int* ldc) __attribute__((weak));
// MKL's per-thread thread count (torch's MKL exports it): a small product is run on the calling thread.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // the C interface (the lower-case name is Fortran's, by pointer)

namespace {

constexpr int64_t kQueryBlock = 256;   // queries per task (brute force)
constexpr int64_t kDbTile = 1024;      // database points per tile (brute force)
// An empty heap is seeded from a tile's k smallest selection values (Brute::seed) from this k, in a
// tile of this many times k points: below, the selection costs more than the pushes it saves.
constexpr int64_t kSeedMinK = 16, kSeedTileRatio = 8;
// The transposed tile's row pitch: not a multiple of 4 KiB, so the D rows a transposing copy writes in
// turn do not all map to the same few cache sets (at D = 64 a 4 KiB pitch made the copy 40x slower).
constexpr int64_t kPitch = kDbTile + 16;
constexpr int64_t kDirectMaxD = 8;     // at or below this dimension the direct formula selects
// l2 with few queries, measured against the product path on Zen 5 (AVX-512) at N = 1000-20000: up to
// this dimension the transposed tiles pay (their transposing copy grows with D) ...
constexpr int64_t kTransposedMaxD = 32;
constexpr int64_t kTransposedMaxQueries = 32;  // ... for this many queries (one: along the rows instead)
constexpr int64_t kRowsMaxQueries = 4;  // and above that dimension, along each database row read in place
constexpr int64_t kLeafSize = 16;      // kd-tree leaf bucket
constexpr int kFixedMaxD = 8;          // kd-trees of D <= this are compiled for their D
constexpr int64_t kTaskMinPoints = 1 << 15;  // kd-tree subtrees built as separate OpenMP tasks
constexpr int64_t kParallelPrepare = 1 << 20;  // database entries (N * D) worth a parallel pass (~0.3 ms)
constexpr int64_t kSerialGemm = 1 << 22;  // multiply-adds below which one BLAS call runs single-threaded
constexpr int64_t kQueriesPerThread = 64;      // kd-tree queries worth a thread
constexpr double kInf = std::numeric_limits<double>::infinity();

int threads() { return std::max(1, at::get_num_threads()); }

template <typename T> constexpr double unit_roundoff();
template <> constexpr double unit_roundoff<float>() { return 5.9604644775390625e-08; }   // 2^-24
template <> constexpr double unit_roundoff<double>() { return 1.1102230246251565e-16; }  // 2^-53

// Row-major C[m, n] = A[m, kk] . B[n, kk]^T (both row-major, leading dimension kk).
template <typename T>
void gemm_nt(int m, int n, int kk, const T* A, const T* B, T* C, int ldc) {
  if (m == 0 || n == 0) return;
  // A product this small costs less than waking MKL's threads, and on a busy machine one of them can
  // hold the call for a scheduler slice (M=10 N=1000 D=64 measured milliseconds at load 4).
  struct SerialBlas {  // as attention.cpp's: the caller's OpenMP thread count is put back too
    int previous = -1;
    int omp_threads = omp_get_max_threads();
    explicit SerialBlas(bool small) {
      if (small && MKL_Set_Num_Threads_Local != nullptr) previous = MKL_Set_Num_Threads_Local(1);
    }
    ~SerialBlas() {
      if (previous >= 0) MKL_Set_Num_Threads_Local(previous);
      if (omp_get_max_threads() != omp_threads) omp_set_num_threads(omp_threads);
    }
  } serial(static_cast<int64_t>(m) * n * kk < kSerialGemm);
  const T one = 1, zero = 0;
  const char ta = 'T', tb = 'N';
  // Column-major BLAS sees row-major matrices transposed: C^T[n, m] = B[n, kk] . A^T[kk, m].
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &n, &m, &kk, &one, B, &kk, A, &kk, &zero, C, &ldc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &n, &m, &kk, &one, B, &kk, A, &kk, &zero, C, &ldc);
  }
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      T s = 0;
      for (int p = 0; p < kk; ++p) s += A[(int64_t)i * kk + p] * B[(int64_t)j * kk + p];
      C[(int64_t)i * ldc + j] = s;
    }
}

// The smallest T not below t (t itself when it is representable), so `value <= up<T>(t)` loses
// nothing that `value <= t` would admit.
template <typename T>
T up(double t) {
  if (!(t <= static_cast<double>(std::numeric_limits<T>::max()))) return std::numeric_limits<T>::infinity();
  T r = static_cast<T>(t);
  if (static_cast<double>(r) < t) {
    // the next T up, by its bits (libm's nextafter is a call, and this runs after every push)
    if (r == T(0)) return std::numeric_limits<T>::denorm_min();
    using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
    Bits b;
    std::memcpy(&b, &r, sizeof b);
    b = r > T(0) ? b + 1 : b - 1;
    std::memcpy(&r, &b, sizeof b);
  }
  return r;
}

template <typename T>
double direct_l2(const T* a, const T* b, int64_t D) {
  // Any summation order in double keeps the value within D * 2^-53 of the exact sum, far inside every
  // bound below, and equal rows still give equal values. Four partial sums (the compiler packs them
  // into one vector): a simd reduction's epilogue added its lanes one by one through the stack, about
  // 20 ns a call at D = 16, where a search of 10 queries re-ranks hundreds of points.
  double s[4] = {0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    for (int u = 0; u < 4; ++u) {
      const double t = static_cast<double>(a[d + u]) - static_cast<double>(b[d + u]);
      s[u] += t * t;
    }
  }
  for (; d < D; ++d) {
    const double t = static_cast<double>(a[d]) - static_cast<double>(b[d]);
    s[0] += t * t;
  }
  return (s[0] + s[1]) + (s[2] + s[3]);
}

// -(a . b) in double. Up to kDirectMaxD the sum runs in order d = 0, 1, ...: a single float32 "ip" query by
// rows (direct_fixed) selects by the very value its re-rank computes here
// (each product of two floats is exact in double, so a fused multiply-add rounds as the add alone), and
// a point can be neither lost nor taken on the two sums' orders where they cancel. Above, any order.
// Forced inline: called in direct_fixed's simd loop, it vectorised across the points only when inlined
// (as a call, M = 1 N = 128476 D = 8 took 0.52x FAISS's time with AVX-512 against 0.30x).
template <typename T>
__attribute__((always_inline)) inline double direct_neg_ip(const T* a, const T* b, int64_t D) {
  double s = 0;
  if (D <= kDirectMaxD) {
    for (int64_t d = 0; d < D; ++d) s += static_cast<double>(a[d]) * static_cast<double>(b[d]);
    return -s;
  }
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += static_cast<double>(a[d]) * static_cast<double>(b[d]);
  return -s;
}

// |row - centre|^2 in double of the row centred in T (written to `out` when given). The centre is zero
// for "ip" and the direct formula, where the centred row is the row itself. Plain pointers and no
// branch, so the loop vectorizes at every level (float to double conversion included); any order of
// the double sum is within the bounds' slack.
template <typename T, bool Store>
inline double centred_norm2(const T* __restrict row, const T* __restrict cen, T* __restrict out, int64_t D) {
  // Eight partial sums (one vector's worth; see direct_l2): a simd reduction's epilogue cost more than the
  // row at D = 16, where the "ip" bound's norms pass is most of a small search's time.
  double s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) {
    for (int u = 0; u < 8; ++u) {
      const T c = row[d + u] - cen[d + u];
      if constexpr (Store) out[d + u] = c;
      s[u] += static_cast<double>(c) * static_cast<double>(c);
    }
  }
  for (; d < D; ++d) {
    const T c = row[d] - cen[d];
    if constexpr (Store) out[d] = c;
    s[0] += static_cast<double>(c) * static_cast<double>(c);
  }
  return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

// A bounded max-heap of the k best (value, index) pairs: the worst pair, by value then index, at
// the root. It lives in caller-owned arrays (an output row, or scratch).
template <typename T>
struct TopK {
  T* val;
  int64_t* idx;
  int64_t k;
  int64_t n = 0;

  static bool before(T a, int64_t i, T b, int64_t j) { return a < b || (a == b && i < j); }

  double worst() const { return n < k ? kInf : static_cast<double>(val[0]); }

  void push(T a, int64_t i) {
    if (n < k) {
      int64_t c = n++;
      while (c > 0) {
        const int64_t p = (c - 1) / 2;
        if (!before(val[p], idx[p], a, i)) break;
        val[c] = val[p];
        idx[c] = idx[p];
        c = p;
      }
      val[c] = a;
      idx[c] = i;
    } else if (before(a, i, val[0], idx[0])) {
      sift_down(a, i, n);
    }
  }

  void sift_down(T a, int64_t i, int64_t size) {
    int64_t c = 0;
    for (;;) {
      int64_t m = 2 * c + 1;
      if (m >= size) break;
      if (m + 1 < size && before(val[m], idx[m], val[m + 1], idx[m + 1])) ++m;
      if (before(val[m], idx[m], a, i)) break;
      val[c] = val[m];
      idx[c] = idx[m];
      c = m;
    }
    val[c] = a;
    idx[c] = i;
  }

  // Heap sort in place: val/idx become ascending by (value, index).
  void sort() {
    for (int64_t size = n; size > 1; --size) {
      const T a = val[size - 1];
      const int64_t i = idx[size - 1];
      val[size - 1] = val[0];
      idx[size - 1] = idx[0];
      sift_down(a, i, size - 1);
    }
  }
};

// The result rows: value -> distance (negated back for "ip"), heap order -> ascending.
template <typename T>
void finish(TopK<T>& h, bool ip, T* out_d, int64_t* out_i) {
  h.sort();
  for (int64_t r = 0; r < h.k; ++r) {
    out_d[r] = ip ? -h.val[r] : h.val[r];
    out_i[r] = h.idx[r];
  }
}

// ---------------------------------------------------------------------------------------------------
// Brute force
//
// Bound on |(|x_c|^2 - 2 q_c.x_c + |q_c|^2) - d| for the centred, rounded vectors q_c, x_c: centring
// moves each coordinate by at most u |.|, which moves the distance by at most 2u(|q_c|+|x_c|)^2; the
// product and norms in type T err by at most gamma_D (|q_c| + |x_c|)^2 and the final subtraction by
// u(|x_c|^2 + 2|q_c||x_c|); rounding the re-ranked value costs u d <= u(|q_c|+|x_c|)^2. Together
// (D + 6) u (|q_c| + |x_c|)^2 to first order; the margin doubles it. Products that underflow err by
// up to half a subnormal spacing each, absolutely: the floor (D + 6) u min_normal = (D + 6) / 2
// spacings, doubled, covers them.
template <typename T>
double l2_margin(int64_t D, double qnorm, double xnorm) {
  const double s = qnorm + xnorm;
  return 2.0 * (D + 6) * unit_roundoff<T>() * (s * s + std::numeric_limits<T>::min());
}

// |fl(q.x) - q.x| <= gamma_D sum |q_i x_i| <= gamma_D |q||x|, plus the re-ranked value's rounding;
// the same floor for underflow.
template <typename T>
double ip_margin(int64_t D, double qnorm, double xnorm) {
  return 2.0 * (D + 4) * unit_roundoff<T>() * (qnorm * xnorm + std::numeric_limits<T>::min());
}

// The direct formula in type T errs by at most (D + 3) u of the distance (all terms are positive).
template <typename T>
double direct_slack(int64_t D) {
  return 2.0 * (D + 4) * unit_roundoff<T>();
}

// The absolute part of the selection bounds: (D + 4) subnormal spacings of T, more than the D + 1
// half-spacings that underflowing squares and the final rounding can lose below the smallest normal.
template <typename T>
double subnormal_floor(int64_t D) {
  return direct_slack<T>(D) * std::numeric_limits<T>::min();
}

// a[j] = the direct formula in T for one query against n points, with the dimension fixed at compile
// time so each value stays in a register, and the loop across the points: a transposed tile (point j's
// value d at x[d * kPitch + j]), or rows read in place (Rows: at x[j * DD + d]; with AVX-512 a row of 8
// float32 values summed along itself filled half a vector, and its own horizontal sum cost more than the
// row: one l2 query, N = 69832, D = 8, took 0.53x FAISS's time that way, 0.14-0.24x across the points).
// An "ip" query by rows (one float32 query) takes each value from direct_neg_ip itself, rounded once: the
// value its re-rank gives, so it selects with no margin and needs no norms pass for one.
template <typename T, int DD, bool IP, bool Rows>
void direct_fixed(const T* __restrict q, const T* __restrict x, T* __restrict a, int64_t n) {
  T qv[DD];
  for (int d = 0; d < DD; ++d) qv[d] = q[d];
  if constexpr (IP && Rows) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) a[j] = static_cast<T>(direct_neg_ip(qv, x + j * DD, DD));
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    T s = 0;
    for (int d = 0; d < DD; ++d) {
      const T xv = Rows ? x[j * DD + d] : x[d * kPitch + j];
      if constexpr (IP) {
        s -= qv[d] * xv;
      } else {
        const T t = qv[d] - xv;
        s += t * t;
      }
    }
    a[j] = s;
  }
}

// a[j] = the direct l2 formula in T for one query against rows x[j * D ..] read in place (any D; the sum
// runs along the row, in the vector order, which the bound `direct_slack` allows: every term is >= 0).
template <typename T>
void direct_rows(const T* __restrict q, const T* __restrict x, int64_t D, T* __restrict a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) {
    const T* __restrict row = x + j * D;
    T s = 0;
#pragma omp simd reduction(+ : s)
    for (int64_t d = 0; d < D; ++d) {
      const T t = q[d] - row[d];
      s += t * t;
    }
    a[j] = s;
  }
}

// The same for any D, J columns at a time with their sums held in registers through the dimension
// loop (each sum in order d = 0, 1, ..., within `direct_slack`): a pass along the tile per dimension would
// read and write every sum D times. Columns [n, n rounded up to J) are computed too, from the zeros the
// transposing copy puts there: `a` and the tile's rows have room for them (kDbTile is a multiple of J)
// and the scan reads [0, n) only.
#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif
// One vector of the level's width (a wider one on AVX2 was split through the stack: 4x slower)
typedef float FloatVec __attribute__((vector_size(kVecBytes)));
typedef double DoubleVec __attribute__((vector_size(kVecBytes)));
template <typename T>
constexpr int64_t kDirectCols = 4 * kVecBytes / sizeof(T);  // columns a block of direct_tile_any holds

template <typename T, bool IP>
void direct_tile_any(const T* __restrict q, const T* __restrict xt, T* __restrict a, int64_t n, int64_t D) {
  // GCC's vector extension, four vectors of sums held in registers (an array of sums with a simd pragma
  // went through the stack each step)
  using V = std::conditional_t<std::is_same_v<T, float>, FloatVec, DoubleVec>;
  constexpr int64_t L = kVecBytes / sizeof(T), J = kDirectCols<T>;
  static_assert(kDbTile % J == 0, "the tile's rows must hold whole column blocks");
  auto load = [](const T* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  };
  for (int64_t j0 = 0; j0 < n; j0 += J) {
    V s0 = {}, s1 = {}, s2 = {}, s3 = {};
    const T* __restrict x = xt + j0;
    for (int64_t d = 0; d < D; ++d, x += kPitch) {
      const T qd = q[d];
      if constexpr (IP) {  // the negated inner product (any order of the sum is within ip_margin)
        s0 -= qd * load(x);
        s1 -= qd * load(x + L);
        s2 -= qd * load(x + 2 * L);
        s3 -= qd * load(x + 3 * L);
      } else {
        const V t0 = qd - load(x), t1 = qd - load(x + L), t2 = qd - load(x + 2 * L), t3 = qd - load(x + 3 * L);
        s0 += t0 * t0;
        s1 += t1 * t1;
        s2 += t2 * t2;
        s3 += t3 * t3;
      }
    }
    std::memcpy(a + j0, &s0, sizeof s0);
    std::memcpy(a + j0 + L, &s1, sizeof s1);
    std::memcpy(a + j0 + 2 * L, &s2, sizeof s2);
    std::memcpy(a + j0 + 3 * L, &s3, sizeof s3);
  }
}

template <typename T>
using DirectFn = void (*)(const T*, const T*, T*, int64_t);

template <typename T, bool Rows, int... Ds>
DirectFn<T> pick_direct(int64_t D, bool ip, std::integer_sequence<int, Ds...>) {
  DirectFn<T> fn = nullptr;
  ((D == Ds + 1 ? (fn = ip ? &direct_fixed<T, Ds + 1, true, Rows> : &direct_fixed<T, Ds + 1, false, Rows>) : fn), ...);
  return fn;
}

// direct_fixed for D <= kDirectMaxD, over a transposed tile or (rows) the database rows in place
template <typename T>
DirectFn<T> direct_values(int64_t D, bool ip, bool rows) {
  constexpr auto dims = std::make_integer_sequence<int, kDirectMaxD>{};
  return rows ? pick_direct<T, true>(D, ip, dims) : pick_direct<T, false>(D, ip, dims);
}

// Bit i set when a[i] may be re-ranked (i < n <= 64): a[i] <= thr, or with Guard also an overflowed a[i]
// (inf or NaN), which bounds nothing. One vector compare per 16 (8) floats on AVX-512 (AVX2).
template <bool Guard, typename T>
inline uint64_t candidates(const T* a, int64_t n, T thr) {
  uint64_t bits = 0;
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 t = _mm512_set1_ps(thr), inf = _mm512_set1_ps(std::numeric_limits<float>::infinity());
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_loadu_ps(a + i);
      const uint64_t m = Guard ? uint16_t(~_mm512_mask_cmp_ps_mask(_mm512_cmp_ps_mask(v, t, _CMP_GT_OQ), v, inf, _CMP_LT_OQ))
                               : _mm512_cmp_ps_mask(v, t, _CMP_LE_OQ);
      bits |= m << i;
    }
  } else {
    const __m512d t = _mm512_set1_pd(thr), inf = _mm512_set1_pd(std::numeric_limits<double>::infinity());
    for (; i + 8 <= n; i += 8) {
      const __m512d v = _mm512_loadu_pd(a + i);
      const uint64_t m = Guard ? uint8_t(~_mm512_mask_cmp_pd_mask(_mm512_cmp_pd_mask(v, t, _CMP_GT_OQ), v, inf, _CMP_LT_OQ))
                               : _mm512_cmp_pd_mask(v, t, _CMP_LE_OQ);
      bits |= m << i;
    }
  }
#elif defined(__AVX2__)
  if constexpr (std::is_same_v<T, float>) {
    const __m256 t = _mm256_set1_ps(thr), inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(a + i);
      const uint64_t m = Guard ? uint8_t(~_mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, t, _CMP_GT_OQ),
                                                                        _mm256_cmp_ps(v, inf, _CMP_LT_OQ))))
                               : uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(v, t, _CMP_LE_OQ)));
      bits |= m << i;
    }
  } else {
    const __m256d t = _mm256_set1_pd(thr), inf = _mm256_set1_pd(std::numeric_limits<double>::infinity());
    for (; i + 4 <= n; i += 4) {
      const __m256d v = _mm256_loadu_pd(a + i);
      const uint64_t m = Guard ? uint8_t(~_mm256_movemask_pd(_mm256_and_pd(_mm256_cmp_pd(v, t, _CMP_GT_OQ),
                                                                         _mm256_cmp_pd(v, inf, _CMP_LT_OQ))) & 0xF)
                               : uint64_t(_mm256_movemask_pd(_mm256_cmp_pd(v, t, _CMP_LE_OQ)));
      bits |= m << i;
    }
  }
#endif
  constexpr T inf = std::numeric_limits<T>::infinity();
  for (; i < n; ++i) bits |= uint64_t(Guard ? !(a[i] > thr && a[i] < inf) : a[i] <= thr) << i;
  return bits;
}

template <typename T>
struct Brute {
  const T* Q;
  const T* X;
  int64_t M, N, D, k;
  bool ip;
  std::vector<double> mean;  // the centre (l2 with the product); zeros otherwise
  std::vector<T> centre;     // the same, in T (what the tiles subtract)
  double xmax = 0;           // max |x - mean| over the database (the margin's |x_c| bound)

  // "ip" goes direct on transposed tiles only (from 2 queries): a single query keeps the product path,
  // whose setup is then no dearer than the norms pass the direct "ip" bound needs as well.
  bool direct() const {
    if (D <= kDirectMaxD) return true;
    if (ip) return M >= 2 && M <= kTransposedMaxQueries && D <= kTransposedMaxD;
    return M <= (D <= kTransposedMaxD ? kTransposedMaxQueries : kRowsMaxQueries);
  }
  // A single query of D <= kDirectMaxD reads the rows in place too: the transposing copy and the norms
  // pass cost it two more passes over the database (M = 1, N = 69832, D = 8 l2 on the Xeon: 0.86x FAISS's
  // time with AVX-512, 1.12x with AVX2, against 0.14-0.24x and 0.27-0.37x by rows, direct_fixed). A float32
  // "ip" one selects by its exact values (see direct_neg_ip), so it needs no norms for a margin either; a
  // float64 one keeps the tiles (its products are rounded, and the two loops may contract them apart).
  bool by_rows() const {
    if (D > kDirectMaxD) return direct() && (M == 1 || D > kTransposedMaxD);
    return M == 1 && (!ip || std::is_same_v<T, float>);
  }
  bool transposed() const { return direct() && !by_rows(); }  // the direct tile, transposed
  // l2 above kDirectMaxD, and a single query by rows: no pass over the database before the search; no
  // overflow bound either, so every value is taken as one that may have overflowed (the guarded scan).
  // (Other "ip" calls need the database's largest norm for their margin: one pass over the database.)
  bool unprepared() const { return direct() && ((D > kDirectMaxD && !ip) || by_rows()); }

  void prepare() {
    mean.assign(D, 0.0);
    centre.assign(D, T(0));
    if (unprepared()) {
      xmax = kInf;
      return;
    }
    // A pass over a small database is not worth a parallel region: waking the other threads costs more,
    // and on a busy machine a descheduled one holds the region's end for a time slice.
    const int nt = N * D >= kParallelPrepare ? threads() : 1;
    if (!ip && !direct()) {
      std::vector<double> part(nt * D, 0.0);
#pragma omp parallel num_threads(nt) if (nt > 1)
      {
        double* acc = part.data() + omp_get_thread_num() * D;
#pragma omp for schedule(static)
        for (int64_t j = 0; j < N; ++j)
          for (int64_t d = 0; d < D; ++d) acc[d] += X[j * D + d];
      }
      for (int t = 0; t < nt; ++t)
        for (int64_t d = 0; d < D; ++d) mean[d] += part[t * D + d];
      // Rounded to T: the centre is then exactly what the centred tiles subtract.
      for (int64_t d = 0; d < D; ++d) mean[d] = static_cast<double>(static_cast<T>(mean[d] / N));
    }
    for (int64_t d = 0; d < D; ++d) centre[d] = static_cast<T>(mean[d]);
    const T* cen = centre.data();
    // The margins need the norms; the direct l2 bound is relative, but the overflow test needs them too.
    double mx = 0;
#pragma omp parallel for reduction(max : mx) num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t j = 0; j < N; ++j) mx = std::max(mx, centred_norm2<T, false>(X + j * D, cen, nullptr, D));
    // Inflated so the norm computed here in double over-covers the norm of the rounded vector.
    xmax = std::sqrt(mx) * (1.0 + 4.0 * D * unit_roundoff<T>());
  }

  // One task: queries [q0, q0 + rows) against database tiles [t0, t1), into `heaps` (rows of k).
  void run(int64_t q0, int64_t rows, int64_t t0, int64_t t1, T* hval, int64_t* hidx, int64_t* hcount, std::vector<T>& qc,
           T* xc, std::vector<T>& xn, T* tile, std::vector<double>& qn,
           std::vector<double>& qnorm) const {
    std::vector<TopK<T>> heaps;
    heaps.reserve(rows);
    for (int64_t r = 0; r < rows; ++r) heaps.push_back(TopK<T>{hval + r * k, hidx + r * k, k});
    for (int64_t r = 0; r < rows; ++r) {
      const T* q = Q + (q0 + r) * D;
      double s = 0;
      const T* cen = centre.data();
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) {
        // l2: -2 (q - mean), so the product yields -2 q_c.x_c exactly scaled; ip: -q.
        const T c = ip ? q[d] : static_cast<T>(q[d] - cen[d]);
        s += static_cast<double>(c) * c;
        qc[r * D + d] = direct() ? q[d] : (ip ? -c : static_cast<T>(-2) * c);
      }
      qn[r] = ip ? 0.0 : s;
      qnorm[r] = std::sqrt(s) * (1.0 + 4.0 * D * unit_roundoff<T>());
    }
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t j0 = t * kDbTile, n = std::min(kDbTile, N - j0);
      if (transposed()) {
        for (int64_t j = 0; j < n; ++j)  // transposed, so the distance loop runs along j
          for (int64_t d = 0; d < D; ++d) xc[d * kPitch + j] = X[(j0 + j) * D + d];
        if (D > kDirectMaxD) {  // direct_tile_any reads whole column blocks: the pad past n is defined
          const int64_t J = kDirectCols<T>, padded = std::min(kDbTile, (n + J - 1) / J * J);
          for (int64_t d = 0; d < D; ++d) std::fill(xc + d * kPitch + n, xc + d * kPitch + padded, T(0));
        }
      } else if (!direct()) {
        const T* cen = centre.data();
        T* xcp = xc;
        for (int64_t j = 0; j < n; ++j) {
          const double s = centred_norm2<T, true>(X + (j0 + j) * D, cen, xcp + j * D, D);
          xn[j] = ip ? T(0) : static_cast<T>(s);
        }
        gemm_nt<T>(static_cast<int>(rows), static_cast<int>(n), static_cast<int>(D), qc.data(), xc, tile,
                   static_cast<int>(kDbTile));
      }
      for (int64_t r = 0; r < rows; ++r) scan_row(heaps[r], Q + (q0 + r) * D, qc.data() + r * D, qn[r], qnorm[r],
                                                 xc, xn.data(), tile + r * kDbTile, j0, n);
    }
    for (int64_t r = 0; r < rows; ++r) hcount[r] = heaps[r].n;
  }

  // The bound a row's selection value must not exceed to be re-ranked, given the current k-th best.
  T threshold(double worst, double qn, double qnorm) const {
    if (!(worst < kInf)) return std::numeric_limits<T>::infinity();
    if (direct()) {
      if (ip && by_rows()) return up<T>(worst);  // the re-rank's own value: no margin
      if (ip) return up<T>(worst + ip_margin<T>(D, qnorm, xmax));
      return up<T>(worst * (1.0 + direct_slack<T>(D)) + subnormal_floor<T>(D));
    }
    return up<T>(worst - qn + (ip ? ip_margin<T>(D, qnorm, xmax) : l2_margin<T>(D, qnorm, xmax)));
  }

  // Whether a selection value of this row can overflow T: every value, product and partial sum is at
  // most (|q_c| + |x_c|)^2 in magnitude (to first order), so not while that stays well inside T.
  bool may_overflow(double qnorm) const {
    const double s = qnorm + xmax;
    return !(s * s < 0.25 * static_cast<double>(std::numeric_limits<T>::max()));
  }

  void scan_row(TopK<T>& h, const T* q, const T* qrow, double qn, double qnorm, const T* xc, const T* xn,
                T* a, int64_t j0, int64_t n) const {
    if (transposed()) {
      if (D <= kDirectMaxD) direct_values<T>(D, ip, false)(qrow, xc, a, n);
      else if (ip) direct_tile_any<T, true>(qrow, xc, a, n, D);
      else direct_tile_any<T, false>(qrow, xc, a, n, D);
    } else if (direct()) {
      if (D <= kDirectMaxD) direct_values<T>(D, ip, true)(qrow, X + j0 * D, a, n);
      else direct_rows<T>(qrow, X + j0 * D, D, a, n);
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) a[j] += xn[j];
    }
    if (may_overflow(qnorm)) scan_values<true>(h, q, qn, qnorm, a, j0, n);
    else scan_values<false>(h, q, qn, qnorm, a, j0, n);
  }

  // Re-ranks every value of a row's tile at or below the threshold. With `Guard`, an overflowed value
  // (inf, or NaN from inf - inf) counts as -inf in a block's minimum and is always re-ranked: it bounds
  // nothing. Without it (no value can overflow) the loops stay a plain minimum and comparison. Forced
  // inline: it runs once per row and tile, and as a call it measured up to 3% slower at D = 128.
  template <bool Guard>
  __attribute__((always_inline)) void scan_values(TopK<T>& h, const T* q, double qn, double qnorm, const T* a,
                                                  int64_t j0, int64_t n) const {
    uint64_t seeded[kDbTile / 64];  // the points seed() pushed, one bit each (n <= kDbTile)
    const bool seeding = h.n == 0 && h.k >= kSeedMinK && n >= kSeedTileRatio * h.k;
    if (seeding) seed<Guard>(h, q, a, j0, n, seeded);
    T thr = threshold(h.worst(), qn, qnorm);
    constexpr int64_t W = 64;
    constexpr T inf = std::numeric_limits<T>::infinity();
    for (int64_t c = 0; c < n; c += W) {
      const int64_t e = std::min(n, c + W);
      T low = inf;
      if constexpr (Guard) {
#pragma omp simd reduction(min : low)
        for (int64_t j = c; j < e; ++j) {
          const T v = a[j] < inf ? a[j] : -inf;
          low = v < low ? v : low;
        }
      } else {
#pragma omp simd reduction(min : low)
        for (int64_t j = c; j < e; ++j) low = a[j] < low ? a[j] : low;
      }
      if (!(low <= thr)) continue;
      // The block's candidates as bits, then one visit per set bit (the threshold only falls, so each is
      // checked again against the current one): a test of every value in turn cost more than the pushes.
      uint64_t bits = candidates<Guard>(a + c, e - c, thr);
      if (seeding) bits &= ~seeded[c / W];
      for (; bits != 0; bits &= bits - 1) {
        const int64_t j = c + __builtin_ctzll(bits);
        if (Guard ? (a[j] > thr && a[j] < inf) : !(a[j] <= thr)) continue;
        const T* x = X + (j0 + j) * D;
        const T v = static_cast<T>(ip ? direct_neg_ip(q, x, D) : direct_l2(q, x, D));
        h.push(v, j0 + j);
        thr = threshold(h.worst(), qn, qnorm);
      }
    }
  }

  // An empty heap fed a tile in order takes every value under its falling k-th best: about
  // k (1 + ln(n / k)) pushes on random data, each with its re-rank, ~200 at k = 50 over 1000 points.
  // Instead it starts from the points under a cut taken from a sample of the tile (every 4th value,
  // NaN as +inf): its r-th smallest, r = k/4 plus two standard deviations, so about 1.7k points fall
  // under it at k = 50 and fewer than k rarely do. Those are real points, so once k of them are in,
  // their worst bounds the final k-th best from the start, and the scan re-ranks only what falls
  // under that (short of k, the scan fills the heap as before). They are marked in `seeded` so the
  // scan does not push them again. A selection over the whole tile cost as much as the pushes saved.
  template <bool Guard>
  void seed(TopK<T>& h, const T* q, const T* a, int64_t j0, int64_t n, uint64_t* seeded) const {
    std::fill(seeded, seeded + (n + 63) / 64, uint64_t(0));
    constexpr int64_t S = 4;
    const int64_t m = n / S, share = h.k / S;
    const int64_t r = std::min(m, share + 2 * static_cast<int64_t>(std::sqrt(static_cast<double>(share))) + 2);
    thread_local std::vector<T> sample;
    sample.resize(m);
    constexpr T inf = std::numeric_limits<T>::infinity();
    for (int64_t i = 0; i < m; ++i) sample[i] = (!Guard || a[i * S] == a[i * S]) ? a[i * S] : inf;
    std::nth_element(sample.begin(), sample.begin() + (r - 1), sample.end());
    const T cut = sample[r - 1];
    for (int64_t j = 0; j < n; ++j) {
      if (!(a[j] <= cut)) continue;
      const T* x = X + (j0 + j) * D;
      h.push(static_cast<T>(ip ? direct_neg_ip(q, x, D) : direct_l2(q, x, D)), j0 + j);
      seeded[j / 64] |= uint64_t(1) << (j % 64);
    }
  }

  // The direct formula against every database point, from an empty heap.
  void exact_row(TopK<T>& h, const T* q) const {
    h.n = 0;
    for (int64_t j = 0; j < N; ++j)
      h.push(static_cast<T>(ip ? direct_neg_ip(q, X + j * D, D) : direct_l2(q, X + j * D, D)), j);
  }

  void search(T* out_d, int64_t* out_i) {
    prepare();
    const int nt = threads();
    const int64_t ntiles = (N + kDbTile - 1) / kDbTile;
    // Queries per task: kQueryBlock, or fewer where one block and the database's tiles cannot feed the
    // threads (M = 10 against N = 1000 ran on one thread: 1.5x FAISS's time, which shares the queries).
    int64_t QB = kQueryBlock;
    if (M <= kQueryBlock && ntiles < nt) QB = std::max<int64_t>(1, (M + nt - 1) / nt);
    const int64_t nqb = (M + QB - 1) / QB;
    // Fewer query blocks than threads: split the database too, one heap set per split, merged after.
    const int64_t splits = nqb >= nt ? 1 : std::min<int64_t>(ntiles, (nt + nqb - 1) / nqb);
    std::vector<T> hval(splits * M * k);
    std::vector<int64_t> hidx(splits * M * k), hcount(splits * M);
    // Scratch sized to the problem (a few queries need a few rows of the tile, not 1 MB of zeroed pages),
    // and no more threads than tasks: an idle thread still has to reach the region's end.
    const int64_t qrows = std::min(QB, M);
    // the direct tile is transposed; rows are read in place
    const int64_t xrows = transposed() ? kPitch : by_rows() ? 0 : std::min(kDbTile, N);
    const int used = static_cast<int>(std::min<int64_t>(nt, nqb * splits));
#pragma omp parallel num_threads(used) if (used > 1)
    {
      // the tiles are written before they are read: left uninitialised (zeroing them cost a few us a call)
      std::vector<T> qc(qrows * D), xn(xrows);
      std::unique_ptr<T[]> xc(new T[xrows * D]), tile(new T[qrows * kDbTile]);
      std::vector<double> qn(qrows), qnorm(qrows);
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < nqb * splits; ++task) {
        const int64_t b = task / splits, s = task % splits;
        const int64_t q0 = b * QB, rows = std::min(QB, M - q0);
        const int64_t t0 = ntiles * s / splits, t1 = ntiles * (s + 1) / splits;
        const int64_t off = (s * M + q0) * k;
        run(q0, rows, t0, t1, hval.data() + off, hidx.data() + off, hcount.data() + s * M + q0, qc, xc.get(), xn, tile.get(), qn,
            qnorm);
      }
#pragma omp for schedule(static)
      for (int64_t i = 0; i < M; ++i) {
        TopK<T> h{hval.data() + i * k, hidx.data() + i * k, k};
        h.n = hcount[i];  // a split with fewer than k points holds fewer than k pairs
        for (int64_t s = 1; s < splits; ++s)
          for (int64_t r = 0; r < hcount[s * M + i]; ++r) h.push(hval[(s * M + i) * k + r], hidx[(s * M + i) * k + r]);
        if (h.n < k) exact_row(h, Q + i * D);  // never expected; a short heap would leave slots unwritten
        finish(h, ip, out_d + i * k, out_i + i * k);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------
// kd-tree

// DD > 0 fixes the dimension at compile time (row swaps and distances unroll); DD == 0 reads D.
template <typename T, int DD>
struct KdTree {
  int64_t N, D;
  std::vector<T> pts;        // the database, permuted so every node's points are contiguous
  std::vector<int64_t> ids;  // original index of each permuted row
  std::vector<T> split;      // per node: the median coordinate
  std::vector<int32_t> dim;  // per node: the split dimension, -1 for a leaf

  KdTree(const T* X, int64_t N_, int64_t D_) : N(N_), D(DD > 0 ? DD : D_), pts(X, X + N_ * D_), ids(N_) {
    for (int64_t j = 0; j < N; ++j) ids[j] = j;
    int64_t levels = 0;
    for (int64_t s = N; s > kLeafSize; s = (s + 1) / 2) ++levels;
    const int64_t nodes = (int64_t(2) << levels) - 1;
    split.assign(nodes, T(0));
    dim.assign(nodes, -1);
    // Below kTaskMinPoints no subtree becomes a task: one thread builds it, without a parallel region.
#pragma omp parallel num_threads(threads()) if (N >= kTaskMinPoints)
#pragma omp single
    build(0, 0, N);
  }

  int64_t dims() const { return DD > 0 ? DD : D; }
  T coord(int64_t row, int32_t d) const { return pts[row * dims() + d]; }

  void swap_rows(int64_t a, int64_t b) {
    T* pa = pts.data() + a * dims();
    T* pb = pts.data() + b * dims();
    for (int64_t d = 0; d < dims(); ++d) std::swap(pa[d], pb[d]);
    std::swap(ids[a], ids[b]);
  }

  // Rows [lo, hi) with coordinate d below p (or, with `or_equal`, not above it) moved to the front, by a
  // branchless Lomuto pass (random data mispredicts half of a branchy partition's comparisons);
  // returns where the rest begins.
  int64_t partition(int64_t lo, int64_t hi, int32_t d, T p, bool or_equal) {
    int64_t j = lo;
    for (int64_t i = lo; i < hi; ++i) {
      const T v = coord(i, d);
      const bool front = or_equal ? v <= p : v < p;
      swap_rows(i, j);
      j += front;
    }
    return j;
  }

  // Quickselect: afterwards rows [lo, kth) have coordinate d <= that of row kth, and rows (kth, hi)
  // >= it. The pivot is the sample element of kth's rank among 63 evenly spaced rows, so one pass
  // leaves a small range around kth; rows equal to the pivot are split off so duplicates end it.
  void select(int64_t lo, int64_t hi, int64_t kth, int32_t d) {
    constexpr int64_t S = 63;
    while (hi - lo > 16) {
      const int64_t n = hi - lo;
      T sample[S];
      const int64_t m = n > 2048 ? S : (n > 128 ? 15 : 3);
      for (int64_t s = 0; s < m; ++s) sample[s] = coord(lo + (2 * s + 1) * n / (2 * m), d);
      const int64_t r = std::min(m - 1, (kth - lo) * m / n);
      std::nth_element(sample, sample + r, sample + m);
      const T p = sample[r];
      const int64_t below = partition(lo, hi, d, p, false);
      if (kth < below) {
        hi = below;
        continue;
      }
      const int64_t above = partition(below, hi, d, p, true);
      if (kth < above) return;  // rows [below, above) all equal p
      lo = above;
    }
    for (int64_t i = lo + 1; i < hi; ++i)
      for (int64_t j = i; j > lo && coord(j, d) < coord(j - 1, d); --j) swap_rows(j, j - 1);
  }

  // The dimension along which rows [lo, hi) spread most (the lowest on a tie), -1 if they are all equal.
  int32_t widest_dimension(int64_t lo, int64_t hi) const {
    int32_t best = -1;
    T widest = 0;
    auto consider = [&](int32_t d, T mn, T mx) {
      if (mx - mn > widest) widest = mx - mn, best = d;
    };
    if constexpr (DD > 0) {  // every dimension's bounds in registers, one pass
      T mn[DD], mx[DD];
      for (int d = 0; d < DD; ++d) mn[d] = mx[d] = coord(lo, d);
      for (int64_t r = lo + 1; r < hi; ++r)
        for (int d = 0; d < DD; ++d) {
          const T v = coord(r, d);
          mn[d] = std::min(mn[d], v);
          mx[d] = std::max(mx[d], v);
        }
      for (int d = 0; d < DD; ++d) consider(d, mn[d], mx[d]);
    } else {
      for (int32_t d = 0; d < D; ++d) {
        T mn = coord(lo, d), mx = mn;
        for (int64_t r = lo + 1; r < hi; ++r) {
          const T v = coord(r, d);
          mn = std::min(mn, v);
          mx = std::max(mx, v);
        }
        consider(d, mn, mx);
      }
    }
    return best;
  }

  void build(int64_t node, int64_t lo, int64_t hi) {
    if (hi - lo <= kLeafSize) return;
    const int32_t best = widest_dimension(lo, hi);
    if (best < 0) return;  // every point identical: one leaf, nothing to split
    const int64_t mid = lo + (hi - lo) / 2;
    select(lo, hi, mid, best);
    split[node] = coord(mid, best);
    dim[node] = best;
    if (hi - lo >= kTaskMinPoints) {
#pragma omp task
      build(2 * node + 1, lo, mid);
#pragma omp task
      build(2 * node + 2, mid, hi);
#pragma omp taskwait
    } else {
      build(2 * node + 1, lo, mid);
      build(2 * node + 2, mid, hi);
    }
  }

  struct Query {
    const T* q;
    TopK<T>& heap;
    double* off;   // per dimension: the query's offset from the current cell (0 inside it)
    double slack;  // relative: admits cells whose computed distance rounds just above the k-th best
    double floor;  // absolute: the same below the smallest normal, where T's spacing is fixed
  };

  double distance(const T* q, const T* x) const {
    double s = 0;
    for (int64_t d = 0; d < dims(); ++d) {
      const double t = static_cast<double>(q[d]) - static_cast<double>(x[d]);
      s += t * t;
    }
    return s;
  }

  void search(const Query& s, int64_t node, int64_t lo, int64_t hi, double rd) const {
    if (dim[node] < 0) {
      for (int64_t r = lo; r < hi; ++r) s.heap.push(static_cast<T>(distance(s.q, &pts[r * dims()])), ids[r]);
      return;
    }
    const int64_t mid = lo + (hi - lo) / 2;
    const int32_t d = dim[node];
    const double diff = static_cast<double>(s.q[d]) - static_cast<double>(split[node]);
    // Left holds coordinates <= split, right >= split.
    const bool left_first = diff < 0;
    if (left_first) search(s, 2 * node + 1, lo, mid, rd);
    else search(s, 2 * node + 2, mid, hi, rd);
    const double old = s.off[d];
    const double far = rd - old * old + diff * diff;
    if (far <= s.heap.worst() * (1.0 + s.slack) + s.floor) {
      s.off[d] = diff;
      if (left_first) search(s, 2 * node + 2, mid, hi, far);
      else search(s, 2 * node + 1, lo, mid, far);
      s.off[d] = old;
    }
  }
};

template <typename T, int DD>
void kdtree_search(const T* Q, const T* X, int64_t M, int64_t N, int64_t D, int64_t k, T* out_d, int64_t* out_i) {
  const KdTree<T, DD> tree(X, N, D);
  // Covers the incremental cell distance's rounding and a value that rounds to the k-th best in T;
  // the floor, (4 D + 8) subnormal spacings, a distance of 0 or a subnormal k-th best, where a far
  // cell's points may still round to it (and win the tie by index).
  const double slack = 8.0 * (D + 2) * unit_roundoff<T>();
  const double floor = slack * std::numeric_limits<T>::min();
  const int used = static_cast<int>(std::min<int64_t>(threads(), (M + kQueriesPerThread - 1) / kQueriesPerThread));
#pragma omp parallel num_threads(used) if (used > 1)
  {
    std::vector<double> off(D);
#pragma omp for schedule(dynamic, 32)
    for (int64_t i = 0; i < M; ++i) {
      std::fill(off.begin(), off.end(), 0.0);
      TopK<T> h{out_d + i * k, out_i + i * k, k};
      typename KdTree<T, DD>::Query s{Q + i * D, h, off.data(), slack, floor};
      tree.search(s, 0, 0, N, 0.0);
      finish(h, false, out_d + i * k, out_i + i * k);
    }
  }
}

// The kd-tree with the dimension fixed at compile time where it is small.
template <typename T, int... Ds>
void kdtree_dispatch(const T* Q, const T* X, int64_t M, int64_t N, int64_t D, int64_t k, T* out_d, int64_t* out_i,
                     std::integer_sequence<int, Ds...>) {
  const bool fixed = ((D == Ds + 1 ? (kdtree_search<T, Ds + 1>(Q, X, M, N, D, k, out_d, out_i), true) : false) || ...);
  if (!fixed) kdtree_search<T, 0>(Q, X, M, N, D, k, out_d, out_i);
}

// Whether a[0..n) is all finite: x * 0 is 0 for a finite x and NaN for inf or NaN. 64 independent lanes,
// so that the loop vectorises into several accumulators at any level (a few microseconds for the data
// of a small call, already in cache for the search; torch's sum and item cost 4-20 us there).
template <typename T>
bool all_finite(const T* a, int64_t n) {
  constexpr int kLanes = 64;
  T acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += a[i + j] * T(0);
  }
  for (; i < n; ++i) acc[0] += a[i] * T(0);
  T z = 0;
  for (int j = 0; j < kLanes; ++j) z += acc[j];
  return z == T(0);
}

void check_inputs(const at::Tensor& q, const at::Tensor& x, int64_t k) {
  TORCH_CHECK(q.dim() == 2 && x.dim() == 2 && q.size(1) == x.size(1), "nearest_neighbor: expected [M, D] and [N, D]");
  TORCH_CHECK(q.scalar_type() == x.scalar_type(), "nearest_neighbor: queries and database differ in dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble, "nearest_neighbor: float32 or float64");
  TORCH_CHECK(k >= 1 && k <= x.size(0), "nearest_neighbor: expected 1 <= k <= N");
  TORCH_CHECK(q.device().is_cpu() && x.device().is_cpu(), "nearest_neighbor: CPU tensors");
}

}  // namespace

// Blocked brute force: (distances [M, k], indices [M, k] int64, finite). metric "ip" when `ip`. When some
// input is NaN or inf (finite is false) nothing is searched: the caller raises the op's error.
std::tuple<at::Tensor, at::Tensor, bool> nearest_neighbor_brute(const at::Tensor& queries,
                                                                const at::Tensor& database, int64_t k, bool ip) {
  check_inputs(queries, database, k);
  const at::Tensor q = queries.contiguous(), x = database.contiguous();
  const int64_t M = q.size(0), N = x.size(0), D = q.size(1);
  at::Tensor dist = at::empty({M, k}, q.options());
  at::Tensor idx = at::empty({M, k}, q.options().dtype(at::kLong));
  bool finite = true;  // false: some input is NaN or inf, and nothing was searched
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nearest_neighbor_brute", [&] {
    if (!all_finite(q.data_ptr<scalar_t>(), M * D) || !all_finite(x.data_ptr<scalar_t>(), N * D)) {
      finite = false;
      return;
    }
    if (M == 0) return;
    Brute<scalar_t> b{q.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), M, N, D, k, ip};
    b.search(dist.data_ptr<scalar_t>(), idx.data_ptr<int64_t>());
  });
  return {dist, idx, finite};
}

// kd-tree, squared L2 only: build and search in one call; finite as for the brute force.
std::tuple<at::Tensor, at::Tensor, bool> nearest_neighbor_kdtree(const at::Tensor& queries,
                                                                 const at::Tensor& database, int64_t k) {
  check_inputs(queries, database, k);
  const at::Tensor q = queries.contiguous(), x = database.contiguous();
  const int64_t M = q.size(0), N = x.size(0), D = q.size(1);
  at::Tensor dist = at::empty({M, k}, q.options());
  at::Tensor idx = at::empty({M, k}, q.options().dtype(at::kLong));
  bool finite = true;  // false: some input is NaN or inf, and nothing was searched
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "nearest_neighbor_kdtree", [&] {
    if (!all_finite(q.data_ptr<scalar_t>(), M * D) || !all_finite(x.data_ptr<scalar_t>(), N * D)) {
      finite = false;
      return;
    }
    if (M == 0) return;
    kdtree_dispatch<scalar_t>(q.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), M, N, D, k, dist.data_ptr<scalar_t>(),
                              idx.data_ptr<int64_t>(), std::make_integer_sequence<int, kFixedMaxD>{});
  });
  return {dist, idx, finite};
}

// Which brute-force path M queries of dimension D take (tests): 0 the product tiles, 1 the direct formula
// on transposed tiles, 2 the direct formula along each database row read in place.
int64_t nearest_neighbor_path(int64_t M, int64_t D, bool ip) {
  const Brute<float> b{nullptr, nullptr, M, 0, D, 1, ip};
  return b.by_rows() ? 2 : b.transposed() ? 1 : 0;
}

TORCH_LIBRARY_FRAGMENT(SWITCHYARD_NS, m) {
  m.def("nearest_neighbor_brute", &nearest_neighbor_brute);
  m.def("nearest_neighbor_kdtree", &nearest_neighbor_kdtree);
}

// Both searches as plain Python functions as well (the eager calls of plugins/fused/nearest_neighbor.py):
// through torch.ops a call costs about 1.8 us more. The GIL is released while they run.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nearest_neighbor_brute", &nearest_neighbor_brute, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("nearest_neighbor_kdtree", &nearest_neighbor_kdtree, pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("nearest_neighbor_path", &nearest_neighbor_path);
}
