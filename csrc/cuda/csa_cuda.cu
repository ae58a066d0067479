// CUDA kernels of the CSA ops, registered for the CUDA dispatch key of qcs_ext.
// The kernels are in csa_kernels.cuh, the host orchestration (shared with the emulated
// build that tests these sources on the CPU) in csa_host.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <atomic>

#include "csa_kernels.cuh"

namespace qcs::cuda {

// Whether the CUDA runtime finds an image of our kernels (SASS for the device's
// architecture, or PTX it can JIT-compile) for device `index`; asked once per device.
// cudaFuncGetAttributes fails with cudaErrorNoKernelImageForDevice (or
// cudaErrorInvalidDeviceFunction) exactly when a launch would.
inline bool kernel_image_fits(int index) {
  static std::array<std::atomic<int>, 64> known{};  // 0 unknown, 1 fits, 2 does not
  if (index < 0 || index >= static_cast<int>(known.size())) return false;
  const int cached = known[index].load(std::memory_order_relaxed);
  if (cached != 0) return cached == 1;
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(index));
  cudaFuncAttributes attr{};
  const cudaError_t err =
      cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(&kern::sqnorm_kernel<float, float>));
  if (err != cudaSuccess) (void)cudaGetLastError();  // clear the sticky-free error state
  const bool fits = err == cudaSuccess;
  TORCH_CHECK(fits || err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction,
              "qcs_ext: cudaFuncGetAttributes failed on device ", index, ": ", cudaGetErrorString(err));
  known[index].store(fits ? 1 : 2, std::memory_order_relaxed);
  return fits;
}

}  // namespace qcs::cuda

#define QCS_HOST_STREAM at::cuda::getCurrentCUDAStream().stream()
#define QCS_HOST_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define QCS_HOST_GUARD(t) const c10::cuda::CUDAGuard qcs_device_guard((t).device())
#define QCS_HOST_DEVICE c10::DeviceType::CUDA
#define QCS_HOST_IMAGE_FITS(index) ::qcs::cuda::kernel_image_fits(index)
#define QCS_HOST_GEMM_INPUT(t) (t)
#define QCS_HOST_HALF __half
#define QCS_HOST_BF16 __nv_bfloat16
#include "csa_host.h"

TORCH_LIBRARY_IMPL(qcs_ext, CUDA, m) { qcs::host::register_kernels(m); }

// qcs_ext::kernel_image_fits(device) -> bool: read by qcs_ext.has_fused_kernel("cuda"),
// which must not claim kernels a device cannot run (the wrappers then use the reference).
TORCH_LIBRARY_FRAGMENT(qcs_ext, m) {
  m.def("kernel_image_fits(int device) -> bool",
        [](int64_t device) { return ::qcs::cuda::kernel_image_fits(static_cast<int>(device)); });
}
