// CPU twin of kernels/cuda/minibatch_stddev.cu. Group m's members are samples g * M + m
// (the official grouping). Forward: each unit (group, block of kPart features) copies its members'
// features into the output, computes each feature's stddev over the group and writes the block's
// sum into a [M, NB] partial buffer; then each group's value (the mean of its F stddevs) is summed
// from its partials in a fixed order and broadcast into the extra channel. Deterministic whatever
// the thread count.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "progan/math.h"

namespace progan::cpu {
namespace {
constexpr int64_t kPart = 256;
}  // namespace

template <typename T>
void minibatch_stddev_forward(const T* x, T* out, int64_t group, int64_t m, int64_t f, int64_t p, double eps) {
  using A = acc_t<T>;
  const int64_t nb = (f + kPart - 1) / kPart;
  std::vector<A> part(m * nb);
  const int g = static_cast<int>(group);
  at::parallel_for(0, m * nb, std::max<int64_t>(1, 64 / std::max<int64_t>(1, group)), [&](int64_t begin, int64_t end) {
    A mean[kPart], var[kPart];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t mi = u / nb, f0 = (u % nb) * kPart, len = std::min(kPart, f - f0);
      for (int64_t j = 0; j < len; ++j) mean[j] = var[j] = A(0);
      for (int64_t gi = 0; gi < group; ++gi) {
        const int64_t i = gi * m + mi;
        const T* xs = x + i * f + f0;
        T* os = out + i * (f + p) + f0;
        for (int64_t j = 0; j < len; ++j) {
          os[j] = xs[j];
          mean[j] += A(xs[j]);
        }
      }
      for (int64_t j = 0; j < len; ++j) mean[j] /= A(group);
      for (int64_t gi = 0; gi < group; ++gi) {
        const T* xs = x + (gi * m + mi) * f + f0;
        for (int64_t j = 0; j < len; ++j) {
          const A d = A(xs[j]) - mean[j];
          var[j] += d * d;
        }
      }
      A sum = A(0);
      for (int64_t j = 0; j < len; ++j) sum += group_stddev(var[j], g, A(eps));
      part[u] = sum;
    }
  });
  for (int64_t mi = 0; mi < m; ++mi) {
    A total = A(0);
    for (int64_t b = 0; b < nb; ++b) total += part[mi * nb + b];
    const T value = T(total / A(f));
    for (int64_t gi = 0; gi < group; ++gi) std::fill_n(out + (gi * m + mi) * (f + p) + f, p, value);
  }
}

template <typename T>
void minibatch_stddev_backward(const T* grad, const T* x, T* dx, int64_t group, int64_t m, int64_t f, int64_t p,
                               double eps) {
  using A = acc_t<T>;
  const int g = static_cast<int>(group);
  // gs[m]: the gradient of group m's value = the sum of its members' extra-channel gradients.
  std::vector<A> gs(m, A(0));
  for (int64_t mi = 0; mi < m; ++mi) {
    for (int64_t gi = 0; gi < group; ++gi) {
      const T* gr = grad + (gi * m + mi) * (f + p) + f;
      for (int64_t j = 0; j < p; ++j) gs[mi] += A(gr[j]);
    }
  }
  const int64_t nb = (f + kPart - 1) / kPart;
  at::parallel_for(0, m * nb, std::max<int64_t>(1, 64 / std::max<int64_t>(1, group)), [&](int64_t begin, int64_t end) {
    A mean[kPart], sd[kPart];
    for (int64_t u = begin; u < end; ++u) {
      const int64_t mi = u / nb, f0 = (u % nb) * kPart, len = std::min(kPart, f - f0);
      for (int64_t j = 0; j < len; ++j) mean[j] = sd[j] = A(0);
      for (int64_t gi = 0; gi < group; ++gi) {
        const T* xs = x + (gi * m + mi) * f + f0;
        for (int64_t j = 0; j < len; ++j) mean[j] += A(xs[j]);
      }
      for (int64_t j = 0; j < len; ++j) mean[j] /= A(group);
      for (int64_t gi = 0; gi < group; ++gi) {
        const T* xs = x + (gi * m + mi) * f + f0;
        for (int64_t j = 0; j < len; ++j) {
          const A d = A(xs[j]) - mean[j];
          sd[j] += d * d;
        }
      }
      for (int64_t j = 0; j < len; ++j) sd[j] = group_stddev(sd[j], g, A(eps));
      for (int64_t gi = 0; gi < group; ++gi) {
        const int64_t i = gi * m + mi;
        const T* xs = x + i * f + f0;
        const T* gr = grad + i * (f + p) + f0;
        T* o = dx + i * f + f0;
        for (int64_t j = 0; j < len; ++j) {
          o[j] = T(A(gr[j]) + group_stddev_grad(gs[mi], A(xs[j]), mean[j], sd[j], g, f));
        }
      }
    }
  });
}

#define INSTANTIATE(T)                                                                                    \
  template void minibatch_stddev_forward<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, double);    \
  template void minibatch_stddev_backward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t,  \
                                             double);
PROGAN_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace progan::cpu
