// Argument checks of the CSA ops, shared by the CPU kernels (cpu/csa_cpu.cpp) and the CUDA
// host code (cuda/csa_host.h, also built under emulation).
//
// The ops are public through torch.ops, so they check their own arguments even though the
// Python wrappers (qcs_ext/ops.py) check first. The messages and exception types are those
// of qcs_ext/_checks.py word for word (shapes printed as Python tuples, dtypes as
// torch.float32, ...): a bad call reads the same whichever layer caught it
// (tests/test_ops.py::test_native_checks_match_python_checks).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <initializer_list>
#include <sstream>
#include <string>

#include "csa_common.h"

namespace qcs::checks {

// A shape as Python prints a tuple: (4, 2, 3), (5,), ().
inline std::string shape_repr(at::IntArrayRef sizes) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << (sizes.size() == 1 ? ",)" : ")");
  return out.str();
}

// A dtype as Python prints it: torch.float32, torch.int64, ...
inline std::string dtype_repr(at::ScalarType type) {
  switch (type) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(type);
  }
}

inline std::string device_repr(const at::Device& device) {
  std::ostringstream out;
  out << device;
  return out.str();
}

// A [branches, B, N, C] feature tensor (check_features in _checks.py).
inline void features(const at::Tensor& qk, const char* name, int64_t branches) {
  TORCH_CHECK_TYPE(at::isFloatingType(qk.scalar_type()), name, " must have a floating dtype, got ",
                   dtype_repr(qk.scalar_type()));
  TORCH_CHECK_VALUE(qk.dim() == 4, name, " must have 4 dimensions [", branches,
                    ", B, N, C], got shape ", shape_repr(qk.sizes()));
  TORCH_CHECK_VALUE(qk.size(0) == branches, name, " must hold ", branches,
                    " branches in its first dimension [", branches, ", B, N, C], got shape ",
                    shape_repr(qk.sizes()));
  const char* dims[] = {"B", "N", "C"};
  for (int d = 0; d < 3; ++d)
    TORCH_CHECK_VALUE(qk.size(d + 1) != 0, name, " has an empty dimension ", dims[d], " (shape ",
                      shape_repr(qk.sizes()), ")");
}

// `t` on the device of qk (same_device in ops.py, check_theta in _checks.py).
inline void same_device(const at::Tensor& t, const char* name, const at::Tensor& qk) {
  TORCH_CHECK_VALUE(t.device() == qk.device(), name, " is on ", device_repr(t.device()),
                    " but qk is on ", device_repr(qk.device()), "; they must match");
}

// theta: one element of qk's dtype on qk's device (check_theta in _checks.py).
inline void theta(const at::Tensor& theta, const at::Tensor& qk) {
  TORCH_CHECK_VALUE(theta.numel() == 1, "theta must hold exactly one element, got shape ",
                    shape_repr(theta.sizes()));
  TORCH_CHECK_TYPE(theta.scalar_type() == qk.scalar_type(), "theta has dtype ",
                   dtype_repr(theta.scalar_type()), " but qk has dtype ",
                   dtype_repr(qk.scalar_type()), "; they must match");
  same_device(theta, "theta", qk);
}

// A NaN or infinite gamma would turn every map into NaN without a word (check_gamma).
inline void gamma(double gamma) {
  TORCH_CHECK_VALUE(std::isfinite(gamma), "gamma must be finite, got ", gamma);
}

// mode / scope strings (check_choice in _checks.py, with MODES and SCOPES).
inline Mode mode(c10::string_view value) {
  if (value == "sd") return Mode::SD;
  if (value == "s") return Mode::S;
  if (value == "d") return Mode::D;
  TORCH_CHECK_VALUE(false, "mode must be one of 'sd', 's', 'd', got '", std::string(value), "'");
}

inline Scope scope(c10::string_view value) {
  if (value == "batch") return Scope::Batch;
  if (value == "sample") return Scope::Sample;
  TORCH_CHECK_VALUE(false, "scope must be one of 'batch', 'sample', got '", std::string(value),
                    "'");
}

// ---- backend-specific (no Python counterpart: the wrappers cast and dispatch first) ----

// qk on the device type a backend's kernels run on.
inline void kernel_device(const at::Tensor& qk, c10::DeviceType type, const char* backend) {
  TORCH_CHECK_VALUE(qk.device().type() == type, "the ", backend, " kernels take qk on ",
                    c10::DeviceTypeName(type, true), ", got qk on ", device_repr(qk.device()));
}

// qk of a dtype the backend's kernels are compiled for; `names` lists them for the message.
inline void kernel_dtype(const at::Tensor& qk, std::initializer_list<at::ScalarType> allowed,
                         const char* names, const char* backend) {
  bool ok = false;
  for (at::ScalarType type : allowed) ok = ok || qk.scalar_type() == type;
  TORCH_CHECK_TYPE(ok, "the ", backend, " kernels take ", names, " qk, got ",
                   dtype_repr(qk.scalar_type()));
}

// A tensor the forward returned and backward takes back: qk's device, the given shape and dtype.
inline void saved(const at::Tensor& t, const char* name, const at::Tensor& qk,
                  at::IntArrayRef sizes, at::ScalarType dtype) {
  same_device(t, name, qk);
  TORCH_CHECK_VALUE(t.sizes() == sizes, name, " must have shape ", shape_repr(sizes),
                    ", got shape ", shape_repr(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must have dtype ", dtype_repr(dtype), ", got ",
                   dtype_repr(t.scalar_type()));
}

}  // namespace qcs::checks
