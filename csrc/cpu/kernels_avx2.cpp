// AVX2 + FMA build of the inner kernels (picked at run time without AVX-512).
#include "cpu_kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#include <cstdint>
#pragma GCC target("avx2,fma")
#define QCS_ISA_NAME "avx2"
#define QCS_ISA_FN kernels_avx2
#define QCS_VEC_BYTES 32
#define QCS_GEMM_MR 4  // 4 x 3 ymm accumulators + 3 B vectors + 1 broadcast = 16 registers
#define QCS_GEMM_NV 3
#define QCS_GRAM_MR 3  // 3 x 3 accumulators + 3 + 3 operand vectors
#define QCS_GRAM_NR 3
#include "kernels_impl.inl"
#else
// Not an x86 CPU: this instruction set does not exist, fall back to the portable build.
namespace qcs::cpu {
const KernelTable& kernels_avx2() { return kernels_baseline(); }
}  // namespace qcs::cpu
#endif
