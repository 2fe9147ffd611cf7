// FlashAttention-style attention on the CPU: tiled forward with an online softmax, and the backward
// pass that recomputes the scores from the saved log-sum-exp (Dao et al., FlashAttention-2, 2023,
// Algorithms 1 and 2). The [Lq, Lk] score matrix is never materialised; one tile of it lives in a
// thread's scratch buffer at a time.
//
// Inputs are float32 and contiguous (the Python side converts bfloat16 and makes them so):
// q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv]; query head h reads key/value head
// h / (Hq / Hkv). Causal is bottom-right aligned: query i may attend key j iff j <= i + Lk - Lq.
// The optional mask is a bool view expanded to [B, Hq, Lq, Lk] (broadcast dimensions have stride 0).
//
// The tile products go through the BLAS sgemm that PyTorch itself links (MKL on x86 wheels), found
// at load time through a weak symbol; when no such symbol exists they fall back to a plain loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc) __attribute__((weak));

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
std::atomic<bool> use_blas{true};  // tests switch it off to check the fallback loop

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

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// 2^x to under 1 ulp for x <= 0 (scores are kept in base 2, scaled by log2(e) in the tile product):
// 2^n * 2^f with n = round(x), |f| <= 1/2, and a degree-6 polynomial fitted to 2^f on [-1/2, 1/2].
// Branch-free, so that the row loops vectorise; 2^-inf is exactly 0, as a masked score must become.
#pragma omp declare simd notinbranch
inline float fast_exp2(float x) {
  const float c = x > -126.0f ? x : -126.0f;
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

struct Problem {
  int64_t B, Hq, Hkv, Lq, Lk, D, Dv, group, shift;  // shift = Lk - Lq (the causal diagonal's offset)
  bool causal;
  float scale;
  const bool* mask;  // nullptr when there is none
  int64_t msb, msh, msi, msj;

  // Bottom-right causal and the caller's mask: disallowed scores of a [rows, n] tile become -inf.
  void mask_tile(float* S, int64_t ldS, int64_t b, int64_t h, int64_t q0, int64_t rows, int64_t k0, int64_t n) const {
    for (int64_t r = 0; r < rows; ++r) {
      float* s = S + r * ldS;
      if (causal) {
        for (int64_t j = std::max<int64_t>(0, q0 + r + shift + 1 - k0); j < n; ++j) s[j] = kNegInf;
      }
      if (mask != nullptr) {
        const bool* m = mask + b * msb + h * msh + (q0 + r) * msi + k0 * msj;
        for (int64_t j = 0; j < n; ++j) {
          if (!m[j * msj]) s[j] = kNegInf;
        }
      }
    }
  }

  // True when some position of the tile may be disallowed (so mask_tile has work to do).
  bool tile_needs_mask(int64_t q0, int64_t k0, int64_t n) const {
    return mask != nullptr || (causal && k0 + n - 1 > q0 + shift);
  }

  // Keys [0, end) hold every key any query in [q0, q0 + rows) may attend.
  int64_t key_end(int64_t q0, int64_t rows) const {
    if (!causal) return Lk;
    return std::min(Lk, std::max<int64_t>(0, q0 + rows + shift));
  }
};

Problem describe(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
                 bool causal, double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat,
              "attention: the C++ kernels take float32 q, k, v");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "attention: q, k, v must be contiguous");
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
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && m.size(0) == p.B && m.size(1) == p.Hq &&
                    m.size(2) == p.Lq && m.size(3) == p.Lk,
                "attention: the mask must be a bool view of shape [B, Hq, Lq, Lk]");
    p.mask = m.data_ptr<bool>();
    p.msb = m.stride(0); p.msh = m.stride(1); p.msi = m.stride(2); p.msj = m.stride(3);
  }
  return p;
}

int threads() { return std::max(1, at::get_num_threads()); }

}  // namespace

// Forward: (o [B, Hq, Lq, Dv], lse [B, Hq, Lq]), both float32. One task is one (batch, head, query
// block); it streams the key/value blocks its queries may attend and skips every tile past the
// causal diagonal. A row that may attend nothing gets o = 0 and lse = -inf.
std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 const std::optional<at::Tensor>& mask, bool causal, double scale,
                                                 int64_t block_q, int64_t block_k) {
  const Problem p = describe(q, k, v, mask, causal, scale);
  at::Tensor o = at::empty({p.B, p.Hq, p.Lq, p.Dv}, q.options());
  at::Tensor lse = at::empty({p.B, p.Hq, p.Lq}, q.options());
  const float* Q = q.data_ptr<float>();
  const float* K = k.data_ptr<float>();
  const float* V = v.data_ptr<float>();
  float* O = o.data_ptr<float>();
  float* LSE = lse.data_ptr<float>();
  TORCH_CHECK(block_q > 0 && block_k > 0, "attention: tile sizes must be positive");
  // Tiles no larger than the sequences, so that short calls allocate small scratch buffers.
  const int64_t BQ = std::max<int64_t>(1, std::min(block_q, p.Lq)), BK = std::max<int64_t>(1, std::min(block_k, p.Lk));
  const int64_t nqb = (p.Lq + BQ - 1) / BQ;
  const int64_t heads = p.B * p.Hq;
  const int64_t tasks = nqb * heads;

#pragma omp parallel num_threads(threads())
  {
    std::vector<float> S(BQ * BK), acc(BQ * p.Dv), m(BQ), l(BQ);
    // The last query blocks attend the most keys under causal: hand them out first.
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t qb = nqb - 1 - t / heads, bh = t % heads;
      const int64_t b = bh / p.Hq, h = bh % p.Hq, hk = h / p.group;
      const int64_t q0 = qb * BQ, rows = std::min(BQ, p.Lq - q0);
      const float* Qb = Q + (bh * p.Lq + q0) * p.D;
      const float* Kh = K + (b * p.Hkv + hk) * p.Lk * p.D;
      const float* Vh = V + (b * p.Hkv + hk) * p.Lk * p.Dv;
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const int64_t kend = p.key_end(q0, rows);
      for (int64_t k0 = 0; k0 < kend; k0 += BK) {
        const int64_t n = std::min(BK, kend - k0);
        float* s0 = S.data();
        gemm(false, true, rows, n, p.D, p.scale * kLog2e, Qb, p.D, Kh + k0 * p.D, p.D, 0.0f, s0, BK);
        if (p.tile_needs_mask(q0, k0, n)) p.mask_tile(s0, BK, b, h, q0, rows, k0, n);
        for (int64_t r = 0; r < rows; ++r) {
          float* s = s0 + r * BK;
          const float m_new = std::max(m[r], row_max(s, n));
          if (m_new == kNegInf) {  // nothing attended so far: this row of the tile adds nothing
            std::fill(s, s + n, 0.0f);
            continue;
          }
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            s[j] = fast_exp2(s[j] - m_new);
            sum += s[j];
          }
          const float alpha = fast_exp2(m[r] - m_new);
          l[r] = l[r] * alpha + sum;
          m[r] = m_new;
          if (alpha != 1.0f) {
            float* a = acc.data() + r * p.Dv;
#pragma omp simd
            for (int64_t d = 0; d < p.Dv; ++d) a[d] *= alpha;
          }
        }
        gemm(false, false, rows, p.Dv, n, 1.0f, s0, BK, Vh + k0 * p.Dv, p.Dv, 1.0f, acc.data(), p.Dv);
      }
      for (int64_t r = 0; r < rows; ++r) {
        float* out = O + (bh * p.Lq + q0 + r) * p.Dv;
        const float* a = acc.data() + r * p.Dv;
        const bool alive = l[r] > 0.0f;
        const float inv = alive ? 1.0f / l[r] : 0.0f;
        for (int64_t d = 0; d < p.Dv; ++d) out[d] = a[d] * inv;
        LSE[bh * p.Lq + q0 + r] = alive ? (m[r] + std::log2(l[r])) * kLn2 : kNegInf;
      }
    }
  }
  return {o, lse};
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
  TORCH_CHECK(dout.scalar_type() == at::kFloat && dout.is_contiguous(), "attention: dout must be contiguous float32");
  TORCH_CHECK(lse.is_contiguous() && delta.is_contiguous(), "attention: lse and delta must be contiguous");
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

// Asks for the tile products on BLAS (on = true) or on the fallback loop; returns whether BLAS is in use.
bool attention_use_blas(bool on) {
  use_blas.store(on);
  return on && sgemm_ != nullptr;
}

TORCH_LIBRARY_FRAGMENT(SWITCHYARD_NS, m) {
  m.def("attention_fwd", &attention_fwd);
  m.def("attention_bwd", &attention_bwd);
  m.def("attention_use_blas", &attention_use_blas);
}
