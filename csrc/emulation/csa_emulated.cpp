// qcs_ext._emulated: the CUDA kernels of csrc/cuda, compiled for the host and run on the
// CPU through the emulation layer (cuda_emulation.h), registered as the CPU kernels of
// the `qcs_emulated` library (same schemas as qcs_ext). The host code, the launch
// configuration and the kernels are the very sources the CUDA build uses; only the
// GEMMs run on ATen's CPU BLAS instead of cuBLAS. See qcs_ext/emulated.py.
#include <Python.h>
#include <torch/library.h>

#include "cuda_emulation.h"  // before the kernels: makes the CUDA dialect plain C++

#define QCS_HOST_STREAM nullptr
#define QCS_HOST_LAUNCH_CHECK() ((void)0)
#define QCS_HOST_GUARD(t) ((void)0)
#define QCS_HOST_DEVICE c10::DeviceType::CPU
#include "csa_host.h"
#include "schemas.h"

PyMODINIT_FUNC PyInit__emulated(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emulated", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(qcs_emulated, m) { qcs::define_csa_ops(m); }

TORCH_LIBRARY_IMPL(qcs_emulated, CPU, m) { qcs::host::register_kernels(m); }
