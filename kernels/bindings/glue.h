// What every op's dispatcher glue (kernels/bindings/<op>.cpp) shares: the headers, argument checks
// whose messages name the op, the dtype dispatch of the CPU twins and, in CUDA builds
// (PROGAN_WITH_CUDA), the dtype, stream and alpha the CUDA launchers take. Kept thin: the math
// lives in the kernels, the autograd formulas in Python (progan_fast/ops/<op>.py,
// torch.library.register_autograd).
#pragma once

// ATen's per-operator headers, not ATen/ATen.h: this header is in every binding, and the whole
// ATen API would add its parsing and debug info to each one's compile.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>

#include "../cpu/cpu_kernels.h"
#include "progan/layout.h"

#ifdef PROGAN_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "progan/cuda_launchers.h"
#endif

// Runs the lambda with scalar_t = the tensor's dtype (float, double, BFloat16 or Half).
#define PROGAN_DISPATCH(op, t, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, (t).scalar_type(), op, __VA_ARGS__)

namespace progan::glue {

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_floating_point(), "progan_fast_native::", op, ": ", name,
              " must be a floating-point tensor (float32, float64, bfloat16 or float16), got ", t.scalar_type());
}

inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), "progan_fast_native::", op, ": ", name, " is on ", t.device(),
              " but the input is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "progan_fast_native::", op, ": ", name, " is ",
              t.scalar_type(), " but the input is ", like.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, "progan_fast_native::", op, ": ", name, " must have ", dim, " dimensions, got shape ",
              t.sizes());
}

// alpha: a 0-dim floating tensor on the input's device (the wrappers pass float32, float64 for
// float64 inputs).
inline void check_alpha(const char* op, const at::Tensor& alpha, const at::Tensor& like) {
  TORCH_CHECK(alpha.dim() == 0, "progan_fast_native::", op, ": alpha must be a 0-dim tensor, got shape ",
              alpha.sizes());
  TORCH_CHECK(alpha.is_floating_point(), "progan_fast_native::", op, ": alpha must be floating point, got ",
              alpha.scalar_type());
  TORCH_CHECK(alpha.device() == like.device(), "progan_fast_native::", op, ": alpha is on ", alpha.device(),
              " but the input is on ", like.device());
}

// [N, C, ...] -> (N, C, P).
struct NCP {
  int64_t n, c, p;
};
inline NCP ncp(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "progan_fast_native::", op, ": needs an [N, C, ...] tensor, got shape ", x.sizes());
  const int64_t n = x.size(0), c = x.size(1);
  return {n, c, n * c == 0 ? 0 : x.numel() / (n * c)};
}

// The layout an op runs in (progan/layout.h): `x` itself when it is dense NCHW or dense NHWC, else
// an NCHW copy; `channels_last` says which. Outputs are allocated with memory_format(channels_last)
// and the op's other activations brought there with to_layout, a copy only when they differ.
struct Dense {
  at::Tensor t;
  bool channels_last;
};
inline Dense dense_layout(const at::Tensor& x) {
  if (x.is_contiguous()) return {x, false};
  if (x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) return {x, true};
  return {x.contiguous(), false};
}
inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}
inline at::Tensor to_layout(const at::Tensor& x, bool channels_last) {
  const auto fmt = memory_format(channels_last && x.dim() == 4);
  return x.is_contiguous(fmt) ? x : x.contiguous(fmt);
}

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// alpha as the CPU twins take it, by value: on the CPU reading the 0-dim tensor involves no device sync.
inline double read_alpha(const at::Tensor& alpha) { return alpha.item<double>(); }

#ifdef PROGAN_WITH_CUDA
inline progan::cuda::DType dtype_of(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return progan::cuda::DType::Float32;
    case at::kDouble: return progan::cuda::DType::Float64;
    case at::kBFloat16: return progan::cuda::DType::BFloat16;
    case at::kHalf: return progan::cuda::DType::Float16;
    default: TORCH_CHECK(false, "progan_fast_native::", op, ": unsupported dtype ", t.scalar_type());
  }
  return progan::cuda::DType::Float32;
}

// The current stream: launching on it is what lets a CUDA graph capture the op.
inline cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// alpha as the CUDA kernels read it: a 0-dim device scalar of the accumulation type (a device-side
// cast when needed, never a host read).
inline at::Tensor alpha_for(const char* op, const at::Tensor& alpha, const at::Tensor& like) {
  check_alpha(op, alpha, like);
  return alpha.to(acc_type(like)).contiguous();
}
#endif

}  // namespace progan::glue
