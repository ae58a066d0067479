// The qcs_ext op library: its schemas (schemas.h) and the CPU kernels (cpu/csa_cpu.cpp);
// the CUDA kernels register themselves in cuda/csa_cuda.cu. Autograd, fake (meta) kernels
// and the public Python functions: qcs_ext/ops.py.
//
// Layout of the tensors shared by the ops (M = 4 matrices for the quadruplet, 1 for the
// pair; branches a, p, n, n2; matrices D_pa, D_n2n, D_na, D_n2p, see csa_common.h):
//   qk         [4|2, B, N, C]  query/key features of each branch
//   maps       [4|2, B, N]     softmax attention maps (the output)
//   distances  [M, B, N, N]    Euclidean distance matrices, saved for backward
//   extrema    [M, B]          max (similarity) / min (distance) used for each shift;
//                              with scope="batch" every column holds the batch extreme
#include <Python.h>
#include <torch/library.h>

#include "cpu/csa_cpu.h"
#include "schemas.h"

// A bare module: importing qcs_ext._C runs the static registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(qcs_ext, m) {
  qcs::define_csa_ops(m);
  qcs::cpu::define_cpu_isa(m);
}

TORCH_LIBRARY_IMPL(qcs_ext, CPU, m) { qcs::cpu::register_kernels(m); }
