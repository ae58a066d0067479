// Registration of the CPU kernels of the CSA ops (defined in csa_cpu.cpp), called from ops.cpp.
#pragma once

#include <torch/library.h>

namespace qcs::cpu {

// cross_similarity_forward / _backward, pair_similarity_forward / _backward for the CPU
// dispatch key (inside a TORCH_LIBRARY_IMPL(..., CPU, m) block).
void register_kernels(torch::Library& m);

// Declares and implements cpu_isa() -> str: the instruction set the CPU kernels run with
// (baseline, avx2 or avx512; QCS_CPU_ISA forces one). Inside a TORCH_LIBRARY block.
void define_cpu_isa(torch::Library& m);

}  // namespace qcs::cpu
