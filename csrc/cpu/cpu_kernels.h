// Interface between the CPU op driver (csa_cpu.cpp) and the vectorised inner kernels,
// which are compiled once per instruction set (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_baseline.cpp) and picked at run time for the CPU at hand.
//
// Nothing here includes ATen: the per-ISA translation units are compiled with
// `#pragma GCC target(...)`, and keeping library inline functions out of them keeps
// AVX-512 code from leaking into symbols that baseline code may call.
#pragma once

#include <cstdint>

// Scalar math shared with the CUDA kernels. Included here, before any per-ISA
// `#pragma GCC target`, so its inline functions are compiled for the baseline ISA wherever
// an out-of-line copy is emitted.
#include "csa_common.h"

namespace qcs::cpu {

// One operand pair of a GEMM: sum over k of A(i, k) * B(k, j), where
// A(i, k) = a[i * a_row_stride + k * a_k_stride] (so a transposed A is just strides) and
// B(k, j) = b[k * ldb + j] (row-major, j contiguous).
template <typename T>
struct GemmSegment {
  const T* a;
  int64_t a_row_stride;
  int64_t a_k_stride;
  const T* b;
  int64_t ldb;
  int64_t k;
};

enum class GemmEpilogue : int32_t {
  kStore = 0,       // out[i, j] = acc
  kScaleMinus = 1,  // out[i, j] = scale[i] * x[i, j] - acc   (the CSA gradient form)
  kAdd = 2,         // out[i, j] += acc   (internal: later blocks of a long k loop)
  kSubtract = 3,    // out[i, j] -= acc   (internal: likewise, for kScaleMinus)
};

// out[i, j] for rows i in [row_begin, row_end) and columns j in [0, cols), summing over up
// to two segments (the two matrices a branch's gradient draws from).
template <typename T>
struct GemmProblem {
  GemmSegment<T> seg[2];
  int32_t num_segments;
  int64_t row_begin, row_end, cols;
  T* out;  // row i is written at out + (i - out_row0) * ldo
  int64_t out_row0;
  int64_t ldo;
  GemmEpilogue epilogue;
  const T* scale;  // [rows], indexed by absolute row; kScaleMinus only
  const T* x;      // row-major with leading dimension ldx; kScaleMinus only
  int64_t ldx;
  // The output is written once and not read again soon (larger than the caches): store it
  // with non-temporal stores where the rows are vector-aligned, skipping the read-for-
  // ownership of every output line and leaving the caches to the operands.
  bool stream_out;
};

template <typename T>
struct KernelSet {
  void (*gemm)(const GemmProblem<T>&);
  // out[i * ldo + j] = rows[i] . cols[j] for i < n_rows, j < n_cols; both operands
  // row-major [*, n] (channels contiguous).
  void (*gram)(const T* rows, int64_t n_rows, const T* cols, int64_t n_cols, int64_t n, T* out,
               int64_t ldo);
  // sum_c (x[c] - y[c])^2 accumulated in double: the exact path for near-zero distances.
  double (*squared_distance)(const T* x, const T* y, int64_t n);
  // sum_c x[c]^2 accumulated in double.
  double (*squared_norm)(const T* x, int64_t n);
  // out[i * n + j] = |rows[i] - cols[j]| for rows i in [r0, r1), from the Gram block
  // gram[(i - r0) * n + j] and the squared norms (double) as sqrt(|x|^2 + |y|^2 - 2 x.y);
  // entries where that identity cancels (duplicated or near-duplicate tokens) are
  // recomputed directly, so a duplicate gives exactly 0. rows/cols are [*, c].
  void (*distances_from_gram)(const T* gram, const T* rows, const T* cols, const double* row_sqnorm,
                              const double* col_sqnorm, int64_t r0, int64_t r1, int64_t n,
                              int64_t c, T* out);

  // Per-matrix epilogues: one sample's n x n distance matrix `dist` (row-major), shifted by
  // its extreme (similarity: extreme - D, distance: D - extreme). All in double. `scratch`
  // holds at least n * n + 8 * n doubles.

  // The smallest (or, with `largest`, the largest) of count values.
  T (*extreme)(const T* x, int64_t count, bool largest);
  // Forward: col_score[j] += weight * cols(M)[j] and row_score[i] += weight * rows(M)[i].
  void (*forward_scores)(const T* dist, double extreme, bool similarity, int64_t n, double weight,
                         double* col_score, double* row_score, double* scratch);
  // Backward of one matrix's aggregations and of its distances, given the fused scores'
  // gradients up_col (of the column branch) and up_row: w = W = dL/dD / D (0 where D = 0)
  // with its row and column sums, where dL/dD leaves out the shift's gradient (the driver
  // adds it at the extreme, which needs sum(dL/dD) first). Returns sum(dL/dD); *ties counts
  // the entries equal to the extreme and *first_tie is the index of the first (-1: none).
  // For distance matrices also d_col[j] += cols(M)[j], d_row[i] += rows(M)[i] (the d scores,
  // for the theta gradient). `scratch` holds at least n * n + 10 * n doubles.
  double (*backward_weights)(const T* dist, T extreme, bool similarity, int64_t n, double weight,
                             const double* up_col, const double* up_row, double* d_col,
                             double* d_row, T* w, T* row_sums, T* col_sums, int64_t* ties,
                             int64_t* first_tie, double* scratch);
};

struct KernelTable {
  const char* isa;
  KernelSet<float> f32;
  KernelSet<double> f64;
};

// Defined in the per-ISA translation units.
const KernelTable& kernels_baseline();
const KernelTable& kernels_avx2();
const KernelTable& kernels_avx512();

// The best table this CPU supports, or the one named by QCS_CPU_ISA
// ("baseline", "avx2", "avx512") when set (tests use it to cover every path).
const KernelTable& active_kernels();

}  // namespace qcs::cpu
