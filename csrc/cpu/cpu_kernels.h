// Interface between the CPU op driver (csa_cpu.cpp) and the vectorised inner kernels,
// which are compiled once per instruction set (kernels_avx512.cpp, kernels_avx2.cpp,
// kernels_baseline.cpp) and picked at run time for the CPU at hand.
//
// Nothing here includes ATen: the per-ISA translation units are compiled with
// `#pragma GCC target(...)`, and keeping library inline functions out of them keeps
// AVX-512 code from leaking into symbols that baseline code may call.
#pragma once

#include <cstdint>

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
  kStore = 0,          // out[i, j] = acc
  kScaleMinus = 1,     // out[i, j] = scale[i] * x[i, j] - acc   (the CSA gradient form)
  kAdd = 2,            // out[i, j] += acc   (internal: later blocks of a long k loop)
  kSubtract = 3,       // out[i, j] -= acc   (internal: likewise, for kScaleMinus)
};

// out[i, j] for rows i in [row_begin, row_end) and columns j in [0, cols), summing over up
// to two segments (the two matrices a branch's gradient draws from).
template <typename T>
struct GemmProblem {
  GemmSegment<T> seg[2];
  int32_t num_segments;
  int64_t row_begin, row_end, cols;
  T* out;          // row i is written at out + (i - out_row0) * ldo
  int64_t out_row0;
  int64_t ldo;
  GemmEpilogue epilogue;
  const T* scale;  // [rows], indexed by absolute row; kScaleMinus only
  const T* x;      // row-major with leading dimension ldx; kScaleMinus only
  int64_t ldx;
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
