// Portable build of the inner kernels: 16-byte vectors (SSE2 on x86-64, NEON on arm64).
#include <cstdint>
#define QCS_ISA_NAME "baseline"
#define QCS_ISA_FN kernels_baseline
#define QCS_VEC_BYTES 16
#define QCS_GEMM_MR 4
#define QCS_GEMM_NV 3
#define QCS_GRAM_MR 3  // 3 x 3 accumulators + 3 + 3 operand vectors
#define QCS_GRAM_NR 3
#include "kernels_impl.inl"
