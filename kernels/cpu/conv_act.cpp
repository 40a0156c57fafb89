// CPU twin of kernels/cuda/conv_act.cu: the equalized-LR conv's epilogue (scale, bias,
// leaky-ReLU, optional pixel norm) in one pass over the conv output (conv -> y), and its backward
// with the bias gradient's partial sums. Work unit: one sample's tile of kTile pixels (all
// channels), so pixel norm's per-pixel reduction stays inside one unit, in both layouts
// (progan/layout.h): NCHW walks channel rows of kTile contiguous pixels; NHWC (channels_last) walks
// pixels, each a contiguous run of C channels, so every inner loop runs over contiguous channels
// (pixel norm's sums in kLanes interleaved partial sums, added in a fixed order, which vectorizes
// without reassociation; the bias gradient's per-channel partials are a contiguous row too).
#include <ATen/Parallel.h>

#include <algorithm>

#include "cpu_kernels.h"
#include "progan/math.h"

namespace progan::cpu {
namespace {
constexpr int64_t kTile = 64;
constexpr int64_t kLanes = 8;
int64_t grain(int64_t work_per_tile) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, work_per_tile)); }

// The pre-norm activation of one value: lrelu(conv * scale + bias) (activation optional).
template <typename A>
inline A epilogue_value(A conv, A scale, A bias, bool activation) {
  const A v = fma_(conv, scale, bias);
  return activation ? lrelu(v) : v;
}

template <typename T>
void forward_nhwc(const T* conv, T* y, const T* bias, acc_t<T>* r, int64_t n, int64_t c, int64_t p, double scale_,
                  bool activation, bool pixel_norm) {
  using A = acc_t<T>;
  const A scale = A(scale_);
  const int64_t tiles_per_sample = (p + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles_per_sample, grain(c * kTile), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / tiles_per_sample, p0 = (t % tiles_per_sample) * kTile;
      const int64_t len = std::min(kTile, p - p0);
      for (int64_t q = s * p + p0; q < s * p + p0 + len; ++q) {  // pixel q: channels [q * c, q * c + c)
        const T* in = conv + q * c;
        T* out = y + q * c;
        if (!pixel_norm) {
          for (int64_t ch = 0; ch < c; ++ch)
            out[ch] = T(epilogue_value(A(in[ch]), scale, bias ? A(bias[ch]) : A(0), activation));
          continue;
        }
        A lane[kLanes] = {};
        int64_t ch = 0;
        for (; ch + kLanes <= c; ch += kLanes) {
          for (int64_t k = 0; k < kLanes; ++k) {
            const A v = epilogue_value(A(in[ch + k]), scale, bias ? A(bias[ch + k]) : A(0), activation);
            lane[k] += v * v;
          }
        }
        for (int64_t k = 0; ch < c; ++ch, ++k) {
          const A v = epilogue_value(A(in[ch]), scale, bias ? A(bias[ch]) : A(0), activation);
          lane[k] += v * v;
        }
        A sum = A(0);
        for (int64_t k = 0; k < kLanes; ++k) sum += lane[k];
        const A rs = pixel_norm_scale(sum, c, A(kPixelNormEps));
        r[q] = rs;
        for (ch = 0; ch < c; ++ch)
          out[ch] = T(epilogue_value(A(in[ch]), scale, bias ? A(bias[ch]) : A(0), activation) * rs);
      }
    }
  });
}

template <typename T>
void backward_nhwc(const T* dy, const T* y, const acc_t<T>* r, T* g, acc_t<T>* bias_part, int64_t n, int64_t c,
                   int64_t p, bool activation, bool pixel_norm) {
  using A = acc_t<T>;
  const int64_t tiles_per_sample = (p + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles_per_sample, grain(2 * c * kTile), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / tiles_per_sample, p0 = (t % tiles_per_sample) * kTile;
      const int64_t len = std::min(kTile, p - p0);
      A* part = bias_part + t * c;
      for (int64_t ch = 0; ch < c; ++ch) part[ch] = A(0);
      for (int64_t q = s * p + p0; q < s * p + p0 + len; ++q) {
        const T* gr = dy + q * c;
        const T* yr = y + q * c;
        if (!(activation || pixel_norm)) {
          for (int64_t ch = 0; ch < c; ++ch) part[ch] += A(gr[ch]);
          continue;
        }
        A mean_dy_y = A(0), rs = A(0);
        if (pixel_norm) {
          A lane[kLanes] = {};
          int64_t ch = 0;
          for (; ch + kLanes <= c; ch += kLanes) {
            for (int64_t k = 0; k < kLanes; ++k) lane[k] += A(gr[ch + k]) * A(yr[ch + k]);
          }
          for (int64_t k = 0; ch < c; ++ch, ++k) lane[k] += A(gr[ch]) * A(yr[ch]);
          A sum = A(0);
          for (int64_t k = 0; k < kLanes; ++k) sum += lane[k];
          mean_dy_y = sum / A(c);
          rs = r[q];
        }
        T* out = g + q * c;
        for (int64_t ch = 0; ch < c; ++ch) {
          A v = A(gr[ch]);
          const A yv = A(yr[ch]);
          if (pixel_norm) v = pixel_norm_grad(v, yv, rs, mean_dy_y);
          if (activation) v = lrelu_grad(v, yv);
          out[ch] = T(v);
          part[ch] += v;
        }
      }
    }
  });
}

}  // namespace

int64_t conv_epilogue_num_tiles(int64_t n, int64_t p) { return n * ((p + kTile - 1) / kTile); }

template <typename T>
void conv_epilogue_forward(const T* conv, T* y, const T* bias, acc_t<T>* r, int64_t n, int64_t c, int64_t p, double scale,
                           bool activation, bool pixel_norm, bool channels_last) {
  if (channels_last) return forward_nhwc(conv, y, bias, r, n, c, p, scale, activation, pixel_norm);
  using A = acc_t<T>;
  const int64_t tiles_per_sample = (p + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles_per_sample, grain(c * kTile), [&](int64_t begin, int64_t end) {
    A sum[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / tiles_per_sample, p0 = (t % tiles_per_sample) * kTile;
      const int64_t len = std::min(kTile, p - p0);
      const T* cs = conv + s * c * p + p0;
      T* ys = y + s * c * p + p0;
      for (int64_t j = 0; j < len; ++j) sum[j] = A(0);
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* row = cs + ch * p;
        T* out = ys + ch * p;
        const A b = bias ? A(bias[ch]) : A(0);
        if (pixel_norm) {  // keep the activation in full precision for the norm: recompute below
          for (int64_t j = 0; j < len; ++j) {
            A v = fma_(A(row[j]), A(scale), b);
            if (activation) v = lrelu(v);
            sum[j] += v * v;
          }
        } else {
          for (int64_t j = 0; j < len; ++j) {
            A v = fma_(A(row[j]), A(scale), b);
            out[j] = T(activation ? lrelu(v) : v);
          }
        }
      }
      if (!pixel_norm) continue;
      for (int64_t j = 0; j < len; ++j) {
        sum[j] = pixel_norm_scale(sum[j], c, A(kPixelNormEps));
        r[s * p + p0 + j] = sum[j];
      }
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* row = cs + ch * p;
        T* out = ys + ch * p;
        const A b = bias ? A(bias[ch]) : A(0);
        for (int64_t j = 0; j < len; ++j) {
          A v = fma_(A(row[j]), A(scale), b);
          if (activation) v = lrelu(v);
          out[j] = T(v * sum[j]);
        }
      }
    }
  });
}

template <typename T>
void conv_epilogue_backward(const T* dy, const T* y, const acc_t<T>* r, T* g, acc_t<T>* bias_part, int64_t n,
                            int64_t c, int64_t p, bool activation, bool pixel_norm, bool channels_last) {
  if (channels_last) return backward_nhwc(dy, y, r, g, bias_part, n, c, p, activation, pixel_norm);
  using A = acc_t<T>;
  const int64_t tiles_per_sample = (p + kTile - 1) / kTile;
  at::parallel_for(0, n * tiles_per_sample, grain(2 * c * kTile), [&](int64_t begin, int64_t end) {
    A s_dyy[kTile];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t s = t / tiles_per_sample, p0 = (t % tiles_per_sample) * kTile;
      const int64_t len = std::min(kTile, p - p0);
      const int64_t base = s * c * p + p0;
      A* part = bias_part + t * c;
      if (pixel_norm) {
        for (int64_t j = 0; j < len; ++j) s_dyy[j] = A(0);
        for (int64_t ch = 0; ch < c; ++ch) {
          const T* gr = dy + base + ch * p;
          const T* yr = y + base + ch * p;
          for (int64_t j = 0; j < len; ++j) s_dyy[j] += A(gr[j]) * A(yr[j]);
        }
        for (int64_t j = 0; j < len; ++j) s_dyy[j] /= A(c);
      }
      const A* rs = pixel_norm ? r + s * p + p0 : nullptr;
      for (int64_t ch = 0; ch < c; ++ch) {
        const T* gr = dy + base + ch * p;
        const T* yr = y + base + ch * p;
        A acc = A(0);
        if (activation || pixel_norm) {
          T* out = g + base + ch * p;
          for (int64_t j = 0; j < len; ++j) {
            A v = A(gr[j]);
            const A yv = A(yr[j]);
            if (pixel_norm) v = pixel_norm_grad(v, yv, rs[j], s_dyy[j]);
            if (activation) v = lrelu_grad(v, yv);
            out[j] = T(v);
            acc += v;
          }
        } else {
          for (int64_t j = 0; j < len; ++j) acc += A(gr[j]);
        }
        part[ch] = acc;
      }
    }
  });
}

#define INSTANTIATE(T)                                                                                      \
  template void conv_epilogue_forward<T>(const T*, T*, const T*, acc_t<T>*, int64_t, int64_t, int64_t, double, bool,  \
                                         bool, bool);                                                       \
  template void conv_epilogue_backward<T>(const T*, const T*, const acc_t<T>*, T*, acc_t<T>*, int64_t,      \
                                          int64_t, int64_t, bool, bool, bool);
PROGAN_CPU_INSTANTIATE(INSTANTIATE)

}  // namespace progan::cpu
