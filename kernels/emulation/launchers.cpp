// C entry points for the emulated CUDA launchers (progan/cuda_launchers.h), so that the test harness
// (emulator.py, through ctypes) calls the real launchers: the same grid sizing, dtype switch and
// kernel arguments as on a device. Each returns the launcher's cudaError_t. One per launcher:
// tests/test_cuda_emulated.py checks that none in the header is missing here.
#include "progan/cuda_launchers.h"

using progan::cuda::DType;

#define PROGAN_EMU_API extern "C" __attribute__((visibility("default")))

PROGAN_EMU_API int progan_emu_pixel_norm_forward(int dt, const void* x, void* y, int64_t n, int64_t c, int64_t p,
                                                 double eps, bool channels_last) {
  return progan::cuda::pixel_norm_forward(DType(dt), x, y, n, c, p, eps, channels_last, nullptr);
}
PROGAN_EMU_API int progan_emu_pixel_norm_backward(int dt, const void* dy, const void* x, void* dx, int64_t n,
                                                  int64_t c, int64_t p, double eps, bool channels_last) {
  return progan::cuda::pixel_norm_backward(DType(dt), dy, x, dx, n, c, p, eps, channels_last, nullptr);
}
PROGAN_EMU_API int64_t progan_emu_conv_epilogue_num_blocks(int64_t n, int64_t p) {
  return progan::cuda::conv_epilogue_num_blocks(n, p);
}
PROGAN_EMU_API int progan_emu_conv_epilogue_forward(int dt, const void* conv, void* y, const void* bias, void* r,
                                                    int64_t n, int64_t c, int64_t p, double scale, bool activation,
                                                    bool pixel_norm, bool channels_last) {
  return progan::cuda::conv_epilogue_forward(DType(dt), conv, y, bias, r, n, c, p, scale, activation, pixel_norm,
                                             channels_last, nullptr);
}
PROGAN_EMU_API int progan_emu_conv_epilogue_backward(int dt, const void* dy, const void* y, const void* r, void* g,
                                                     void* bias_part, int64_t n, int64_t c, int64_t p, bool activation,
                                                     bool pixel_norm, bool channels_last) {
  return progan::cuda::conv_epilogue_backward(DType(dt), dy, y, r, g, bias_part, n, c, p, activation, pixel_norm,
                                              channels_last, nullptr);
}
PROGAN_EMU_API int progan_emu_fade_in_forward(int dt, const void* low, const void* high, const void* alpha, void* out,
                                              int64_t n, int64_t c, int64_t hl, int64_t wl, bool channels_last) {
  return progan::cuda::fade_in_forward(DType(dt), low, high, alpha, out, n, c, hl, wl, channels_last, nullptr);
}
PROGAN_EMU_API int progan_emu_fade_in_backward(int dt, const void* grad, const void* alpha, void* d_low, void* d_high,
                                               int64_t n, int64_t c, int64_t hl, int64_t wl, bool channels_last) {
  return progan::cuda::fade_in_backward(DType(dt), grad, alpha, d_low, d_high, n, c, hl, wl, channels_last, nullptr);
}
PROGAN_EMU_API int progan_emu_fade_reals(int dt, const void* x, const void* alpha, void* out, int64_t n, int64_t c,
                                         int64_t hl, int64_t wl, bool channels_last) {
  return progan::cuda::fade_reals(DType(dt), x, alpha, out, n, c, hl, wl, channels_last, nullptr);
}
PROGAN_EMU_API int progan_emu_blend_forward(int dt, const void* old_, const void* new_, const void* alpha, void* out,
                                            int64_t numel) {
  return progan::cuda::blend_forward(DType(dt), old_, new_, alpha, out, numel, nullptr);
}
PROGAN_EMU_API int progan_emu_blend_backward(int dt, const void* grad, const void* alpha, void* d_old, void* d_new,
                                             int64_t numel) {
  return progan::cuda::blend_backward(DType(dt), grad, alpha, d_old, d_new, numel, nullptr);
}
PROGAN_EMU_API int progan_emu_downsample2x_forward(int dt, const void* x, void* y, int64_t n, int64_t c, int64_t h,
                                                   int64_t w, bool channels_last) {
  return progan::cuda::downsample2x_forward(DType(dt), x, y, n, c, h, w, channels_last, nullptr);
}
PROGAN_EMU_API int progan_emu_downsample2x_backward(int dt, const void* grad, void* dx, int64_t n, int64_t c, int64_t h,
                                                    int64_t w, bool channels_last) {
  return progan::cuda::downsample2x_backward(DType(dt), grad, dx, n, c, h, w, channels_last, nullptr);
}
PROGAN_EMU_API int64_t progan_emu_minibatch_stddev_part_count(int64_t m, int64_t f) {
  return progan::cuda::minibatch_stddev_part_count(m, f);
}
PROGAN_EMU_API int progan_emu_minibatch_stddev_forward(int dt, const void* x, void* out, void* part, int64_t group,
                                                       int64_t m, int64_t f, int64_t p, double eps,
                                                       bool channels_last) {
  return progan::cuda::minibatch_stddev_forward(DType(dt), x, out, part, group, m, f, p, eps, channels_last, nullptr);
}
PROGAN_EMU_API int progan_emu_minibatch_stddev_backward(int dt, const void* grad, const void* x, void* gs, void* dx,
                                                        int64_t group, int64_t m, int64_t f, int64_t p, double eps,
                                                        bool channels_last) {
  return progan::cuda::minibatch_stddev_backward(DType(dt), grad, x, gs, dx, group, m, f, p, eps, channels_last,
                                                 nullptr);
}
