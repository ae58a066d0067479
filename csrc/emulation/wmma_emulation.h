// The warp-level matrix API (nvcuda::wmma, <mma.h>) for the CUDA emulation: the subset
// the kernels use, with the hardware's input rounding, checked as the GPU requires.
//
// What is emulated exactly:
//   * shapes m16n16k8 (precision::tf32 inputs, float accumulator) and m16n16k16 (16-bit
//     inputs: half or bfloat16, any type that converts exactly to float; float accumulator);
//   * TF32 inputs: the tensor cores read only the top 19 bits of a float (sign, exponent,
//     10 mantissa bits): mma_sync drops the low 13 bits of every A and B element, as the
//     hardware does with unconverted floats; __float_to_tf32 rounds to nearest, ties away
//     from zero (cvt.rna.tf32.f32), so a kernel that splits x = big + small with it
//     (3xTF32) gets the split the GPU gets;
//   * products of TF32 or 16-bit inputs are exact (at most 22-bit significands); the k
//     products and the accumulator are summed in double and rounded to float once per
//     mma_sync. The hardware's adder tree may differ from this in the last bit of an
//     mma's result: tests compare with a tolerance, never bitwise against a GPU.
//
// What is checked (the GPU's rules; a violation is reported with the kernel and block,
// then abort): the pointer of a load or store is 32-byte aligned (256 bits), ldm is a
// multiple of 16 bytes, and every lane of the warp takes part (the operations are warp
// collectives: each one passes a warp barrier, so a missing lane is a deadlock that the
// watchdog reports).
//
// Fragment layout: which lane holds which element of a fragment is unspecified in CUDA,
// so kernels may only touch fragment elements uniformly (x[i] for every i, the same
// operation). Here every lane holds a whole tile (num_elements is the tile size, not the
// hardware's per-lane count); a load reads each element from one lane (element e by lane
// e % 32) and shares it through the warp's exchange, so every lane has all of A and B;
// mma_sync computes and a store writes accumulator element e in lane e % 32 only. The
// race checker therefore sees one read or write per element, from a lane of the warp
// that issued the operation.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace nvcuda::wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

namespace detail {

template <typename Use, int M, int N, int K>
struct TileShape;
template <int M, int N, int K>
struct TileShape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct TileShape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct TileShape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

// What a fragment element is stored as: TF32 fragments hold floats (of which the tensor
// cores read 19 bits), the others their own type.
template <typename T>
struct Storage {
  using type = T;
};
template <>
struct Storage<precision::tf32> {
  using type = float;
};

template <int M, int N, int K, typename T>
constexpr bool supported_shape() {
  if constexpr (std::is_same_v<T, precision::tf32>) return M == 16 && N == 16 && K == 8;
  if constexpr (std::is_same_v<T, float>) return M == 16 && N == 16 && (K == 8 || K == 16);
  return M == 16 && N == 16 && K == 16 && sizeof(T) == 2;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "qcs emulation: kernel %s, block (%u, %u, %u), thread %u: wmma %s\n", qcs_emu::tl_kernel,
               blockIdx.x, blockIdx.y, blockIdx.z, qcs_emu::tl_linear, what);
  std::fflush(stderr);
  std::abort();
}

// The byte address modulo 32 of an element pointer (a raw pointer or a shared array's).
template <typename P>
long long misalignment(P p) {
  if constexpr (std::is_pointer_v<P>) return static_cast<long long>(reinterpret_cast<std::uintptr_t>(p) % 32);
  else return p.byte_offset() % 32;
}
template <typename P>
void check_operand(P p, unsigned ldm, std::size_t elem_size) {
  if (misalignment(p) != 0) fail("load/store pointer not 32-byte (256-bit) aligned");
  if ((static_cast<std::size_t>(ldm) * elem_size) % 16 != 0) fail("ldm not a multiple of 16 bytes");
}

// Lane-wise exchange of a whole tile: every lane puts the elements it read (e % 32 ==
// lane) into the warp's buffer, a warp barrier, and every lane copies the full tile.
// Two alternating buffers per warp, as for shuffles: one barrier per exchange.
inline double* tile_buffer() {
  qcs_emu::BlockState& st = *qcs_emu::tl_block;
  unsigned char& par = st.tile_parity[qcs_emu::tl_linear];
  double* buf = st.tiles.data() + (2 * qcs_emu::warp_id() + par) * qcs_emu::BlockState::kTileExchange;
  par ^= 1;
  return buf;
}
inline void warp_barrier() {
  if (qcs_emu::warp_lanes() != 32) fail("used by a partial warp (the block size must be a multiple of 32)");
  qcs_emu::tl_block->warp[qcs_emu::warp_id()]->arrive_and_wait();
}

}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
class fragment {
  static_assert(detail::supported_shape<M, N, K, T>(), "the emulated wmma supports m16n16k8 (tf32) and m16n16k16");

 public:
  using storage_type = typename detail::Storage<T>::type;
  using shape = detail::TileShape<Use, M, N, K>;
  static constexpr int num_elements = shape::rows * shape::cols;
  storage_type x[num_elements];  // element (r, c) at x[r * cols + c] (see the header)
};

// TF32 rounding of the conversion instruction: to nearest, ties away from zero.
inline float __float_to_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7F800000u) != 0x7F800000u) bits = (bits + 0x1000u) & ~0x1FFFu;  // not Inf or NaN
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

template <typename Use, int M, int N, int K, typename T, typename L>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, typename fragment<Use, M, N, K, T, L>::storage_type v) {
  for (auto& e : f.x) e = v;
}

namespace detail {
template <typename Frag, typename P>
void load(Frag& f, P p, unsigned ldm, bool row_major_memory) {
  using S = typename Frag::storage_type;
  constexpr int rows = Frag::shape::rows, cols = Frag::shape::cols;
  check_operand(p, ldm, sizeof(S));
  double* buf = tile_buffer();
  const unsigned lane = qcs_emu::lane();
  for (int e = static_cast<int>(lane); e < rows * cols; e += 32) {
    const int r = e / cols, c = e % cols;
    const long long at = row_major_memory ? static_cast<long long>(r) * ldm + c : static_cast<long long>(c) * ldm + r;
    buf[e] = static_cast<double>(static_cast<float>(static_cast<S>(p[at])));
  }
  warp_barrier();
  for (int e = 0; e < rows * cols; ++e) f.x[e] = static_cast<S>(static_cast<float>(buf[e]));
}
// The value the tensor cores multiply: TF32 keeps 19 bits of the float.
template <typename T, typename S>
double multiplicand(S v) {
  float f = static_cast<float>(v);
  if constexpr (std::is_same_v<T, precision::tf32>) {
    uint32_t bits;
    std::memcpy(&bits, &f, 4);
    bits &= ~0x1FFFu;
    std::memcpy(&f, &bits, 4);
  }
  return static_cast<double>(f);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename L, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, P p, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "an accumulator load takes a layout_t");
  detail::load(f, p, ldm, std::is_same_v<L, row_major>);
}
template <int M, int N, int K, typename T, typename P>
void load_matrix_sync(fragment<accumulator, M, N, K, T>& f, P p, unsigned ldm, layout_t layout) {
  detail::load(f, p, ldm, layout == mem_row_major);
}

template <int M, int N, int K, typename T, typename P>
void store_matrix_sync(P p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm, layout_t layout) {
  using Frag = fragment<accumulator, M, N, K, T>;
  detail::check_operand(p, ldm, sizeof(typename Frag::storage_type));
  detail::warp_barrier();  // a collective: every lane arrives before any writes
  for (int e = static_cast<int>(qcs_emu::lane()); e < Frag::num_elements; e += 32) {
    const int r = e / N, c = e % N;
    const long long at =
        layout == mem_row_major ? static_cast<long long>(r) * ldm + c : static_cast<long long>(c) * ldm + r;
    p[at] = f.x[e];
  }
}

// d = a b + c (16 x 16 x K), products exact, one rounding to float per element. A lane
// computes only the accumulator elements it owns (e % 32 == lane: the ones its store
// writes); its copies of the others are left as they were (a kernel may only touch
// fragment elements uniformly, so it never reads them for a position).
template <int M, int N, int K, typename T, typename LA, typename LB, typename C>
void mma_sync(fragment<accumulator, M, N, K, C>& d, const fragment<matrix_a, M, N, K, T, LA>& a,
              const fragment<matrix_b, M, N, K, T, LB>& b, const fragment<accumulator, M, N, K, C>& c) {
  for (int e = static_cast<int>(qcs_emu::lane()); e < M * N; e += 32) {
    const int i = e / N, j = e % N;
    double acc = static_cast<double>(c.x[e]);
    for (int k = 0; k < K; ++k)
      acc += detail::multiplicand<T>(a.x[i * K + k]) * detail::multiplicand<T>(b.x[k * N + j]);
    d.x[e] = static_cast<float>(acc);
  }
}

}  // namespace nvcuda::wmma
