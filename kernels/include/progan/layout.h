// The two activation layouts every native kernel reads and writes, shared by the CUDA kernels, their
// CPU twins and the dispatcher glue. No torch headers: nvcc alone compiles this.
//
// A 4-d activation [N, C, H, W] is seen as [N, C, P] with P = H * W, in one of two dense layouts:
// NCHW (torch.contiguous_format) or NHWC (torch.channels_last). The kernels index through the
// element strides of that view, so one kernel serves both and its outputs come out in the layout of
// its inputs, with no copy. The glue copies any other strides to NCHW first, and treats a tensor
// that is dense in both layouts (C == 1 or P == 1, where both index the same memory) as NCHW.
#pragma once

#include <cstdint>

#include "progan/math.h"

namespace progan {

// Element strides of the [N, C, P] view: NCHW {C*P, P, 1}, NHWC {P*C, 1, C}.
struct NCPStrides {
  int64_t n, c, p;
};

PROGAN_HD NCPStrides ncp_strides(int64_t c, int64_t p, bool channels_last) {
  return channels_last ? NCPStrides{p * c, 1, c} : NCPStrides{c * p, p, 1};
}

}  // namespace progan
