// The schema strings of the CSA ops, shared by every library that defines them:
// qcs_ext (the real CPU/CUDA kernels, ops.cpp) and qcs_emulated (the CUDA kernel sources
// executed on the host under the emulation layer), so both always take the same arguments.
#pragma once

#define QCS_CROSS_FORWARD_SCHEMA                                                        \
  "cross_similarity_forward(Tensor qk, Tensor theta, float gamma, str mode, str scope)" \
  " -> (Tensor maps, Tensor distances, Tensor extrema)"
#define QCS_CROSS_BACKWARD_SCHEMA                                                         \
  "cross_similarity_backward(Tensor grad_maps, Tensor maps, Tensor qk, Tensor distances," \
  " Tensor extrema, Tensor theta, float gamma, str mode, str scope)"                      \
  " -> (Tensor grad_qk, Tensor grad_theta)"
#define QCS_PAIR_FORWARD_SCHEMA                                                              \
  "pair_similarity_forward(Tensor qk, str scope) -> (Tensor maps, Tensor distances, Tensor " \
  "extrema)"
#define QCS_PAIR_BACKWARD_SCHEMA                                                         \
  "pair_similarity_backward(Tensor grad_maps, Tensor maps, Tensor qk, Tensor distances," \
  " Tensor extrema, str scope) -> Tensor grad_qk"

#define QCS_DEFINE_SCHEMAS(m)           \
  do {                                  \
    (m).def(QCS_CROSS_FORWARD_SCHEMA);  \
    (m).def(QCS_CROSS_BACKWARD_SCHEMA); \
    (m).def(QCS_PAIR_FORWARD_SCHEMA);   \
    (m).def(QCS_PAIR_BACKWARD_SCHEMA);  \
  } while (0)
