// Shared scalar math and enumerations of Cross Similarity Attention (CSA).
//
// Used by the CPU kernels, the CUDA kernels and the host emulation of the CUDA kernels,
// so everything here is header-only, free of ATen, and callable on host and device.
// The math is specified in docs/csa-spec.md; the names below follow it.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define QCS_HD __host__ __device__ __forceinline__
#else
#define QCS_HD inline
#endif

namespace qcs {

// Same epsilon as torch.nn.functional.normalize: norms are clamped to it.
constexpr double kNormEps = 1e-12;

enum class Mode : int32_t { SD = 0, S = 1, D = 2 };
enum class Scope : int32_t { Batch = 0, Sample = 1 };

// Branch order, always: a, p, n, n2.
enum Branch : int32_t { kA = 0, kP = 1, kN = 2, kN2 = 3 };

// The four distance matrices, in the order they are stored in the `distances` tensor
// ([M, B, N, N]): rows come from `row_branch`, columns from `col_branch`.
// Similarity matrices (same class) are shifted as max - D, distance matrices (cross
// class) as D - min.
enum Matrix : int32_t { kPA = 0, kN2N = 1, kNA = 2, kN2P = 3 };
QCS_HD int32_t row_branch(int32_t m) {
  return m == kPA ? kP : m == kN2N ? kN2 : m == kNA ? kN : kN2;
}
QCS_HD int32_t col_branch(int32_t m) { return m == kPA ? kA : m == kN2N ? kN : m == kNA ? kA : kP; }
QCS_HD bool is_similarity(int32_t m) { return m == kPA || m == kN2N; }

// Which score of which branch each aggregation of a matrix feeds:
//   cols(M) scores the column branch, rows(M) the row branch;
//   similarity matrices feed `s`, distance matrices feed `d`.
// (a: s=cols(S_pa), d=cols(E_na); p: s=rows(S_pa), d=cols(E_n2p);
//  n: s=cols(S_n2n), d=rows(E_na); n2: s=rows(S_n2n), d=rows(E_n2p).)

// Whether matrix m is needed at all for a mode (mode "s" never reads the cross-class
// matrices, mode "d" never reads the same-class ones).
QCS_HD bool matrix_used(int32_t m, Mode mode) {
  return is_similarity(m) ? mode != Mode::D : mode != Mode::S;
}

// score = s_weight * s + d_weight * d.  k = gamma + tanh(theta).
QCS_HD double fusion_k(double theta, double gamma) { return gamma + std::tanh(theta); }
QCS_HD double s_weight(Mode mode) { return mode == Mode::D ? 0.0 : 1.0; }
QCS_HD double d_weight(Mode mode, double k) {
  return mode == Mode::SD ? k : (mode == Mode::D ? 1.0 : 0.0);
}
// d(score)/d(theta) per unit of d: only mode "sd" lets theta reach the output.
QCS_HD double dk_dtheta(Mode mode, double theta) {
  if (mode != Mode::SD) return 0.0;
  const double t = std::tanh(theta);
  return 1.0 - t * t;
}

QCS_HD double clamp_norm(double sumsq) {
  const double n = std::sqrt(sumsq);
  return n > kNormEps ? n : kNormEps;
}
// Whether the norm was clamped: then F.normalize's gradient through the norm is zero.
QCS_HD bool norm_clamped(double sumsq) { return !(std::sqrt(sumsq) > kNormEps); }

// The shift as a sign, also dM/dD: M = shift_sign * (D - extreme) is exactly max - D for
// similarity matrices (sign -1) and D - min for distance ones (+1).
QCS_HD double shift_sign(bool similarity) { return similarity ? -1.0 : 1.0; }

// Shifted matrix entry from a distance and the extreme of its matrix.
QCS_HD double shifted(double dist, double extreme, bool similarity) {
  return similarity ? extreme - dist : dist - extreme;
}

// Relative threshold below which a distance from the Gram identity
// |x|^2 + |y|^2 - 2 x.y is recomputed directly as sum (x - y)^2: there the Gram form
// loses most of its digits to cancellation (and duplicated tokens must give exactly 0).
template <typename T>
struct RefineThreshold;
template <>
struct RefineThreshold<float> {
  static constexpr double value = 1e-2;
};
template <>
struct RefineThreshold<double> {
  static constexpr double value = 1e-5;
};

}  // namespace qcs
