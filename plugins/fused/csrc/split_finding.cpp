// split_finding for the CPU: per-thread private (grad, hess) histograms built in one pass over the rows,
// merged, then one scan per (node, feature) with XGBoost's gain and the op's tie order.
//
// A histogram has 256 slots per (node, feature), one per uint8 value, so slot 255 is the missing bin and
// no row needs a branch. Rows are read in their own order: sorting them by node first (so one node's
// histogram stays in cache) measured 2-4x slower on 1M x 28 rows, the gather of scattered rows costing
// more than the cache misses it saves.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

namespace {

constexpr int64_t kSlots = 256;
constexpr int64_t kMissing = 255;
constexpr int64_t kUpdatesPerThread = 1 << 20;  // histogram updates (rows x features) worth a thread
constexpr int64_t kCandidatesPerThread = 1 << 18;  // (node, feature, threshold) scans worth a thread
constexpr int64_t kRowsPerBlock = 8192;  // rows a thread takes at a time
constexpr int64_t kSlotsPerBlock = 1 << 15;  // histogram entries a thread merges at a time

struct Params {
  double reg_lambda, reg_alpha, gamma, min_child_weight;
};

// T(G)^2 / (H + lambda), T the L1 soft threshold; 0 for a side without hessian (XGBoost's CalcGain).
inline double score(double g, double h, const Params& p) {
  const double den = h + p.reg_lambda;
  if (!(den > 0)) return 0.0;
  const double t = std::max(std::fabs(g) - p.reg_alpha, 0.0);
  return t * t / den;
}

template <typename scalar_t, typename index_t>
void accumulate_rows(const uint8_t* bins, const scalar_t* grad, const scalar_t* hess, const index_t* ids,
                     int64_t lo, int64_t hi, int64_t F, int64_t M, double* hist) {
  for (int64_t i = lo; i < hi; ++i) {
    const uint64_t m = static_cast<uint64_t>(static_cast<int64_t>(ids[i]));
    if (m >= static_cast<uint64_t>(M)) continue;  // -1: the row takes no part
    const double g = static_cast<double>(grad[i]);
    const double h = static_cast<double>(hess[i]);
    double* node = hist + static_cast<int64_t>(m) * F * kSlots * 2;
    const uint8_t* row = bins + i * F;
    for (int64_t f = 0; f < F; ++f) {
      double* s = node + (f * kSlots + row[f]) * 2;
      s[0] += g;
      s[1] += h;
    }
  }
}

// hist: [M, F, 256, 2] merged sums. Writes the best split of every node.
void scan(const double* hist, int64_t M, int64_t F, int64_t B, const Params& p, int64_t* feature,
          int64_t* threshold, bool* default_left, double* out /* [5, M] */) {
  std::vector<double> best_gain(M * F, -std::numeric_limits<double>::infinity());
  std::vector<int64_t> best_t(M * F, -1), best_d(M * F, 0);
  std::vector<double> best_gl(M * F, 0.0), best_hl(M * F, 0.0);
  std::vector<double> G(M, 0.0), H(M, 0.0);
  // Node totals once, from feature 0, so every feature of a node sees the same parent.
  for (int64_t m = 0; m < M && F > 0; ++m) {
    const double* s = hist + m * F * kSlots * 2;
    for (int64_t b = 0; b < kSlots; ++b) {
      G[m] += s[2 * b];
      H[m] += s[2 * b + 1];
    }
  }
#pragma omp parallel for schedule(dynamic, 4) if (M * F * B > kCandidatesPerThread)
  for (int64_t j = 0; j < M * F; ++j) {
    const int64_t m = j / F;
    const double* s = hist + j * kSlots * 2;
    const double parent = score(G[m], H[m], p);
    const double mg = s[2 * kMissing], mh = s[2 * kMissing + 1];
    double cg = 0.0, ch = 0.0, best = -std::numeric_limits<double>::infinity();
    for (int64_t t = 0; t + 1 < B; ++t) {
      cg += s[2 * t];
      ch += s[2 * t + 1];
      for (int d = 0; d < 2; ++d) {  // missing right first: it wins ties
        const double gl = d ? cg + mg : cg, hl = d ? ch + mh : ch;
        const double gr = G[m] - gl, hr = H[m] - hl;
        if (!(hl >= p.min_child_weight && hr >= p.min_child_weight)) continue;
        const double gain = score(gl, hl, p) + score(gr, hr, p) - parent;
        if (gain > p.gamma && gain > best) {
          best = gain;
          best_t[j] = t;
          best_d[j] = d;
          best_gl[j] = gl;
          best_hl[j] = hl;
        }
      }
    }
    best_gain[j] = best;
  }
  for (int64_t m = 0; m < M; ++m) {
    int64_t bf = -1;
    for (int64_t f = 0; f < F; ++f) {  // strictly greater: the lower feature keeps a tie
      if (best_t[m * F + f] >= 0 && (bf < 0 || best_gain[m * F + f] > best_gain[m * F + bf])) bf = f;
    }
    if (bf < 0) continue;
    const int64_t j = m * F + bf;
    feature[m] = bf;
    threshold[m] = best_t[j];
    default_left[m] = best_d[j] != 0;
    out[m] = best_gain[j];
    out[M + m] = best_gl[j];
    out[2 * M + m] = best_hl[j];
    out[3 * M + m] = G[m] - best_gl[j];
    out[4 * M + m] = H[m] - best_hl[j];
  }
}

template <typename scalar_t, typename index_t>
void build(const at::Tensor& bins, const at::Tensor& grad, const at::Tensor& hess, const at::Tensor& node_ids,
           int64_t M, int64_t max_threads, at::Tensor& hist) {
  const int64_t n = bins.size(0), F = bins.size(1);
  const uint8_t* X = bins.data_ptr<uint8_t>();
  const scalar_t* g = grad.data_ptr<scalar_t>();
  const scalar_t* h = hess.data_ptr<scalar_t>();
  const index_t* ids = node_ids.data_ptr<index_t>();
  const int64_t per = M * F * kSlots * 2;
  // A thread per million updates at most: each parallel region costs a wake-up (far more on a busy machine).
  const int T = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(max_threads, n * F / kUpdatesPerThread + 1)));
  // Uninitialized: each thread zeroes its own copy (first touch puts the pages near that thread).
  std::unique_ptr<double[]> priv(new double[static_cast<size_t>(T - 1) * per]);
  double* merged = hist.data_ptr<double>();
  int used = 1;
#pragma omp parallel num_threads(T)
  {
    const int tid = omp_get_thread_num();
#pragma omp single nowait
    used = omp_get_num_threads();
    double* mine = tid == 0 ? merged : priv.get() + static_cast<size_t>(tid - 1) * per;
    std::fill(mine, mine + per, 0.0);
    // Blocks of rows handed out as threads come free: a thread the OS preempts holds back one block,
    // not a fixed half of the rows.
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t lo = 0; lo < n; lo += kRowsPerBlock) {
      accumulate_rows<scalar_t, index_t>(X, g, h, ids, lo, std::min(n, lo + kRowsPerBlock), F, M, mine);
    }
  }
  if (used > 1) {
#pragma omp parallel for num_threads(used) schedule(dynamic, 1)
    for (int64_t lo = 0; lo < per; lo += kSlotsPerBlock) {
      const int64_t hi = std::min(per, lo + kSlotsPerBlock);
      for (int t = 1; t < used; ++t) {
        const double* other = priv.get() + static_cast<size_t>(t - 1) * per;
        for (int64_t k = lo; k < hi; ++k) merged[k] += other[k];
      }
    }
  }
}

std::vector<at::Tensor> split_finding_cpu(const at::Tensor& bins_in, const at::Tensor& grad_in,
                                          const at::Tensor& hess_in, const at::Tensor& node_ids_in,
                                          int64_t num_nodes, int64_t num_bins, double reg_lambda, double reg_alpha,
                                          double gamma, double min_child_weight,
                                          int64_t max_threads) {
  TORCH_CHECK(bins_in.dim() == 2 && bins_in.scalar_type() == at::kByte, "split_finding_cpu: bins must be uint8 [N, F]");
  TORCH_CHECK(grad_in.scalar_type() == hess_in.scalar_type(), "split_finding_cpu: grad and hess dtypes differ");
  TORCH_CHECK(num_nodes >= 1 && num_bins >= 1 && num_bins <= kMissing, "split_finding_cpu: bad num_nodes/num_bins");
  const at::Tensor bins = bins_in.contiguous(), grad = grad_in.contiguous(), hess = hess_in.contiguous();
  const at::Tensor node_ids = node_ids_in.contiguous();
  const int64_t M = num_nodes, F = bins.size(1);
  TORCH_CHECK(grad.numel() == bins.size(0) && hess.numel() == bins.size(0) && node_ids.numel() == bins.size(0),
              "split_finding_cpu: grad, hess and node_ids need one value per row of bins");
  const auto opts = at::TensorOptions().device(at::kCPU);
  at::Tensor feature = at::full({M}, -1, opts.dtype(at::kLong));
  at::Tensor threshold = at::full({M}, -1, opts.dtype(at::kLong));
  at::Tensor default_left = at::zeros({M}, opts.dtype(at::kBool));
  at::Tensor sums = at::zeros({5, M}, opts.dtype(at::kDouble));
  if (num_bins >= 2 && F > 0) {
    at::Tensor hist = at::empty({M, F, kSlots, 2}, opts.dtype(at::kDouble));
    const int64_t threads = max_threads > 0 ? max_threads : at::get_num_threads();
    AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "split_finding_cpu", [&] {
      if (node_ids.scalar_type() == at::kInt) {
        build<scalar_t, int32_t>(bins, grad, hess, node_ids, M, threads, hist);
      } else {
        TORCH_CHECK(node_ids.scalar_type() == at::kLong, "split_finding_cpu: node_ids must be int32 or int64");
        build<scalar_t, int64_t>(bins, grad, hess, node_ids, M, threads, hist);
      }
    });
    const Params p{reg_lambda, reg_alpha, gamma, min_child_weight};
    scan(hist.data_ptr<double>(), M, F, num_bins, p, feature.data_ptr<int64_t>(), threshold.data_ptr<int64_t>(),
         default_left.data_ptr<bool>(), sums.data_ptr<double>());
  }
  return {feature, threshold, default_left, sums[0], sums[1], sums[2], sums[3], sums[4]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(SWITCHYARD_NS, m) {
  m.def("split_finding_cpu", &split_finding_cpu);
}
