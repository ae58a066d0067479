// CPU kernels of the CSA ops (schemas in csrc/schemas.h, math in docs/csa-spec.md).
//
// Forward, per call:
//   0. squared norms of every token;
//   1. Gram products (register-blocked, cpu_kernels.h) -> distances, in row blocks
//      (parallel over matrix x sample x block);
//      near-zero distances recomputed directly (csa_common.h, RefineThreshold);
//   2. extrema per matrix and sample (inside step 1's task when it holds a whole matrix),
//      then over the batch for scope="batch";
//   3. per sample: shift, row/column norms, both aggregations, fusion and softmax.
// Backward, per call:
//   A. per sample: softmax and fusion backward, then per matrix, in two passes over it, the
//      aggregation backward and W = dL/dD / D with its row and column sums (the kernels'
//      backward_weights), the theta partial sums, and for scope="sample" the shift's
//      gradient routed to the (tied) extremes;
//   B. scope="batch": the shift's gradient, which needs the whole batch's sums, added at
//      the batch extremes;
//   C. per branch, sample and row block one GEMM over its two matrices:
//      grad_x = diag(sum W) x - W y.
// All reductions run in a fixed order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/cpu_kernels.h"
#include "csa_common.h"

namespace qcs::cpu {

const KernelTable& active_kernels() {
  // Read on every call (cheap) so tests can switch instruction sets within one process.
  const char* forced = std::getenv("QCS_CPU_ISA");
#if defined(__x86_64__) || defined(__i386__)
  static const bool has_avx512 = __builtin_cpu_supports("avx512f") &&
                                 __builtin_cpu_supports("avx512vl") &&
                                 __builtin_cpu_supports("avx512bw") &&
                                 __builtin_cpu_supports("avx512dq");
  static const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  static const bool has_avx512 = false, has_avx2 = false;
#endif
  if (forced != nullptr && forced[0] != '\0') {
    const std::string name(forced);
    TORCH_CHECK(name == "baseline" || name == "avx2" || name == "avx512",
                "QCS_CPU_ISA must be baseline, avx2 or avx512, got '", name, "'");
    TORCH_CHECK(name != "avx512" || has_avx512, "QCS_CPU_ISA=avx512 but this CPU lacks AVX-512");
    TORCH_CHECK(name != "avx2" || has_avx2, "QCS_CPU_ISA=avx2 but this CPU lacks AVX2/FMA");
    if (name == "avx512") return kernels_avx512();
    if (name == "avx2") return kernels_avx2();
    return kernels_baseline();
  }
  if (has_avx512) return kernels_avx512();
  if (has_avx2) return kernels_avx2();
  return kernels_baseline();
}

namespace {

// Rows per parallel task: about kRowTarget, split evenly (49 tokens -> one block of 49, not
// 48 + 1, whose lone row would stream the whole operand panel for one row of output).
constexpr int64_t kRowTarget = 96;
int64_t row_block(int64_t n) {
  const int64_t blocks = (n + kRowTarget - 1) / kRowTarget;
  return (n + blocks - 1) / blocks;
}

// Outputs above this size outgrow the caches before anything reads them: the backward
// GEMMs store them non-temporally (GemmProblem::stream_out).
constexpr int64_t kStreamOutputBytes = int64_t(4) << 20;

// A sample's branches up to this size (the paper's 4 x 49 x 768 float32: 600 KB) are read
// into L2 in one sequential pass before its backward GEMMs, which would otherwise touch
// them first in row-strided panels that the hardware prefetcher does not follow.
constexpr int64_t kWarmSampleBytes = int64_t(768) << 10;

// Reads [p, p + count) a cache line at a time, for the side effect of caching it.
template <typename T>
void warm_cache(const T* p, int64_t count) {
  T sum = 0;
  for (int64_t i = 0; i < count; i += 64 / int64_t(sizeof(T))) sum += p[i];
  asm volatile("" : : "r,m"(sum));  // keeps the loads
}

template <typename T> const KernelSet<T>& kernel_set(const KernelTable& t);
template <> const KernelSet<float>& kernel_set<float>(const KernelTable& t) { return t.f32; }
template <> const KernelSet<double>& kernel_set<double>(const KernelTable& t) { return t.f64; }

Mode parse_mode(const std::string& mode) {
  if (mode == "sd") return Mode::SD;
  if (mode == "s") return Mode::S;
  if (mode == "d") return Mode::D;
  TORCH_CHECK_VALUE(false, "mode must be 'sd', 's' or 'd', got '", mode, "'");
}

Scope parse_scope(const std::string& scope) {
  if (scope == "batch") return Scope::Batch;
  if (scope == "sample") return Scope::Sample;
  TORCH_CHECK_VALUE(false, "scope must be 'batch' or 'sample', got '", scope, "'");
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The problem's geometry and which matrices it uses.
struct Geometry {
  int64_t branches, batch, tokens, channels;
  std::vector<int32_t> matrices;  // used matrix ids (index into distances' first dim)
  int64_t num_matrix_slots;       // distances.size(0): 4 for the quadruplet, 1 for the pair
  Mode mode;
  Scope scope;
};

Geometry make_geometry(const at::Tensor& qk, bool pair, Mode mode, Scope scope) {
  Geometry g{qk.size(0), qk.size(1), qk.size(2), qk.size(3), {}, pair ? 1 : 4, mode, scope};
  if (pair) {
    g.matrices = {kPA};
  } else {
    for (int32_t m = 0; m < 4; ++m)
      if (matrix_used(m, mode)) g.matrices.push_back(m);
  }
  return g;
}

void check_features(const at::Tensor& qk, int64_t branches) {
  TORCH_CHECK_VALUE(qk.dim() == 4 && qk.size(0) == branches, "qk must have shape [", branches,
                    ", B, N, C], got ", qk.sizes());
  TORCH_CHECK_VALUE(qk.size(1) > 0 && qk.size(2) > 0 && qk.size(3) > 0,
                    "qk has an empty dimension: ", qk.sizes());
  TORCH_CHECK_TYPE(qk.scalar_type() == at::kFloat || qk.scalar_type() == at::kDouble,
                   "the CPU kernels take float32 or float64 qk, got ", qk.scalar_type());
  TORCH_CHECK(qk.device().is_cpu(), "qk must be a CPU tensor here, got ", qk.device());
}

void check_like(const at::Tensor& t, const char* name, at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

double read_theta(const at::Tensor& theta, const at::Tensor& qk) {
  TORCH_CHECK_VALUE(theta.numel() == 1, "theta must hold one element, got shape ", theta.sizes());
  TORCH_CHECK_TYPE(theta.scalar_type() == qk.scalar_type(), "theta has dtype ",
                   theta.scalar_type(), " but qk has ", qk.scalar_type());
  TORCH_CHECK(theta.device().is_cpu(), "theta must be a CPU tensor, got ", theta.device());
  return theta.item<double>();
}

template <typename T>
const T* branch_rows(const T* base, const Geometry& g, int64_t branch, int64_t b) {
  return base + (branch * g.batch + b) * g.tokens * g.channels;
}

// ---------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------

// Returns whether it also wrote extrema[m, b] (each matrix's extreme per sample: done
// while the matrix is in cache when one task computes all of it).
template <typename T>
bool compute_distances(const at::Tensor& qk, const Geometry& g, at::Tensor& distances,
                       at::Tensor& extrema, const KernelSet<T>& kern) {
  const int64_t B = g.batch, N = g.tokens, C = g.channels;
  const T* x = qk.data_ptr<T>();
  T* dist = distances.data_ptr<T>();
  T* ext = extrema.data_ptr<T>();

  // Which branches are some matrix's columns: their norms are needed for every token.
  std::vector<uint8_t> is_col(g.branches, 0);
  for (int32_t m : g.matrices) is_col[col_branch(m)] = 1;

  // Tasks are (sample, row block), each doing every matrix: the sample's branches are read
  // from memory once and then served from L2 to all of its Gram products.
  const int64_t rows_per = row_block(N), blocks = ceil_div(N, rows_per);
  at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> gram(rows_per * N);
    std::vector<double> sqnorm(g.branches * N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / blocks, blk = task % blocks;
      const int64_t r0 = blk * rows_per, r1 = std::min(N, r0 + rows_per);
      for (int64_t br = 0; br < g.branches; ++br) {
        const T* t = branch_rows(x, g, br, b);
        for (int64_t i = is_col[br] ? 0 : r0; i < (is_col[br] ? N : r1); ++i)
          sqnorm[br * N + i] = kern.squared_norm(t + i * C, C);
      }
      for (int32_t m : g.matrices) {
        const int64_t rb = row_branch(m), cb = col_branch(m);
        const T* rows = branch_rows(x, g, rb, b);
        const T* cols = branch_rows(x, g, cb, b);
        kern.gram(rows + r0 * C, r1 - r0, cols, N, C, gram.data(), N);
        T* d = dist + ((int64_t(m) * B + b) * N) * N;
        kern.distances_from_gram(gram.data(), rows, cols, sqnorm.data() + rb * N,
                                 sqnorm.data() + cb * N, r0, r1, N, C, d);
        if (blocks == 1) ext[int64_t(m) * B + b] = kern.extreme(d, N * N, is_similarity(m));
      }
    }
  });
  return blocks == 1;
}

// extrema[m, b]: max (similarity) / min (distance) of each used matrix per sample, then,
// for scope="batch", the extreme over the batch in every column.
template <typename T>
void compute_extrema(const Geometry& g, const at::Tensor& distances, at::Tensor& extrema,
                     const KernelSet<T>& kern, bool per_sample_done) {
  const int64_t B = g.batch, NN = g.tokens * g.tokens;
  const T* dist = distances.data_ptr<T>();
  T* ext = extrema.data_ptr<T>();
  const int64_t tasks = per_sample_done ? 0 : int64_t(g.matrices.size()) * B;
  if (tasks > 0) at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int32_t m = g.matrices[task / B];
      const int64_t b = task % B;
      ext[int64_t(m) * B + b] = kern.extreme(dist + (int64_t(m) * B + b) * NN, NN, is_similarity(m));
    }
  });
  if (g.scope == Scope::Batch) {
    for (int32_t m : g.matrices) {
      T* row = ext + int64_t(m) * B;
      const T e = kern.extreme(row, B, is_similarity(m));
      std::fill(row, row + B, e);
    }
  }
}

template <typename T>
void forward_epilogue(const Geometry& g, const at::Tensor& distances, const at::Tensor& extrema,
                      double theta, double gamma, at::Tensor& maps, const KernelSet<T>& kern) {
  const int64_t B = g.batch, N = g.tokens;
  const T* dist = distances.data_ptr<T>();
  const T* ext = extrema.data_ptr<T>();
  T* out = maps.data_ptr<T>();
  const double ws = s_weight(g.mode), wd = d_weight(g.mode, fusion_k(theta, gamma));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(N * N + 8 * N);
    std::vector<double> score(g.branches * N);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(score.begin(), score.end(), 0.0);
      for (int32_t m : g.matrices) {
        const int64_t slot = int64_t(m) * B + b;
        kern.forward_scores(dist + slot * N * N, double(ext[slot]), is_similarity(m), N,
                            is_similarity(m) ? ws : wd, score.data() + col_branch(m) * N,
                            score.data() + row_branch(m) * N, scratch.data());
      }
      for (int64_t br = 0; br < g.branches; ++br) {
        const double* s = score.data() + br * N;
        const double mx = *std::max_element(s, s + N);
        double total = 0;
        T* o = out + (br * B + b) * N;
        for (int64_t i = 0; i < N; ++i) total += std::exp(s[i] - mx);
        for (int64_t i = 0; i < N; ++i) o[i] = T(std::exp(s[i] - mx) / total);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_cpu(const at::Tensor& qk_in,
                                                           double theta, double gamma, Mode mode,
                                                           Scope scope, bool pair) {
  const at::Tensor qk = qk_in.contiguous();
  const Geometry g = make_geometry(qk, pair, mode, scope);
  at::Tensor maps = at::empty({g.branches, g.batch, g.tokens}, qk.options());
  // Unused matrices (modes "s" and "d") are zero: backward never reads them, but outputs
  // are defined everywhere. The used ones are written in full, so only the rest is cleared.
  at::Tensor distances = at::empty({g.num_matrix_slots, g.batch, g.tokens, g.tokens}, qk.options());
  at::Tensor extrema = at::zeros({g.num_matrix_slots, g.batch}, qk.options());
  for (int64_t m = 0; m < g.num_matrix_slots; ++m)
    if (std::find(g.matrices.begin(), g.matrices.end(), m) == g.matrices.end()) distances[m].zero_();
  const KernelTable& table = active_kernels();
  AT_DISPATCH_FLOATING_TYPES(qk.scalar_type(), "qcs_ext_forward_cpu", [&] {
    const bool extrema_done =
        compute_distances<scalar_t>(qk, g, distances, extrema, kernel_set<scalar_t>(table));
    compute_extrema<scalar_t>(g, distances, extrema, kernel_set<scalar_t>(table), extrema_done);
    forward_epilogue<scalar_t>(g, distances, extrema, theta, gamma, maps,
                               kernel_set<scalar_t>(table));
  });
  return {maps, distances, extrema};
}

// ---------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------

struct BackwardState {
  at::Tensor weights;              // [slots, B, N, N]: W = dL/dD / D
  std::vector<double> grad_sum;    // [slots * B]: sum of dL/dD before the extreme routing
  std::vector<int64_t> ties;       // [slots * B]: elements equal to the extreme
  std::vector<int64_t> first_tie;  // [slots * B]: index of the first of them in the matrix
  std::vector<double> theta_part;  // [B]
};

// Adds the shift's gradient at the extreme of one matrix (slot): `routed` (the extreme's
// share of -sum(dL/dS), spread evenly over tied extremes like amax) divided by D, to W and
// its row and column sums where D equals the extreme. Zero distances get nothing, as cdist.
template <typename T>
void route_extreme(const T* dist, T extreme, double routed, int64_t n, int64_t ties,
                   int64_t first_tie, T* w, T* row_sums, T* col_sums) {
  auto add = [&](int64_t k) {
    const T d = dist[k];
    if (!(d == extreme && d > T(0))) return;
    const double delta = routed / double(d);
    w[k] = T(double(w[k]) + delta);
    row_sums[k / n] = T(double(row_sums[k / n]) + delta);
    col_sums[k % n] = T(double(col_sums[k % n]) + delta);
  };
  if (ties == 0) return;
  if (ties == 1) return add(first_tie);  // the usual case: no scan
  for (int64_t k = first_tie; k < n * n; ++k) add(k);
}

template <typename T>
void backward_aggregations(const Geometry& g, const at::Tensor& grad_maps, const at::Tensor& maps,
                           const at::Tensor& distances, const at::Tensor& extrema, double theta,
                           double gamma, BackwardState& st, at::Tensor& row_sums,
                           at::Tensor& col_sums, const KernelSet<T>& kern) {
  const int64_t B = g.batch, N = g.tokens;
  T* rsum = row_sums.data_ptr<T>();
  T* csum = col_sums.data_ptr<T>();
  const T* gm = grad_maps.data_ptr<T>();
  const T* mp = maps.data_ptr<T>();
  const T* dist = distances.data_ptr<T>();
  const T* ext = extrema.data_ptr<T>();
  T* w = st.weights.data_ptr<T>();
  const double ws = s_weight(g.mode), wd = d_weight(g.mode, fusion_k(theta, gamma));
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> scratch(N * N + 10 * N);
    std::vector<double> gscore(g.branches * N), dscore(g.branches * N);
    for (int64_t b = begin; b < end; ++b) {
      // Softmax backward: g_score = map * (g - sum(map * g)).
      for (int64_t br = 0; br < g.branches; ++br) {
        const T* mi = mp + (br * B + b) * N;
        const T* gi = gm + (br * B + b) * N;
        double dot = 0;
        for (int64_t i = 0; i < N; ++i) dot += double(mi[i]) * double(gi[i]);
        for (int64_t i = 0; i < N; ++i)
          gscore[br * N + i] = double(mi[i]) * (double(gi[i]) - dot);
      }
      std::fill(dscore.begin(), dscore.end(), 0.0);
      for (int32_t m : g.matrices) {
        const bool sim = is_similarity(m);
        const int64_t slot = int64_t(m) * B + b;
        // Upstream of cols(M) and rows(M): the fused score's gradient (times the weight).
        st.grad_sum[slot] = kern.backward_weights(
            dist + slot * N * N, ext[slot], sim, N, sim ? ws : wd,
            gscore.data() + col_branch(m) * N, gscore.data() + row_branch(m) * N,
            dscore.data() + col_branch(m) * N, dscore.data() + row_branch(m) * N,
            w + slot * N * N, rsum + slot * N, csum + slot * N, &st.ties[slot],
            &st.first_tie[slot], scratch.data());
        // scope="sample" routes the shift's gradient here; "batch" needs the whole
        // batch's sums first (route_batch_extremes).
        if (g.scope == Scope::Sample)
          route_extreme(dist + slot * N * N, ext[slot], -st.grad_sum[slot] / double(st.ties[slot]),
                        N, st.ties[slot], st.first_tie[slot], w + slot * N * N,
                        rsum + slot * N, csum + slot * N);
      }
      double tp = 0;
      for (int64_t k = 0; k < g.branches * N; ++k) tp += gscore[k] * dscore[k];
      st.theta_part[b] = tp;
    }
  });
}

// scope="batch": routes each matrix's shift gradient, -sum(dL/dS) over the batch divided by
// the number of tied extremes, to the elements equal to the batch extreme (usually one
// element of one sample per matrix).
template <typename T>
void route_batch_extremes(const Geometry& g, const at::Tensor& distances,
                          const at::Tensor& extrema, BackwardState& st, at::Tensor& row_sums,
                          at::Tensor& col_sums) {
  const int64_t B = g.batch, N = g.tokens;
  const T* dist = distances.data_ptr<T>();
  const T* ext = extrema.data_ptr<T>();
  T* w = st.weights.data_ptr<T>();
  T* rsum = row_sums.data_ptr<T>();
  T* csum = col_sums.data_ptr<T>();
  for (int32_t m : g.matrices) {
    double total = 0;
    int64_t count = 0;
    for (int64_t b = 0; b < B; ++b) {
      total += st.grad_sum[m * B + b];
      count += st.ties[m * B + b];
    }
    const double routed = -total / double(count);
    for (int64_t b = 0; b < B; ++b) {
      const int64_t slot = int64_t(m) * B + b;
      route_extreme(dist + slot * N * N, ext[slot], routed, N, st.ties[slot], st.first_tie[slot],
                    w + slot * N * N, rsum + slot * N, csum + slot * N);
    }
  }
}

template <typename T>
void backward_gemms(const Geometry& g, const at::Tensor& qk, const BackwardState& st,
                    const at::Tensor& row_sums, const at::Tensor& col_sums, at::Tensor& grad_qk,
                    const KernelSet<T>& kern) {
  const int64_t B = g.batch, N = g.tokens, C = g.channels;
  const T* x = qk.data_ptr<T>();
  const T* w = st.weights.data_ptr<T>();
  const T* rsum = row_sums.data_ptr<T>();
  const T* csum = col_sums.data_ptr<T>();
  T* out = grad_qk.data_ptr<T>();
  const int64_t rows_per = row_block(N), blocks = ceil_div(N, rows_per);
  // Sample-major tasks: a sample's branches serve all of its branches' gradients from L2.
  const int64_t tasks = g.branches * B * blocks;
  const bool stream_out = grad_qk.numel() * int64_t(sizeof(T)) >= kStreamOutputBytes;
  const bool warm = blocks == 1 && g.branches * N * C * int64_t(sizeof(T)) <= kWarmSampleBytes;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scale(N);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (blocks * g.branches), blk = (task / g.branches) % blocks,
                    br = task % g.branches;
      if (warm && blk == 0 && (br == 0 || task == begin)) {
        for (int64_t q = 0; q < g.branches; ++q) warm_cache(branch_rows(x, g, q, b), N * C);
      }
      GemmProblem<T> p{};
      std::fill(scale.begin(), scale.end(), T(0));
      // Each matrix touching this branch: as its row branch, grad += diag(W 1) x - W y_cols;
      // as its column branch, grad += diag(W^T 1) x - W^T y_rows.
      for (int32_t m : g.matrices) {
        const int64_t slot = int64_t(m) * B + b;
        const T* wm = w + slot * N * N;
        const bool as_row = row_branch(m) == br, as_col = col_branch(m) == br;
        if (!as_row && !as_col) continue;
        const T* sums = (as_row ? rsum : csum) + slot * N;
        for (int64_t i = 0; i < N; ++i) scale[i] += sums[i];
        const int64_t other = as_row ? col_branch(m) : row_branch(m);
        p.seg[p.num_segments++] = {wm, as_row ? N : 1, as_row ? 1 : N,
                                   branch_rows(x, g, other, b), C, N};
      }
      p.row_begin = blk * rows_per;
      p.row_end = std::min(N, p.row_begin + rows_per);
      p.cols = C;
      p.out = out + (br * B + b) * N * C;
      p.ldo = C;
      p.epilogue = GemmEpilogue::kScaleMinus;
      p.scale = scale.data();
      p.x = branch_rows(x, g, br, b);
      p.ldx = C;
      p.stream_out = stream_out;
      kern.gemm(p);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad_maps_in,
                                                const at::Tensor& maps, const at::Tensor& qk_in,
                                                const at::Tensor& distances,
                                                const at::Tensor& extrema, double theta,
                                                double gamma, Mode mode, Scope scope, bool pair) {
  const at::Tensor qk = qk_in.contiguous();
  const at::Tensor grad_maps = grad_maps_in.contiguous();
  const Geometry g = make_geometry(qk, pair, mode, scope);
  const int64_t B = g.batch, N = g.tokens;
  check_like(grad_maps, "grad_maps", {g.branches, B, N}, qk.scalar_type());
  check_like(maps, "maps", {g.branches, B, N}, qk.scalar_type());
  check_like(distances, "distances", {g.num_matrix_slots, B, N, N}, qk.scalar_type());
  check_like(extrema, "extrema", {g.num_matrix_slots, B}, qk.scalar_type());
  TORCH_CHECK(maps.is_contiguous() && distances.is_contiguous() && extrema.is_contiguous(),
              "maps, distances and extrema must be contiguous (as the forward returns them)");

  BackwardState st;
  st.weights = at::empty_like(distances);
  st.grad_sum.assign(g.num_matrix_slots * B, 0.0);
  st.ties.assign(g.num_matrix_slots * B, 0);
  st.first_tie.assign(g.num_matrix_slots * B, -1);
  st.theta_part.assign(B, 0.0);
  at::Tensor row_sums = at::empty({g.num_matrix_slots, B, N}, qk.options());
  at::Tensor col_sums = at::empty({g.num_matrix_slots, B, N}, qk.options());
  at::Tensor grad_qk = at::empty_like(qk);
  const KernelTable& table = active_kernels();
  AT_DISPATCH_FLOATING_TYPES(qk.scalar_type(), "qcs_ext_backward_cpu", [&] {
    const KernelSet<scalar_t>& kern = kernel_set<scalar_t>(table);
    backward_aggregations<scalar_t>(g, grad_maps, maps, distances, extrema, theta, gamma, st,
                                    row_sums, col_sums, kern);
    if (g.scope == Scope::Batch)
      route_batch_extremes<scalar_t>(g, distances, extrema, st, row_sums, col_sums);
    backward_gemms<scalar_t>(g, qk, st, row_sums, col_sums, grad_qk, kern);
  });
  double theta_sum = 0;
  for (double v : st.theta_part) theta_sum += v;
  at::Tensor grad_theta = at::full({}, dk_dtheta(mode, theta) * theta_sum, qk.options());
  return {grad_qk, grad_theta};
}

// ---------------------------------------------------------------------------------------
// Op entry points
// ---------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_similarity_forward(
    const at::Tensor& qk, const at::Tensor& theta, double gamma, c10::string_view mode,
    c10::string_view scope) {
  check_features(qk, 4);
  TORCH_CHECK_VALUE(std::isfinite(gamma), "gamma must be finite, got ", gamma);
  return forward_cpu(qk, read_theta(theta, qk), gamma, parse_mode(std::string(mode)),
                     parse_scope(std::string(scope)), /*pair=*/false);
}

std::tuple<at::Tensor, at::Tensor> cross_similarity_backward(
    const at::Tensor& grad_maps, const at::Tensor& maps, const at::Tensor& qk,
    const at::Tensor& distances, const at::Tensor& extrema, const at::Tensor& theta, double gamma,
    c10::string_view mode, c10::string_view scope) {
  check_features(qk, 4);
  TORCH_CHECK_VALUE(std::isfinite(gamma), "gamma must be finite, got ", gamma);
  return backward_cpu(grad_maps, maps, qk, distances, extrema, read_theta(theta, qk), gamma,
                      parse_mode(std::string(mode)), parse_scope(std::string(scope)), false);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_similarity_forward(const at::Tensor& qk,
                                                                       c10::string_view scope) {
  check_features(qk, 2);
  return forward_cpu(qk, 0.0, 1.0, Mode::S, parse_scope(std::string(scope)), /*pair=*/true);
}

at::Tensor pair_similarity_backward(const at::Tensor& grad_maps, const at::Tensor& maps,
                                    const at::Tensor& qk, const at::Tensor& distances,
                                    const at::Tensor& extrema, c10::string_view scope) {
  check_features(qk, 2);
  return std::get<0>(backward_cpu(grad_maps, maps, qk, distances, extrema, 0.0, 1.0, Mode::S,
                                  parse_scope(std::string(scope)), /*pair=*/true));
}

std::string cpu_isa() { return active_kernels().isa; }

}  // namespace
}  // namespace qcs::cpu

TORCH_LIBRARY_FRAGMENT(qcs_ext, m) {
  // Which instruction set the CPU kernels run with (tests and benchmarks report it).
  m.def("cpu_isa() -> str", &qcs::cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(qcs_ext, CPU, m) {
  m.impl("cross_similarity_forward", &qcs::cpu::cross_similarity_forward);
  m.impl("cross_similarity_backward", &qcs::cpu::cross_similarity_backward);
  m.impl("pair_similarity_forward", &qcs::cpu::pair_similarity_forward);
  m.impl("pair_similarity_backward", &qcs::cpu::pair_similarity_backward);
}
