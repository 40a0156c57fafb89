// Kernels with planted bugs (and correct twins) for the emulator's own tests
// (tests/test_cuda_emulated.py): each bug must be caught, each twin must pass. Compiled only into
// the emulation library, with the same launch rewrite as kernels/cuda/*.cu.
#include <cuda_runtime.h>

#include <cstdint>

namespace progan_emu_selftest {
namespace {

// A block reduction like common.cuh's block_sum; with_barrier = false drops the barrier between
// the warps' partial sums and warp 0 reading them.
template <bool with_barrier>
__global__ void block_sum_kernel(const float* x, float* out, int n) {
  __shared__ float scratch[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  float v = threadIdx.x < n ? x[threadIdx.x] : 0.0f;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  if (lane == 0) scratch[warp] = v;
  if (with_barrier) __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) *out = v;
  }
}

// A grid-stride copy; off_by_one = 1 plants `i <= n` for `i < n`.
__global__ void copy_kernel(const float* x, float* y, int64_t n, int off_by_one) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n + off_by_one;
       i += int64_t(gridDim.x) * blockDim.x)
    y[i] = x[i];
}

// Each thread reads its left neighbour's element of a shared tile. mode 0: nobody fills the tile;
// 1: the threads fill it, then a barrier; 2: they fill it without the barrier (a race that only
// shows when a thread runs before its left neighbour); 3: as 1, but reading the right neighbour,
// past the tile's end for the last thread.
__global__ void shared_tile_kernel(const float* x, float* y, int mode) {
  __shared__ float tile[64];
  if (mode != 0) tile[threadIdx.x] = x[threadIdx.x];
  if (mode != 2) __syncthreads();
  y[threadIdx.x] = tile[mode == 3 ? threadIdx.x + 1 : (threadIdx.x > 0 ? threadIdx.x - 1 : 0)];
}

// bug 0: none; 1: threads wait at two different barriers; 2: a warp returns before a barrier;
// 3: a full-mask shuffle after lane 5 returned; 4: lane 0 waits at a barrier while its warp
// shuffles (deadlock); 5: a mask without the caller's lane; 6: a shuffle reading a lane outside a
// partial mask.
__global__ void sync_kernel(float* y, int bug) {
  float v = float(threadIdx.x);
  if (bug == 1) {
    if (threadIdx.x < 40) {
      __syncthreads();
    } else {
      __syncthreads();
    }
  }
  if (bug == 2 && threadIdx.x >= 32) return;
  if (bug == 3 && threadIdx.x == 5) return;
  if (bug == 4 && threadIdx.x == 0) __syncthreads();
  if (bug == 5) v = __shfl_xor_sync(0x0000ffffu, v, 1);
  if (bug == 6 && threadIdx.x < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16, 32);
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  __syncthreads();
  y[threadIdx.x] = v;
}

// The rest of the model, used correctly: dynamic shared memory, atomics, votes, the other
// shuffles, shuffles with a partial mask and width, and a 2D block.
__global__ void features_kernel(const float* x, float* y, unsigned* votes, int n) {
  extern __shared__ float dyn[];
  const int t = threadIdx.y * blockDim.x + threadIdx.x, lane = t & 31;
  const float v = t < n ? x[t] : 0.0f;
  dyn[t] = v;
  __syncthreads();
  if (t == 0) dyn[blockDim.x * blockDim.y] = 0.0f;
  __syncthreads();
  atomicAdd(&dyn[blockDim.x * blockDim.y], v);
  const unsigned ballot = __ballot_sync(0xffffffffu, v > 0.0f);
  const float down = __shfl_down_sync(0xffffffffu, v, 1);
  const float up = __shfl_up_sync(0xffffffffu, v, 2);
  const float from3 = __shfl_sync(0xffffffffu, v, 3);
  float half_sum = v;  // a sum within each half warp, by a partial mask and by width 16
  if (lane < 16) half_sum += __shfl_xor_sync(0x0000ffffu, v, 8);
  const float width8 = __shfl_xor_sync(0xffffffffu, v, 4, 8);
  __syncthreads();
  const float total = dyn[blockDim.x * blockDim.y];
  y[t * 7 + 0] = down;
  y[t * 7 + 1] = up;
  y[t * 7 + 2] = from3;
  y[t * 7 + 3] = half_sum;
  y[t * 7 + 4] = width8;
  y[t * 7 + 5] = total;
  y[t * 7 + 6] = float(__any_sync(0xffffffffu, v > 1.0f) + 2 * __all_sync(0xffffffffu, v > -1e30f));
  if (lane == 0) votes[t / 32] = ballot;
}

}  // namespace
}  // namespace progan_emu_selftest

using namespace progan_emu_selftest;

extern "C" __attribute__((visibility("default"))) int progan_emu_selftest_block_sum(const float* x, float* out, int n,
                                                                                    int threads, int with_barrier) {
  if (with_barrier) {
    block_sum_kernel<true><<<1, threads>>>(x, out, n);
  } else {
    block_sum_kernel<false><<<1, threads>>>(x, out, n);
  }
  return cudaGetLastError();
}

extern "C" __attribute__((visibility("default"))) int progan_emu_selftest_copy(const float* x, float* y, int64_t n,
                                                                               int blocks, int off_by_one) {
  copy_kernel<<<blocks, 64>>>(x, y, n, off_by_one);
  return cudaGetLastError();
}

extern "C" __attribute__((visibility("default"))) int progan_emu_selftest_shared_tile(const float* x, float* y,
                                                                                      int mode) {
  shared_tile_kernel<<<1, 64>>>(x, y, mode);
  return cudaGetLastError();
}

extern "C" __attribute__((visibility("default"))) int progan_emu_selftest_sync(float* y, int threads, int bug) {
  sync_kernel<<<1, threads>>>(y, bug);
  return cudaGetLastError();
}

extern "C" __attribute__((visibility("default"))) int progan_emu_selftest_features(const float* x, float* y,
                                                                                   unsigned* votes, int n) {
  features_kernel<<<1, dim3(16, 4), (16 * 4 + 1) * sizeof(float)>>>(x, y, votes, n);
  return cudaGetLastError();
}

extern "C" __attribute__((visibility("default"))) int progan_emu_selftest_bad_config(float* y) {
  sync_kernel<<<1, 2048>>>(y, 0);
  return cudaGetLastError();
}
