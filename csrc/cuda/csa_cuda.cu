// CUDA kernels of the CSA ops, registered for the CUDA dispatch key of qcs_ext.
// The kernels are in csa_kernels.cuh, the host orchestration (shared with the emulated
// build that tests these sources on the CPU) in csa_host.h.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#define QCS_HOST_STREAM at::cuda::getCurrentCUDAStream().stream()
#define QCS_HOST_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define QCS_HOST_GUARD(t) const c10::cuda::CUDAGuard qcs_device_guard((t).device())
#define QCS_HOST_DEVICE c10::DeviceType::CUDA
#include "csa_host.h"

TORCH_LIBRARY_IMPL(qcs_ext, CUDA, m) { qcs::host::register_kernels(m); }
