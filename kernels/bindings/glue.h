// Dispatcher glue shared by the CPU (ops.cpp) and CUDA (cuda_ops.cpp) implementations: argument
// checks with messages that name the op, and output allocation. Kept thin: the math lives in the
// kernels, the autograd formulas in Python (progan_fast/ops/*.py, torch.library.register_autograd).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>

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

inline at::ScalarType acc_type(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// The largest group size <= group_size that divides the batch (see minibatch_stddev.py).
inline int64_t effective_group_size(int64_t batch, int64_t group_size) {
  int64_t g = std::max<int64_t>(1, std::min(group_size, batch));
  while (batch % g) --g;
  return g;
}

inline void check_fade_in(const at::Tensor& low, const at::Tensor& high) {
  check_float("fade_in", "high", high);
  check_like("fade_in", "low", low, high);
  check_dim("fade_in", "low", low, 4);
  TORCH_CHECK(high.dim() == 4 && high.size(0) == low.size(0) && high.size(1) == low.size(1) &&
                  high.size(2) == 2 * low.size(2) && high.size(3) == 2 * low.size(3),
              "progan_fast_native::fade_in: high ", high.sizes(), " is not twice low ", low.sizes());
}

inline void check_even_4d(const char* op, const at::Tensor& x) {
  check_dim(op, "x", x, 4);
  TORCH_CHECK(x.size(2) % 2 == 0 && x.size(3) % 2 == 0, "progan_fast_native::", op,
              ": needs even height and width, got shape ", x.sizes());
}

}  // namespace progan::glue
