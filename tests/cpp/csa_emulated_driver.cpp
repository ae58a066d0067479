// Standalone driver for the sanitizer builds (ThreadSanitizer; AddressSanitizer +
// UndefinedBehaviorSanitizer) of the emulated CUDA kernels. No torch: the host side of
// csa_host.h is mirrored here with std::vector and naive GEMMs, so that every byte the
// kernels touch is instrumented. It runs forward and backward of the quadruplet and the
// pair op, both epilogue paths (fused and streaming), in float and double, with ties and
// zero distances, and checks the results against a direct double-precision reference
// (maps) and central finite differences of it (gradients).
//
// Exit status: 0 if every check passed; 1 otherwise. Sanitizer reports abort or set the
// exit status on their own (TSAN_OPTIONS/ASAN_OPTIONS/UBSAN_OPTIONS from the caller).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include "csa_kernels.cuh"
#include "cuda_emulation.h"

using qcs::Mode;
using qcs::Scope;
namespace kern = qcs::kern;

struct Problem {
  int R, M, B, N, C;
  Mode mode;
  Scope scope;
  double gamma, theta;
  std::vector<double> qk;  // [R, B, N, C]
};

static int g_failures = 0;
static void expect(bool ok, const char* what, double got, double bound) {
  if (!ok) {
    ++g_failures;
    std::printf("FAIL %s: %.3e > %.3e\n", what, got, bound);
  }
}

// ------------------------------------------------------------------ direct reference
static std::vector<double> reference_maps(const Problem& p, const std::vector<double>& qk,
                                          double theta) {
  const int R = p.R, B = p.B, N = p.N, C = p.C;
  auto x = [&](int br, int b, int i, int k) {
    return qk[((static_cast<size_t>(br) * B + b) * N + i) * C + k];
  };
  std::vector<double> s(R * B * N, 0.0), d(R * B * N, 0.0);
  for (int m = 0; m < p.M; ++m) {
    if (!qcs::matrix_used(m, p.mode)) continue;
    const int rb = qcs::row_branch(m), cb = qcs::col_branch(m);
    const bool sim = qcs::is_similarity(m);
    std::vector<double> D(static_cast<size_t>(B) * N * N);
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) {
          double acc = 0;
          for (int k = 0; k < C; ++k)
            acc += (x(rb, b, i, k) - x(cb, b, j, k)) * (x(rb, b, i, k) - x(cb, b, j, k));
          D[(static_cast<size_t>(b) * N + i) * N + j] = std::sqrt(acc);
        }
    for (int b = 0; b < B; ++b) {
      auto lo = D.begin() + (p.scope == Scope::Batch ? 0 : static_cast<size_t>(b) * N * N);
      auto hi = p.scope == Scope::Batch ? D.end() : lo + static_cast<size_t>(N) * N;
      const double ext = sim ? *std::max_element(lo, hi) : *std::min_element(lo, hi);
      std::vector<double> S(static_cast<size_t>(N) * N), rn(N, 0.0), cn(N, 0.0);
      for (int e = 0; e < N * N; ++e)
        S[e] = qcs::shifted(D[static_cast<size_t>(b) * N * N + e], ext, sim);
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) {
          rn[i] += S[i * N + j] * S[i * N + j];
          cn[j] += S[i * N + j] * S[i * N + j];
        }
      double* kind = sim ? s.data() : d.data();
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) {
          kind[(static_cast<size_t>(cb) * B + b) * N + j] += S[i * N + j] / qcs::clamp_norm(rn[i]);
          kind[(static_cast<size_t>(rb) * B + b) * N + i] += S[i * N + j] / qcs::clamp_norm(cn[j]);
        }
    }
  }
  const double sw = qcs::s_weight(p.mode),
               dw = qcs::d_weight(p.mode, qcs::fusion_k(theta, p.gamma));
  std::vector<double> maps(R * B * N);
  for (int row = 0; row < R * B; ++row) {
    double mx = -HUGE_VAL, sum = 0;
    for (int j = 0; j < N; ++j) mx = std::max(mx, sw * s[row * N + j] + dw * d[row * N + j]);
    for (int j = 0; j < N; ++j) sum += std::exp(sw * s[row * N + j] + dw * d[row * N + j] - mx);
    for (int j = 0; j < N; ++j)
      maps[row * N + j] = std::exp(sw * s[row * N + j] + dw * d[row * N + j] - mx) / sum;
  }
  return maps;
}

// ------------------------------------------------------------------ the kernels (mirror of
// csa_host.h)
template <typename A>
struct Result {
  std::vector<A> maps, dist, extrema, grad_qk;
  A grad_theta = 0;
};

// Distances and sample extremes from Gram products (cuBLAS in the real build) and the
// streaming kernels: the path of float64, of N > 64 and of the streaming checks.
template <typename A>
static void gemm_distances(const Problem& p, const std::vector<A>& qk, Result<A>& res) {
  const int R = p.R, M = p.M, B = p.B, N = p.N, C = p.C;
  const size_t NN = static_cast<size_t>(N) * N;
  auto X = [&](int br, int b) { return qk.data() + (static_cast<size_t>(br) * B + b) * N * C; };
  for (int m = 0; m < M; ++m) {  // Gram products (cuBLAS in the real build)
    if (!qcs::matrix_used(m, p.mode)) continue;
    for (int b = 0; b < B; ++b) {
      const A *x = X(qcs::row_branch(m), b), *y = X(qcs::col_branch(m), b);
      A* g = res.dist.data() + (static_cast<size_t>(m) * B + b) * NN;
      for (int i = 0; i < N; ++i)
        for (int j = 0; j < N; ++j) {
          A acc = 0;
          for (int k = 0; k < C; ++k) acc += x[i * C + k] * y[j * C + k];
          g[i * N + j] = acc;
        }
    }
  }
  std::vector<A> sq(R * B * N);
  const int64_t rows = static_cast<int64_t>(R) * B * N;
  QCS_LAUNCH(static_cast<int>((rows + 7) / 8), kern::kStreamThreads, 0, nullptr,
             kern::sqnorm_kernel<A, A>)(qk.data(), sq.data(), rows, C);
  const int tiles = static_cast<int>(std::clamp<int64_t>(
      (NN + kern::kStreamThreads * 16 - 1) / (kern::kStreamThreads * 16), 1, 64));
  std::vector<A> partial(static_cast<size_t>(M) * B * tiles);
  QCS_LAUNCH(tiles * M * B, kern::kStreamThreads, 0, nullptr, kern::distance_kernel<A, A>)(
      qk.data(), sq.data(), res.dist.data(), partial.data(), B, N, C, tiles, p.mode);
  QCS_LAUNCH((M * B + 3) / 4, kern::kSmallThreads, 0, nullptr, kern::sample_extrema_kernel<A>)(
      partial.data(), res.extrema.data(), M, B, tiles, p.mode);
}

template <typename A>
static Result<A> run_kernels(const Problem& p, const std::vector<double>& grad_maps,
                             bool streaming) {
  const int R = p.R, M = p.M, B = p.B, N = p.N, C = p.C;
  const size_t NN = static_cast<size_t>(N) * N;
  std::vector<A> qk(p.qk.begin(), p.qk.end());
  const A theta = static_cast<A>(p.theta);
  const A* th = p.M == 4 ? &theta : nullptr;
  auto X = [&](int br, int b) { return qk.data() + (static_cast<size_t>(br) * B + b) * N * C; };
  Result<A> res;
  res.dist.assign(M * B * NN, A(0));
  res.extrema.resize(M * B);
  // As csa_host.h: distances in tiles, float on tensor cores, double on CUDA cores.
  const bool on_tensor_cores = !streaming && std::is_same_v<A, float>;
  if (!streaming) {
    const int tiles = (N + kern::kTcTokens - 1) / kern::kTcTokens;
    std::vector<A> partial(static_cast<size_t>(M) * B * tiles * tiles);
    if constexpr (std::is_same_v<A, float>)
      QCS_LAUNCH(M * B * tiles * tiles, kern::kTcThreads, 0, nullptr,
                 kern::tensor_core_distance_kernel<float, kern::Tf32x3>)(
          qk.data(), res.dist.data(), partial.data(), B, N, C, p.mode);
    else
      QCS_LAUNCH(M * B * tiles * tiles, kern::kTcThreads, 0, nullptr,
                 kern::cuda_core_distance_kernel)(qk.data(), res.dist.data(), partial.data(), B, N,
                                                  C, p.mode);
    QCS_LAUNCH((M * B + 3) / 4, kern::kSmallThreads, 0, nullptr, kern::sample_extrema_kernel<A>)(
        partial.data(), res.extrema.data(), M, B, tiles * tiles, p.mode);
  } else {
    gemm_distances(p, qk, res);
  }
  if (p.scope == Scope::Batch)
    QCS_LAUNCH(M, kern::kSmallThreads, 0, nullptr, kern::batch_extrema_kernel<A>)(
        res.extrema.data(), B, p.mode);
  res.maps.resize(R * B * N);
  if (!streaming) {
    const size_t smem = (NN + 2 * N + 2 * R * N) * sizeof(A);
    QCS_LAUNCH(B, kern::kSmallThreads, smem, nullptr, kern::fused_epilogue_kernel<A, A>)(
        res.dist.data(), res.extrema.data(), th, p.gamma, p.mode, M, R, B, N, res.maps.data());
  } else {
    std::vector<A> norms(2 * M * B * N), scores(2 * R * B * N);
    QCS_LAUNCH(M * B, kern::kStreamThreads, 0, nullptr, kern::stream_aggregate_kernel<A>)(
        res.dist.data(), res.extrema.data(), norms.data(), scores.data(), M, R, B, N, p.mode);
    QCS_LAUNCH(B, kern::kSmallThreads, 0, nullptr, kern::fuse_softmax_kernel<A, A>)(
        scores.data(), th, p.gamma, p.mode, R, B, N, res.maps.data());
  }
  // backward
  std::vector<A> g(grad_maps.begin(), grad_maps.end()), gscore(R * B * N);
  QCS_LAUNCH(B, kern::kSmallThreads, 0, nullptr, kern::softmax_backward_kernel<A, A>)(
      g.data(), res.maps.data(), gscore.data(), R, B, N);
  std::vector<A> stats(4 * M * B * N), part(3 * M * B), route(M * B), wmat(M * B * NN),
      wsum(2 * M * B * N);
  QCS_LAUNCH(M * B, kern::kStreamThreads, 0, nullptr, kern::backward_stats_kernel<A, A>)(
      res.dist.data(), res.extrema.data(), gscore.data(), th, p.gamma, p.mode, M, B, N,
      stats.data(), part.data());
  QCS_LAUNCH(M, kern::kSmallThreads, 0, nullptr, kern::backward_reduce_kernel<A, A>)(
      part.data(), th, p.mode, p.scope, M, B, route.data(), th ? &res.grad_theta : nullptr);
  if constexpr (std::is_same_v<A, float>) {
    if (on_tensor_cores && N <= kern::kTcTokens) {  // as csa_host.h: W on chip
      res.grad_qk.assign(qk.size(), A(0));
      QCS_LAUNCH(R * B, kern::kTcGradThreads, 0, nullptr, kern::tensor_core_gradient_kernel<float>)(
          qk.data(), res.dist.data(), res.extrema.data(), gscore.data(), th, p.gamma, p.mode, M, B,
          N, C, stats.data(), route.data(), res.grad_qk.data());
      return res;
    }
  }
  QCS_LAUNCH(M * B, kern::kStreamThreads, 0, nullptr, kern::backward_weights_kernel<A, A>)(
      res.dist.data(), res.extrema.data(), gscore.data(), th, p.gamma, p.mode, M, B, N,
      stats.data(), route.data(), wmat.data(), wsum.data());
  res.grad_qk.assign(qk.size(), A(0));
  if (!streaming) {  // as csa_host.h: the gradient products in output tiles
    const int row_tiles = (N + kern::kTcTokens - 1) / kern::kTcTokens;
    if constexpr (std::is_same_v<A, float>) {  // on tensor cores
      const int tiles = row_tiles * ((C + kern::kTcTileChannels - 1) / kern::kTcTileChannels);
      QCS_LAUNCH(R * B * tiles, kern::kTcThreads, 0, nullptr,
                 kern::tensor_core_gradient_tiles_kernel<float>)(
          qk.data(), wmat.data(), wsum.data(), p.mode, M, B, N, C,
          static_cast<float>(1.0 / (2.0 * N)), res.grad_qk.data());
    } else {  // double on CUDA cores
      const int tiles = row_tiles * ((C + kern::kF64TileChannels - 1) / kern::kF64TileChannels);
      QCS_LAUNCH(R * B * tiles, kern::kTcThreads, 0, nullptr,
                 kern::cuda_core_gradient_tiles_kernel)(qk.data(), wmat.data(), wsum.data(), p.mode,
                                                        M, B, N, C, 1.0 / (2.0 * N),
                                                        res.grad_qk.data());
    }
    return res;
  }
  for (int m = 0; m < M; ++m) {  // dX = diag(W1) X - W Y, dY = diag(W^T 1) Y - W^T X
    if (!qcs::matrix_used(m, p.mode)) continue;
    for (int b = 0; b < B; ++b) {
      const int rb = qcs::row_branch(m), cb = qcs::col_branch(m);
      const A *x = X(rb, b), *y = X(cb, b),
              *w = wmat.data() + (static_cast<size_t>(m) * B + b) * NN;
      const A* wr = wsum.data() + (static_cast<size_t>(m) * B + b) * N;
      const A* wc = wsum.data() + (static_cast<size_t>(M + m) * B + b) * N;
      A* gx = res.grad_qk.data() + (static_cast<size_t>(rb) * B + b) * N * C;
      A* gy = res.grad_qk.data() + (static_cast<size_t>(cb) * B + b) * N * C;
      for (int i = 0; i < N; ++i)
        for (int k = 0; k < C; ++k) {
          A acc = wr[i] * x[i * C + k];
          for (int l = 0; l < N; ++l) acc -= w[i * N + l] * y[l * C + k];
          gx[i * C + k] += acc;
        }
      for (int l = 0; l < N; ++l)
        for (int k = 0; k < C; ++k) {
          A acc = wc[l] * y[l * C + k];
          for (int i = 0; i < N; ++i) acc -= w[i * N + l] * x[i * C + k];
          gy[l * C + k] += acc;
        }
    }
  }
  return res;
}

// ------------------------------------------------------------------ checks
static double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::abs(x));
  return m;
}

// fd: compare the gradient with finite differences. Off for constant input, where the
// maps are not differentiable (the normalisation of an all-zero matrix): there the
// kernels, like autograd through the reference, give exactly zero.
static void check(const char* name, Problem p, bool streaming, std::mt19937_64& rng,
                  bool fd_check = true) {
  std::normal_distribution<double> normal;
  std::vector<double> gm(static_cast<size_t>(p.R) * p.B * p.N);
  for (double& v : gm) v = normal(rng);
  const auto ref = reference_maps(p, p.qk, p.theta);
  const auto r64 = run_kernels<double>(p, gm, streaming);
  const auto r32 = run_kernels<float>(p, gm, streaming);
  double e64 = 0, e32 = 0, rowsum = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    e64 = std::max(e64, std::abs(r64.maps[i] - ref[i]));
    e32 = std::max(e32, std::abs(static_cast<double>(r32.maps[i]) - ref[i]));
  }
  for (int row = 0; row < p.R * p.B; ++row) {
    double s = 0;
    for (int j = 0; j < p.N; ++j) s += r64.maps[row * p.N + j];
    rowsum = std::max(rowsum, std::abs(s - 1));
  }
  expect(e64 <= 1e-12, "maps float64 vs reference", e64, 1e-12);
  expect(e32 <= 1e-5, "maps float32 vs reference", e32, 1e-5);
  expect(rowsum <= 1e-12, "rows sum to 1", rowsum, 1e-12);
  // Directional derivative of L = sum(g * maps) along random v (and theta along vt).
  std::vector<double> v(p.qk.size());
  for (double& x : v) x = normal(rng);
  const double vt = p.M == 4 ? normal(rng) : 0.0, h = 1e-6;
  auto loss = [&](double t) {
    std::vector<double> q(p.qk);
    for (size_t i = 0; i < q.size(); ++i) q[i] += t * v[i];
    const auto mp = reference_maps(p, q, p.theta + t * vt);
    double l = 0;
    for (size_t i = 0; i < mp.size(); ++i) l += gm[i] * mp[i];
    return l;
  };
  const double fd = (loss(h) - loss(-h)) / (2 * h);
  double an = r64.grad_theta * vt, an32 = static_cast<double>(r32.grad_theta) * vt;
  std::vector<double> g64(r64.grad_qk.begin(), r64.grad_qk.end());
  for (size_t i = 0; i < v.size(); ++i) {
    an += r64.grad_qk[i] * v[i];
    an32 += static_cast<double>(r32.grad_qk[i]) * v[i];
  }
  const double scale = std::max(1.0, std::abs(fd));
  if (!fd_check) {
    expect(max_abs(g64) == 0.0 && r64.grad_theta == 0.0, "grad is zero at constant input",
           max_abs(g64), 0.0);
    std::printf("%-32s %s maps64 %.1e maps32 %.1e grad64 max %.1e\n", name,
                streaming ? "stream" : "fused ", e64, e32, max_abs(g64));
    return;
  }
  expect(std::abs(an - fd) <= 1e-6 * scale, "grad float64 vs finite differences", std::abs(an - fd),
         1e-6 * scale);
  const double gscale = std::max(max_abs(g64), 1e-3) * std::sqrt(static_cast<double>(v.size()));
  expect(std::abs(an32 - an) <= 1e-3 * gscale, "grad float32 vs float64", std::abs(an32 - an),
         1e-3 * gscale);
  std::printf("%-32s %s maps64 %.1e maps32 %.1e grad64 %.1e grad32 %.1e\n", name,
              streaming ? "stream" : "fused ", e64, e32, std::abs(an - fd), std::abs(an32 - an));
}

static Problem make(int R, int B, int N, int C, Mode mode, Scope scope, std::mt19937_64& rng) {
  Problem p{R, R == 4 ? 4 : 1, B, N, C, mode, scope, 0.9, 0.25, {}};
  std::normal_distribution<double> normal;
  p.qk.resize(static_cast<size_t>(R) * B * N * C);
  for (double& x : p.qk) x = normal(rng);
  return p;
}

// `csa_emulated_driver quick` (used under ThreadSanitizer, ~10x slower) checks two of the
// six mode/scope combinations at the first shape instead of all six.
// ------------------------------------------------- negative controls of the validator
// Planted launches beyond the CUDA limits must be refused (LaunchError, naming the kernel
// and the limit), legal ones at the limits must run.
__global__ void planted_kernel(int* out) {
  QCS_DYNAMIC_SMEM(smem);
  (void)smem;
  if (threadIdx.x == 0 && blockIdx.x == 0 && blockIdx.y == 0) out[0] += 1;
}

static bool refused(const char* what, dim3 grid, dim3 block, size_t smem, const char* expect) {
  int counter = 0;
  try {
    QCS_LAUNCH(grid, block, smem, nullptr, planted_kernel)(&counter);
  } catch (const qcs_emu::LaunchError& e) {
    const bool named = std::string(e.what()).find("planted_kernel") != std::string::npos &&
                       std::string(e.what()).find(expect) != std::string::npos;
    std::printf("control %-44s refused: %s\n", what, e.what());
    return named && counter == 0;
  }
  std::printf("control %-44s NOT refused\n", what);
  return false;
}

static int validator_controls() {
  int bad = 0;
  bad += !refused("gridDim.y = 65536 (the old B > 16383 launch)", dim3(1, 65536), 32, 0, "65535");
  bad += !refused("32 x 32 x 2 = 2048 threads", 1, dim3(32, 32, 2), 0, "more than 1024 threads");
  bad += !refused("block z = 65", 1, dim3(1, 1, 65), 0, "block dimension");
  bad += !refused("empty grid", 0, 32, 0, "empty grid");
  bad +=
      !refused("49 KiB dynamic smem, no opt-in", 1, 32, 49 * 1024, "without cudaFuncSetAttribute");
  bad += cudaFuncSetAttribute(planted_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              64 * 1024) != cudaSuccess;
  bad += !refused("65 KiB dynamic smem, 64 KiB opt-in", 1, 32, 65 * 1024,
                  "limit set by cudaFuncSetAttribute");
  bad += cudaFuncSetAttribute(planted_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              200 * 1024) == cudaSuccess;
  int counter = 0;  // at the limits (1024 threads, the 64 KiB opted into): runs
  QCS_LAUNCH(1, 1024, 64 * 1024, nullptr, planted_kernel)(&counter);
  bad += counter != 1;
  std::printf(bad ? "validator controls FAILED\n"
                  : "validator controls: all refused as expected\n");
  return bad;
}

// Negative control of the watchdog: thread 0 waits at __syncthreads for the others, which
// spin until thread 0 has passed it: a deadlock (run with QCS_EMULATION_WATCHDOG_S small).
__global__ void planted_deadlock(int* flag) {
  if (threadIdx.x == 0) {
    __syncthreads();
    std::atomic_ref<int>(*flag).store(1);
  } else {
    while (std::atomic_ref<int>(*flag).load() == 0) std::this_thread::yield();
  }
}

// The same with barriers only: thread 0 waits at __syncthreads, the rest of its warp at
// __syncwarp (which needs thread 0), the other warp at __syncthreads (which needs them):
// no thread can go on. Fibers see it at once; host threads after the watchdog's time.
__global__ void planted_barrier_deadlock() {
  if (threadIdx.x == 0 || threadIdx.x >= 32) __syncthreads();
  else __syncwarp();
}

// Negative controls of the race checker, the mask check and the block order. Each planted
// kernel is run by its own mode (`csa_emulated_driver race`, ...): a report aborts.
// Threads 0 and 40 (two warps) touch one shared cell with no barrier between.
__global__ void planted_race(int* out) {
  QCS_SHARED_ARRAY(int, cell, 1);
  if (threadIdx.x == 0) cell[0] = 1;
  if (threadIdx.x == 40) out[0] = cell[0];
}
// Lane 0 writes, a shuffle, lane 1 reads: a shuffle is not a memory fence (a race);
// with `fence` a __syncwarp orders the two (no race).
__global__ void planted_shuffle_fence(int* out, bool fence) {
  QCS_SHARED_ARRAY(int, cell, 1);
  if (threadIdx.x == 0) cell[0] = 7;
  const int v = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
  if (fence) __syncwarp();
  if (threadIdx.x == 1) out[0] = cell[0] + v;
}
// All 32 lanes call a shuffle whose mask names only 16 of them.
__global__ void planted_mask(int* out) {
  const int v = __shfl_xor_sync(0x0000ffffu, static_cast<int>(threadIdx.x), 1);
  if (threadIdx.x == 0) out[0] = v;
}
// Every block overwrites one word: what is left is the block that ran last.
__global__ void planted_order(int* out) {
  if (threadIdx.x == 0) out[0] = static_cast<int>(blockIdx.x);
}

// Every block's thread 0 stores its index in a shared cell; after a barrier every thread
// checks it: with one copy for all running blocks, concurrent blocks would disagree.
__global__ void per_block_shared(int* mismatches) {
  QCS_SHARED_ARRAY(int, cell, 1);
  if (threadIdx.x == 0) cell[0] = static_cast<int>(blockIdx.x);
  __syncthreads();
  if (cell[0] != static_cast<int>(blockIdx.x)) atomicAdd(mismatches, 1);
}
// Every block's thread 0 increments one global word without an atomic: a race between
// blocks running at once (ThreadSanitizer reports it).
__global__ void planted_cross_block(int* out) {
  if (threadIdx.x == 0) out[0] += 1;
}

// Static shared memory: 40 KiB (with 10 KiB dynamic: 50 KiB, above the 48 KiB a kernel
// has without cudaFuncSetAttribute), and 49 KiB (above the static limit).
__global__ void planted_static_40k(int* out) {
  QCS_SHARED_ARRAY(float, big, 10 * 1024);
  big[threadIdx.x] = 1.f;
  if (threadIdx.x == 0) *out = 1;
}
__global__ void planted_static_49k(int* out) {
  QCS_SHARED_ARRAY(float, half_of_it, 6 * 1024);
  QCS_SHARED_ARRAY(float, other_half, 6 * 1024 + 256);
  half_of_it[threadIdx.x] = other_half[threadIdx.x] = 1.f;
  if (threadIdx.x == 0) *out = 1;
}

// Dynamic shared memory: thread 0 writes a float that thread 40 reads with no barrier
// between (a race), or (past_end) thread 0 writes one float past the launch's 64 bytes.
__global__ void planted_dynamic(int* out, bool past_end) {
  QCS_DYNAMIC_SMEM(raw);
  auto cells = QCS_SMEM_VIEW(float, raw);
  if (past_end) {
    if (threadIdx.x == 0) cells[16] = 1.f;
    return;
  }
  if (threadIdx.x == 0) cells[3] = 1.f;
  if (threadIdx.x == 40) out[0] = static_cast<int>(cells[3]);
}

static int planted(const std::string& what) {
  int out = 0;
  if (what == "dynamic-race") QCS_LAUNCH(1, 64, 64, nullptr, planted_dynamic)(&out, false);
  if (what == "dynamic-range") QCS_LAUNCH(1, 64, 64, nullptr, planted_dynamic)(&out, true);
  if (what == "static-smem") QCS_LAUNCH(1, 32, 0, nullptr, planted_static_49k)(&out);
  if (what == "static-plus-dynamic")
    QCS_LAUNCH(1, 32, 10 * 1024, nullptr, planted_static_40k)(&out);
  if (what == "static-within-limits") {  // 40 KiB static + 8 KiB dynamic: exactly the limit
    QCS_LAUNCH(1, 32, 8 * 1024, nullptr, planted_static_40k)(&out);
    std::printf("static within limits: ran (out = %d)\n", out);
    return out == 1 ? 0 : 1;
  }
  if (what == "race") QCS_LAUNCH(1, 64, 0, nullptr, planted_race)(&out);
  if (what == "shuffle-fence") QCS_LAUNCH(1, 32, 0, nullptr, planted_shuffle_fence)(&out, false);
  if (what == "syncwarp-fence") QCS_LAUNCH(1, 32, 0, nullptr, planted_shuffle_fence)(&out, true);
  if (what == "mask") QCS_LAUNCH(1, 32, 0, nullptr, planted_mask)(&out);
  if (what == "cross-block") QCS_LAUNCH(64, 32, 0, nullptr, planted_cross_block)(&out);
  if (what == "shared-per-block") {
    QCS_LAUNCH(64, 64, 0, nullptr, per_block_shared)(&out);
    std::printf("shared per block: %d mismatches\n", out);
    return out == 0 ? 0 : 1;
  }
  if (what == "order") {
    std::printf("last block of 5 launches:");
    for (int i = 0; i < 5; ++i) {
      QCS_LAUNCH(64, 32, 0, nullptr, planted_order)(&out);
      std::printf(" %d", out);
    }
    std::printf("\n");
    return 0;
  }
  std::printf("planted %s: not reported (out = %d)\n", what.c_str(), out);
  return 0;
}

// ------------------------------------------------------------------ the emulated wmma
namespace wmma = nvcuda::wmma;

// A bfloat16 (round to nearest even from float), to drive the 16-bit fragments without torch.
struct Bf16 {
  uint16_t bits = 0;
  Bf16() = default;
  explicit Bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    bits = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
  explicit operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};

struct alignas(32) WmmaBuffers {
  float a[16 * 16], b[16 * 16], one[16 * 16], three[16 * 16], half[16 * 16];
  Bf16 ah[16 * 16], bh[16 * 16];
};

// One warp: c = a b (16 x 8 times 8 x 16) with one TF32 mma and with 3xTF32 (kern::Tf32x3),
// and a bfloat16 m16n16k16 product. `offset` (elements) and `ldm_extra` misplace the
// operands for the negative controls.
__global__ void wmma_products(WmmaBuffers* buf, int offset, int ldm_extra) {
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::load_matrix_sync(fa, buf->a + offset, 8 + ldm_extra);
  wmma::load_matrix_sync(fb, buf->b, 16);
  wmma::fill_fragment(acc, 0.f);
  wmma::mma_sync(acc, fa, fb, acc);
  wmma::store_matrix_sync(buf->one, acc, 16, wmma::mem_row_major);
  wmma::fill_fragment(acc, 0.f);
  kern::Tf32x3::mma(acc, fa, fb);
  wmma::store_matrix_sync(buf->three, acc, 16, wmma::mem_row_major);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, Bf16, wmma::row_major> ha;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, Bf16, wmma::col_major> hb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> hacc;
  wmma::load_matrix_sync(ha, buf->ah, 16);
  wmma::load_matrix_sync(hb, buf->bh, 16);
  wmma::fill_fragment(hacc, 1.f);
  wmma::mma_sync(hacc, ha, hb, hacc);
  wmma::store_matrix_sync(buf->half, hacc, 16, wmma::mem_row_major);
}

static float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The emulated warp-matrix API against independent computations: TF32 conversion
// rounding, one TF32 mma (inputs truncated to 19 bits), 3xTF32 (float32 accuracy), and a
// bfloat16 mma (exact products, float accumulation). Modes wmma-misaligned / wmma-ldm:
// a planted misaligned pointer or bad ldm, which the emulation must report.
static int wmma_checks(const std::string& mode) {
  int failures = 0;
  auto want = [&](bool ok, const char* what, double got, double bound) {
    if (!ok) {
      ++failures;
      std::printf("FAIL %s: %.3e (bound %.3e)\n", what, got, bound);
    }
  };
  // __float_to_tf32: to nearest, ties away from zero, 10 mantissa bits kept.
  const struct {
    uint32_t in, out;
  } rounding[] = {
      {0x3F801000u, 0x3F802000u},  // 1 + 2^-11: a tie, away from zero -> 1 + 2^-10
      {0xBF801000u, 0xBF802000u},  // the same, negative
      {0x3F800800u, 0x3F800000u},  // 1 + 2^-12: below half -> 1
      {0x3F801800u, 0x3F802000u},  // 1 + 3 * 2^-12: above half -> 1 + 2^-10
      {0x3F803000u, 0x3F804000u},  // 1 + 3 * 2^-11: a tie from an odd value, away from zero
      {0x7F800000u, 0x7F800000u},  // +inf stays
  };
  for (const auto& r : rounding) {
    const float got = wmma::__float_to_tf32(bits_float(r.in));
    uint32_t u;
    std::memcpy(&u, &got, 4);
    want(u == r.out, "__float_to_tf32 rounding", static_cast<double>(u),
         static_cast<double>(r.out));
  }
  auto buf = std::make_unique<WmmaBuffers>();
  std::mt19937_64 rng(7);
  std::normal_distribution<float> normal;
  for (int e = 0; e < 256; ++e) {
    buf->a[e] = normal(rng);
    buf->b[e] = normal(rng);
    buf->ah[e] = Bf16(normal(rng));
    buf->bh[e] = Bf16(normal(rng));
  }
  const int offset = mode == "wmma-misaligned" ? 1 : 0;
  const int ldm_extra = mode == "wmma-ldm" ? 1 : 0;
  QCS_LAUNCH(1, 32, 0, nullptr, wmma_products)(buf.get(), offset, ldm_extra);
  if (offset || ldm_extra) {
    std::printf("the planted wmma misuse was not reported\n");
    return 1;
  }
  auto trunc19 = [](float v) {
    uint32_t u;
    std::memcpy(&u, &v, 4);
    return static_cast<double>(bits_float(u & ~0x1FFFu));
  };
  double err_one = 0, err_three = 0, err_one_vs_trunc = 0, err_half = 0;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double exact = 0, truncated = 0, half = 1;
      for (int k = 0; k < 8; ++k) {
        exact += static_cast<double>(buf->a[i * 8 + k]) * buf->b[k * 16 + j];
        truncated += trunc19(buf->a[i * 8 + k]) * trunc19(buf->b[k * 16 + j]);
      }
      for (int k = 0; k < 16; ++k)  // b is column-major: element (k, j) at j * 16 + k
        half += static_cast<double>(static_cast<float>(buf->ah[i * 16 + k])) *
                static_cast<float>(buf->bh[j * 16 + k]);
      err_one = std::max(err_one, std::abs(buf->one[i * 16 + j] - exact));
      err_three = std::max(err_three, std::abs(buf->three[i * 16 + j] - exact));
      err_one_vs_trunc = std::max(err_one_vs_trunc, std::abs(buf->one[i * 16 + j] - truncated));
      err_half = std::max(err_half, std::abs(buf->half[i * 16 + j] - half));
    }
  // Products of ~N(0,1) values summed 8 at a time: entries are O(3).
  want(err_one_vs_trunc <= 1e-6, "one TF32 mma = the product of the truncated inputs",
       err_one_vs_trunc, 1e-6);
  want(err_one > 1e-4, "one TF32 mma loses digits (the inputs are truncated)", err_one, 1e-4);
  want(err_three <= 4e-6, "3xTF32 keeps float32 accuracy", err_three, 4e-6);
  want(err_half <= 4e-6, "bfloat16 mma: exact products, float accumulation", err_half, 4e-6);
  std::printf("wmma: one TF32 mma off by %.2e, 3xTF32 by %.2e, bfloat16 by %.2e\n", err_one,
              err_three, err_half);
  return failures;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode.rfind("wmma", 0) == 0) return wmma_checks(mode) == 0 ? 0 : 1;
  if (mode == "race" || mode == "shuffle-fence" || mode == "syncwarp-fence" || mode == "mask" ||
      mode == "order" || mode == "cross-block" || mode == "shared-per-block" ||
      mode.rfind("static-", 0) == 0 || mode.rfind("dynamic-", 0) == 0)
    return planted(mode);
  if (argc > 1 && std::string(argv[1]) == "deadlock") {
    int flag = 0;
    QCS_LAUNCH(1, 64, 0, nullptr, planted_deadlock)(&flag);
    std::printf("the planted deadlock was not reported\n");
    return 1;
  }
  if (mode == "barrier-deadlock") {
    QCS_LAUNCH(1, 64, 0, nullptr, planted_barrier_deadlock)();
    std::printf("the planted deadlock was not reported\n");
    return 1;
  }
  const bool quick = argc > 1 && std::string(argv[1]) == "quick";
  if (argc > 1 && std::string(argv[1]) == "controls") return validator_controls() == 0 ? 0 : 1;
  std::mt19937_64 rng(1234);
  const Mode modes[] = {Mode::SD, Mode::S, Mode::D};
  const Scope scopes[] = {Scope::Batch, Scope::Sample};
  for (Mode mode : modes)
    for (Scope scope : scopes) {
      if (quick && !((mode == Mode::SD && scope == Scope::Batch) ||
                     (mode == Mode::D && scope == Scope::Sample)))
        continue;
      check("quad B=2 N=5 C=3", make(4, 2, 5, 3, mode, scope, rng), false, rng);
    }
  check("quad B=1 N=1", make(4, 1, 1, 2, Mode::SD, Scope::Batch, rng), false, rng);
  check("quad B=2 N=33 C=2 (streaming)", make(4, 2, 33, 2, Mode::SD, Scope::Sample, rng), true,
        rng);
  check("quad B=1 N=9 (streaming, batch)", make(4, 1, 9, 3, Mode::D, Scope::Batch, rng), true, rng);
  check("pair B=3 N=4", make(2, 3, 4, 3, Mode::S, Scope::Batch, rng), false, rng);
  check("pair B=2 N=6 (streaming)", make(2, 2, 6, 3, Mode::S, Scope::Sample, rng), true, rng);
  {  // zero distances: p repeats a (D_pa has zeros), one token repeated in n
    Problem p = make(4, 2, 4, 3, Mode::SD, Scope::Batch, rng);
    const size_t plane = static_cast<size_t>(p.B) * p.N * p.C;
    std::copy(p.qk.begin(), p.qk.begin() + plane, p.qk.begin() + plane);
    std::copy(p.qk.begin() + 2 * plane, p.qk.begin() + 2 * plane + p.C,
              p.qk.begin() + 2 * plane + p.C);
    check("quad duplicated tokens", p, false, rng);
  }
  {  // constant input: all distances 0, the clamp path everywhere
    Problem p = make(4, 2, 3, 2, Mode::SD, Scope::Sample, rng);
    std::fill(p.qk.begin(), p.qk.end(), 0.5);
    check("quad constant input", p, true, rng, false);
  }
  // Every tile of the tensor-core kernels (N = 49: 4 x 4 tiles), after the checks above
  // so that their random draws stay as they were.
  check("quad B=2 N=49 C=40 (all tiles)", make(4, 2, 49, 40, Mode::SD, Scope::Batch, rng), false,
        rng);
  check("quad B=1 N=70 C=33 (2 x 2 tiles)", make(4, 1, 70, 33, Mode::SD, Scope::Sample, rng), false,
        rng);
  if (g_failures) {
    std::printf("%d check(s) FAILED\n", g_failures);
    return 1;
  }
  std::printf("all checks passed\n");
  return 0;
}
