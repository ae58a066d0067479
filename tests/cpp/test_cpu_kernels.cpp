// Native tests of the CPU inner kernels (csrc/cpu/kernels_*.cpp) against naive loops, for
// every instruction set this CPU supports. The kernels are free of ATen, so this builds
// with a plain compiler — also under AddressSanitizer/UBSan (tests/test_cpu_native.py).
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/cpu_kernels.h"

namespace qcs::cpu {
// The runtime selection lives in the ATen driver; this test calls the tables directly.
const KernelTable& active_kernels() { return kernels_baseline(); }
}  // namespace qcs::cpu

using namespace qcs::cpu;

static int passed = 0, failed = 0;

static void expect(bool ok, const char* what, const char* isa, int size_case) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s [%s, case %d]\n", what, isa, size_case);
  }
}

template <typename T>
static std::vector<T> random_vector(size_t n, std::mt19937& rng) {
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<T> v(n);
  for (auto& x : v) x = T(dist(rng));
  return v;
}

template <typename T>
static double tolerance() { return sizeof(T) == 4 ? 2e-4 : 1e-11; }

template <typename T>
static void test_gemm(const KernelSet<T>& k, const char* isa, std::mt19937& rng) {
  // rows, k1, k2, cols: odd sizes leave partial micro-tiles and scalar column tails.
  const int cases[][4] = {{1, 1, 0, 1}, {7, 5, 3, 17}, {13, 49, 49, 70}, {49, 49, 49, 768},
                          {6, 2, 9, 129}, {13, 300, 290, 70}, {5, 600, 0, 33}};
  int idx = 0;
  for (const auto& c : cases) {
    const int64_t rows = c[0], k1 = c[1], k2 = c[2], cols = c[3];
    // Segment 1: A as-is [rows, k1]; segment 2: A transposed, stored [k2, rows].
    auto a1 = random_vector<T>(rows * k1, rng), a2 = random_vector<T>(k2 * rows, rng);
    auto b1 = random_vector<T>(k1 * cols, rng), b2 = random_vector<T>(k2 * cols, rng);
    auto x = random_vector<T>(rows * cols, rng), scale = random_vector<T>(rows, rng);
    // epi 0: store, 1: scale-minus, 2: scale-minus with streaming stores (taken where the
    // rows are vector-aligned: the 768-column case; elsewhere the plain path again).
    for (int epi = 0; epi < 3; ++epi) {
      const int64_t r0 = rows > 2 ? 1 : 0;  // a row range not starting at 0
      std::vector<T> buffer((rows - r0) * cols + 64, T(-7));
      T* out = buffer.data();
      while (reinterpret_cast<uintptr_t>(out) % 64 != 0) ++out;
      GemmProblem<T> p{};
      p.seg[0] = {a1.data(), k1, 1, b1.data(), cols, k1};
      p.seg[1] = {a2.data(), 1, rows, b2.data(), cols, k2};
      p.num_segments = k2 > 0 ? 2 : 1;
      p.row_begin = r0;
      p.row_end = rows;
      p.cols = cols;
      p.out = out;
      p.out_row0 = r0;
      p.ldo = cols;
      p.epilogue = epi == 0 ? GemmEpilogue::kStore : GemmEpilogue::kScaleMinus;
      p.stream_out = epi == 2;
      p.scale = scale.data();
      p.x = x.data();
      p.ldx = cols;
      k.gemm(p);
      double worst = 0;
      for (int64_t i = r0; i < rows; ++i) {
        for (int64_t j = 0; j < cols; ++j) {
          double acc = 0, mag = 0;
          for (int64_t q = 0; q < k1; ++q) {
            acc += double(a1[i * k1 + q]) * b1[q * cols + j];
            mag += std::fabs(double(a1[i * k1 + q]) * b1[q * cols + j]);
          }
          for (int64_t q = 0; q < k2; ++q) {
            acc += double(a2[q * rows + i]) * b2[q * cols + j];
            mag += std::fabs(double(a2[q * rows + i]) * b2[q * cols + j]);
          }
          const double want = epi == 0 ? acc : double(scale[i]) * x[i * cols + j] - acc;
          worst = std::fmax(worst, std::fabs(out[(i - r0) * cols + j] - want) / (mag + 1.0));
        }
      }
      expect(worst < tolerance<T>(),
             epi == 0 ? "gemm store" : epi == 1 ? "gemm scale-minus" : "gemm streamed scale-minus",
             isa, idx);
    }
    ++idx;
  }
}

template <typename T>
static void test_gram_and_norms(const KernelSet<T>& k, const char* isa, std::mt19937& rng) {
  const int cases[][3] = {{1, 1, 1}, {5, 7, 3}, {49, 49, 768}, {9, 13, 33}, {4, 4, 16}};
  int idx = 0;
  for (const auto& c : cases) {
    const int64_t nr = c[0], nc = c[1], n = c[2];
    auto rows = random_vector<T>(nr * n, rng), cols = random_vector<T>(nc * n, rng);
    const int64_t ldo = nc + 3;
    std::vector<T> out(nr * ldo, T(-7));
    k.gram(rows.data(), nr, cols.data(), nc, n, out.data(), ldo);
    double worst = 0;
    for (int64_t i = 0; i < nr; ++i)
      for (int64_t j = 0; j < nc; ++j) {
        double acc = 0, mag = 0;
        for (int64_t q = 0; q < n; ++q) {
          acc += double(rows[i * n + q]) * cols[j * n + q];
          mag += std::fabs(double(rows[i * n + q]) * cols[j * n + q]);
        }
        worst = std::fmax(worst, std::fabs(out[i * ldo + j] - acc) / (mag + 1.0));
      }
    bool padding_untouched = true;
    for (int64_t i = 0; i < nr; ++i)
      for (int64_t j = nc; j < ldo; ++j) padding_untouched &= out[i * ldo + j] == T(-7);
    expect(worst < tolerance<T>(), "gram", isa, idx);
    expect(padding_untouched, "gram writes only its block", isa, idx);
    double sq = 0, sd = 0;
    for (int64_t q = 0; q < n; ++q) {
      sq += double(rows[q]) * rows[q];
      sd += (double(rows[q]) - cols[q]) * (double(rows[q]) - cols[q]);
    }
    expect(std::fabs(k.squared_norm(rows.data(), n) - sq) <= tolerance<T>() * (sq + 1), "squared_norm", isa, idx);
    expect(std::fabs(k.squared_distance(rows.data(), cols.data(), n) - sd) <= tolerance<T>() * (sd + 1),
           "squared_distance", isa, idx);
    expect(k.squared_distance(rows.data(), rows.data(), n) == 0.0, "squared_distance of a duplicate is 0", isa, idx);
    ++idx;
  }
}

int main() {
  std::vector<const KernelTable*> tables = {&kernels_baseline()};
#if defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) tables.push_back(&kernels_avx2());
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    tables.push_back(&kernels_avx512());
#endif
  std::mt19937 rng(1234);
  for (const KernelTable* t : tables) {
    test_gemm(t->f32, t->isa, rng);
    test_gemm(t->f64, t->isa, rng);
    test_gram_and_norms(t->f32, t->isa, rng);
    test_gram_and_norms(t->f64, t->isa, rng);
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
