// AVX-512 build of the inner kernels (picked at run time when the CPU has AVX-512F).
#include "cpu_kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#include <cstdint>
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")
#define QCS_ISA_NAME "avx512"
#define QCS_ISA_FN kernels_avx512
#define QCS_VEC_BYTES 64
#define QCS_GEMM_MR 6  // 6 x 4 zmm accumulators + 4 B vectors + 1 broadcast <= 32 registers
#define QCS_GEMM_NV 4
#define QCS_GRAM_MR 4  // 4 x 4 accumulators + 4 + 4 operand vectors
#define QCS_GRAM_NR 4
#include "kernels_impl.inl"
#else
// Not an x86 CPU: this instruction set does not exist, fall back to the portable build.
namespace qcs::cpu {
const KernelTable& kernels_avx512() { return kernels_baseline(); }
}  // namespace qcs::cpu
#endif
