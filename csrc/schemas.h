// The schemas of the CSA ops, shared by every library that defines them: qcs_ext (the CPU
// and CUDA kernels, ops.cpp) and qcs_emulated (the CUDA kernel sources run on the host
// under the emulation layer, emulation/csa_emulated.cpp), so both take the same arguments.
// Python side of each op (fake kernel, autograd, public wrapper): qcs_ext/ops.py.
#pragma once

#include <torch/library.h>

namespace qcs {

// Declares the four CSA ops in library `m` (inside a TORCH_LIBRARY block).
inline void define_csa_ops(torch::Library& m) {
  m.def(
      "cross_similarity_forward(Tensor qk, Tensor theta, float gamma, str mode, str scope)"
      " -> (Tensor maps, Tensor distances, Tensor extrema)");
  m.def(
      "cross_similarity_backward(Tensor grad_maps, Tensor maps, Tensor qk, Tensor distances,"
      " Tensor extrema, Tensor theta, float gamma, str mode, str scope)"
      " -> (Tensor grad_qk, Tensor grad_theta)");
  m.def(
      "pair_similarity_forward(Tensor qk, str scope)"
      " -> (Tensor maps, Tensor distances, Tensor extrema)");
  m.def(
      "pair_similarity_backward(Tensor grad_maps, Tensor maps, Tensor qk, Tensor distances,"
      " Tensor extrema, str scope) -> Tensor grad_qk");
}

}  // namespace qcs
