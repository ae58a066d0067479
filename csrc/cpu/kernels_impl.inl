// Vectorised inner kernels of the CPU backend, written once with GCC/Clang vector
// extensions and compiled per instruction set. The including file defines
//   QCS_ISA_NAME       the table's name, QCS_ISA_FN its accessor function,
//   QCS_VEC_BYTES      vector register width in bytes (16, 32, 64),
//   QCS_GEMM_MR/NV     GEMM micro-tile: rows x vectors of columns kept in registers,
//   QCS_GRAM_MR/NR     Gram micro-tile: rows x columns of vector accumulators,
// after its `#pragma GCC target`.
#include "cpu_kernels.h"

namespace qcs::cpu {
namespace {

template <typename T>
struct Vec {
  static constexpr int kWidth = QCS_VEC_BYTES / sizeof(T);
  typedef T type __attribute__((vector_size(QCS_VEC_BYTES)));
  // Unaligned, aliasing view for loads and stores at any element address.
  typedef T unaligned __attribute__((vector_size(QCS_VEC_BYTES), aligned(sizeof(T)), may_alias));
  static inline type load(const T* p) { return *reinterpret_cast<const unaligned*>(p); }
  static inline void store(T* p, type v) { *reinterpret_cast<unaligned*>(p) = v; }
  // x - 0 is exact for every x (also -0), so it folds to a plain broadcast; 0 + x would not.
  static inline type splat(T x) { return x - type{}; }
  // Lane sum as a tree (log2(width) dependent adds instead of width).
  static inline T hsum(type v) {
    T lanes[kWidth];
    __builtin_memcpy(lanes, &v, sizeof(v));
#pragma GCC unroll 8
    for (int w = kWidth / 2; w > 0; w /= 2)
#pragma GCC unroll 16
      for (int i = 0; i < w; ++i) lanes[i] += lanes[i + w];
    return lanes[0];
  }
};

template <typename T>
struct Epilogue {
  const GemmProblem<T>& p;
  inline void vec(int64_t row, int64_t col, typename Vec<T>::type acc) const {
    using V = Vec<T>;
    T* dst = p.out + (row - p.out_row0) * p.ldo + col;
    switch (p.epilogue) {
      case GemmEpilogue::kStore: V::store(dst, acc); break;
      case GemmEpilogue::kScaleMinus:
        V::store(dst, V::splat(p.scale[row]) * V::load(p.x + row * p.ldx + col) - acc);
        break;
      case GemmEpilogue::kAdd: V::store(dst, V::load(dst) + acc); break;
      case GemmEpilogue::kSubtract: V::store(dst, V::load(dst) - acc); break;
    }
  }
  inline void scalar(int64_t row, int64_t col, T acc) const {
    T* dst = p.out + (row - p.out_row0) * p.ldo + col;
    switch (p.epilogue) {
      case GemmEpilogue::kStore: *dst = acc; break;
      case GemmEpilogue::kScaleMinus: *dst = p.scale[row] * p.x[row * p.ldx + col] - acc; break;
      case GemmEpilogue::kAdd: *dst += acc; break;
      case GemmEpilogue::kSubtract: *dst -= acc; break;
    }
  }
};

// MR rows x NV vectors of columns held in registers across the whole k loop.
template <typename T, int MR, int NV>
__attribute__((always_inline)) inline void micro_tile(const GemmProblem<T>& p, int64_t row0,
                                                      int64_t col0, const Epilogue<T>& epi) {
  using V = Vec<T>;
  using vt = typename V::type;
  constexpr int W = V::kWidth;
  constexpr int kLine = 64 / sizeof(T);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    T* dst = p.out + (row0 + r - p.out_row0) * p.ldo + col0;
#pragma GCC unroll 8
    for (int c = 0; c < NV * W; c += kLine) {
      __builtin_prefetch(dst + c, 1, 3);
      if (p.epilogue == GemmEpilogue::kScaleMinus) __builtin_prefetch(p.x + (row0 + r) * p.ldx + col0 + c, 0, 3);
    }
  }
  vt acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = vt{};
  for (int s = 0; s < p.num_segments; ++s) {
    const GemmSegment<T>& g = p.seg[s];
    const T* a = g.a + row0 * g.a_row_stride;
    const T* b = g.b + col0;
    const int64_t rs = g.a_row_stride, ks = g.a_k_stride, ldb = g.ldb;
    for (int64_t k = 0; k < g.k; ++k) {
      vt bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = V::load(b + k * ldb + v * W);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        const vt av = V::splat(a[r * rs + k * ks]);
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) epi.vec(row0 + r, col0 + v * W, acc[r][v]);
}

// Columns left over after the last full vector: plain scalar accumulation.
template <typename T>
void scalar_columns(const GemmProblem<T>& p, int64_t col_begin, const Epilogue<T>& epi) {
  for (int64_t i = p.row_begin; i < p.row_end; ++i) {
    for (int64_t j = col_begin; j < p.cols; ++j) {
      T acc = 0;
      for (int s = 0; s < p.num_segments; ++s) {
        const GemmSegment<T>& g = p.seg[s];
        for (int64_t k = 0; k < g.k; ++k)
          acc += g.a[i * g.a_row_stride + k * g.a_k_stride] * g.b[k * g.ldb + j];
      }
      epi.scalar(i, j, acc);
    }
  }
}

template <typename T, int NV>
inline void row_sweep(const GemmProblem<T>& p, int64_t col0, const Epilogue<T>& epi) {
  constexpr int MR = QCS_GEMM_MR;
  int64_t row = p.row_begin;
  for (; row + MR <= p.row_end; row += MR) micro_tile<T, MR, NV>(p, row, col0, epi);
  // Remaining rows, one template per count so every tile keeps its accumulators in registers.
  switch (p.row_end - row) {
#define QCS_ROW_CASE(n) \
  case n:               \
    if constexpr (n < MR) micro_tile<T, n, NV>(p, row, col0, epi); \
    break;
    QCS_ROW_CASE(1) QCS_ROW_CASE(2) QCS_ROW_CASE(3) QCS_ROW_CASE(4) QCS_ROW_CASE(5)
    QCS_ROW_CASE(6) QCS_ROW_CASE(7)
#undef QCS_ROW_CASE
    default:
      break;
  }
}

// Columns [col_begin, col_end) of p: full panels of NV vectors, single vectors, then scalars.
template <typename T>
void column_range(const GemmProblem<T>& p, int64_t col_begin, int64_t col_end) {
  constexpr int W = Vec<T>::kWidth;
  constexpr int NV = QCS_GEMM_NV;
  const Epilogue<T> epi{p};
  int64_t col = col_begin;
  for (; col + NV * W <= col_end; col += NV * W) row_sweep<T, NV>(p, col, epi);
  for (; col + W <= col_end; col += W) row_sweep<T, 1>(p, col, epi);
  if (col < col_end) {
    GemmProblem<T> tail = p;
    tail.cols = col_end;
    scalar_columns(tail, col, epi);
  }
}

template <typename T>
void gemm(const GemmProblem<T>& p) {
  constexpr int W = Vec<T>::kWidth;
  constexpr int64_t kPanel = QCS_GEMM_NV * W;
  // Long k loops (N = 784: k = 1568) are cut into blocks so that the block of the B panel
  // (kBlock x one column panel) and of A stay in L1/L2 while the row tiles sweep them; the
  // output panel accumulates across blocks in memory.
  constexpr int64_t kBlock = 256;
  int64_t total_k = 0;
  for (int s = 0; s < p.num_segments; ++s) total_k += p.seg[s].k;
  for (int64_t col = 0; col < p.cols; col += kPanel) {
    const int64_t col_end = col + kPanel < p.cols ? col + kPanel : p.cols;
    if (total_k <= kBlock) {
      column_range(p, col, col_end);
      continue;
    }
    GemmProblem<T> part = p;
    part.num_segments = 1;
    bool first = true;
    for (int s = 0; s < p.num_segments; ++s) {
      const GemmSegment<T>& g = p.seg[s];
      for (int64_t k0 = 0; k0 < g.k; k0 += kBlock) {
        part.seg[0] = {g.a + k0 * g.a_k_stride, g.a_row_stride, g.a_k_stride, g.b + k0 * g.ldb,
                       g.ldb, g.k - k0 < kBlock ? g.k - k0 : kBlock};
        part.epilogue = first ? p.epilogue
                              : (p.epilogue == GemmEpilogue::kStore ? GemmEpilogue::kAdd
                                                                     : GemmEpilogue::kSubtract);
        column_range(part, col, col_end);
        first = false;
      }
    }
  }
}

template <typename T, int MR, int NR>
__attribute__((always_inline)) inline void gram_tile(const T* rows, const T* cols, int64_t n,
                                                     T* out, int64_t ldo) {
  using V = Vec<T>;
  using vt = typename V::type;
  constexpr int W = V::kWidth;
  vt acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) acc[r][c] = vt{};
  int64_t k = 0;
  for (; k + W <= n; k += W) {
    vt a[MR], b[NR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) a[r] = V::load(rows + r * n + k);
#pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) b[c] = V::load(cols + c * n + k);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int c = 0; c < NR; ++c) acc[r][c] += a[r] * b[c];
  }
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r) {
    T sums[NR];
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define QCS_HAVE_SHUFFLEVECTOR 1
#endif
#endif
#ifdef QCS_HAVE_SHUFFLEVECTOR
    if constexpr (W == 16 && NR == 4) {
      // The four lane sums of a row in one transposing tree (6 shuffles, 4 adds), not four
      // separate trees: at C = 768 the reductions were an eighth of the Gram's time.
      const vt x = __builtin_shufflevector(acc[r][0], acc[r][1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17,
                                           18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(acc[r][0], acc[r][1], 8, 9, 10, 11, 12, 13, 14, 15,
                                           24, 25, 26, 27, 28, 29, 30, 31);
      const vt y = __builtin_shufflevector(acc[r][2], acc[r][3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17,
                                           18, 19, 20, 21, 22, 23) +
                   __builtin_shufflevector(acc[r][2], acc[r][3], 8, 9, 10, 11, 12, 13, 14, 15,
                                           24, 25, 26, 27, 28, 29, 30, 31);
      // Lanes 0-3: column 0's partial sums, 4-7: column 2's, 8-11: column 1's, 12-15: column 3's.
      const vt t = __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25,
                                           26, 27) +
                   __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28,
                                           29, 30, 31);
      const vt u = t + __builtin_shufflevector(t, t, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15,
                                               12, 13);
      const vt w = u + __builtin_shufflevector(u, u, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12,
                                               15, 14);
      sums[0] = w[0];
      sums[1] = w[8];
      sums[2] = w[4];
      sums[3] = w[12];
    } else
#endif
    {
#pragma GCC unroll 8
      for (int c = 0; c < NR; ++c) sums[c] = V::hsum(acc[r][c]);
    }
#pragma GCC unroll 8
    for (int c = 0; c < NR; ++c) {
      T sum = sums[c];
      for (int64_t kk = k; kk < n; ++kk) sum += rows[r * n + kk] * cols[c * n + kk];
      out[r * ldo + c] = sum;
    }
  }
}

template <typename T, int MR>
inline void gram_row_tile(const T* rows, const T* cols, int64_t n_cols, int64_t n, T* out,
                          int64_t ldo) {
  constexpr int NR = QCS_GRAM_NR;
  int64_t c = 0;
  for (; c + NR <= n_cols; c += NR) gram_tile<T, MR, NR>(rows, cols + c * n, n, out + c, ldo);
  switch (n_cols - c) {
#define QCS_COL_CASE(k) \
  case k:               \
    if constexpr (k < NR) gram_tile<T, MR, k>(rows, cols + c * n, n, out + c, ldo); \
    break;
    QCS_COL_CASE(1) QCS_COL_CASE(2) QCS_COL_CASE(3) QCS_COL_CASE(4) QCS_COL_CASE(5)
#undef QCS_COL_CASE
    default:
      break;
  }
}

template <typename T>
void gram_block(const T* rows, int64_t n_rows, const T* cols, int64_t n_cols, int64_t n, T* out,
                int64_t ldo) {
  constexpr int MR = QCS_GRAM_MR;
  int64_t r = 0;
  for (; r + MR <= n_rows; r += MR) gram_row_tile<T, MR>(rows + r * n, cols, n_cols, n, out + r * ldo, ldo);
  switch (n_rows - r) {
#define QCS_ROW_CASE(k) \
  case k:               \
    if constexpr (k < MR) gram_row_tile<T, k>(rows + r * n, cols, n_cols, n, out + r * ldo, ldo); \
    break;
    QCS_ROW_CASE(1) QCS_ROW_CASE(2) QCS_ROW_CASE(3) QCS_ROW_CASE(4) QCS_ROW_CASE(5)
#undef QCS_ROW_CASE
    default:
      break;
  }
}

template <typename T>
void gram(const T* rows, int64_t n_rows, const T* cols, int64_t n_cols, int64_t n, T* out,
          int64_t ldo) {
  // Every row tile streams all columns: beyond L2 (N = 784: 2.4 MB of columns) they would
  // come from L3 once per row tile, so the columns go in chunks of about 256 KB.
  constexpr int64_t kChunkBytes = 256 * 1024;
  int64_t chunk = kChunkBytes / (n * int64_t(sizeof(T)));
  chunk = chunk < QCS_GRAM_NR ? QCS_GRAM_NR : chunk - chunk % QCS_GRAM_NR;
  for (int64_t c = 0; c < n_cols; c += chunk)
    gram_block(rows, n_rows, cols + c * n, n_cols - c < chunk ? n_cols - c : chunk, n, out + c, ldo);
}

template <typename T>
double squared_distance(const T* x, const T* y, int64_t n) {
  using V = Vec<T>;
  constexpr int W = V::kWidth;
  typename V::type acc{};
  int64_t c = 0;
  for (; c + W <= n; c += W) {
    const auto diff = V::load(x + c) - V::load(y + c);
    acc += diff * diff;
  }
  double sum = V::hsum(acc);
  for (; c < n; ++c) sum += double(x[c] - y[c]) * double(x[c] - y[c]);
  return sum;
}

template <typename T>
double squared_norm(const T* x, int64_t n) {
  using V = Vec<T>;
  constexpr int W = V::kWidth;
  // Four accumulators: one would serialise on the FMA latency.
  typename V::type acc[4] = {};
  int64_t c = 0;
  for (; c + 4 * W <= n; c += 4 * W) {
#pragma GCC unroll 4
    for (int u = 0; u < 4; ++u) {
      const auto v = V::load(x + c + u * W);
      acc[u] += v * v;
    }
  }
  for (; c + W <= n; c += W) {
    const auto v = V::load(x + c);
    acc[0] += v * v;
  }
  double sum = V::hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; c < n; ++c) sum += double(x[c]) * double(x[c]);
  return sum;
}

}  // namespace

const KernelTable& QCS_ISA_FN() {
  static const KernelTable table{
      QCS_ISA_NAME,
      {&gemm<float>, &gram<float>, &squared_distance<float>, &squared_norm<float>},
      {&gemm<double>, &gram<double>, &squared_distance<double>, &squared_norm<double>},
  };
  return table;
}

}  // namespace qcs::cpu
