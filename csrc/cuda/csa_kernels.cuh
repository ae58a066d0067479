// CUDA kernels of Cross Similarity Attention (CSA), forward and backward.
//
// Plain CUDA C++ with no ATen: this same source is compiled by nvcc (csa_cuda.cu) and, for
// the tests, by the host compiler under the emulation layer (csrc/emulation), where every
// block runs as real host threads. Launches go through QCS_LAUNCH, never `<<<...>>>`.
//
// Template parameters: T is the element type of qk/maps/theta (float, double, c10::Half,
// c10::BFloat16), A the accumulation type (float, or double for double). A is also the
// dtype of the saved distances/extrema and of every workspace.
//
// Layouts (R branches: 4 for the quadruplet, 2 for the pair; M matrices: 4 or 1):
//   qk [R,B,N,C] T, sq [R,B,N] A (squared token norms), dist [M,B,N,N] A,
//   extrema [M,B] A, maps [R,B,N] T, scores [2,R,B,N] A (s then d).
// Matrix m of batch element b is "block mb = m*B + b" in every per-matrix kernel.
#pragma once

#include <cstdint>
#include <type_traits>

#include "csa_common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#define QCS_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define QCS_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
// A typed view of dynamic shared memory (race-checked under the emulation).
#define QCS_SMEM_VIEW(T, raw) reinterpret_cast<T*>(raw)
// 32-byte aligned: a tile passed to wmma::load_matrix_sync must be (256 bits).
#define QCS_SHARED_ARRAY(T, name, N) __shared__ __align__(32) T name[N]
#define QCS_NO_UNROLL _Pragma("unroll 1")
#define QCS_UNROLL _Pragma("unroll")
#else
#define QCS_NO_UNROLL
#define QCS_UNROLL
#include "cuda_emulation.h"
#endif

namespace qcs::kern {

constexpr int kStreamThreads = 256;  // per-matrix streaming kernels
constexpr int kSmallThreads = 128;   // per-batch-element kernels (one warp per branch)
constexpr int kMaxWarps = 32;

template <typename A>
__device__ __forceinline__ A pos_inf() {
  return static_cast<A>(HUGE_VAL);
}

// XOR butterflies: every lane ends with the same, bitwise identical value (a+b == b+a).
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_max(A v) {
  for (int o = 16; o > 0; o >>= 1) {
    const A w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}
template <typename A>
__device__ __forceinline__ A warp_min(A v) {
  for (int o = 16; o > 0; o >>= 1) {
    const A w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}

// Block-wide reductions through `scratch` (kMaxWarps values of shared memory, a
// QCS_SHARED_ARRAY: the emulation race-checks it, hence the template parameter). Every
// thread returns the result; the order of the partial sums is fixed (deterministic).
// blockDim.x must be a multiple of 32.
template <typename A, typename Scratch>
__device__ __forceinline__ A block_sum(A v, Scratch&& scratch) {
  v = warp_sum(v);
  const int nw = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  A total = 0;
  for (int w = 0; w < nw; ++w) total += scratch[w];
  __syncthreads();  // scratch may be reused right after
  return total;
}
template <typename A, typename Scratch>
__device__ __forceinline__ A block_extreme(A v, Scratch&& scratch, bool largest) {
  v = largest ? warp_max(v) : warp_min(v);
  const int nw = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = v;
  __syncthreads();
  A r = scratch[0];
  for (int w = 1; w < nw; ++w) {
    const A x = scratch[w];
    r = largest ? (x > r ? x : r) : (x < r ? x : r);
  }
  __syncthreads();
  return r;
}

// Norm clamped as in F.normalize; `clamped(n)` tells whether the clamp was taken (then the
// gradient through the norm vanishes). The clamp value itself is the only norm <= eps.
template <typename A>
__device__ __forceinline__ A clamped_norm(A sumsq) {
  const A n = std::sqrt(sumsq);
  const A eps = static_cast<A>(kNormEps);
  return n > eps ? n : eps;
}
template <typename A>
__device__ __forceinline__ bool is_clamped(A norm) {
  return !(norm > static_cast<A>(kNormEps));
}

// Weight of matrix m's aggregations in the score they feed (s or d), k read on device.
template <typename T, typename A>
__device__ __forceinline__ A matrix_weight(int m, Mode mode, const T* theta, double gamma) {
  if (is_similarity(m)) return static_cast<A>(s_weight(mode));
  const double th = theta != nullptr ? static_cast<double>(static_cast<A>(theta[0])) : 0.0;
  return static_cast<A>(d_weight(mode, mode == Mode::SD ? fusion_k(th, gamma) : 0.0));
}

// A shifted N x N matrix (S = ext - D or E = D - ext) of one (m, b): entry (i, j) is
// sign * (d[i*n + j] - ext) with sign = -1 for similarity matrices (exact in IEEE
// arithmetic). A matrix already shifted into shared memory is read with ext 0, sign 1.
// P: a pointer to the entries (const A* in global memory; a view of dynamic shared memory,
// which is A* on the GPU and a race-checked pointer under the emulation).
template <typename A, typename P = const A*>
struct Shifted {
  P d;
  A ext;
  A sign;
  int n;
  __device__ __forceinline__ A at(const P& p) const { return sign * (static_cast<A>(*p) - ext); }
  __device__ __forceinline__ P row(int i) const { return d + static_cast<int64_t>(i) * n; }
};
template <typename A>
__device__ __forceinline__ Shifted<A> shifted_matrix(const A* d, A ext, bool sim, int n) {
  return Shifted<A>{d, ext, sim ? A(-1) : A(1), n};
}

// Row norms (one warp per row) and column norms (one thread per column) of an N x N matrix.
template <typename A, typename P, typename Out>
__device__ __forceinline__ void norms_pass(const Shifted<A, P> mat, Out rn, Out cn) {
  const int n = mat.n, lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  for (int i = warp; i < n; i += nw) {
    const P p = mat.row(i);
    A ss = 0;
    for (int j = lane; j < n; j += 32) {
      const A v = mat.at(p + j);
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) rn[i] = clamped_norm(ss);
  }
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    P p = mat.d + j;
    A ss = 0;
    for (int i = 0; i < n; ++i, p += n) {
      const A v = mat.at(p);
      ss += v * v;
    }
    cn[j] = clamped_norm(ss);
  }
}

// cols(M)[j] = sum_i M[i,j] / rn[i] (thread per column); rows(M)[i] = sum_j M[i,j] / cn[j]
// (warp per row). Needs rn/cn complete (a barrier after norms_pass).
template <typename A, typename P, typename In, typename Out>
__device__ __forceinline__ void aggregate_pass(const Shifted<A, P> mat, In rn, In cn, Out cols, Out rows) {
  const int n = mat.n, lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    P p = mat.d + j;
    A acc = 0;
    for (int i = 0; i < n; ++i, p += n) acc += mat.at(p) / static_cast<A>(rn[i]);
    cols[j] = acc;
  }
  for (int i = warp; i < n; i += nw) {
    const P p = mat.row(i);
    A acc = 0;
    for (int j = lane; j < n; j += 32) acc += mat.at(p + j) / static_cast<A>(cn[j]);
    acc = warp_sum(acc);
    if (lane == 0) rows[i] = acc;
  }
}

// softmax(sw * s + dw * d) over n tokens, by one warp; a zero weight skips its term.
template <typename T, typename A, typename In>
__device__ __forceinline__ void softmax_warp(In s, In d, A sw, A dw, int n, T* out) {
  const int lane = threadIdx.x % 32;
  auto score = [&](int j) -> A {
    A v = 0;
    if (sw != A(0)) v += sw * static_cast<A>(s[j]);
    if (dw != A(0)) v += dw * static_cast<A>(d[j]);
    return v;
  };
  A mx = -pos_inf<A>();
  for (int j = lane; j < n; j += 32) {
    const A v = score(j);
    mx = v > mx ? v : mx;
  }
  mx = warp_max(mx);
  A sum = 0;
  for (int j = lane; j < n; j += 32) sum += std::exp(score(j) - mx);
  // One division per row, out of the loop: the IEEE division's slow-path call inside it
  // spilled registers to local memory (a product with 1/sum is within an ulp of it).
  const A inv = A(1) / warp_sum(sum);
  for (int j = lane; j < n; j += 32) out[j] = static_cast<T>(std::exp(score(j) - mx) * inv);
}

// ---------------------------------------------------------------------------- forward

// The entries of a warp flagged by `refine` (where the Gram form d2 = |x|^2 + |y|^2 - 2 x.y
// cancels) recomputed directly as |x_i - y_j|^2 by the whole warp, lanes along the C
// channels (coalesced), one flagged entry after another; (i, j) is this lane's entry
// (x and y: the branches' [N, C] token rows). Returns this lane's d2, replaced if it was
// flagged. Inputs with a large common offset flag every entry: C/32 steps per entry, not
// C strided loads per thread.
template <typename T, typename A>
__device__ __forceinline__ A recompute_flagged(A d2, bool refine, int i, int j, const T* __restrict__ x,
                                               const T* __restrict__ y, int c) {
  const int lane = threadIdx.x % 32;
  for (unsigned todo = __ballot_sync(0xffffffffu, refine); todo != 0; todo &= todo - 1) {
    const int src = __ffs(static_cast<int>(todo)) - 1;
    const T* xi = x + static_cast<int64_t>(__shfl_sync(0xffffffffu, i, src)) * c;
    const T* yj = y + static_cast<int64_t>(__shfl_sync(0xffffffffu, j, src)) * c;
    A direct = 0;
    for (int k = lane; k < c; k += 32) {
      const A diff = static_cast<A>(xi[k]) - static_cast<A>(yj[k]);
      direct += diff * diff;
    }
    direct = warp_sum(direct);
    if (lane == src) d2 = direct;
  }
  return d2;
}

// sq[r] = |qk[r, :]|^2 for every token row r of qk: one warp per row.
template <typename T, typename A>
__global__ void __launch_bounds__(kStreamThreads)
    sqnorm_kernel(const T* __restrict__ qk, A* __restrict__ sq, int64_t rows, int c) {
  const int lane = threadIdx.x % 32;
  const int64_t nw = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows; r += nw) {
    A ss = 0;
    for (int k = lane; k < c; k += 32) {
      const A v = static_cast<A>(qk[r * c + k]);
      ss += v * v;
    }
    ss = warp_sum(ss);
    if (lane == 0) sq[r] = ss;
  }
}

// Distances from the Gram products, in place: dist holds x.y on entry and ||x - y|| on
// exit; where the Gram form cancels (d2 < threshold * (|x|^2 + |y|^2)) the distance is
// recomputed directly (recompute_flagged). Also the extreme of every tile:
// partial[mb * tiles + tile]. grid (tiles * M * B), 1-D: block -> (mb, tile), so the
// batch size is not bound by gridDim.y's 65535.
template <typename T, typename A>
__global__ void __launch_bounds__(kStreamThreads)
    distance_kernel(const T* __restrict__ qk, const A* __restrict__ sq, A* __restrict__ dist, A* __restrict__ partial,
                    int batch, int n, int c, int tiles, Mode mode) {
  QCS_SHARED_ARRAY(A, scratch, kMaxWarps);
  // 32-bit index arithmetic throughout (n <= 2^15, so n * n < 2^31): a 64-bit division
  // is a call into a slow subroutine, whose saved registers spilled to local memory.
  const unsigned blk = blockIdx.x;
  const int mb = static_cast<int>(blk / static_cast<unsigned>(tiles));
  const int tile = static_cast<int>(blk % static_cast<unsigned>(tiles));
  const int m = mb / batch, b = mb % batch;
  if (!matrix_used(m, mode)) return;
  const bool sim = is_similarity(m);
  const int64_t rb = static_cast<int64_t>(row_branch(m)) * batch + b;
  const int64_t cb = static_cast<int64_t>(col_branch(m)) * batch + b;
  const T* x = qk + rb * n * c;
  const T* y = qk + cb * n * c;
  const A* sx = sq + rb * n;
  const A* sy = sq + cb * n;
  A* d = dist + static_cast<int64_t>(mb) * n * n;
  constexpr double kThreshold = RefineThreshold<A>::value;
  const A threshold = static_cast<A>(kThreshold);
  const int lane = threadIdx.x % 32;
  const int nn = n * n;
  const int first = tile * blockDim.x + threadIdx.x;
  const int stride = tiles * blockDim.x;
  // Warp-uniform trip count: the lanes of a warp hold entries base .. base + 31.
  for (int base = first - lane; base < nn; base += stride) {
    const int e = base + lane;
    A d2 = 0;
    bool refine = false;
    if (e < nn) {
      const A norms = sx[e / n] + sy[e % n];
      d2 = norms - A(2) * d[e];
      refine = d2 < threshold * norms;
    }
    d2 = recompute_flagged(d2, refine, e < nn ? e / n : 0, e < nn ? e % n : 0, x, y, c);
    if (e < nn) d[e] = d2 < A(0) ? A(0) : d2;  // clamps rounding below 0 but keeps NaN
  }
  // The square roots in a second sweep over the same (thread-private) entries: keeps the
  // refinement loop's live registers away from sqrt's slow-path call (no spills).
  A ext = sim ? -pos_inf<A>() : pos_inf<A>();
  for (int e = first; e < nn; e += stride) {
    const A v = std::sqrt(d[e]);
    d[e] = v;
    ext = sim ? (v > ext ? v : ext) : (v < ext ? v : ext);
  }
  ext = block_extreme(ext, scratch, sim);
  if (threadIdx.x == 0) partial[static_cast<int64_t>(mb) * tiles + tile] = ext;
}

// ---------------------------------------------------------------------------- tensor cores
// The Gram products on tensor cores (nvcuda::wmma), 64 x 64 tiles of the N x N matrix per
// block, then the distances and the tile's extreme; at N <= kTcTokens (the paper's 49) one
// tile is the whole matrix, and one launch replaces the Gram GEMMs, sqnorm_kernel,
// distance_kernel and sample_extrema_kernel. The backward on tensor cores
// (tensor_core_gradient_kernel) holds whole N x N matrices: N <= kTcTokens only.
namespace wmma = nvcuda::wmma;

constexpr int kTcTokens = 64;             // N <= 64: 4 x 4 tiles of 16 x 16
constexpr int kTcThreads = 256;           // 8 warps, 2 of the 16 output tiles each
constexpr int kTcChunk = 32;              // channels staged per step (one warp-wide row each)
constexpr int kTcGramLd = kTcTokens + 4;  // padded rows of the Gram tile in shared memory

// Staged values in and out of shared memory (the 16-bit CUDA types have no implicit
// conversions in torch's builds: __CUDA_NO_HALF_CONVERSIONS__).
#if defined(__CUDACC__)
template <typename S>
__device__ __forceinline__ S stage_from(float v);
template <>
__device__ __forceinline__ float stage_from<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half stage_from<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 stage_from<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
#else
template <typename S>
inline S stage_from(float v) {
  return static_cast<S>(v);
}
#endif

// How float32 enters the tensor cores: 3xTF32. Each operand is split x = big + small,
// both TF32 (10-bit mantissas), and a b = big_a big_b + big_a small_b + small_a big_b
// (small_a small_b, ~2^-22 relative, dropped): float32 accuracy from three TF32 mmas,
// the small products first. One TF32 mma alone leaves distances ~1e-3 off.
struct Tf32x3 {
  using Stage = float;
  using Input = wmma::precision::tf32;
  static constexpr int kK = 8, kPad = 4;
  // big (x on entry) -> x rounded to TF32, small = the rest, rounded: in place, so that
  // the caller's fragments are not live beside their two halves (register pressure).
  template <typename Frag>
  __device__ static void split(Frag& big, Frag& small) {
    for (int i = 0; i < big.num_elements; ++i) {
      const float v = big.x[i];
      const float hi = wmma::__float_to_tf32(v);
      big.x[i] = hi;
      small.x[i] = wmma::__float_to_tf32(v - hi);
    }
  }
  template <typename Acc, typename FragA, typename FragB>
  __device__ static void mma(Acc& acc, FragA a_big, FragB b_big) {
    FragA a_small;
    FragB b_small;
    split(a_big, a_small);
    split(b_big, b_small);
    wmma::mma_sync(acc, a_small, b_big, acc);
    wmma::mma_sync(acc, a_big, b_small, acc);
    wmma::mma_sync(acc, a_big, b_big, acc);
  }
};

// How float16 and bfloat16 enter: natively (H: __half or __nv_bfloat16). Their products
// are exact in float and accumulate in float: the same Gram as widening to float32 first.
template <typename H>
struct Native16 {
  using Stage = H;
  using Input = H;
  static constexpr int kK = 16, kPad = 8;
  template <typename Acc, typename FragA, typename FragB>
  __device__ static void mma(Acc& acc, const FragA& a, const FragB& b) {
    wmma::mma_sync(acc, a, b, acc);
  }
};

// The 64 x 64 tile of the N x N matrix of one (m, b) that a block of a tile kernel
// (tensor_core_distance_kernel, cuda_core_distance_kernel) computes: grid
// (M * B * tiles^2), tiles = ceil(N / 64), block -> (mb, tile) in 32-bit arithmetic (n <=
// 2^15: a 64-bit division is a slow subroutine call).
struct DistanceTile {
  int mb, m, b, i0, j0, rows, cols;
  __device__ __forceinline__ DistanceTile(int batch, int n) {
    const int tiles = (n + kTcTokens - 1) / kTcTokens;
    const unsigned per_matrix = static_cast<unsigned>(tiles * tiles);
    mb = static_cast<int>(blockIdx.x / per_matrix);
    const int tile = static_cast<int>(blockIdx.x % per_matrix);
    m = mb / batch;
    b = mb % batch;
    i0 = tile / tiles * kTcTokens;
    j0 = tile % tiles * kTcTokens;
    rows = n - i0 < kTcTokens ? n - i0 : kTcTokens;
    cols = n - j0 < kTcTokens ? n - j0 : kTcTokens;
  }
  // This tile of dist [M,B,N,N] (row stride n).
  template <typename A>
  __device__ __forceinline__ A* in(A* dist, int n) const {
    return dist + static_cast<int64_t>(mb) * n * n + static_cast<int64_t>(i0) * n + j0;
  }
  // An unused matrix: zero distances and extreme. Block-uniform.
  template <typename A>
  __device__ __forceinline__ void zero(A* d, A* partial, int n) const {
    for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) d[e / cols * n + e % cols] = 0;
    if (threadIdx.x == 0) partial[blockIdx.x] = 0;
  }
};

// The distances of a tile from its Gram products gram[i * ld + j] and squared norms (sq[i]
// of the x rows, sq[kTcTokens + j] of the y rows), all in shared memory: the cancelling
// entries recomputed from x and y by recompute_flagged, the rest clamped at 0, written to
// d (row stride n); returns the tile's extreme (to every thread of warp 0).
template <typename T, typename A, typename GramPtr, typename SqPtr, typename Scratch>
__device__ __forceinline__ A tile_distances(GramPtr gram, int ld, SqPtr sq, Scratch&& scratch, const DistanceTile& t,
                                            const T* __restrict__ x, const T* __restrict__ y, int c, int n, bool sim,
                                            A* __restrict__ d) {
  const A threshold = static_cast<A>(RefineThreshold<A>::value);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int entries = t.rows * t.cols;
  for (int base = 32 * warp; base < entries; base += blockDim.x) {  // warp-uniform trip count
    const int e = base + lane;
    const int i = e < entries ? e / t.cols : 0, j = e < entries ? e % t.cols : 0;  // in the tile
    A d2 = 0;
    bool refine = false;
    if (e < entries) {
      const A norms = sq[i] + sq[kTcTokens + j];
      d2 = norms - A(2) * gram[i * ld + j];
      refine = d2 < threshold * norms;
    }
    d2 = recompute_flagged(d2, refine, t.i0 + i, t.j0 + j, x, y, c);
    if (e < entries) gram[i * ld + j] = d2 < A(0) ? A(0) : d2;  // clamps rounding below 0, keeps NaN
  }
  // The square roots in a second sweep over the same (thread-private) entries: keeps the
  // refinement loop's live registers away from sqrt's slow-path call (no spills).
  A ext = sim ? -pos_inf<A>() : pos_inf<A>();
  for (int e = threadIdx.x; e < entries; e += blockDim.x) {
    const int i = e / t.cols, j = e % t.cols;
    const A v = std::sqrt(static_cast<A>(gram[i * ld + j]));
    d[i * n + j] = v;
    ext = sim ? (v > ext ? v : ext) : (v < ext ? v : ext);
  }
  return block_extreme(ext, scratch, sim);
}

// One block per 64 x 64 tile of the N x N matrix of one (m, b): grid (M * B * tiles^2),
// tiles = ceil(N / 64), kTcThreads threads (so N = 784 spreads 169 blocks per matrix over
// the GPU). The tile's 64 x and 64 y tokens are staged kTcChunk channels at a time
// (zero-padded past N), each warp accumulates two 16 x 16 Gram sub-tiles in registers (and
// the squared token norms of the rows it stages); the Gram tile then goes to shared memory and the
// distances are formed from it (the cancelling entries recomputed from qk by
// recompute_flagged), written to dist [M,B,N,N] (for the epilogue and the backward), and
// the tile's extreme to partial[mb * tiles^2 + tile]: with one tile (N <= 64) that is the
// sample's extreme, else sample_extrema_kernel reduces the tiles. Unused matrices get
// zeros (distances and extremes).
// (__launch_bounds__ asks for 2 blocks per SM, i.e. up to 128 registers: left to itself
// ptxas held the float32 kernel to 64 on sm_90 and spilled around sqrt's slow-path call.)
template <typename T, typename Recipe>
__global__ void __launch_bounds__(kTcThreads, 2)
    tensor_core_distance_kernel(const T* __restrict__ qk, float* __restrict__ dist, float* __restrict__ partial,
                                int batch, int n, int c, Mode mode) {
  using S = typename Recipe::Stage;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, Recipe::kK, typename Recipe::Input, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, Recipe::kK, typename Recipe::Input, wmma::col_major>;
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, Recipe::kK, float>;
  constexpr int kLd = kTcChunk + Recipe::kPad;  // padded rows: fewer bank conflicts
  constexpr int kRowsPerWarp = 2 * kTcTokens / (kTcThreads / 32);
  QCS_SHARED_ARRAY(S, xs, kTcTokens * kLd);
  QCS_SHARED_ARRAY(S, ys, kTcTokens * kLd);
  QCS_SHARED_ARRAY(float, gram, kTcTokens* kTcGramLd);
  QCS_SHARED_ARRAY(float, sq, 2 * kTcTokens);
  QCS_SHARED_ARRAY(float, scratch, kMaxWarps);
  const DistanceTile tile(batch, n);
  const int i0 = tile.i0, j0 = tile.j0, rows = tile.rows, cols = tile.cols;
  float* d = tile.in(dist, n);
  if (!matrix_used(tile.m, mode)) return tile.zero(d, partial, n);
  const bool sim = is_similarity(tile.m);
  const T* x = qk + (static_cast<int64_t>(row_branch(tile.m)) * batch + tile.b) * n * c;
  const T* y = qk + (static_cast<int64_t>(col_branch(tile.m)) * batch + tile.b) * n * c;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub_rows = (rows + 15) / 16, sub_cols = (cols + 15) / 16;  // 16 x 16 sub-tiles in use
  FragC acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  // Squared token norms, summed chunk by chunk in sq by lane 0 of the warp that stages
  // the row (its own rows: no barrier needed until the distances read them).
  if (lane == 0)
    for (int r = 0; r < kRowsPerWarp; ++r) sq[warp + r * (kTcThreads / 32)] = 0.f;

  for (int k0 = 0; k0 < c; k0 += kTcChunk) {
    // Stage 128 rows (x tokens, then y tokens) of kTcChunk channels: warp w takes rows
    // w, w + 8, ...; lane l channel k0 + l (coalesced).
    for (int r = 0; r < kRowsPerWarp; ++r) {
      const int row = warp + r * (kTcThreads / 32), tok = row % kTcTokens;
      const bool is_x = row < kTcTokens;
      const int token = (is_x ? i0 : j0) + tok;
      if (token >= n) {  // warp-uniform: a padding row, zeros from the first chunk on, no norm
        if (k0 == 0) {
          if (is_x) xs[tok * kLd + lane] = stage_from<S>(0.f);
          else ys[tok * kLd + lane] = stage_from<S>(0.f);
        }
        continue;
      }
      const T* src = is_x ? x : y;
      const float v = k0 + lane < c ? static_cast<float>(src[static_cast<int64_t>(token) * c + k0 + lane]) : 0.f;
      const float part = warp_sum(v * v);
      if (lane == 0) sq[row] = sq[row] + part;
      if (is_x) xs[tok * kLd + lane] = stage_from<S>(v);
      else ys[tok * kLd + lane] = stage_from<S>(v);
    }
    __syncthreads();
    // acc[] stays in registers only if every index is a constant: unrolled
    QCS_UNROLL
    for (int t = 0; t < 2; ++t) {
      const int sub = 2 * warp + t, ti = sub / 4, tj = sub % 4;
      if (ti >= sub_rows || tj >= sub_cols) continue;  // warp-uniform
      for (int kk = 0; kk < kTcChunk; kk += Recipe::kK) {
        FragA fa;
        FragB fb;
        wmma::load_matrix_sync(fa, xs + ti * 16 * kLd + kk, kLd);
        wmma::load_matrix_sync(fb, ys + tj * 16 * kLd + kk, kLd);  // y^T: column-major
        Recipe::mma(acc[t], fa, fb);
      }
    }
    __syncthreads();  // the stage is overwritten next
  }
  QCS_UNROLL
  for (int t = 0; t < 2; ++t) {
    const int sub = 2 * warp + t, ti = sub / 4, tj = sub % 4;
    if (ti < sub_rows && tj < sub_cols)
      wmma::store_matrix_sync(gram + ti * 16 * kTcGramLd + tj * 16, acc[t], kTcGramLd, wmma::mem_row_major);
  }
  __syncthreads();

  const float ext = tile_distances(gram + 0, kTcGramLd, sq + 0, scratch, tile, x, y, c, n, sim, d);
  if (threadIdx.x == 0) partial[blockIdx.x] = ext;
}

// float64 on CUDA cores, in the tiles of tensor_core_distance_kernel (same grid, same
// outputs, one launch at N <= 64): kF64Chunk channels of the tile's 64 x and 64 y tokens
// staged at a time (two threads per token row, four channels each, squared norms
// alongside), every thread accumulating a 4 x 4 block of the Gram tile in registers (rows
// ti + 16a, columns tj + 16b: a warp reads two x rows, broadcast, and 16 y rows), then
// tile_distances. Shared memory: 43.6 KiB.
constexpr int kF64Chunk = 8;
__global__ void __launch_bounds__(kTcThreads)
    cuda_core_distance_kernel(const double* __restrict__ qk, double* __restrict__ dist, double* __restrict__ partial,
                              int batch, int n, int c, Mode mode) {
  constexpr int kLd = kF64Chunk + 1, kGramLd = kTcTokens + 1;
  QCS_SHARED_ARRAY(double, xs, kTcTokens* kLd);
  QCS_SHARED_ARRAY(double, ys, kTcTokens* kLd);
  QCS_SHARED_ARRAY(double, gram, kTcTokens* kGramLd);
  QCS_SHARED_ARRAY(double, sq, 2 * kTcTokens);
  QCS_SHARED_ARRAY(double, scratch, kMaxWarps);
  const DistanceTile tile(batch, n);
  double* d = tile.in(dist, n);
  if (!matrix_used(tile.m, mode)) return tile.zero(d, partial, n);
  const bool sim = is_similarity(tile.m);
  const double* x = qk + (static_cast<int64_t>(row_branch(tile.m)) * batch + tile.b) * n * c;
  const double* y = qk + (static_cast<int64_t>(col_branch(tile.m)) * batch + tile.b) * n * c;
  // Staging: thread t holds row t / 2 (x tokens, then y tokens), channels 4 (t % 2) + q.
  const int row = threadIdx.x / 2, half = threadIdx.x % 2, tok = row % kTcTokens;
  const bool is_x = row < kTcTokens;
  const int token = (is_x ? tile.i0 : tile.j0) + tok;
  const double* src = (is_x ? x : y) + static_cast<int64_t>(token < n ? token : 0) * c;
  if (half == 0) sq[row] = 0.0;  // its own row: read after the barriers below
  const int ti = threadIdx.x / 16, tj = threadIdx.x % 16;
  double acc[4][4] = {};
  for (int k0 = 0; k0 < c; k0 += kF64Chunk) {
    double part = 0;
    QCS_UNROLL
    for (int q = 0; q < 4; ++q) {
      const int k = 4 * half + q;
      const double v = token < n && k0 + k < c ? src[k0 + k] : 0.0;
      part += v * v;
      if (is_x) xs[tok * kLd + k] = v;
      else ys[tok * kLd + k] = v;
    }
    part += __shfl_xor_sync(0xffffffffu, part, 1);
    if (half == 0) sq[row] = sq[row] + part;
    __syncthreads();
    for (int k = 0; k < kF64Chunk; ++k) {
      double xv[4], yv[4];
      QCS_UNROLL
      for (int a = 0; a < 4; ++a) {
        xv[a] = xs[(ti + 16 * a) * kLd + k];
        yv[a] = ys[(tj + 16 * a) * kLd + k];
      }
      QCS_UNROLL
      for (int a = 0; a < 4; ++a) {
        QCS_UNROLL
        for (int b = 0; b < 4; ++b) acc[a][b] = std::fma(xv[a], yv[b], acc[a][b]);
      }
    }
    __syncthreads();  // the stage is overwritten next
  }
  QCS_UNROLL
  for (int a = 0; a < 4; ++a) {
    QCS_UNROLL
    for (int b = 0; b < 4; ++b) gram[(ti + 16 * a) * kGramLd + tj + 16 * b] = acc[a][b];
  }
  __syncthreads();
  const double ext = tile_distances(gram + 0, kGramLd, sq + 0, scratch, tile, x, y, c, n, sim, d);
  if (threadIdx.x == 0) partial[blockIdx.x] = ext;
}

// Extremes, phase 1: extrema[m, b] of every sample from its tile extremes, one warp per
// (m, b), in parallel over the batch. Unused matrices get 0. grid (ceil(M*B / warps)).
template <typename A>
__global__ void __launch_bounds__(kSmallThreads)
    sample_extrema_kernel(const A* __restrict__ partial, A* __restrict__ extrema, int nmat, int batch, int tiles,
                          Mode mode) {
  const int lane = threadIdx.x % 32;
  const int64_t mb = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (mb >= static_cast<int64_t>(nmat) * batch) return;  // whole warps
  const int m = static_cast<int>(mb / batch);
  if (!matrix_used(m, mode)) {
    if (lane == 0) extrema[mb] = 0;
    return;
  }
  const bool sim = is_similarity(m);
  A v = sim ? -pos_inf<A>() : pos_inf<A>();
  for (int t = lane; t < tiles; t += 32) {
    const A w = partial[mb * tiles + t];
    v = sim ? (w > v ? w : v) : (w < v ? w : v);
  }
  v = sim ? warp_max(v) : warp_min(v);
  if (lane == 0) extrema[mb] = v;
}

// Extremes, phase 2 (scope "batch" only): the batch extreme of matrix m from the sample
// extremes, a fixed-order block reduction (no atomics), written to every column.
// grid (M).
template <typename A>
__global__ void __launch_bounds__(kSmallThreads) batch_extrema_kernel(A* __restrict__ extrema, int batch, Mode mode) {
  QCS_SHARED_ARRAY(A, scratch, kMaxWarps);
  const int m = blockIdx.x;
  if (!matrix_used(m, mode)) return;  // phase 1 wrote the zeros
  const bool sim = is_similarity(m);
  A* col = extrema + static_cast<int64_t>(m) * batch;
  A v = sim ? -pos_inf<A>() : pos_inf<A>();
  for (int b = threadIdx.x; b < batch; b += blockDim.x) v = sim ? (col[b] > v ? col[b] : v) : (col[b] < v ? col[b] : v);
  v = block_extreme(v, scratch, sim);  // its barriers end every read before the writes below
  for (int b = threadIdx.x; b < batch; b += blockDim.x) col[b] = v;
}

// Fused epilogue for small N: one block per batch element. Each used matrix in turn is
// shifted into shared memory, its row/column norms and both aggregations computed there,
// the scores of the four branches accumulated in shared memory; then the fusion
// s + k d (k = gamma + tanh(theta), theta read on device) and the softmax, a warp per branch.
// Dynamic shared memory: (N*N + 2N + 2RN + kMaxWarps) * sizeof(A). grid (B).
template <typename T, typename A>
__global__ void __launch_bounds__(kSmallThreads)
    fused_epilogue_kernel(const A* __restrict__ dist, const A* __restrict__ extrema, const T* __restrict__ theta,
                          double gamma, Mode mode, int nmat, int nbranch, int batch, int n, T* __restrict__ maps) {
  QCS_DYNAMIC_SMEM(smem_raw);
  auto mat = QCS_SMEM_VIEW(A, smem_raw);  // pointer-like: A* on the GPU
  auto rn = mat + n * n;
  auto cn = rn + n;
  auto sc = cn + n;  // [2][R][N]: s then d
  const int b = blockIdx.x;
  for (int e = threadIdx.x; e < 2 * nbranch * n; e += blockDim.x) sc[e] = 0;
  for (int m = 0; m < nmat; ++m) {
    if (!matrix_used(m, mode)) continue;
    const bool sim = is_similarity(m);
    const int64_t mb = static_cast<int64_t>(m) * batch + b;
    const A ext = extrema[mb];
    const A* d = dist + mb * n * n;
    for (int e = threadIdx.x; e < n * n; e += blockDim.x) mat[e] = sim ? ext - d[e] : d[e] - ext;
    __syncthreads();
    const Shifted<A, decltype(mat)> held{mat, A(0), A(1), n};
    norms_pass(held, rn, cn);
    __syncthreads();
    const auto kind = sc + (sim ? 0 : nbranch * n);
    aggregate_pass(held, rn, cn, kind + col_branch(m) * n, kind + row_branch(m) * n);
    __syncthreads();
  }
  const A sw = static_cast<A>(s_weight(mode));
  const A dw = matrix_weight<T, A>(kNA, mode, theta, gamma);
  for (int br = threadIdx.x / 32; br < nbranch; br += blockDim.x / 32)
    softmax_warp(sc + br * n, sc + (nbranch + br) * n, sw, dw, n, maps + (static_cast<int64_t>(br) * batch + b) * n);
}

// Streaming epilogue for large N, part 1: one block per (m, b) reads its matrix from
// global memory (coalesced: warps along rows, threads along columns), norms into the
// workspace `norms` [2, M, B, N], the aggregations into `scores` [2, R, B, N]. grid (M*B).
template <typename A>
__global__ void __launch_bounds__(kStreamThreads)
    stream_aggregate_kernel(const A* __restrict__ dist, const A* __restrict__ extrema, A* __restrict__ norms,
                            A* __restrict__ scores, int nmat, int nbranch, int batch, int n, Mode mode) {
  const int mb = blockIdx.x, m = mb / batch, b = mb % batch;
  if (!matrix_used(m, mode)) return;
  const bool sim = is_similarity(m);
  const Shifted<A> mat = shifted_matrix(dist + static_cast<int64_t>(mb) * n * n, extrema[mb], sim, n);
  A* rn = norms + static_cast<int64_t>(mb) * n;
  A* cn = norms + (static_cast<int64_t>(nmat) * batch + mb) * n;
  norms_pass(mat, rn, cn);
  __syncthreads();
  A* kind = scores + (sim ? 0 : static_cast<int64_t>(nbranch) * batch * n);
  aggregate_pass(mat, rn, cn, kind + (static_cast<int64_t>(col_branch(m)) * batch + b) * n,
                 kind + (static_cast<int64_t>(row_branch(m)) * batch + b) * n);
}

// Streaming epilogue, part 2: fusion and softmax, one block per batch element. grid (B).
template <typename T, typename A>
__global__ void __launch_bounds__(kSmallThreads)
    fuse_softmax_kernel(const A* __restrict__ scores, const T* __restrict__ theta, double gamma, Mode mode, int nbranch,
                        int batch, int n, T* __restrict__ maps) {
  const int b = blockIdx.x;
  const A sw = static_cast<A>(s_weight(mode));
  const A dw = matrix_weight<T, A>(kNA, mode, theta, gamma);
  for (int br = threadIdx.x / 32; br < nbranch; br += blockDim.x / 32) {
    const int64_t row = (static_cast<int64_t>(br) * batch + b) * n;
    softmax_warp(scores + row, scores + static_cast<int64_t>(nbranch) * batch * n + row, sw, dw, n, maps + row);
  }
}

// ---------------------------------------------------------------------------- backward

// g_score = map * (g - sum(map * g)) per branch row: a warp per branch. grid (B).
template <typename T, typename A>
__global__ void __launch_bounds__(kSmallThreads)
    softmax_backward_kernel(const T* __restrict__ grad_maps, const T* __restrict__ maps, A* __restrict__ gscore,
                            int nbranch, int batch, int n) {
  const int lane = threadIdx.x % 32, b = blockIdx.x;
  for (int br = threadIdx.x / 32; br < nbranch; br += blockDim.x / 32) {
    const int64_t row = (static_cast<int64_t>(br) * batch + b) * n;
    A dot = 0;
    for (int j = lane; j < n; j += 32) dot += static_cast<A>(maps[row + j]) * static_cast<A>(grad_maps[row + j]);
    dot = warp_sum(dot);
    for (int j = lane; j < n; j += 32)
      gscore[row + j] = static_cast<A>(maps[row + j]) * (static_cast<A>(grad_maps[row + j]) - dot);
  }
}

// Upstream gradients of matrix m's two aggregations: u = w g_cols (column branch) and
// v = w g_rows (row branch), w the matrix's weight; the gradient of the shifted matrix is
//   dL/dM[i,l] = u[l]/r_i - M[i,l] alpha_i/r_i^3 + v[i]/c_l - M[i,l] beta_l/c_l^3,
// alpha_i = sum_j u[j] M[i,j], beta_l = sum_k v[k] M[k,l]; a clamped norm drops its term.
// Held as inverse norms rinv/cinv and prescaled ahat = alpha/r^3, bhat = beta/c^3 (0 where
// clamped), so the element-wise work has no division.
template <typename A>
struct MatrixGrad {
  const A* gu;  // g_score of the column branch, row b
  const A* gv;  // g_score of the row branch, row b
  A w;          // weight of this matrix's score (1, k or 0)
  const A *rinv, *cinv, *ahat, *bhat;
  __device__ __forceinline__ A operator()(int i, int l, A mil) const {
    return w * (gu[l] * rinv[i] + gv[i] * cinv[l]) - mil * (ahat[i] + bhat[l]);
  }
};

// W[i,l] = dL/dD[i,l] / D[i,l] (0 where D == 0) from the shifted matrix's gradient:
// dL/dD = sign * dL/dM (sign -1 for S = ext - D), plus `route` where D is the extreme.
template <typename A>
__device__ __forceinline__ A distance_weight(const MatrixGrad<A>& grad, int i, int l, A dv, A ext, A sign, A route) {
  A gd = sign * grad(i, l, sign * (dv - ext));
  if (dv == ext) gd += route;
  return dv == A(0) ? A(0) : gd / dv;
}

// Per (m, b): the workspace stats [4, M, B, N] (rinv, cinv, ahat, bhat, see MatrixGrad)
// and three partial sums part [3, M, B]: the theta term sum(g_score * d) of this matrix's
// two aggregations, the total sum(dL/dM), and the number of entries equal to the
// extreme (ties). grid (M*B); deterministic block reductions.
template <typename T, typename A>
__global__ void __launch_bounds__(kStreamThreads)
    backward_stats_kernel(const A* __restrict__ dist, const A* __restrict__ extrema, const A* __restrict__ gscore,
                          const T* __restrict__ theta, double gamma, Mode mode, int nmat, int batch, int n,
                          A* __restrict__ stats, A* __restrict__ part) {
  QCS_SHARED_ARRAY(A, scratch, kMaxWarps);
  const int mb = blockIdx.x, m = mb / batch, b = mb % batch;
  const int64_t mbs = static_cast<int64_t>(nmat) * batch;  // stride between workspace planes
  if (!matrix_used(m, mode)) {
    if (threadIdx.x == 0) part[mb] = part[mbs + mb] = part[2 * mbs + mb] = 0;
    return;
  }
  const bool sim = is_similarity(m);
  const A ext = extrema[mb];
  const A* d = dist + static_cast<int64_t>(mb) * n * n;
  const Shifted<A> mat = shifted_matrix(d, ext, sim, n);
  A* rn = stats + static_cast<int64_t>(mb) * n;  // norms first, inverse norms at the end
  A* cn = stats + (mbs + mb) * n;
  A* ahat = stats + (2 * mbs + mb) * n;
  A* bhat = stats + (3 * mbs + mb) * n;
  const A* gu = gscore + (static_cast<int64_t>(col_branch(m)) * batch + b) * n;
  const A* gv = gscore + (static_cast<int64_t>(row_branch(m)) * batch + b) * n;
  const A w = matrix_weight<T, A>(m, mode, theta, gamma);
  const bool theta_term = !sim && mode == Mode::SD;

  norms_pass(mat, rn, cn);
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  A tsum = 0;
  for (int i = warp; i < n; i += nw) {  // alpha_i and rows(M)[i]
    const A* p = mat.row(i);
    A al = 0, ag = 0;
    for (int j = lane; j < n; j += 32) {
      const A v = mat.at(p + j);
      al += gu[j] * v;
      if (theta_term) ag += v / cn[j];
    }
    al = warp_sum(al);
    ag = warp_sum(ag);
    if (lane == 0) {
      const A r = rn[i];
      // One division at a time: r^3 overflows float32 from r ~ 7e12 (inputs of that scale).
      ahat[i] = is_clamped(r) ? A(0) : w * (al / r / r / r);
      tsum += gv[i] * ag;
    }
  }
  for (int l = threadIdx.x; l < n; l += blockDim.x) {  // beta_l and cols(M)[l]
    const A* p = mat.d + l;
    A be = 0, ag = 0;
    for (int i = 0; i < n; ++i, p += n) {
      const A v = mat.at(p);
      be += gv[i] * v;
      if (theta_term) ag += v / rn[i];
    }
    const A c = cn[l];
    bhat[l] = is_clamped(c) ? A(0) : w * (be / c / c / c);
    tsum += gu[l] * ag;
  }
  tsum = block_sum(tsum, scratch);  // its barriers also end every read of rn/cn above
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    rn[i] = A(1) / rn[i];
    cn[i] = A(1) / cn[i];
  }
  __syncthreads();

  const MatrixGrad<A> grad{gu, gv, w, rn, cn, ahat, bhat};
  A total = 0, ties = 0;
  for (int i = 0; i < n; ++i) {
    const A* p = mat.row(i);
    for (int l = threadIdx.x; l < n; l += blockDim.x) {
      total += grad(i, l, mat.at(p + l));
      ties += p[l] == ext ? A(1) : A(0);
    }
  }
  total = block_sum(total, scratch);
  ties = block_sum(ties, scratch);
  if (threadIdx.x == 0) {
    part[mb] = tsum;
    part[mbs + mb] = total;
    part[2 * mbs + mb] = ties;
  }
}

// The gradient of the extremes, routed to the tied entries, and theta's gradient, from
// the partial sums in a fixed order: route[m, b] is what each entry equal to the extreme
// receives (spread evenly over the ties of the sample, or of the whole batch).
// grad_theta = (1 - tanh^2 theta) * sum(g_score * d) (0 unless mode "sd"), by block 0.
// grid (M), parallel over the batch; block reductions in a fixed order (deterministic).
template <typename T, typename A>
__global__ void __launch_bounds__(kSmallThreads)
    backward_reduce_kernel(const A* __restrict__ part, const T* __restrict__ theta, Mode mode, Scope scope, int nmat,
                           int batch, A* __restrict__ route, T* __restrict__ grad_theta) {
  QCS_SHARED_ARRAY(double, wide, kMaxWarps);
  QCS_SHARED_ARRAY(A, scratch, kMaxWarps);
  const int64_t mbs = static_cast<int64_t>(nmat) * batch;
  const int m = blockIdx.x;
  // S = ext - D: the maximum collects +sum(dL/dS); E = D - ext: the minimum -sum(dL/dE).
  const A sign = is_similarity(m) ? A(1) : A(-1);
  const A* sums = part + mbs + static_cast<int64_t>(m) * batch;
  const A* ties = part + 2 * mbs + static_cast<int64_t>(m) * batch;
  A* out = route + static_cast<int64_t>(m) * batch;
  if (scope == Scope::Batch) {
    double s = 0, t = 0;  // tie counts over a batch can pass 2^24
    for (int b = threadIdx.x; b < batch; b += blockDim.x) {
      s += static_cast<double>(sums[b]);
      t += static_cast<double>(ties[b]);
    }
    s = block_sum(s, wide);
    t = block_sum(t, wide);
    const A r = t > 0 ? static_cast<A>(static_cast<double>(sign) * s / t) : A(0);
    for (int b = threadIdx.x; b < batch; b += blockDim.x) out[b] = r;
  } else {
    // (this loop shape keeps the double division's slow-path call from spilling registers)
    const int step = blockDim.x;
    QCS_NO_UNROLL
    for (int b = threadIdx.x; b < batch; b += step) {
      const A t = ties[b];
      A r = A(0);
      if (t > A(0)) r = (sign * sums[b]) / t;
      out[b] = r;
    }
  }
  if (m == 0 && grad_theta != nullptr) {  // block-uniform
    A t = 0;
    for (int64_t e = threadIdx.x; e < mbs; e += blockDim.x) t += part[e];
    t = block_sum(t, scratch);
    if (threadIdx.x == 0) {
      const double th = static_cast<double>(static_cast<A>(theta[0]));
      grad_theta[0] = static_cast<T>(static_cast<A>(dk_dtheta(mode, th)) * t);
    }
  }
}

// W = dL/dD / D (0 where D == 0) of each (m, b), with its row sums and column sums
// (wsum [2, M, B, N]) for dL/dX = diag(W 1) X - W Y, dL/dY = diag(W^T 1) Y - W^T X.
// dL/dD = -dL/dS (+ route at the maximum) or dL/dE (+ route, negative, at the minimum).
// grid (M*B); unused matrices are skipped (the host does not read them).
template <typename T, typename A>
__global__ void __launch_bounds__(kStreamThreads)
    backward_weights_kernel(const A* __restrict__ dist, const A* __restrict__ extrema, const A* __restrict__ gscore,
                            const T* __restrict__ theta, double gamma, Mode mode, int nmat, int batch, int n,
                            const A* __restrict__ stats, const A* __restrict__ route, A* __restrict__ wmat,
                            A* __restrict__ wsum) {
  const int mb = blockIdx.x, m = mb / batch, b = mb % batch;
  if (!matrix_used(m, mode)) return;
  const int64_t mbs = static_cast<int64_t>(nmat) * batch;
  const bool sim = is_similarity(m);
  const A ext = extrema[mb];
  const A rt = route[mb];
  const A* d = dist + static_cast<int64_t>(mb) * n * n;
  A* wm = wmat + static_cast<int64_t>(mb) * n * n;
  const MatrixGrad<A> grad{gscore + (static_cast<int64_t>(col_branch(m)) * batch + b) * n,
                           gscore + (static_cast<int64_t>(row_branch(m)) * batch + b) * n,
                           matrix_weight<T, A>(m, mode, theta, gamma),
                           stats + static_cast<int64_t>(mb) * n,
                           stats + (mbs + mb) * n,
                           stats + (2 * mbs + mb) * n,
                           stats + (3 * mbs + mb) * n};
  const A sign = sim ? A(-1) : A(1);  // dL/dD = sign * dL/dM
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
  for (int i = warp; i < n; i += nw) {
    const A* p = d + static_cast<int64_t>(i) * n;
    A* q = wm + static_cast<int64_t>(i) * n;
    A rowsum = 0;
    for (int l = lane; l < n; l += 32) {
      const A wv = distance_weight(grad, i, l, p[l], ext, sign, rt);
      q[l] = wv;
      rowsum += wv;
    }
    rowsum = warp_sum(rowsum);
    if (lane == 0) wsum[static_cast<int64_t>(mb) * n + i] = rowsum;
  }
  __syncthreads();  // the block's own global writes of W are visible to it after the barrier
  for (int l = threadIdx.x; l < n; l += blockDim.x) {
    const A* q = wm + l;
    A colsum = 0;
    for (int i = 0; i < n; ++i, q += n) colsum += *q;
    wsum[(mbs + mb) * n + l] = colsum;
  }
}

// Backward on tensor cores for N <= kTcTokens: the whole gradient of one branch r of one
// sample b, grid (R * B), kTcGradThreads threads. Branch r sits in two matrices (one in
// the pair op); for each, W = dL/dD / D is formed in shared memory (distance_weight,
// stored negated) with its row sums (r the row branch: dX = diag(W 1) X - W Y) or column
// sums (r the column branch: dY = diag(W^T 1) Y - W^T X). Then, kTcGradChunk channels at a
// time, the gradient of the chunk is
//     sum_k  wsum_k (x - o_k)  -  W_k (y_k - o_k)      (W_k^T for a column branch)
// with o_k the mean token of matrix k's pair (both terms are unchanged by a common shift;
// centring keeps a large common offset from cancelling float32's digits). The first sum
// starts the accumulator, the products run on tensor cores in 3xTF32 (every dtype: the
// centred tokens are not 16-bit values), and the chunk is written once, in T.
// Deterministic: fixed order everywhere. Static shared memory: 47.6 KiB.
constexpr int kTcGradThreads = 128;  // 4 warps, one 16-row output tile each
constexpr int kTcGradChunk = 16;     // channels per step: one 16-column output tile
constexpr int kTcGradLd = kTcGradChunk + 4;

// acc -= W' P over k < kmax (3xTF32): W' = rows i0.. of W (FragLayout row_major), or of
// W^T (col_major: W's columns i0..), W held negated in shared memory with rows of w_ld
// floats; P: the centred partner rows (p_ld floats each) from the 16 output columns.
template <typename FragLayout, typename FragC, typename WPtr, typename PPtr>
__device__ __forceinline__ void subtract_w_times_partner(FragC& acc, WPtr w, int w_ld, PPtr partner, int p_ld, int i0,
                                                         int kmax) {
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, FragLayout>;
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  constexpr bool kTransposed = std::is_same_v<FragLayout, wmma::col_major>;
  for (int kk = 0; kk < kmax; kk += 8) {  // padding rows and columns of W and the partner are 0
    FragA fa;
    FragB fb;
    wmma::load_matrix_sync(fa, w + (kTransposed ? kk * w_ld + i0 : i0 * w_ld + kk), w_ld);
    wmma::load_matrix_sync(fb, partner + kk * p_ld, p_ld);
    Tf32x3::mma(acc, fa, fb);
  }
}

// The k-th matrix (k = 0, 1) among the first nmat that holds branch r, or -1.
__device__ __forceinline__ int matrix_of_branch(int r, int k, int nmat) {
  int seen = 0;
  for (int m = 0; m < nmat; ++m) {
    if (row_branch(m) != r && col_branch(m) != r) continue;
    if (seen == k) return m;
    ++seen;
  }
  return -1;
}

// The matrices that hold branch r (two in the quadruplet; one in the pair, where the
// second slot repeats it, unused), whether r is their row branch, whether the mode uses
// them. The kernels index these arrays with constants only (unrolled loops): registers.
struct BranchMatrices {
  int mats[2];
  bool as_row[2], used[2];
};
__device__ __forceinline__ BranchMatrices branch_matrices(int r, int nmat, Mode mode) {
  const int first = matrix_of_branch(r, 0, nmat), second = matrix_of_branch(r, 1, nmat);
  const int m1 = second < 0 ? first : second;
  return {{first, m1},
          {row_branch(first) == r, row_branch(m1) == r},
          {matrix_used(first, mode), second >= 0 && matrix_used(m1, mode)}};
}

template <typename T>
__global__ void __launch_bounds__(kTcGradThreads)
    tensor_core_gradient_kernel(const T* __restrict__ qk, const float* __restrict__ dist,
                                const float* __restrict__ extrema, const float* __restrict__ gscore,
                                const T* __restrict__ theta, double gamma, Mode mode, int nmat, int batch, int n, int c,
                                const float* __restrict__ stats, const float* __restrict__ route,
                                T* __restrict__ grad) {
  constexpr int kTile = kTcTokens * kTcTokens;
  QCS_SHARED_ARRAY(float, wneg, 2 * kTile);                     // -W of the branch's matrices
  QCS_SHARED_ARRAY(float, wsum, 2 * kTcTokens);                 // their row or column sums
  QCS_SHARED_ARRAY(float, own, kTcTokens* kTcGradLd);           // branch r's chunk, then the result
  QCS_SHARED_ARRAY(float, partner, 2 * kTcTokens * kTcGradLd);  // each matrix's other branch
  QCS_SHARED_ARRAY(float, centre, 2 * kTcGradChunk);            // o_k of the chunk
  const int r = blockIdx.x / batch, b = blockIdx.x % batch;
  const int64_t mbs = static_cast<int64_t>(nmat) * batch;
  const BranchMatrices held = branch_matrices(r, nmat, mode);
  const auto& [mats, as_row, used] = held;
  const T* partner_x[2];
  QCS_UNROLL
  for (int k = 0; k < 2; ++k) {  // W of each matrix (0 if unused), negated
    const int m = mats[k];
    const int64_t mb = static_cast<int64_t>(m) * batch + b;
    const int pb = as_row[k] ? col_branch(m) : row_branch(m);
    partner_x[k] = qk + (static_cast<int64_t>(pb) * batch + b) * n * c;
    if (!used[k]) {  // block-uniform
      for (int e = threadIdx.x; e < kTile; e += blockDim.x) wneg[k * kTile + e] = 0.f;
      continue;
    }
    const bool sim = is_similarity(m);
    const MatrixGrad<float> mg{gscore + (static_cast<int64_t>(col_branch(m)) * batch + b) * n,
                               gscore + (static_cast<int64_t>(row_branch(m)) * batch + b) * n,
                               matrix_weight<T, float>(m, mode, theta, gamma),
                               stats + mb * n,
                               stats + (mbs + mb) * n,
                               stats + (2 * mbs + mb) * n,
                               stats + (3 * mbs + mb) * n};
    const float* d = dist + mb * n * n;
    const float ext = extrema[mb], rt = route[mb], sign = sim ? -1.f : 1.f;
    for (int e = threadIdx.x; e < kTile; e += blockDim.x) {
      const int i = e / kTcTokens, l = e % kTcTokens;
      wneg[k * kTile + e] = i < n && l < n ? -distance_weight(mg, i, l, d[i * n + l], ext, sign, rt) : 0.f;
    }
  }
  __syncthreads();
  for (int t = threadIdx.x; t < 2 * kTcTokens; t += blockDim.x) {
    const int k = t / kTcTokens, i = t % kTcTokens;
    const bool rows = k == 0 ? as_row[0] : as_row[1];
    float sum = 0;
    for (int l = 0; l < kTcTokens; ++l)
      sum -= rows ? wneg[k * kTile + i * kTcTokens + l] : wneg[k * kTile + l * kTcTokens + i];
    wsum[t] = sum;
  }
  // (the first barrier of the chunk loop orders these writes before their reads)

  const T* own_x = qk + (static_cast<int64_t>(r) * batch + b) * n * c;
  T* out = grad + (static_cast<int64_t>(r) * batch + b) * n * c;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, i0 = 16 * warp;
  constexpr int kStaged = kTcTokens * kTcGradChunk;
  for (int k0 = 0; k0 < c; k0 += kTcGradChunk) {
    for (int e = threadIdx.x; e < 3 * kStaged; e += blockDim.x) {
      const int which = e / kStaged, row = e % kStaged / kTcGradChunk, col = e % kTcGradChunk;
      const T* src = which == 0 ? own_x : which == 1 ? partner_x[0] : partner_x[1];
      const float v = row < n && k0 + col < c ? static_cast<float>(src[static_cast<int64_t>(row) * c + k0 + col]) : 0.f;
      if (which == 0) own[row * kTcGradLd + col] = v;
      else partner[(which - 1) * kTcTokens * kTcGradLd + row * kTcGradLd + col] = v;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < 2 * kTcGradChunk; t += blockDim.x) {
      const int k = t / kTcGradChunk, col = t % kTcGradChunk;
      float so = 0, sp = 0;
      for (int row = 0; row < n; ++row) {
        so += own[row * kTcGradLd + col];
        sp += partner[k * kTcTokens * kTcGradLd + row * kTcGradLd + col];
      }
      centre[t] = (so + sp) / static_cast<float>(2 * n);
    }
    __syncthreads();
    for (int e = threadIdx.x; e < n * kTcGradChunk; e += blockDim.x) {  // padding rows stay 0
      const int row = e / kTcGradChunk, col = e % kTcGradChunk;
      const float x = own[row * kTcGradLd + col];
      float start = 0;
      QCS_UNROLL
      for (int k = 0; k < 2; ++k) {
        const float o = centre[k * kTcGradChunk + col];
        const int at = k * kTcTokens * kTcGradLd + row * kTcGradLd + col;
        partner[at] = partner[at] - o;
        start += wsum[k * kTcTokens + row] * (x - o);
      }
      own[row * kTcGradLd + col] = start;
    }
    __syncthreads();
    if (i0 < n) {  // warp-uniform
      wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
      wmma::load_matrix_sync(acc, own + i0 * kTcGradLd, kTcGradLd, wmma::mem_row_major);
      QCS_UNROLL
      for (int k = 0; k < 2; ++k) {
        if (!used[k]) continue;
        if (as_row[k])
          subtract_w_times_partner<wmma::row_major>(acc, wneg + k * kTile, kTcTokens,
                                                    partner + k * kTcTokens * kTcGradLd, kTcGradLd, i0, n);
        else
          subtract_w_times_partner<wmma::col_major>(acc, wneg + k * kTile, kTcTokens,
                                                    partner + k * kTcTokens * kTcGradLd, kTcGradLd, i0, n);
      }
      wmma::store_matrix_sync(own + i0 * kTcGradLd, acc, kTcGradLd, wmma::mem_row_major);
      __syncwarp();  // the lanes read what other lanes stored
      for (int e = lane; e < 16 * kTcGradChunk; e += 32) {
        const int row = i0 + e / kTcGradChunk, col = e % kTcGradChunk;
        if (row < n && k0 + col < c)
          out[static_cast<int64_t>(row) * c + k0 + col] = static_cast<T>(own[row * kTcGradLd + col]);
      }
    }
    __syncthreads();  // the stages are overwritten next
  }
}

// Backward on tensor cores above N = 64: the gradient of branch r of sample b from W and
// its sums written by backward_weights_kernel (wmat [M,B,N,N], wsum [2,M,B,N]), one
// 64-token x 32-channel output tile per block: grid (R * B * ceil(N/64) * ceil(C/32)),
// kTcThreads threads (8 warps, 4 x 2 sub-tiles of 16 x 16). The tile starts as
// sum_k wsum_k (x - o_k) and takes -W_k' (y_k - o_k) over 64-token steps (W_k' = W_k, or
// W_k^T for a column branch, staged negated), on tensor cores in 3xTF32; o_k is the mean
// token of matrix k's pair over the tile's channels (the centring of the small-N kernel).
// Written once, in T. Deterministic. Static shared memory: 35.3 KiB.
constexpr int kTcTileChannels = 32;
constexpr int kTcWLd = kTcTokens + 4;
constexpr int kTcChanLd = kTcTileChannels + 4;

// The output tile of a gradient tiles kernel's block: branch r of sample b (rb = r B + b),
// tokens i0 .. i0 + 63, channels c0 .. c0 + kChannels - 1 (grid R * B * ceil(N / 64) *
// ceil(C / kChannels)); the branch's matrices, and its tokens with each matrix's partner's.
template <int kChannels, typename T>
struct GradientTile {
  struct Tokens {
    const T* own;
    const T* partner[2];
  };
  int rb, b, i0, c0;
  BranchMatrices held;
  Tokens tokens;
  __device__ __forceinline__ GradientTile(const T* __restrict__ qk, Mode mode, int nmat, int batch, int n, int c) {
    const int row_tiles = (n + kTcTokens - 1) / kTcTokens, chan_tiles = (c + kChannels - 1) / kChannels;
    const unsigned per_branch = static_cast<unsigned>(row_tiles * chan_tiles);
    rb = static_cast<int>(blockIdx.x / per_branch);
    const int tile = static_cast<int>(blockIdx.x % per_branch), r = rb / batch;
    b = rb % batch;
    i0 = tile / chan_tiles * kTcTokens;
    c0 = tile % chan_tiles * kChannels;
    held = branch_matrices(r, nmat, mode);
    tokens.own = qk + static_cast<int64_t>(rb) * n * c;
    QCS_UNROLL
    for (int k = 0; k < 2; ++k) {
      const int partner = held.as_row[k] ? col_branch(held.mats[k]) : row_branch(held.mats[k]);
      tokens.partner[k] = qk + (static_cast<int64_t>(partner) * batch + b) * n * c;
    }
  }
};

// The gradient tiles' shared steps (tensor_core_gradient_tiles_kernel, and for float64
// cuda_core_gradient_tiles_kernel), for a tile of kChannels channels from c0:
// o_k of the tile's channels: centre[k * kChannels + col], the mean token of matrix k's
// pair (the own branch and partner k), lanes along channels. inv_tokens = 1 / (2 N) comes
// from the host: a division's slow-path call here spilled registers on sm_90.
template <int kChannels, typename A, typename T, typename P>
__device__ __forceinline__ void tile_centres(P centre, const T* __restrict__ own_x, const T* const (&partner_x)[2],
                                             int n, int c, int c0, A inv_tokens) {
  for (int t = threadIdx.x; t < 2 * kChannels; t += blockDim.x) {
    const int k = t / kChannels, ch = c0 + t % kChannels;
    const T* px = k == 0 ? partner_x[0] : partner_x[1];
    A so = 0, sp = 0;
    if (ch < c)
      for (int tok = 0; tok < n; ++tok) {
        so += static_cast<A>(own_x[static_cast<int64_t>(tok) * c + ch]);
        sp += static_cast<A>(px[static_cast<int64_t>(tok) * c + ch]);
      }
    centre[t] = (so + sp) * inv_tokens;
  }
}
// The start of output (i0 + row, c0 + col) of the tile: sum_k wsum_k[i] (x_i - o_k), 0
// outside the branch.
template <int kChannels, typename A, typename T, typename P>
__device__ __forceinline__ A gradient_start(const GradientTile<kChannels, T>& tile, const A* __restrict__ wsum,
                                            P centre, int nmat, int batch, int n, int c, int row, int col) {
  const int i = tile.i0 + row, ch = tile.c0 + col;
  if (i >= n || ch >= c) return A(0);
  const A x = static_cast<A>(tile.tokens.own[static_cast<int64_t>(i) * c + ch]);
  const int64_t mbs = static_cast<int64_t>(nmat) * batch;  // wsum [2, M, B, N]: column sums after row sums
  A start = 0;
  QCS_UNROLL
  for (int k = 0; k < 2; ++k) {
    if (!tile.held.used[k]) continue;
    const int64_t mb = static_cast<int64_t>(tile.held.mats[k]) * batch + tile.b;
    start += wsum[((tile.held.as_row[k] ? 0 : mbs) + mb) * n + i] * (x - centre[k * kChannels + col]);
  }
  return start;
}
// One step over partner tokens j0 .. j0 + 63: -W[w_row0.., w_col0..] staged in wt (rows
// follow W's rows: coalesced reads; zeros outside), and partner k's tokens centred by o_k
// (ck: centre + k * kChannels) in pt.
template <int kChannels, typename WPtr, typename PPtr, typename CPtr, typename A, typename T>
__device__ __forceinline__ void stage_gradient_step(WPtr wt, int wld, PPtr pt, int pld, const A* __restrict__ w,
                                                    const T* __restrict__ px, CPtr ck, int w_row0, int w_col0, int j0,
                                                    int c0, int n, int c) {
  for (int e = threadIdx.x; e < kTcTokens * kTcTokens; e += blockDim.x) {
    const int row = e / kTcTokens, col = e % kTcTokens;
    const bool inside = w_row0 + row < n && w_col0 + col < n;
    wt[row * wld + col] = inside ? -w[static_cast<int64_t>(w_row0 + row) * n + w_col0 + col] : A(0);
  }
  for (int e = threadIdx.x; e < kTcTokens * kChannels; e += blockDim.x) {
    const int row = e / kChannels, col = e % kChannels, j = j0 + row, ch = c0 + col;
    pt[row * pld + col] = j < n && ch < c ? static_cast<A>(px[static_cast<int64_t>(j) * c + ch]) - ck[col] : A(0);
  }
}

template <typename T>
__global__ void __launch_bounds__(kTcThreads)
    tensor_core_gradient_tiles_kernel(const T* __restrict__ qk, const float* __restrict__ wmat,
                                      const float* __restrict__ wsum, Mode mode, int nmat, int batch, int n, int c,
                                      float inv_tokens, T* __restrict__ grad) {
  QCS_SHARED_ARRAY(float, wt, kTcTokens* kTcWLd);        // -W' tile (row branch) or -W tile (column)
  QCS_SHARED_ARRAY(float, pt, kTcTokens* kTcChanLd);     // centred partner tile
  QCS_SHARED_ARRAY(float, ot, kTcTokens* kTcChanLd);     // the output tile
  QCS_SHARED_ARRAY(float, centre, 2 * kTcTileChannels);  // o_k of the tile's channels
  const GradientTile<kTcTileChannels, T> tile(qk, mode, nmat, batch, n, c);
  const int rb = tile.rb, b = tile.b, i0 = tile.i0, c0 = tile.c0;
  const auto& [mats, as_row, used] = tile.held;
  const auto& [own_x, partner_x] = tile.tokens;

  tile_centres<kTcTileChannels>(centre + 0, own_x, partner_x, n, c, c0, inv_tokens);
  __syncthreads();
  for (int e = threadIdx.x; e < kTcTokens * kTcTileChannels; e += blockDim.x) {
    const int row = e / kTcTileChannels, col = e % kTcTileChannels;
    ot[row * kTcChanLd + col] = gradient_start(tile, wsum, centre + 0, nmat, batch, n, c, row, col);
  }
  __syncthreads();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub_r = 16 * (warp / 2), sub_c = 16 * (warp % 2);
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc;
  wmma::load_matrix_sync(acc, ot + sub_r * kTcChanLd + sub_c, kTcChanLd, wmma::mem_row_major);
  QCS_UNROLL
  for (int k = 0; k < 2; ++k) {
    if (!used[k]) continue;  // block-uniform
    const float* w = wmat + (static_cast<int64_t>(mats[k]) * batch + b) * n * n;
    const T* px = k == 0 ? partner_x[0] : partner_x[1];
    for (int j0 = 0; j0 < n; j0 += kTcTokens) {
      // -W[i0.., j0..] (row branch), or -W[j0.., i0..] read as its transpose (column
      // branch): either way rows of the stage follow W's rows (coalesced reads).
      stage_gradient_step<kTcTileChannels>(wt + 0, kTcWLd, pt + 0, kTcChanLd, w, px, centre + k * kTcTileChannels,
                                           as_row[k] ? i0 : j0, as_row[k] ? j0 : i0, j0, c0, n, c);
      __syncthreads();
      const int kmax = n - j0 < kTcTokens ? n - j0 : kTcTokens;
      // (wt + 0: a pointer to the stage; the emulation's shared arrays become one through +)
      if (as_row[k]) subtract_w_times_partner<wmma::row_major>(acc, wt + 0, kTcWLd, pt + sub_c, kTcChanLd, sub_r, kmax);
      else subtract_w_times_partner<wmma::col_major>(acc, wt + 0, kTcWLd, pt + sub_c, kTcChanLd, sub_r, kmax);
      __syncthreads();  // the stages are overwritten next
    }
  }
  wmma::store_matrix_sync(ot + sub_r * kTcChanLd + sub_c, acc, kTcChanLd, wmma::mem_row_major);
  __syncwarp();  // the lanes read what other lanes stored
  T* out = grad + static_cast<int64_t>(rb) * n * c;
  for (int e = lane; e < 16 * 16; e += 32) {
    const int row = sub_r + e / 16, col = sub_c + e % 16, i = i0 + row, ch = c0 + col;
    if (i < n && ch < c) out[static_cast<int64_t>(i) * c + ch] = static_cast<T>(ot[row * kTcChanLd + col]);
  }
}

// float64 on CUDA cores: the tiles of tensor_core_gradient_tiles_kernel (same math, same
// centring, at every N after backward_weights_kernel), 64 tokens x kF64TileChannels
// channels per block (W's stage in double leaves room for no more in 48 KiB), every
// thread holding 4 outputs (rows t / 16 + 16 a, channel t % 16) in registers. Written
// once. Deterministic. Static shared memory: 41.9 KiB.
constexpr int kF64TileChannels = 16;
__global__ void __launch_bounds__(kTcThreads)
    cuda_core_gradient_tiles_kernel(const double* __restrict__ qk, const double* __restrict__ wmat,
                                    const double* __restrict__ wsum, Mode mode, int nmat, int batch, int n, int c,
                                    double inv_tokens, double* __restrict__ grad) {
  constexpr int kWLd = kTcTokens + 1, kChanLd = kF64TileChannels + 1;
  QCS_SHARED_ARRAY(double, wt, kTcTokens* kWLd);           // -W' tile (row branch) or -W tile (column)
  QCS_SHARED_ARRAY(double, pt, kTcTokens* kChanLd);        // centred partner tile
  QCS_SHARED_ARRAY(double, centre, 2 * kF64TileChannels);  // o_k of the tile's channels
  const GradientTile<kF64TileChannels, double> tile(qk, mode, nmat, batch, n, c);
  const int rb = tile.rb, b = tile.b, i0 = tile.i0, c0 = tile.c0;
  const auto& [mats, as_row, used] = tile.held;
  const auto& [own_x, partner_x] = tile.tokens;

  tile_centres<kF64TileChannels>(centre + 0, own_x, partner_x, n, c, c0, inv_tokens);
  __syncthreads();
  const int row = threadIdx.x / kF64TileChannels, col = threadIdx.x % kF64TileChannels;
  constexpr int kRowStep = kTcThreads / kF64TileChannels;  // 16
  double acc[kTcTokens / kRowStep];
  QCS_UNROLL
  for (int a = 0; a < kTcTokens / kRowStep; ++a)
    acc[a] = gradient_start(tile, wsum, centre + 0, nmat, batch, n, c, row + kRowStep * a, col);
  QCS_UNROLL
  for (int k = 0; k < 2; ++k) {
    if (!used[k]) continue;  // block-uniform
    const double* w = wmat + (static_cast<int64_t>(mats[k]) * batch + b) * n * n;
    const double* px = k == 0 ? partner_x[0] : partner_x[1];
    for (int j0 = 0; j0 < n; j0 += kTcTokens) {
      stage_gradient_step<kF64TileChannels>(wt + 0, kWLd, pt + 0, kChanLd, w, px, centre + k * kF64TileChannels,
                                            as_row[k] ? i0 : j0, as_row[k] ? j0 : i0, j0, c0, n, c);
      __syncthreads();
      const int kmax = n - j0 < kTcTokens ? n - j0 : kTcTokens;
      // -W'[i][j]: element (i, j) of the stage for a row branch, (j, i) for a column branch.
      const int wi = as_row[k] ? kWLd : 1, wj = as_row[k] ? 1 : kWLd;
      for (int j = 0; j < kmax; ++j) {
        const double p = pt[j * kChanLd + col];
        QCS_UNROLL
        for (int a = 0; a < kTcTokens / kRowStep; ++a)
          acc[a] = std::fma(wt[(row + kRowStep * a) * wi + j * wj], p, acc[a]);
      }
      __syncthreads();  // the stages are overwritten next
    }
  }
  double* out = grad + static_cast<int64_t>(rb) * n * c;
  QCS_UNROLL
  for (int a = 0; a < kTcTokens / kRowStep; ++a) {
    const int i = i0 + row + kRowStep * a, ch = c0 + col;
    if (i < n && ch < c) out[static_cast<int64_t>(i) * c + ch] = acc[a];
  }
}

}  // namespace qcs::kern
