// decode_step on the CPU: one streaming pass over the vocabulary per (batch, node) row, then the tree.
//
// The row pass reads each row of logits once, in blocks that stay in L1, and keeps the running max
// (and first argmax), sum exp(z) and sum exp(z) z with z = (x - max) / temperature; when a block
// raises the max, the sums so far are rescaled (the online softmax: Milakov and Gimelshein, "Online
// normalizer calculation for softmax", 2018). From those, log p(token) = z_token - log sum and the
// entropy H = log sum - sum(e z) / sum, without materialising the softmax. Leaves only need the max.
// The tree walk then runs per batch row, and a sampled token costs one more pass over one row
// (inverse CDF over per-block sums, then a scan of the one block that holds the target). Equally deep
// paths whose float32-based scores lie within kTieBand of the best are re-scored in float64 by the
// reference's rule (an exactly summed log-sum-exp per row), so ties break exactly as it breaks them.
//
// Inputs (the Python side makes them so): draft_tokens int64 [B, T], parents and lex_rank int64 [T],
// logits float32 / bfloat16 / float16 [B, T, V], draft_probs float32 [B, T, V] or none, uniforms
// float64 [B, n], all contiguous. rule: 0 greedy, 1 typical, 2 rejection.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

// The AVX2 level gets explicit 8-wide loops: GCC if-converts exp_nonpos's selects with AVX-512's
// masks, but at AVX2 (no masks, trapping math) it leaves the exp loops scalar, which measured 3-9x
// slower than the AVX-512 build. AVX-512 keeps the compiler's 16-wide code.
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define SWITCHYARD_DS_AVX2 1
#endif

namespace {

constexpr int64_t kBlock = 2048;
// Below this many logits a step runs on one thread: waking the others costs more than it saves (and,
// on a busy machine, a descheduled thread stalls the whole parallel loop).
constexpr int64_t kSerialWork = 1 << 18;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr float kFloor = -200.0f;  // z below this contributes exp(z) = 0 (and e * z = 0, not 0 * -inf)
// Path scores from float32 row statistics are good to about 1e-6; equally deep paths within this
// (relative) band of the best are re-scored in float64. TOL_REL in core/ops/decode_step.py.
constexpr double kTieBand = 1e-4;

// exp(z) for z <= 0, within about 2 ulp: 2^(z log2 e) split into a rounded integer r and a fraction
// f in [-1/2, 1/2]; 2^f = exp(f ln 2) by its degree-7 Taylor polynomial (remainder below 1e-8), and r
// goes into the exponent bits. Branch-free, so the loops that call it vectorize.
inline float exp_nonpos(float z) {
  const float t = z * 1.44269504088896341f;
  const float tc = t < -126.0f ? -126.0f : t;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float r = (tc + magic) - magic;
  const float f = (tc - r) * 0.693147180559945309f;
  float p = 1.0f / 5040.0f;
  p = p * f + 1.0f / 720.0f;
  p = p * f + 1.0f / 120.0f;
  p = p * f + 1.0f / 24.0f;
  p = p * f + 1.0f / 6.0f;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = (static_cast<int32_t>(r) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return t < -126.0f ? 0.0f : p * scale;
}

#if defined(SWITCHYARD_DS_AVX2)
// exp_nonpos on 8 lanes, the same steps (a NaN lane stays NaN, as in the scalar code).
inline __m256 exp_nonpos8(__m256 z) {
  const __m256 lo = _mm256_set1_ps(-126.0f), magic = _mm256_set1_ps(12582912.0f);
  const __m256 t = _mm256_mul_ps(z, _mm256_set1_ps(1.44269504088896341f));
  const __m256 under = _mm256_cmp_ps(t, lo, _CMP_LT_OQ);
  const __m256 tc = _mm256_blendv_ps(t, lo, under);
  const __m256 r = _mm256_sub_ps(_mm256_add_ps(tc, magic), magic);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(tc, r), _mm256_set1_ps(0.693147180559945309f));
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(r), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// max(kFloor, (x - m) * inv_t) on 8 lanes; max_ps returns its second operand on NaN, as the scalar
// `z < kFloor ? kFloor : z` keeps a NaN z.
inline __m256 shifted8(const float* x, __m256 m, __m256 inv_t) {
  const __m256 z = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x), m), inv_t);
  return _mm256_max_ps(_mm256_set1_ps(-200.0f), z);
}

inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(at::Half x) { return static_cast<float>(x); }

// A block of logits as float32: the row itself for float32, else converted into buf.
inline const float* as_float(const float* x, int64_t, float*) { return x; }

inline const float* as_float(const at::BFloat16* x, int64_t n, float* buf) {
  const uint16_t* raw = reinterpret_cast<const uint16_t*>(x);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = static_cast<uint32_t>(raw[i]) << 16;
    float v;
    std::memcpy(&v, &bits, sizeof v);
    buf[i] = v;
  }
  return buf;
}

inline const float* as_float(const at::Half* x, int64_t n, float* buf) {
  int64_t i = 0;
#if defined(__F16C__)
  // c10's scalar conversion does not vectorize; F16C converts 8 at a time, exactly.
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
#endif
  for (; i < n; ++i) buf[i] = static_cast<float>(x[i]);
  return buf;
}

struct Stats {
  int64_t argmax = 0;
  float max = kNegInf;
  double sum = 0.0;   // sum exp(z), z = (x - max) * inv_t
  double wsum = 0.0;  // sum exp(z) z
};

inline float block_max(const float* x, int64_t n) {
  float m = kNegInf;
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

inline void block_sums(const float* x, int64_t n, float m, float inv_t, float& s_out, float& w_out) {
  float s = 0.0f, w = 0.0f;
  int64_t done = 0;  // entries the 8-wide loop took
#if defined(SWITCHYARD_DS_AVX2)
  {
    const __m256 vm = _mm256_set1_ps(m), vt = _mm256_set1_ps(inv_t);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, w0 = s0, w1 = s0;  // two chains: the adds' latency hides
    for (; done + 16 <= n; done += 16) {
      const __m256 z0 = shifted8(x + done, vm, vt), z1 = shifted8(x + done + 8, vm, vt);
      const __m256 e0 = exp_nonpos8(z0), e1 = exp_nonpos8(z1);
      s0 = _mm256_add_ps(s0, e0);
      s1 = _mm256_add_ps(s1, e1);
      w0 = _mm256_fmadd_ps(e0, z0, w0);
      w1 = _mm256_fmadd_ps(e1, z1, w1);
    }
    s = hsum8(_mm256_add_ps(s0, s1));
    w = hsum8(_mm256_add_ps(w0, w1));
  }
#else
#pragma omp simd reduction(+ : s, w)
#endif
  for (int64_t i = done; i < n; ++i) {
    float z = (x[i] - m) * inv_t;
    z = z < kFloor ? kFloor : z;
    const float e = exp_nonpos(z);
    s += e;
    w += e * z;
  }
  s_out = s;
  w_out = w;
}

// The row pass: max and first argmax always; the sums when need_sum.
template <typename T>
Stats row_stats(const T* row, int64_t V, float inv_t, bool need_sum) {
  alignas(64) float buf[kBlock];
  Stats st;
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    const float* x = as_float(row + start, n, buf);
    const float bm = block_max(x, n);
    if (bm > st.max || start == 0) {
      int64_t i = 0;
      while (i < n - 1 && x[i] != bm) ++i;
      st.argmax = start + i;
      if (need_sum && st.sum > 0) {  // rescale the sums to the new max
        const double d = (static_cast<double>(bm) - st.max) * inv_t;
        const double scale = std::exp(-d);
        if (scale > 0) {
          st.wsum = scale * (st.wsum - d * st.sum);
          st.sum *= scale;
        } else {
          st.sum = st.wsum = 0.0;
        }
      }
      st.max = std::max(st.max, bm);
    }
    if (need_sum && st.max > kNegInf) {
      float s, w;
      block_sums(x, n, st.max, inv_t, s, w);
      st.sum += s;
      st.wsum += w;
    }
  }
  return st;
}

// Inverse CDF over weights that fill(start, n, buf) writes for entries [start, start + n): the first
// entry whose running sum exceeds u * total, never one of weight 0; -1 when every weight is 0.
template <typename Fill>
int64_t sample_row(int64_t V, double u, const Fill& fill) {
  const int64_t blocks = (V + kBlock - 1) / kBlock;
  std::vector<double> sums(blocks);
  alignas(64) float buf[kBlock];
  double total = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock, n = std::min(kBlock, V - start);
    fill(start, n, buf);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += buf[i];
    sums[b] = s;
    total += s;
  }
  if (!(total > 0)) return -1;
  const double target = u * total;
  double cum = 0.0;
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t start = b * kBlock, n = std::min(kBlock, V - start);
    if (cum + sums[b] > target) {
      fill(start, n, buf);
      double c = cum;
      for (int64_t i = 0; i < n; ++i) {
        c += buf[i];
        if (c > target && buf[i] > 0) return start + i;
      }
    }
    cum += sums[b];
  }
  for (int64_t b = blocks - 1; b >= 0; --b) {  // rounding left the target unreached: the last positive entry
    const int64_t start = b * kBlock, n = std::min(kBlock, V - start);
    fill(start, n, buf);
    for (int64_t i = n - 1; i >= 0; --i)
      if (buf[i] > 0) return start + i;
  }
  return -1;
}

// A sample from p = softmax((x - max) * inv_t) of one row.
template <typename T>
int64_t sample_p(const T* row, int64_t V, float m, float inv_t, double u) {
  return sample_row(V, u, [&](int64_t start, int64_t n, float* buf) {
    alignas(64) float tmp[kBlock];
    const float* x = as_float(row + start, n, tmp);
    int64_t done = 0;
#if defined(SWITCHYARD_DS_AVX2)
    const __m256 vm = _mm256_set1_ps(m), vt = _mm256_set1_ps(inv_t);
    for (; done + 8 <= n; done += 8) _mm256_storeu_ps(buf + done, exp_nonpos8(shifted8(x + done, vm, vt)));
#else
#pragma omp simd
#endif
    for (int64_t i = done; i < n; ++i) {
      float z = (x[i] - m) * inv_t;
      buf[i] = exp_nonpos(z < kFloor ? kFloor : z);
    }
  });
}

// A sample from normalize(max(p - q, 0)), p = exp(z) / sum; from p when that has no mass.
template <typename T>
int64_t sample_residual(const T* row, const float* q, int64_t V, const Stats& st, float inv_t, double u) {
  const float inv_sum = static_cast<float>(1.0 / st.sum);
  const int64_t i = sample_row(V, u, [&](int64_t start, int64_t n, float* buf) {
    alignas(64) float tmp[kBlock];
    const float* x = as_float(row + start, n, tmp);
    int64_t done = 0;
#if defined(SWITCHYARD_DS_AVX2)
    const __m256 vm = _mm256_set1_ps(st.max), vt = _mm256_set1_ps(inv_t), vs = _mm256_set1_ps(inv_sum);
    for (; done + 8 <= n; done += 8) {
      const __m256 e = exp_nonpos8(shifted8(x + done, vm, vt));
      const __m256 r = _mm256_fmsub_ps(e, vs, _mm256_loadu_ps(q + start + done));
      _mm256_storeu_ps(buf + done, _mm256_max_ps(r, _mm256_setzero_ps()));  // NaN -> 0, as `r > 0 ? r : 0`
    }
#else
#pragma omp simd
#endif
    for (int64_t j = done; j < n; ++j) {
      float z = (x[j] - st.max) * inv_t;
      const float r = exp_nonpos(z < kFloor ? kFloor : z) * inv_sum - q[start + j];
      buf[j] = r > 0.0f ? r : 0.0f;
    }
  });
  return i >= 0 ? i : sample_p(row, V, st.max, inv_t, u);
}

// log sum exp((x - max) / temperature) of one row in float64, as the reference defines it: each term
// by std::exp in double (a scalar call: the same value wherever the entry sits), summed exactly in
// 128-bit fixed point (units of 2^-100; terms are at most 1) and rounded once. The sum does not depend
// on the order of the entries, so rows that are permutations of each other give equal sums.
template <typename T>
double exact_log_sum(const T* row, int64_t V, float max, double temperature) {
  unsigned __int128 acc = 0;
  const double m = max;
  for (int64_t j = 0; j < V; ++j) {
    const double e = std::exp((static_cast<double>(to_float(row[j])) - m) / temperature);
    if (e > 0 && e <= 1) acc += static_cast<unsigned __int128>(e * 0x1p100);  // NaN (bad logits): skipped
  }
  return std::log(static_cast<double>(acc) * 0x1p-100);
}

struct Problem {
  int64_t B, T, V, rule, nu, width;
  double temperature, threshold, alpha;
  float inv_t;
  const int64_t* drafts;
  const int64_t* parents;
  const int64_t* lex_rank;
  const float* q;
  const double* u;
  int64_t* tokens;
  int64_t* nodes;
  int64_t* num;
};

// log p(parent)[token] of one node, and whether the node passes on its own (rule 0 or 1).
template <typename T>
std::pair<double, bool> judge_node(const Problem& P, const T* logits, const Stats& st, int64_t row, int64_t token) {
  if (P.temperature == 0) {
    const bool hit = token == st.argmax;
    return {hit ? 0.0 : -std::numeric_limits<double>::infinity(), hit};
  }
  const double x = to_float(logits[row * P.V + token]);
  const double logp = (x - st.max) * static_cast<double>(P.inv_t) - std::log(st.sum);
  if (P.rule == 0) return {logp, token == st.argmax};
  const double entropy = std::log(st.sum) - st.wsum / st.sum;
  const double cutoff = std::min(P.threshold, P.alpha * std::exp(-entropy));
  return {logp, std::exp(logp) > cutoff};
}

void write_row(const Problem& P, int64_t b, const std::vector<int64_t>& path, int64_t extra) {
  int64_t* tok = P.tokens + b * P.width;
  int64_t* nod = P.nodes + b * P.width;
  const int64_t n = static_cast<int64_t>(path.size()) - 1;
  for (int64_t j = 0; j <= n; ++j) nod[j] = path[j];
  for (int64_t j = 1; j <= n; ++j) tok[j - 1] = P.drafts[b * P.T + path[j]];
  tok[n] = extra;
  P.num[b] = n;
}

// Among equally deep candidate leaves, the best by float64 path scores summed from the root down (the
// reference's rule), then the lowest path.
template <typename T>
int64_t rescore(const Problem& P, const T* logits, const std::vector<Stats>& stats, int64_t b,
                const std::vector<int64_t>& leaves) {
  std::vector<double> log_sum(P.T, 0.0);
  std::vector<char> known(P.T, 0);
  std::vector<int64_t> path;
  int64_t best = -1;
  double best_score = 0.0;
  for (const int64_t leaf : leaves) {
    path.clear();
    for (int64_t i = leaf; i > 0; i = P.parents[i]) path.push_back(i);
    double score = 0.0;
    for (auto it = path.rbegin(); it != path.rend(); ++it) {
      const int64_t p = P.parents[*it], r = b * P.T + p;
      const T* row = logits + r * P.V;
      if (!known[p]) {
        log_sum[p] = exact_log_sum(row, P.V, stats[r].max, P.temperature);
        known[p] = 1;
      }
      const double x = to_float(row[P.drafts[b * P.T + *it]]);
      score += (x - static_cast<double>(stats[r].max)) / P.temperature - log_sum[p];
    }
    if (best < 0 || score > best_score || (score == best_score && P.lex_rank[leaf] < P.lex_rank[best])) {
      best = leaf;
      best_score = score;
    }
  }
  return best;
}

template <typename T>
void verify_tree(const Problem& P, const T* logits, const std::vector<Stats>& stats, int64_t b) {
  const int64_t Tn = P.T;
  std::vector<char> alive(Tn, 0);
  std::vector<double> score(Tn, 0.0);
  std::vector<int64_t> depth(Tn, 0);
  alive[0] = 1;
  int64_t best = 0;
  for (int64_t i = 1; i < Tn; ++i) {
    const int64_t p = P.parents[i];
    depth[i] = depth[p] + 1;
    if (!alive[p]) continue;
    const auto [logp, pass] = judge_node(P, logits, stats[b * Tn + p], b * Tn + p, P.drafts[b * Tn + i]);
    if (!pass) continue;
    alive[i] = 1;
    score[i] = score[p] + logp;  // root to leaf, the reference's order
    if (depth[i] > depth[best] || (depth[i] == depth[best] &&
        (score[i] > score[best] || (score[i] == score[best] && P.lex_rank[i] < P.lex_rank[best]))))
      best = i;
  }
  if (P.temperature > 0) {  // at temperature 0 every passing token has log-probability 0 exactly
    std::vector<int64_t> near;
    const double band = kTieBand * (1.0 + std::fabs(score[best]));
    for (int64_t i = 0; i < Tn; ++i)
      if (alive[i] && depth[i] == depth[best] && score[i] >= score[best] - band) near.push_back(i);
    if (near.size() > 1) best = rescore(P, logits, stats, b, near);
  }
  std::vector<int64_t> path;
  for (int64_t i = best; i >= 0; i = P.parents[i]) path.push_back(i);
  std::reverse(path.begin(), path.end());
  const Stats& st = stats[b * Tn + best];
  int64_t extra = st.argmax;
  if (P.rule == 1 && P.temperature > 0) {
    extra = sample_p(logits + (b * Tn + best) * P.V, P.V, st.max, P.inv_t, P.u[b * P.nu]);
    if (extra < 0) extra = st.argmax;  // no mass: only NaN or +inf logits, outside the contract
  }
  write_row(P, b, path, extra);
}

// Speculative sampling over a chain of k = T - 1 drafts (Leviathan et al. 2023, Algorithm 1).
template <typename T>
void verify_chain(const Problem& P, const T* logits, const std::vector<Stats>& stats, int64_t b) {
  const int64_t k = P.T - 1;
  const double* u = P.u + b * P.nu;
  int64_t n = 0;
  for (int64_t j = 1; j <= k; ++j) {
    const int64_t token = P.drafts[b * P.T + j];
    const Stats& st = stats[b * P.T + j - 1];
    double p;
    if (P.temperature == 0) {
      p = token == st.argmax ? 1.0 : 0.0;
    } else {
      const double x = to_float(logits[(b * P.T + j - 1) * P.V + token]);
      p = std::exp((x - st.max) * static_cast<double>(P.inv_t) - std::log(st.sum));
    }
    const double q = P.q[(b * P.T + j) * P.V + token];
    if (!(q > 0 && u[j - 1] * q < p)) break;
    n = j;
  }
  const Stats& st = stats[b * P.T + n];
  const T* row = logits + (b * P.T + n) * P.V;
  int64_t extra = st.argmax;  // temperature 0: the residual of a one-hot p is that one-hot
  if (P.temperature > 0) {
    extra = n < k ? sample_residual(row, P.q + (b * P.T + n + 1) * P.V, P.V, st, P.inv_t, u[k])
                  : sample_p(row, P.V, st.max, P.inv_t, u[k]);
    if (extra < 0) extra = st.argmax;  // no mass: only NaN or +inf logits, outside the contract
  }
  std::vector<int64_t> path(n + 1);
  for (int64_t j = 0; j <= n; ++j) path[j] = j;
  write_row(P, b, path, extra);
}

template <typename T>
void run(const Problem& P, const T* logits) {
  const int64_t rows = P.B * P.T;
  std::vector<char> has_children(P.T, 0);
  for (int64_t i = 1; i < P.T; ++i) has_children[P.parents[i]] = 1;
  std::vector<Stats> stats(rows);
  const int threads = at::get_num_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (rows * P.V > kSerialWork)
  for (int64_t r = 0; r < rows; ++r) {
    const bool need_sum = P.temperature > 0 && has_children[r % P.T];
    stats[r] = row_stats(logits + r * P.V, P.V, P.inv_t, need_sum);
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (P.B * P.V > kSerialWork)
  for (int64_t b = 0; b < P.B; ++b) {
    if (P.rule == 2)
      verify_chain(P, logits, stats, b);
    else
      verify_tree(P, logits, stats, b);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_step_run(
    const at::Tensor& draft_tokens, const at::Tensor& parents, const at::Tensor& lex_rank, const at::Tensor& logits,
    const std::optional<at::Tensor>& draft_probs, int64_t rule, double temperature, double threshold, double alpha,
    const at::Tensor& uniforms, int64_t depth) {
  TORCH_CHECK(logits.dim() == 3 && logits.is_contiguous(), "decode_step_run: logits must be contiguous [B, T, V]");
  TORCH_CHECK(draft_tokens.is_contiguous() && parents.is_contiguous() && lex_rank.is_contiguous() &&
              uniforms.is_contiguous(), "decode_step_run: inputs must be contiguous");
  TORCH_CHECK(rule != 2 || (draft_probs.has_value() && draft_probs->scalar_type() == at::kFloat &&
                            draft_probs->is_contiguous()), "decode_step_run: rejection needs contiguous float32 draft_probs");
  Problem P{};
  P.B = logits.size(0);
  P.T = logits.size(1);
  P.V = logits.size(2);
  P.rule = rule;
  P.nu = uniforms.size(1);
  P.width = depth + 1;
  P.temperature = temperature;
  P.threshold = threshold;
  P.alpha = alpha;
  const double inv_t = temperature > 0 ? 1.0 / temperature : 0.0;
  P.inv_t = static_cast<float>(std::min(inv_t, static_cast<double>(FLT_MAX)));
  P.drafts = draft_tokens.data_ptr<int64_t>();
  P.parents = parents.data_ptr<int64_t>();
  P.lex_rank = lex_rank.data_ptr<int64_t>();
  P.q = rule == 2 ? draft_probs->data_ptr<float>() : nullptr;
  P.u = uniforms.data_ptr<double>();
  auto opts = draft_tokens.options();
  at::Tensor tokens = at::full({P.B, P.width}, -1, opts);
  at::Tensor nodes = at::full({P.B, P.width}, -1, opts);
  at::Tensor num = at::zeros({P.B}, opts);
  P.tokens = tokens.data_ptr<int64_t>();
  P.nodes = nodes.data_ptr<int64_t>();
  P.num = num.data_ptr<int64_t>();
  switch (logits.scalar_type()) {
    case at::kFloat: run(P, logits.data_ptr<float>()); break;
    case at::kBFloat16: run(P, logits.data_ptr<at::BFloat16>()); break;
    case at::kHalf: run(P, logits.data_ptr<at::Half>()); break;
    default: TORCH_CHECK(false, "decode_step_run: logits must be float32, bfloat16 or float16, got ", logits.scalar_type());
  }
  return {tokens, num, nodes};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(SWITCHYARD_NS, m) {
  m.def("decode_step_run", &decode_step_run);
}
