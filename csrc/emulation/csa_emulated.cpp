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
#define QCS_HOST_IMAGE_FITS(index) ::qcs_emu_host::kernel_image_fits(index)
#define QCS_HOST_GEMM_INPUT(t) ::qcs_emu_host::cublas_input(t)
#define QCS_HOST_HALF c10::Half  // the emulated wmma takes any 16-bit type that converts to float
#define QCS_HOST_BF16 c10::BFloat16

#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdlib>

namespace qcs_emu_host {

// The CUDA runtime's answer to "is there a kernel image for this device": yes, unless
// QCS_EMULATED_NO_KERNEL_IMAGE=1 plays a GPU newer than every image of the build.
inline bool kernel_image_fits(int /*index*/) {
  const char* v = std::getenv("QCS_EMULATED_NO_KERNEL_IMAGE");
  return v == nullptr || v[0] != '1';
}

// A float32 GEMM operand as cuBLAS reads it: where the global switches allow TF32
// (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision("high"/"medium"))
// and no at::NoTF32Guard is active, the tensor cores see only the top 10 mantissa bits
// (the low 13 bits dropped). Emulated so that the CPU tests see what a GPU would.
inline at::Tensor cublas_input(const at::Tensor& t) {
  qcs_emu::note_launch("cuBLAS GEMM operand");  // two per GEMM, in the launch log
  if (t.scalar_type() != at::kFloat || at::NoTF32Guard::should_disable_tf32() || !at::globalContext().allowTF32CuBLAS())
    return t;
  return t.contiguous().view(at::kInt).bitwise_and(~0x1FFF).view(at::kFloat);
}

}  // namespace qcs_emu_host

#include "csa_host.h"
#include "schemas.h"

PyMODINIT_FUNC PyInit__emulated(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_emulated", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(qcs_emulated, m) {
  qcs::define_csa_ops(m);
  // As qcs_ext::kernel_image_fits of the CUDA build (see csrc/cuda/csa_cuda.cu).
  m.def("kernel_image_fits(int device) -> bool",
        [](int64_t device) { return ::qcs_emu_host::kernel_image_fits(static_cast<int>(device)); });
  // The kernels launched (and cuBLAS operands passed) since the last call, then cleared.
  m.def("launch_log() -> str[]", []() {
    std::lock_guard<std::mutex> lock(qcs_emu::launch_log_mutex());
    std::vector<std::string> out;
    out.swap(qcs_emu::launch_log());
    return out;
  });
}

TORCH_LIBRARY_IMPL(qcs_emulated, CPU, m) { qcs::host::register_kernels(m); }
