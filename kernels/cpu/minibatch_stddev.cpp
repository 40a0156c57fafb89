// CPU twin of kernels/cuda/minibatch_stddev.cu. Group m's members are samples g * M + m
// (the official grouping). Forward: each unit (group, block of kPart features) copies its members'
// features into the output, computes each feature's stddev over the group and writes the block's
// sum into a [M, NB] partial buffer; then each group's value (the mean of its F stddevs) is summed
// from its partials in a fixed order and broadcast into the extra channel. Deterministic whatever
// the thread count.
//
// Layouts: x (and dx) dense NCHW or dense NHWC, out (and grad) [N, C + 1, H, W] in the same layout.
// Features are taken in x's MEMORY order (k = c * P + p in NCHW, p * C + c in NHWC), so every loop
// over them reads contiguous memory -- over channels in NHWC -- and the statistic is the same sum in
// another order. In the output row of a sample (F + P values), memory-order feature k sits in run
// k / R at offset (k / R) * (R + 1) + k % R, with R = F in NCHW (one run: offset k) and R = C in
// NHWC (a run per pixel, each followed by that pixel's stat value); see OutRow.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "cpu_kernels.h"
#include "progan/math.h"

namespace progan::cpu {
namespace {
constexpr int64_t kPart = 256;

// Where a sample's values sit in its output (or output-gradient) row of F + P values.
struct OutRow {
  int64_t run;                      // contiguous input features between stat values: F (NCHW) or C (NHWC)
  int64_t stat0, stat_step;         // pixel q's stat value at stat0 + q * stat_step
  OutRow(int64_t f, int64_t p, bool channels_last)
      : run(channels_last ? f / p : f), stat0(channels_last ? f / p : f), stat_step(channels_last ? f / p + 1 : 1) {}

  // Calls fn(j, offset, len) for the contiguous pieces of memory-order features [f0, f0 + len): features
  // f0 + j .. f0 + j + len - 1 sit at offset .. offset + len - 1 of the row.
  template <typename Fn>
  void for_runs(int64_t f0, int64_t len, Fn&& fn) const {
    int64_t q = f0 / run, r = f0 % run;
    for (int64_t j = 0; j < len; ++q, r = 0) {
      const int64_t piece = std::min(len - j, run - r);
      fn(j, q * (run + 1) + r, piece);
      j += piece;
    }
  }
};
}  // namespace

template <typename T>
void minibatch_stddev_forward(const T* x, T* out, int64_t group, int64_t m, int64_t f, int64_t p, double eps,
                              bool channels_last) {
  using A = acc_t<T>;
  const int64_t nb = (f + kPart - 1) / kPart;
  const OutRow row(f, p, channels_last);
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
        T* orow = out + i * (f + p);
        row.for_runs(f0, len, [&](int64_t j0, int64_t off, int64_t piece) {
          T* os = orow + off;
          for (int64_t j = 0; j < piece; ++j) {
            os[j] = xs[j0 + j];
            mean[j0 + j] += A(xs[j0 + j]);
          }
        });
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
    for (int64_t gi = 0; gi < group; ++gi) {
      T* dst = out + (gi * m + mi) * (f + p) + row.stat0;
      for (int64_t q = 0; q < p; ++q) dst[q * row.stat_step] = value;
    }
  }
}

template <typename T>
void minibatch_stddev_backward(const T* grad, const T* x, T* dx, int64_t group, int64_t m, int64_t f, int64_t p,
                               double eps, bool channels_last) {
  using A = acc_t<T>;
  const int g = static_cast<int>(group);
  const OutRow row(f, p, channels_last);
  // gs[m]: the gradient of group m's value = the sum of its members' extra-channel gradients.
  std::vector<A> gs(m, A(0));
  for (int64_t mi = 0; mi < m; ++mi) {
    for (int64_t gi = 0; gi < group; ++gi) {
      const T* gr = grad + (gi * m + mi) * (f + p) + row.stat0;
      for (int64_t q = 0; q < p; ++q) gs[mi] += A(gr[q * row.stat_step]);
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
        const T* grow = grad + i * (f + p);
        T* o = dx + i * f + f0;
        row.for_runs(f0, len, [&](int64_t j0, int64_t off, int64_t piece) {
          const T* gr = grow + off;
          for (int64_t j = 0; j < piece; ++j) {
            const int64_t k = j0 + j;
            o[k] = T(A(gr[j]) + group_stddev_grad(gs[mi], A(xs[k]), mean[k], sd[k], g, f));
          }
        });
      }
    }
  });
}

#define INSTANTIATE(T)                                                                                         \
  template void minibatch_stddev_forward<T>(const T*, T*, int64_t, int64_t, int64_t, int64_t, double, bool);   \
  template void minibatch_stddev_backward<T>(const T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, double, \
                                             bool);
PROGAN_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace progan::cpu
