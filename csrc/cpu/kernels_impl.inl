// Vectorised inner kernels of the CPU backend, written once with GCC/Clang vector
// extensions and compiled per instruction set. The including file defines
//   QCS_ISA_NAME       the table's name, QCS_ISA_FN its accessor function,
//   QCS_VEC_BYTES      vector register width in bytes (16, 32, 64),
//   QCS_GEMM_MR/NV     GEMM micro-tile: rows x vectors of columns kept in registers,
//   QCS_GRAM_MR/NR     Gram micro-tile: rows x columns of vector accumulators,
// after its `#pragma GCC target`.
#include "cpu_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QCS_HAVE_STREAM_STORE 1
#endif

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
  static constexpr bool kCanStream =
#ifdef QCS_HAVE_STREAM_STORE
      true;
#else
      false;
#endif
  // Non-temporal store; p must be QCS_VEC_BYTES-aligned. Weakly ordered: see stream_fence.
  static inline void stream(T* p, type v) {
#ifdef QCS_HAVE_STREAM_STORE
    if constexpr (QCS_VEC_BYTES == 64 && sizeof(T) == 4) _mm512_stream_ps(p, __m512(v));
    else if constexpr (QCS_VEC_BYTES == 64) _mm512_stream_pd(p, __m512d(v));
    else if constexpr (QCS_VEC_BYTES == 32 && sizeof(T) == 4) _mm256_stream_ps(p, __m256(v));
    else if constexpr (QCS_VEC_BYTES == 32) _mm256_stream_pd(p, __m256d(v));
    else if constexpr (sizeof(T) == 4) _mm_stream_ps(p, __m128(v));
    else _mm_stream_pd(p, __m128d(v));
#else
    store(p, v);
#endif
  }
  // Orders the streamed stores before whatever follows (the join of the parallel region).
  static inline void stream_fence() {
#ifdef QCS_HAVE_STREAM_STORE
    _mm_sfence();
#endif
  }
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
  bool stream;  // non-temporal stores of final values (gemm decides: alignment, one k pass)
  inline void put(T* dst, typename Vec<T>::type v) const {
    if (stream) Vec<T>::stream(dst, v);
    else Vec<T>::store(dst, v);
  }
  template <GemmEpilogue kind>
  inline void vec(int64_t row, int64_t col, typename Vec<T>::type acc) const {
    using V = Vec<T>;
    T* dst = p.out + (row - p.out_row0) * p.ldo + col;
    switch (kind) {
      case GemmEpilogue::kStore: put(dst, acc); break;
      case GemmEpilogue::kScaleMinus:
        put(dst, V::splat(p.scale[row]) * V::load(p.x + row * p.ldx + col) - acc);
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
// With kPrefetchNext the tile also prefetches the B rows of the next column panel.
template <typename T, int MR, int NV, bool kPrefetchNext = false>
__attribute__((always_inline)) inline void micro_tile(const GemmProblem<T>& p, int64_t row0,
                                                      int64_t col0, const Epilogue<T>& epi) {
  using V = Vec<T>;
  using vt = typename V::type;
  constexpr int W = V::kWidth;
  constexpr int kLine = 64 / sizeof(T);
  vt acc[MR][NV];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = vt{};
  // Step k of segment g: B's row k (NV vectors from col0) times A's column k (MR rows).
  auto step = [&](const GemmSegment<T>& g, int64_t k) __attribute__((always_inline)) {
    const T* a = g.a + row0 * g.a_row_stride + k * g.a_k_stride;
    const T* b = g.b + k * g.ldb + col0;
    vt bv[NV];
    if constexpr (kPrefetchNext) {
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) __builtin_prefetch(b + (NV + v) * W, 0, 3);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = V::load(b + v * W);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const vt av = V::splat(a[r * g.a_row_stride]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  };
  // Steps [k0, k1) of g, or with h, of two segments of equal k interleaved: one loop for both
  // halves of the gradient's K = 2N (a loop exit per segment, mispredicted at these short
  // trip counts, cost a few per cent of a tile).
  auto steps = [&](const GemmSegment<T>& g, const GemmSegment<T>* h, int64_t k0, int64_t k1)
                   __attribute__((always_inline)) {
                     if (h == nullptr) {
                       for (int64_t k = k0; k < k1; ++k) step(g, k);
                     } else {
                       for (int64_t k = k0; k < k1; ++k) {
                         step(g, k);
                         step(*h, k);
                       }
                     }
                   };
  // The epilogue's operands are prefetched a few steps before the k loop ends: earlier, the
  // streaming B panel would evict them from L1 again.
  constexpr int64_t kLead = 16;
  auto prefetch_epilogue = [&]() __attribute__((always_inline)) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
      for (int c = 0; c < NV * W; c += kLine) {
        if (!epi.stream)
          __builtin_prefetch(p.out + (row0 + r - p.out_row0) * p.ldo + col0 + c, 1, 3);
        if (p.epilogue == GemmEpilogue::kScaleMinus)
          __builtin_prefetch(p.x + (row0 + r) * p.ldx + col0 + c, 0, 3);
      }
    }
  };
  if (p.num_segments == 2 && p.seg[0].k == p.seg[1].k) {
    const int64_t k = p.seg[0].k, split = k > kLead / 2 ? k - kLead / 2 : 0;
    steps(p.seg[0], &p.seg[1], 0, split);
    prefetch_epilogue();
    steps(p.seg[0], &p.seg[1], split, k);
  } else {
    for (int s = 0; s < p.num_segments; ++s) {
      const GemmSegment<T>& g = p.seg[s];
      const bool last = s == p.num_segments - 1;
      const int64_t split = !last ? g.k : g.k > kLead ? g.k - kLead : 0;
      steps(g, nullptr, 0, split);
      if (last) {
        prefetch_epilogue();
        steps(g, nullptr, split, g.k);
      }
    }
  }
  // A case per macro call, which clang-format cannot lay out:
  // clang-format off
  switch (p.epilogue) {  // once per tile, not per vector
#define QCS_EPILOGUE_CASE(kind)                                              \
  case kind:                                                                 \
    _Pragma("GCC unroll 8") for (int r = 0; r < MR; ++r)                     \
      _Pragma("GCC unroll 8") for (int v = 0; v < NV; ++v)                   \
        epi.template vec<kind>(row0 + r, col0 + v * W, acc[r][v]);           \
    break;
    QCS_EPILOGUE_CASE(GemmEpilogue::kStore)
    QCS_EPILOGUE_CASE(GemmEpilogue::kScaleMinus)
    QCS_EPILOGUE_CASE(GemmEpilogue::kAdd)
    QCS_EPILOGUE_CASE(GemmEpilogue::kSubtract)
#undef QCS_EPILOGUE_CASE
  }
  // clang-format on
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

// How many tiles of `other` rows (or columns) let tiles of `size` cover the rest of `count`
// exactly (GEMM: 49 = 4 x 6 + 5 x 5; Gram: 49 = 11 x 4 + 5): a remainder tile of one row or
// column has too few FMAs per load to keep the FMA units busy. 0 where none does, or none is
// needed; the remainder is then a tile of its own.
inline int64_t odd_size_tiles(int64_t count, int64_t size, int64_t other) {
  for (int64_t n = 1; n < size && n * other <= count; ++n)
    if ((count - n * other) % size == 0) return n;
  return 0;
}

template <typename T, int NV>
inline void row_sweep(const GemmProblem<T>& p, int64_t col0, const Epilogue<T>& epi) {
  constexpr int MR = QCS_GEMM_MR;
  // Rows in tiles of MR and MR - 1 where that covers them, not a lone remainder row.
  int64_t short_tiles = odd_size_tiles(p.row_end - p.row_begin, MR, MR - 1);
  const int64_t full_end = p.row_end - short_tiles * (MR - 1);
  int64_t row = p.row_begin;
  // The panel's first row tile fetches the next panel's B rows a line per vector and step:
  // the rows lie a row stride apart (3 KB at C = 768), a pattern the hardware prefetcher
  // does not follow, so that panel's first tile would otherwise wait on memory.
  const bool prefetch_next = NV > 1 && col0 + 2 * NV * Vec<T>::kWidth <= p.cols;
  if (prefetch_next && row + MR <= full_end) {
    micro_tile<T, MR, NV, true>(p, row, col0, epi);
    row += MR;
  } else if (prefetch_next && short_tiles > 0) {
    micro_tile<T, MR - 1, NV, true>(p, row, col0, epi);
    row += MR - 1;
    --short_tiles;
  }
  for (; row + MR <= full_end; row += MR) micro_tile<T, MR, NV>(p, row, col0, epi);
  for (; short_tiles > 0; --short_tiles, row += MR - 1)
    micro_tile<T, MR - 1, NV>(p, row, col0, epi);
  // Remaining rows, one template per count so every tile keeps its accumulators in registers.
  // A case per macro call, which clang-format cannot lay out:
  // clang-format off
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
  // clang-format on
}

// Columns [col_begin, col_end) of p: full panels of NV vectors, single vectors, then scalars.
template <typename T>
void column_range(const GemmProblem<T>& p, int64_t col_begin, int64_t col_end, bool stream) {
  constexpr int W = Vec<T>::kWidth;
  constexpr int NV = QCS_GEMM_NV;
  const Epilogue<T> epi{p, stream};
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
  // Streaming needs every vector store aligned, and only pays when each output element is
  // stored once (one k pass; blocked k loops read the output back).
  const bool stream = Vec<T>::kCanStream && p.stream_out && total_k <= kBlock &&
                      reinterpret_cast<uintptr_t>(p.out) % QCS_VEC_BYTES == 0 &&
                      (p.ldo * int64_t(sizeof(T))) % QCS_VEC_BYTES == 0;
  for (int64_t col = 0; col < p.cols; col += kPanel) {
    const int64_t col_end = col + kPanel < p.cols ? col + kPanel : p.cols;
    if (total_k <= kBlock) {
      column_range(p, col, col_end, stream);
      continue;
    }
    GemmProblem<T> part = p;
    part.num_segments = 1;
    bool first = true;
    for (int s = 0; s < p.num_segments; ++s) {
      const GemmSegment<T>& g = p.seg[s];
      for (int64_t k0 = 0; k0 < g.k; k0 += kBlock) {
        part.seg[0] = {
            g.a + k0 * g.a_k_stride, g.a_row_stride, g.a_k_stride,
            g.b + k0 * g.ldb,        g.ldb,          g.k - k0 < kBlock ? g.k - k0 : kBlock};
        part.epilogue = first ? p.epilogue
                              : (p.epilogue == GemmEpilogue::kStore ? GemmEpilogue::kAdd
                                                                    : GemmEpilogue::kSubtract);
        column_range(part, col, col_end, false);
        first = false;
      }
    }
  }
  if (stream) Vec<T>::stream_fence();
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
    if constexpr (W == 16 && NR >= 4) {
      // The first four lane sums of a row in one transposing tree (6 shuffles, 4 adds), not four
      // separate trees: at C = 768 the reductions were an eighth of the Gram's time.
      const vt x = __builtin_shufflevector(acc[r][0], acc[r][1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                           19, 20, 21, 22, 23) +
                   __builtin_shufflevector(acc[r][0], acc[r][1], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                           25, 26, 27, 28, 29, 30, 31);
      const vt y = __builtin_shufflevector(acc[r][2], acc[r][3], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18,
                                           19, 20, 21, 22, 23) +
                   __builtin_shufflevector(acc[r][2], acc[r][3], 8, 9, 10, 11, 12, 13, 14, 15, 24,
                                           25, 26, 27, 28, 29, 30, 31);
      // Lanes 0-3: column 0's partial sums, 4-7: column 2's, 8-11: column 1's, 12-15: column 3's.
      const vt t =
          __builtin_shufflevector(x, y, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
          __builtin_shufflevector(x, y, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
      const vt u =
          t + __builtin_shufflevector(t, t, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
      const vt w =
          u + __builtin_shufflevector(u, u, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
      sums[0] = w[0];
      sums[1] = w[8];
      sums[2] = w[4];
      sums[3] = w[12];
#pragma GCC unroll 8
      for (int c = 4; c < NR; ++c) sums[c] = V::hsum(acc[r][c]);
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

// Gram rows (or columns) in tiles of `tile` and `tile + 1`, on AVX-512 only: a
// (MR + 1) x (NR + 1) tile fits in 32 vector registers, not in 16.
inline int64_t wide_tiles(int64_t count, int64_t tile) {
  return QCS_VEC_BYTES < 64 ? 0 : odd_size_tiles(count, tile, tile + 1);
}

template <typename T, int MR>
inline void gram_row_tile(const T* rows, const T* cols, int64_t n_cols, int64_t n, T* out,
                          int64_t ldo) {
  constexpr int NR = QCS_GRAM_NR;
  int64_t wide = wide_tiles(n_cols, NR);
  const int64_t narrow_end = n_cols - wide * (NR + 1);
  int64_t c = 0;
  for (; c + NR <= narrow_end; c += NR) gram_tile<T, MR, NR>(rows, cols + c * n, n, out + c, ldo);
  for (; wide > 0; --wide, c += NR + 1)
    gram_tile<T, MR, NR + 1>(rows, cols + c * n, n, out + c, ldo);
  // A case per macro call, which clang-format cannot lay out:
  // clang-format off
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
  // clang-format on
}

template <typename T>
void gram_block(const T* rows, int64_t n_rows, const T* cols, int64_t n_cols, int64_t n, T* out,
                int64_t ldo) {
  constexpr int MR = QCS_GRAM_MR;
  int64_t wide = wide_tiles(n_rows, MR);
  const int64_t narrow_end = n_rows - wide * (MR + 1);
  int64_t r = 0;
  for (; r + MR <= narrow_end; r += MR)
    gram_row_tile<T, MR>(rows + r * n, cols, n_cols, n, out + r * ldo, ldo);
  for (; wide > 0; --wide, r += MR + 1)
    gram_row_tile<T, MR + 1>(rows + r * n, cols, n_cols, n, out + r * ldo, ldo);
  // A case per macro call, which clang-format cannot lay out:
  // clang-format off
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
  // clang-format on
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
    gram_block(rows, n_rows, cols + c * n, n_cols - c < chunk ? n_cols - c : chunk, n, out + c,
               ldo);
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

// ---- Row loops in double: distances and the per-matrix epilogues -----------------------
//
// These loops run along a row of n (49) entries, so they are written with explicit vectors of
// doubles plus a one-lane tail (Lanes<L> below; one body serves both): GCC's `omp simd`
// reductions sum their lanes through the stack one by one, and with three or more of them
// per row that was most of these loops' time.

template <int L>
struct Lanes;

// One lane: the tail of a row.
template <>
struct Lanes<1> {
  using real = double;
  using mask = bool;
  template <typename T>
  static real load(const T* p) {
    return double(*p);
  }
  template <typename T>
  static void store(T* p, real v) {
    *p = T(v);
  }
  static real splat(double x) { return x; }
  static real select(mask m, real a, real b) { return m ? a : b; }
  static real sqrt(real x) { return std::sqrt(x); }
};

// A vector of doubles; float data is widened on load and narrowed on store.
template <>
struct Lanes<Vec<double>::kWidth> {
  using VD = Vec<double>;
  static constexpr int kWidth = VD::kWidth;
  using real = VD::type;
  typedef int64_t mask __attribute__((vector_size(QCS_VEC_BYTES)));
  typedef float narrow __attribute__((vector_size(QCS_VEC_BYTES / 2), aligned(4), may_alias));
  template <typename T>
  static real load(const T* p) {
    if constexpr (sizeof(T) == sizeof(double)) return VD::load(p);
    else return __builtin_convertvector(*reinterpret_cast<const narrow*>(p), real);
  }
  template <typename T>
  static void store(T* p, real v) {
    if constexpr (sizeof(T) == sizeof(double)) VD::store(p, v);
    else *reinterpret_cast<narrow*>(p) = __builtin_convertvector(v, narrow);
  }
  static real splat(double x) { return VD::splat(x); }
  static real select(mask m, real a, real b) { return m ? a : b; }
  static real sqrt(real x) {
#if defined(QCS_HAVE_STREAM_STORE) && QCS_VEC_BYTES == 64  // x86: a packed square root
    return real(_mm512_sqrt_pd(__m512d(x)));
#elif defined(QCS_HAVE_STREAM_STORE) && QCS_VEC_BYTES == 32
    return real(_mm256_sqrt_pd(__m256d(x)));
#elif defined(QCS_HAVE_STREAM_STORE) && QCS_VEC_BYTES == 16
    return real(_mm_sqrt_pd(__m128d(x)));
#else
    for (int l = 0; l < kWidth; ++l) x[l] = std::sqrt(x[l]);
    return x;
#endif
  }
};

using Wide = Lanes<Vec<double>::kWidth>;

// body(j, Wide{}) for each full vector of lanes from j, then body(j, Lanes<1>{}) per entry left.
template <typename Body>
__attribute__((always_inline)) inline void sweep(int64_t n, Body&& body) {
  int64_t j = 0;
  for (; j + Wide::kWidth <= n; j += Wide::kWidth) body(j, Wide{});
  for (; j < n; ++j) body(j, Lanes<1>{});
}

// A row's sum: vector lanes plus the tail, added as a tree at the end.
struct RowSum {
  Wide::real lanes{};
  double tail = 0;
  void add(Wide::real x) { lanes += x; }
  void add(double x) { tail += x; }
  double total() const { return Vec<double>::hsum(lanes) + tail; }
};

// A row's count of true masks.
struct RowCount {
  Wide::mask lanes{};
  int64_t tail = 0;
  void add(Wide::mask m) { lanes -= m; }  // true lanes are -1
  void add(bool m) { tail += m ? 1 : 0; }
  int64_t total() const {
    int64_t sum = tail;
    for (int l = 0; l < Wide::kWidth; ++l) sum += lanes[l];
    return sum;
  }
};

template <typename T>
void distances_from_gram(const T* gram, const T* rows, const T* cols, const double* nr,
                         const double* nc, int64_t r0, int64_t r1, int64_t n, int64_t c, T* out) {
  const double tau = RefineThreshold<T>::value;
  for (int64_t i = r0; i < r1; ++i) {
    const T* gi = gram + (i - r0) * n;
    RowCount refine;
    sweep(n, [&](int64_t j, auto lanes) __attribute__((always_inline)) {
      using Ln = decltype(lanes);
      const auto scale = nr[i] + Ln::load(nc + j);
      const auto d2 = scale - 2.0 * Ln::load(gi + j);
      refine.add(d2 <= tau * scale);
      // NaN stays NaN (the compare is false).
      Ln::store(out + i * n + j, Ln::sqrt(Ln::select(d2 < 0.0, Ln::splat(0.0), d2)));
    });
    if (refine.total() == 0) continue;
    for (int64_t j = 0; j < n; ++j) {
      const double scale = nr[i] + nc[j];
      if (scale - 2.0 * double(gi[j]) <= tau * scale) {
        const double d2 = squared_distance(rows + i * c, cols + j * c, c);
        out[i * n + j] = T(std::sqrt(d2 < 0.0 ? 0.0 : d2));  // NaN stays NaN
      }
    }
  }
}

// ---- Per-matrix epilogues (KernelSet::forward_scores and friends), in double -----------

template <typename T>
T extreme(const T* x, int64_t count, bool largest) {
  // Lane-wise extremes, then the lanes: a scalar max chain waits on every compare.
  T e = x[0];
  if (largest) {
#pragma omp simd reduction(max : e)
    for (int64_t k = 1; k < count; ++k) e = x[k] > e ? x[k] : e;
  } else {
#pragma omp simd reduction(min : e)
    for (int64_t k = 1; k < count; ++k) e = x[k] < e ? x[k] : e;
  }
  return e;
}

// M = shift(D) in double, with its row and column sums of squares.
template <typename T>
void shifted_matrix(const T* dist, double extreme, bool similarity, int64_t n, double* out,
                    double* row_sumsq, double* col_sumsq) {
  const double sign = shift_sign(similarity);
  for (int64_t j = 0; j < n; ++j) col_sumsq[j] = 0;
  for (int64_t i = 0; i < n; ++i) {
    RowSum rs;
    sweep(n, [&](int64_t j, auto lanes) __attribute__((always_inline)) {
      using Ln = decltype(lanes);
      const auto v = sign * (Ln::load(dist + i * n + j) - extreme);
      Ln::store(out + i * n + j, v);
      rs.add(v * v);
      Ln::store(col_sumsq + j, Ln::load(col_sumsq + j) + v * v);
    });
    row_sumsq[i] = rs.total();
  }
}

template <typename T>
void forward_scores(const T* dist, double extreme, bool similarity, int64_t n, double weight,
                    double* col_score, double* row_score, double* scratch) {
  double *mat = scratch, *rsq = mat + n * n, *csq = rsq + n, *inv_r = csq + n, *inv_c = inv_r + n;
  shifted_matrix(dist, extreme, similarity, n, mat, rsq, csq);
  for (int64_t i = 0; i < n; ++i) inv_r[i] = 1.0 / clamp_norm(rsq[i]);
  for (int64_t j = 0; j < n; ++j) inv_c[j] = 1.0 / clamp_norm(csq[j]);
  // cols(M) scores the column branch (rows normalised), rows(M) the row branch.
  for (int64_t i = 0; i < n; ++i) {
    const double* mi = mat + i * n;
    const double wr = weight * inv_r[i];
    RowSum row_acc;
    sweep(n, [&](int64_t j, auto lanes) __attribute__((always_inline)) {
      using Ln = decltype(lanes);
      const auto m = Ln::load(mi + j);
      Ln::store(col_score + j, Ln::load(col_score + j) + wr * m);
      row_acc.add(m * Ln::load(inv_c + j));
    });
    row_score[i] += weight * row_acc.total();
  }
}

// Pass 2 of backward_weights, one row i: dL/dD[i, j], W[i, j] = dL/dD / D (0 where D = 0) and,
// for distance matrices (kDScores), the d scores' terms.
template <typename T, bool kDScores>
inline void weight_row(const T* di, const double* mi, int64_t n, double sign, double wr, double wur,
                       double ai, double ir, const double* up_col, const double* inv_c,
                       const double* beta, T* wi, double* col_w, double* d_col, double* row_total,
                       double* row_w, double* row_d) {
  RowSum total, wsum, dsum;
  sweep(n, [&](int64_t j, auto lanes) __attribute__((always_inline)) {
    using Ln = decltype(lanes);
    // d/dM of sum_j u[j] M[i, j] / r_i: u[j] / r_i - M[i, j] (u . M[i]) / r_i^3 (spec, step
    // 3), for the row- and the column-normalised aggregation; dL/dD = -dL/dM (similarity)
    // or +dL/dM (distance).
    const auto m = Ln::load(mi + j);
    const auto ic = Ln::load(inv_c + j);
    const auto gd = sign * (wr * Ln::load(up_col + j) - m * ai + wur * ic - m * Ln::load(beta + j));
    total.add(gd);
    // d|x - y|/dx = (x - y)/|x - y|; zero at zero distance, as torch.cdist. The division
    // runs in every lane (branch-free); the safe denominator keeps the masked-off lanes
    // finite.
    const auto dij = Ln::load(di + j);
    const auto positive = dij > 0.0;
    const auto w =
        Ln::select(positive, gd / Ln::select(positive, dij, Ln::splat(1.0)), Ln::splat(0.0));
    Ln::store(wi + j, w);
    wsum.add(w);
    Ln::store(col_w + j, Ln::load(col_w + j) + w);
    if constexpr (kDScores) {
      Ln::store(d_col + j, Ln::load(d_col + j) + m * ir);
      dsum.add(m * ic);
    }
  });
  *row_total = total.total();
  *row_w = wsum.total();
  *row_d = dsum.total();
}

// Two passes over the matrix: the first builds M = shift(D) with everything its norms and
// the aggregations' backward need; the second writes W.
template <typename T>
double backward_weights(const T* dist, T extreme, bool similarity, int64_t n, double weight,
                        const double* up_col, const double* up_row, double* d_col, double* d_row,
                        T* w, T* row_sums, T* col_sums, int64_t* ties, int64_t* first_tie,
                        double* scratch) {
  double *mat = scratch, *rsq = mat + n * n, *csq = rsq + n, *inv_r = csq + n, *inv_c = inv_r + n,
         *t = inv_c + n, *v = t + n, *alpha = v + n, *beta = alpha + n, *col_w = beta + n;
  for (int64_t j = 0; j < n; ++j) csq[j] = v[j] = col_w[j] = 0;
  const double ext = double(extreme), sign = shift_sign(similarity);
  int64_t count = 0, first = -1;
  for (int64_t i = 0; i < n; ++i) {
    const T* di = dist + i * n;
    double* mi = mat + i * n;
    const double ur = up_row[i];
    RowSum rs, acc;
    RowCount row_ties;
    sweep(n, [&](int64_t j, auto lanes) __attribute__((always_inline)) {
      using Ln = decltype(lanes);
      const auto dij = Ln::load(di + j);
      const auto m = sign * (dij - ext);
      Ln::store(mi + j, m);
      rs.add(m * m);
      Ln::store(csq + j, Ln::load(csq + j) + m * m);
      acc.add(Ln::load(up_col + j) * m);
      Ln::store(v + j, Ln::load(v + j) + ur * m);
      row_ties.add(dij == ext);
    });
    rsq[i] = rs.total();
    t[i] = weight * acc.total();
    const int64_t tied = row_ties.total();
    if (tied != 0 && first < 0) {
      for (int64_t j = 0; j < n; ++j)
        if (di[j] == extreme) {
          first = i * n + j;
          break;
        }
    }
    count += tied;
  }
  *ties = count;
  *first_tie = first;
  for (int64_t i = 0; i < n; ++i) {
    const double r = clamp_norm(rsq[i]);
    inv_r[i] = 1.0 / r;
    alpha[i] = norm_clamped(rsq[i]) ? 0.0 : t[i] / (r * r * r);
  }
  for (int64_t j = 0; j < n; ++j) {
    const double c = clamp_norm(csq[j]);
    inv_c[j] = 1.0 / c;
    beta[j] = norm_clamped(csq[j]) ? 0.0 : weight * v[j] / (c * c * c);
  }
  double total = 0;
  for (int64_t i = 0; i < n; ++i) {
    double row_total, row_w, row_d;
    const T* di = dist + i * n;
    const double* mi = mat + i * n;
    const double wr = weight * inv_r[i], wur = weight * up_row[i];
    if (similarity)
      weight_row<T, false>(di, mi, n, sign, wr, wur, alpha[i], inv_r[i], up_col, inv_c, beta,
                           w + i * n, col_w, d_col, &row_total, &row_w, &row_d);
    else
      weight_row<T, true>(di, mi, n, sign, wr, wur, alpha[i], inv_r[i], up_col, inv_c, beta,
                          w + i * n, col_w, d_col, &row_total, &row_w, &row_d);
    total += row_total;
    row_sums[i] = T(row_w);
    if (!similarity) d_row[i] += row_d;  // the d scores, for the theta gradient
  }
  for (int64_t j = 0; j < n; ++j) col_sums[j] = T(col_w[j]);
  return total;
}

}  // namespace

const KernelTable& QCS_ISA_FN() {
  static const KernelTable table{
      QCS_ISA_NAME,
      {&gemm<float>, &gram<float>, &squared_distance<float>, &squared_norm<float>,
       &distances_from_gram<float>, &extreme<float>, &forward_scores<float>,
       &backward_weights<float>},
      {&gemm<double>, &gram<double>, &squared_distance<double>, &squared_norm<double>,
       &distances_from_gram<double>, &extreme<double>, &forward_scores<double>,
       &backward_weights<double>},
  };
  return table;
}

}  // namespace qcs::cpu
