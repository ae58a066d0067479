// Host side of the CUDA CSA ops: argument checks, workspaces, the Gram/gradient GEMMs
// (ATen: cuBLAS on the GPU, the CPU BLAS under emulation) and the kernel launches.
//
// Shared by the real CUDA build (csa_cuda.cu) and the emulated build
// (csrc/emulation/csa_emulated.cpp), which define before including it:
//   QCS_HOST_STREAM        the stream to launch on (the current CUDA stream)
//   QCS_HOST_LAUNCH_CHECK() checks the last launch (C10_CUDA_KERNEL_LAUNCH_CHECK)
//   QCS_HOST_GUARD(t)      a device guard for tensor t
//   QCS_HOST_DEVICE        the c10::DeviceType the ops run on
//   QCS_HOST_IMAGE_FITS(i) whether a kernel image of this build runs on device i
//   QCS_HOST_GEMM_INPUT(t) a GEMM operand as the BLAS will see it (the identity on the
//                          GPU; the emulation rounds to TF32 where cuBLAS would)
//   QCS_HOST_HALF, QCS_HOST_BF16  the 16-bit types of the tensor-core fragments
// Nothing here synchronises with the device: theta is read by the kernels.
//
// Precision: the GEMMs run with TF32 pinned off (at::NoTF32Guard), whatever the global
// switches (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision) say:
// the Gram identity loses digits to cancellation and TF32's 10-bit mantissa would leave
// float32 distances ~1e-3 off. The tensor-core paths (float32, float16, bfloat16) keep
// float32 accuracy their own way: 3xTF32 (kern::Tf32x3), whatever the switches say.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <tuple>
#include <type_traits>

#include "csa_checks.h"
#include "csa_kernels.cuh"

namespace qcs::host {

// The checks shared with the CPU backend and Python (csa_checks.h), then this backend's.
inline void check_qk(const at::Tensor& qk, int64_t branches) {
  checks::features(qk, "qk", branches);
  checks::kernel_device(qk, QCS_HOST_DEVICE, "CUDA");
  TORCH_CHECK_VALUE(qk.size(2) <= (1 << 15) && qk.size(3) <= (1 << 30), "qk too large: ", qk.sizes());
  checks::kernel_dtype(qk, {at::kFloat, at::kDouble, at::kHalf, at::kBFloat16}, "float32, float64, float16 or bfloat16",
                       "CUDA");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------- launches
// The CUDA limits every launch is checked against (the same on every architecture the
// package ships for): a 1-D grid of at most 2^31 - 1 blocks, blocks of at most the
// kernel's __launch_bounds__ threads (a multiple of the warp), dynamic shared memory
// within the 48 KiB a kernel gets without cudaFuncSetAttribute.
constexpr int64_t kMaxGridX = 2147483647;
constexpr size_t kMaxDefaultSmem = 48 * 1024;

// The 1-D grid of a launch of `blocks` blocks of `threads` threads (bounds: the kernel's
// __launch_bounds__) with `smem` bytes of dynamic shared memory, checked.
inline dim3 checked_grid(const char* kernel, int64_t blocks, int threads, int bounds, size_t smem = 0) {
  TORCH_CHECK(blocks >= 1 && blocks <= kMaxGridX, "qcs_ext: ", kernel, " needs ", blocks,
              " blocks, beyond CUDA's grid limit of 2^31 - 1 (input too large)");
  TORCH_CHECK(threads >= 32 && threads <= bounds && threads % 32 == 0, "qcs_ext: ", kernel, " launched with ", threads,
              " threads, its __launch_bounds__ is ", bounds);
  TORCH_CHECK(smem <= kMaxDefaultSmem, "qcs_ext: ", kernel, " needs ", smem,
              " bytes of dynamic shared memory, more than the 48 KiB available without opt-in");
  return dim3(static_cast<unsigned>(blocks));
}

// Refuses to launch on a device this build has no kernel image for (no SASS of its
// architecture and no PTX old enough to be compiled for it): the message says why,
// instead of "no kernel image is available" from the first launch. The Python wrappers
// fall back to the reference on such a device (has_fused_kernel says False).
inline void require_kernel_image(const at::Tensor& qk) {
  const int index = qk.device().has_index() ? qk.device().index() : 0;
  TORCH_CHECK(QCS_HOST_IMAGE_FITS(index), "qcs_ext: this build has no CUDA kernel image for device ", qk.device(),
              " (it carries SASS for sm_80 and sm_90 and PTX for newer GPUs; rebuild qcs-ext with nvcc from a "
              "CUDA toolkit that knows the device); qcs_ext.reference runs anywhere");
}

// out = a @ b (batched), with the operands as the BLAS sees them.
inline void gemm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  at::bmm_out(out, QCS_HOST_GEMM_INPUT(a), QCS_HOST_GEMM_INPUT(b));
}
// acc -= a @ b (batched).
inline void gemm_sub(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  acc.baddbmm_(QCS_HOST_GEMM_INPUT(a), QCS_HOST_GEMM_INPUT(b), 1, -1);
}

// QCS_CSA_FORCE_STREAMING=1: the GEMM path and the streaming epilogue at every N (tests).
inline bool force_streaming() {
  const char* force = std::getenv("QCS_CSA_FORCE_STREAMING");
  return force != nullptr && force[0] == '1';
}
inline bool fused_fits(int64_t n, int64_t nbranch, size_t elem) {
  if (force_streaming()) return false;
  return static_cast<size_t>(n * n + 2 * n + 2 * nbranch * n) * elem <= 48 * 1024;
}

// How a dtype enters the tensor cores (kern::tensor_core_distance_kernel): float32
// through 3xTF32, float16/bfloat16 natively; float64 has no recipe (its tiles run on
// CUDA cores: cuda_core_distance_kernel, cuda_core_gradient_tiles_kernel).
// QCS_HOST_HALF / QCS_HOST_BF16: the 16-bit types the wmma fragments take.
template <typename T>
struct TensorCoreRecipe {
  using type = void;
};
template <>
struct TensorCoreRecipe<float> {
  using type = kern::Tf32x3;
};
template <>
struct TensorCoreRecipe<c10::Half> {
  using type = kern::Native16<QCS_HOST_HALF>;
};
template <>
struct TensorCoreRecipe<c10::BFloat16> {
  using type = kern::Native16<QCS_HOST_BF16>;
};

// extrema [M,B]: each sample's extreme of its `tiles` tile extremes in partial [M,B,tiles],
// a warp per (m, b).
template <typename A>
void launch_sample_extrema(const at::Tensor& partial, at::Tensor& extrema, int tiles, Mode mode) {
  const int nmat = static_cast<int>(extrema.size(0)), batch = static_cast<int>(extrema.size(1));
  const dim3 grid = checked_grid("sample_extrema_kernel", ceil_div(int64_t{nmat} * batch, kern::kSmallThreads / 32),
                                 kern::kSmallThreads, kern::kSmallThreads);
  QCS_LAUNCH(grid, kern::kSmallThreads, 0, QCS_HOST_STREAM, kern::sample_extrema_kernel<A>)(
      partial.data_ptr<A>(), extrema.data_ptr<A>(), nmat, batch, tiles, mode);
  QCS_HOST_LAUNCH_CHECK();
}

// Distances [M,B,N,N] and sample extremes [M,B] in 64 x 64 tiles: on tensor cores
// (tensor_core_distance_kernel), float64 on CUDA cores (cuda_core_distance_kernel). One
// launch for N <= 64 (one tile per matrix), two above (then the sample extremes of the tiles').
template <typename T>
std::tuple<at::Tensor, at::Tensor> distances_in_tiles(const at::Tensor& qk, Mode mode, int nmat) {
  using A = at::opmath_type<T>;
  const int batch = static_cast<int>(qk.size(1)), n = static_cast<int>(qk.size(2)), c = static_cast<int>(qk.size(3));
  const auto acc = qk.options().dtype(c10::CppTypeToScalarType<A>::value);
  const int64_t tiles = ceil_div(n, kern::kTcTokens), per_matrix = tiles * tiles;
  at::Tensor dist = at::empty({nmat, batch, n, n}, acc);
  at::Tensor extrema = at::empty({nmat, batch}, acc);
  at::Tensor partial = per_matrix == 1 ? extrema : at::empty({nmat, batch, per_matrix}, acc);
  if constexpr (std::is_same_v<T, double>) {
    QCS_LAUNCH(checked_grid("cuda_core_distance_kernel", per_matrix * nmat * batch, kern::kTcThreads, kern::kTcThreads),
               kern::kTcThreads, 0, QCS_HOST_STREAM, kern::cuda_core_distance_kernel)(
        qk.data_ptr<double>(), dist.data_ptr<double>(), partial.data_ptr<double>(), batch, n, c, mode);
  } else {
    using Recipe = typename TensorCoreRecipe<T>::type;
    QCS_LAUNCH(
        checked_grid("tensor_core_distance_kernel", per_matrix * nmat * batch, kern::kTcThreads, kern::kTcThreads),
        kern::kTcThreads, 0, QCS_HOST_STREAM, kern::tensor_core_distance_kernel<T, Recipe>)(
        qk.data_ptr<T>(), dist.data_ptr<float>(), partial.data_ptr<float>(), batch, n, c, mode);
  }
  QCS_HOST_LAUNCH_CHECK();
  if (per_matrix > 1) launch_sample_extrema<A>(partial, extrema, static_cast<int>(per_matrix), mode);
  return {dist, extrema};
}

// Distances [M,B,N,N] and sample extremes [M,B] from Gram GEMMs (ATen: cuBLAS) and
// streaming kernels: any N and dtype (QCS_CSA_FORCE_STREAMING=1).
template <typename T>
std::tuple<at::Tensor, at::Tensor> distances_from_gemms(const at::Tensor& qk, Mode mode, int nmat) {
  using A = at::opmath_type<T>;
  const at::NoTF32Guard full_fp32_gemms;  // see "Precision" above
  const int nbranch = static_cast<int>(qk.size(0));
  const int batch = static_cast<int>(qk.size(1)), n = static_cast<int>(qk.size(2)), c = static_cast<int>(qk.size(3));
  const auto acc = qk.options().dtype(c10::CppTypeToScalarType<A>::value);
  const at::Tensor qka = qk.scalar_type() == acc.dtype().toScalarType() ? qk : qk.to(acc.dtype());
  auto stream = QCS_HOST_STREAM;

  // Gram products of the used matrices (fp32 accumulate; half inputs are widened first
  // so the Gram identity keeps its digits), the other matrices stay zero.
  at::Tensor dist = at::zeros({nmat, batch, n, n}, acc);
  for (int m = 0; m < nmat; ++m) {
    if (!matrix_used(m, mode)) continue;
    at::Tensor out = dist.select(0, m);
    gemm_into(out, qka.select(0, row_branch(m)), qka.select(0, col_branch(m)).transpose(1, 2));
  }

  at::Tensor sq = at::empty({nbranch, batch, n}, acc);
  const int64_t rows = static_cast<int64_t>(nbranch) * batch * n;
  const dim3 sq_grid = checked_grid("sqnorm_kernel", std::min<int64_t>(ceil_div(rows, kern::kStreamThreads / 32), 4096),
                                    kern::kStreamThreads, kern::kStreamThreads);
  QCS_LAUNCH(sq_grid, kern::kStreamThreads, 0, stream, kern::sqnorm_kernel<T, A>)(qk.data_ptr<T>(), sq.data_ptr<A>(),
                                                                                  rows, c);
  QCS_HOST_LAUNCH_CHECK();

  const int64_t nn = static_cast<int64_t>(n) * n;
  const int tiles = static_cast<int>(std::clamp<int64_t>(ceil_div(nn, kern::kStreamThreads * 16), 1, 64));
  at::Tensor partial = at::empty({nmat, batch, tiles}, acc);
  const dim3 dist_grid =
      checked_grid("distance_kernel", int64_t{tiles} * nmat * batch, kern::kStreamThreads, kern::kStreamThreads);
  QCS_LAUNCH(dist_grid, kern::kStreamThreads, 0, stream, kern::distance_kernel<T, A>)(
      qk.data_ptr<T>(), sq.data_ptr<A>(), dist.data_ptr<A>(), partial.data_ptr<A>(), batch, n, c, tiles, mode);
  QCS_HOST_LAUNCH_CHECK();

  at::Tensor extrema = at::empty({nmat, batch}, acc);
  launch_sample_extrema<A>(partial, extrema, tiles, mode);
  return {dist, extrema};
}

// Launches, forward: tensor_core_distance_kernel (float64: cuda_core_distance_kernel;
// + sample_extrema_kernel above N = 64), batch_extrema_kernel (scope "batch"), the
// epilogue (fused_epilogue_kernel, or 2 streaming kernels above N ~ 100): 3 at N <= 64, 5
// at N = 196 or 784. QCS_CSA_FORCE_STREAMING=1: the Gram GEMMs and 4-6 kernels.
template <typename T>
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward_typed(const at::Tensor& qk, const T* theta, double gamma,
                                                             Mode mode, Scope scope, int nmat) {
  using A = at::opmath_type<T>;
  const int nbranch = static_cast<int>(qk.size(0));
  const int batch = static_cast<int>(qk.size(1)), n = static_cast<int>(qk.size(2));
  const auto acc = qk.options().dtype(c10::CppTypeToScalarType<A>::value);
  auto stream = QCS_HOST_STREAM;

  at::Tensor dist, extrema;
  if (force_streaming()) std::tie(dist, extrema) = distances_from_gemms<T>(qk, mode, nmat);
  else std::tie(dist, extrema) = distances_in_tiles<T>(qk, mode, nmat);

  // The batch's extremes from the samples': a fixed-order block reduction (no atomics).
  if (scope == Scope::Batch) {
    QCS_LAUNCH(checked_grid("batch_extrema_kernel", nmat, kern::kSmallThreads, kern::kSmallThreads),
               kern::kSmallThreads, 0, stream, kern::batch_extrema_kernel<A>)(extrema.data_ptr<A>(), batch, mode);
    QCS_HOST_LAUNCH_CHECK();
  }

  const int64_t nn = static_cast<int64_t>(n) * n;
  at::Tensor maps = at::empty({nbranch, batch, n}, qk.options());
  if (fused_fits(n, nbranch, sizeof(A))) {
    const size_t smem = static_cast<size_t>(nn + 2 * n + 2 * nbranch * n) * sizeof(A);
    QCS_LAUNCH(checked_grid("fused_epilogue_kernel", batch, kern::kSmallThreads, kern::kSmallThreads, smem),
               kern::kSmallThreads, smem, stream, kern::fused_epilogue_kernel<T, A>)(
        dist.data_ptr<A>(), extrema.data_ptr<A>(), theta, gamma, mode, nmat, nbranch, batch, n, maps.data_ptr<T>());
    QCS_HOST_LAUNCH_CHECK();
  } else {
    at::Tensor norms = at::empty({2, nmat, batch, n}, acc);
    at::Tensor scores = at::empty({2, nbranch, batch, n}, acc);
    QCS_LAUNCH(
        checked_grid("stream_aggregate_kernel", int64_t{nmat} * batch, kern::kStreamThreads, kern::kStreamThreads),
        kern::kStreamThreads, 0, stream, kern::stream_aggregate_kernel<A>)(dist.data_ptr<A>(), extrema.data_ptr<A>(),
                                                                           norms.data_ptr<A>(), scores.data_ptr<A>(),
                                                                           nmat, nbranch, batch, n, mode);
    QCS_HOST_LAUNCH_CHECK();
    QCS_LAUNCH(checked_grid("fuse_softmax_kernel", batch, kern::kSmallThreads, kern::kSmallThreads),
               kern::kSmallThreads, 0, stream, kern::fuse_softmax_kernel<T, A>)(
        scores.data_ptr<A>(), theta, gamma, mode, nbranch, batch, n, maps.data_ptr<T>());
    QCS_HOST_LAUNCH_CHECK();
  }
  return {maps, dist, extrema};
}

// Launches, backward: softmax_backward_kernel, backward_stats_kernel,
// backward_reduce_kernel, then for a 32- or 16-bit dtype tensor_core_gradient_kernel
// (N <= 64: 4 in all) or backward_weights_kernel + tensor_core_gradient_tiles_kernel
// (5); float64: backward_weights_kernel + cuda_core_gradient_tiles_kernel (5).
// QCS_CSA_FORCE_STREAMING=1: backward_weights_kernel and the gradient GEMMs (8 cuBLAS
// calls and ~16 element-wise ATen ops in the quadruplet).
template <typename T>
std::tuple<at::Tensor, at::Tensor> backward_typed(const at::Tensor& grad_maps, const at::Tensor& maps,
                                                  const at::Tensor& qk, const at::Tensor& dist,
                                                  const at::Tensor& extrema, const T* theta, double gamma, Mode mode,
                                                  Scope scope, int nmat, bool want_theta) {
  using A = at::opmath_type<T>;
  const at::NoTF32Guard full_fp32_gemms;  // see "Precision" above
  const int nbranch = static_cast<int>(qk.size(0));
  const int batch = static_cast<int>(qk.size(1)), n = static_cast<int>(qk.size(2));
  const auto acc = qk.options().dtype(c10::CppTypeToScalarType<A>::value);
  auto stream = QCS_HOST_STREAM;

  at::Tensor gscore = at::empty({nbranch, batch, n}, acc);
  QCS_LAUNCH(checked_grid("softmax_backward_kernel", batch, kern::kSmallThreads, kern::kSmallThreads),
             kern::kSmallThreads, 0, stream, kern::softmax_backward_kernel<T, A>)(
      grad_maps.data_ptr<T>(), maps.data_ptr<T>(), gscore.data_ptr<A>(), nbranch, batch, n);
  QCS_HOST_LAUNCH_CHECK();

  at::Tensor stats = at::empty({4, nmat, batch, n}, acc);
  at::Tensor part = at::empty({3, nmat, batch}, acc);
  const dim3 per_matrix =
      checked_grid("backward_stats_kernel", int64_t{nmat} * batch, kern::kStreamThreads, kern::kStreamThreads);
  QCS_LAUNCH(per_matrix, kern::kStreamThreads, 0, stream, kern::backward_stats_kernel<T, A>)(
      dist.data_ptr<A>(), extrema.data_ptr<A>(), gscore.data_ptr<A>(), theta, gamma, mode, nmat, batch, n,
      stats.data_ptr<A>(), part.data_ptr<A>());
  QCS_HOST_LAUNCH_CHECK();

  at::Tensor route = at::empty({nmat, batch}, acc);
  at::Tensor grad_theta = at::empty({}, qk.options());
  QCS_LAUNCH(checked_grid("backward_reduce_kernel", nmat, kern::kSmallThreads, kern::kSmallThreads),
             kern::kSmallThreads, 0, stream,
             kern::backward_reduce_kernel<T, A>)(part.data_ptr<A>(), theta, mode, scope, nmat, batch,
                                                 route.data_ptr<A>(), want_theta ? grad_theta.data_ptr<T>() : nullptr);
  QCS_HOST_LAUNCH_CHECK();

  if constexpr (!std::is_void_v<typename TensorCoreRecipe<T>::type>) {
    if (n <= kern::kTcTokens && !force_streaming()) {  // W on chip, products on tensor cores
      at::Tensor grad = at::empty(qk.sizes(), qk.options());
      QCS_LAUNCH(checked_grid("tensor_core_gradient_kernel", int64_t{nbranch} * batch, kern::kTcGradThreads,
                              kern::kTcGradThreads),
                 kern::kTcGradThreads, 0, stream, kern::tensor_core_gradient_kernel<T>)(
          qk.data_ptr<T>(), dist.data_ptr<A>(), extrema.data_ptr<A>(), gscore.data_ptr<A>(), theta, gamma, mode, nmat,
          batch, n, static_cast<int>(qk.size(3)), stats.data_ptr<A>(), route.data_ptr<A>(), grad.data_ptr<T>());
      QCS_HOST_LAUNCH_CHECK();
      return {grad, grad_theta};
    }
  }

  at::Tensor wmat = at::empty({nmat, batch, n, n}, acc);
  at::Tensor wsum = at::empty({2, nmat, batch, n}, acc);
  QCS_LAUNCH(per_matrix, kern::kStreamThreads, 0, stream, kern::backward_weights_kernel<T, A>)(
      dist.data_ptr<A>(), extrema.data_ptr<A>(), gscore.data_ptr<A>(), theta, gamma, mode, nmat, batch, n,
      stats.data_ptr<A>(), route.data_ptr<A>(), wmat.data_ptr<A>(), wsum.data_ptr<A>());
  QCS_HOST_LAUNCH_CHECK();

  if (!force_streaming()) {  // the gradient products in 64-token output tiles
    const int c = static_cast<int>(qk.size(3));
    at::Tensor grad = at::empty(qk.sizes(), qk.options());
    if constexpr (std::is_same_v<T, double>) {  // on CUDA cores, 16 channels per tile
      const int64_t tiles = ceil_div(n, kern::kTcTokens) * ceil_div(c, kern::kF64TileChannels);
      QCS_LAUNCH(
          checked_grid("cuda_core_gradient_tiles_kernel", tiles * nbranch * batch, kern::kTcThreads, kern::kTcThreads),
          kern::kTcThreads, 0, stream, kern::cuda_core_gradient_tiles_kernel)(
          qk.data_ptr<double>(), wmat.data_ptr<double>(), wsum.data_ptr<double>(), mode, nmat, batch, n, c,
          1.0 / (2.0 * n), grad.data_ptr<double>());
    } else {  // on tensor cores, 32 channels per tile
      const int64_t tiles = ceil_div(n, kern::kTcTokens) * ceil_div(c, kern::kTcTileChannels);
      QCS_LAUNCH(checked_grid("tensor_core_gradient_tiles_kernel", tiles * nbranch * batch, kern::kTcThreads,
                              kern::kTcThreads),
                 kern::kTcThreads, 0, stream, kern::tensor_core_gradient_tiles_kernel<T>)(
          qk.data_ptr<T>(), wmat.data_ptr<A>(), wsum.data_ptr<A>(), mode, nmat, batch, n, c,
          static_cast<float>(1.0 / (2.0 * n)), grad.data_ptr<T>());
    }
    QCS_HOST_LAUNCH_CHECK();
    return {grad, grad_theta};
  }

  // QCS_CSA_FORCE_STREAMING: the gradient GEMMs through ATen.
  // dL/dX = diag(W 1) X - W Y (rows), dL/dY = diag(W^T 1) Y - W^T X (columns); each
  // branch sits in two matrices: accumulate (fixed order, deterministic). Both terms are
  // unchanged when X and Y are shifted by one common vector o per sample, so they are
  // computed from X - o and Y - o (o: the mean token of the pair): with a large common
  // offset the two terms would otherwise cancel and lose float32's digits.
  const at::Tensor qka = qk.scalar_type() == acc.dtype().toScalarType() ? qk : qk.to(acc.dtype());
  at::Tensor grad = at::zeros(qk.sizes(), acc);
  for (int m = 0; m < nmat; ++m) {
    if (!matrix_used(m, mode)) continue;
    const at::Tensor xr = qka.select(0, row_branch(m)), yr = qka.select(0, col_branch(m));
    const at::Tensor o = (xr.mean(1, true) + yr.mean(1, true)) * 0.5;
    const at::Tensor x = xr - o, y = yr - o;
    const at::Tensor w = wmat.select(0, m);
    at::Tensor gx = grad.select(0, row_branch(m)), gy = grad.select(0, col_branch(m));
    gx.addcmul_(wsum.select(0, 0).select(0, m).unsqueeze(-1), x);
    gemm_sub(gx, w, y);
    gy.addcmul_(wsum.select(0, 1).select(0, m).unsqueeze(-1), y);
    gemm_sub(gy, w.transpose(1, 2), x);
  }
  return {grad.to(qk.scalar_type()), grad_theta};
}

// ---------------------------------------------------------------------------- the ops

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_forward(const at::Tensor& qk_in, const at::Tensor& theta,
                                                                    double gamma, c10::string_view mode_s,
                                                                    c10::string_view scope_s) {
  const at::Tensor qk = qk_in.contiguous();
  check_qk(qk, 4);
  checks::theta(theta, qk);
  checks::gamma(gamma);
  const Mode mode = checks::mode(mode_s);
  const Scope scope = checks::scope(scope_s);
  QCS_HOST_GUARD(qk);
  require_kernel_image(qk);
  const at::Tensor th = theta.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qk.scalar_type(), "qcs_cross_forward", [&] {
    out = forward_typed<scalar_t>(qk, th.data_ptr<scalar_t>(), gamma, mode, scope, 4);
  });
  return out;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> pair_forward(const at::Tensor& qk_in, c10::string_view scope_s) {
  const at::Tensor qk = qk_in.contiguous();
  check_qk(qk, 2);
  const Scope scope = checks::scope(scope_s);
  QCS_HOST_GUARD(qk);
  require_kernel_image(qk);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qk.scalar_type(), "qcs_pair_forward", [&] {
    out = forward_typed<scalar_t>(qk, static_cast<const scalar_t*>(nullptr), 0.0, Mode::S, scope, 1);
  });
  return out;
}

inline void check_backward_inputs(const at::Tensor& grad_maps, const at::Tensor& maps, const at::Tensor& qk,
                                  const at::Tensor& dist, const at::Tensor& extrema, int nmat) {
  const int64_t r = qk.size(0), b = qk.size(1), n = qk.size(2);
  const auto aux = (qk.scalar_type() == at::kHalf || qk.scalar_type() == at::kBFloat16) ? at::kFloat : qk.scalar_type();
  checks::saved(grad_maps, "grad_maps", qk, {r, b, n}, qk.scalar_type());
  checks::saved(maps, "maps", qk, {r, b, n}, qk.scalar_type());
  checks::saved(dist, "distances", qk, {nmat, b, n, n}, aux);
  checks::saved(extrema, "extrema", qk, {nmat, b}, aux);
}

inline std::tuple<at::Tensor, at::Tensor> cross_backward(const at::Tensor& grad_in, const at::Tensor& maps_in,
                                                         const at::Tensor& qk_in, const at::Tensor& dist_in,
                                                         const at::Tensor& extrema_in, const at::Tensor& theta,
                                                         double gamma, c10::string_view mode_s,
                                                         c10::string_view scope_s) {
  const at::Tensor grad_maps = grad_in.contiguous(), maps = maps_in.contiguous(), qk = qk_in.contiguous();
  const at::Tensor dist = dist_in.contiguous(), extrema = extrema_in.contiguous();
  check_qk(qk, 4);
  checks::theta(theta, qk);
  checks::gamma(gamma);
  check_backward_inputs(grad_maps, maps, qk, dist, extrema, 4);
  const Mode mode = checks::mode(mode_s);
  const Scope scope = checks::scope(scope_s);
  QCS_HOST_GUARD(qk);
  require_kernel_image(qk);
  const at::Tensor th = theta.contiguous();
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qk.scalar_type(), "qcs_cross_backward", [&] {
    out = backward_typed<scalar_t>(grad_maps, maps, qk, dist, extrema, th.data_ptr<scalar_t>(), gamma, mode, scope, 4,
                                   true);
  });
  std::get<1>(out) = std::get<1>(out).reshape(theta.sizes());
  return out;
}

inline at::Tensor pair_backward(const at::Tensor& grad_in, const at::Tensor& maps_in, const at::Tensor& qk_in,
                                const at::Tensor& dist_in, const at::Tensor& extrema_in, c10::string_view scope_s) {
  const at::Tensor grad_maps = grad_in.contiguous(), maps = maps_in.contiguous(), qk = qk_in.contiguous();
  const at::Tensor dist = dist_in.contiguous(), extrema = extrema_in.contiguous();
  check_qk(qk, 2);
  check_backward_inputs(grad_maps, maps, qk, dist, extrema, 1);
  const Scope scope = checks::scope(scope_s);
  QCS_HOST_GUARD(qk);
  require_kernel_image(qk);
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, qk.scalar_type(), "qcs_pair_backward", [&] {
    out = std::get<0>(backward_typed<scalar_t>(grad_maps, maps, qk, dist, extrema,
                                               static_cast<const scalar_t*>(nullptr), 0.0, Mode::S, scope, 1, false));
  });
  return out;
}

// Registers the four ops with the kernels above (inside a TORCH_LIBRARY_IMPL block).
inline void register_kernels(torch::Library& m) {
  m.impl("cross_similarity_forward", &cross_forward);
  m.impl("cross_similarity_backward", &cross_backward);
  m.impl("pair_similarity_forward", &pair_forward);
  m.impl("pair_similarity_backward", &pair_backward);
}

}  // namespace qcs::host
