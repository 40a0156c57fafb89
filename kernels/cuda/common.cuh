// Helpers shared by the CUDA kernels: storage <-> accumulation conversions, vector loads, block
// reductions, grid sizing and the grid-stride loop, the launchers' dtype switch. CUDA runtime
// headers and ours only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "progan/cuda_launchers.h"
#include "progan/layout.h"
#include "progan/math.h"

namespace progan::cuda {

// acc_t<T>, the accumulation type, comes from progan/math.h (shared with the CPU twins).

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_acc(acc_t<T> v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <>
__device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

// VEC elements of T in one 16-byte (or smaller) aligned access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Vec {
  T v[VEC];
};

// Elements per 16-byte access, and whether every pointer allows it for a tensor of `numel`.
template <typename T>
constexpr int vec_width() {
  return 16 / sizeof(T);
}
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
// `scratch` holds 32 values. Ends with a barrier, so it can be called again right away.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : A(0);
    v = warp_sum(v);
  }
  __syncthreads();
  return v;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most blocks grid_for gives a launch. The CPU emulation (kernels/emulation) lowers it so that
// its tests make every grid-stride loop take several passes on small tensors.
#ifndef PROGAN_MAX_GRID_BLOCKS
#define PROGAN_MAX_GRID_BLOCKS (65535 * 8)
#endif

// Grid size for a 1D grid-stride launch: enough blocks to fill the GPU, never more than needed.
inline unsigned grid_for(int64_t work, int threads) {
  const int64_t blocks = ceil_div(work, threads), cap = PROGAN_MAX_GRID_BLOCKS;
  return static_cast<unsigned>(blocks < cap ? (blocks > 0 ? blocks : 1) : cap);
}

}  // namespace progan::cuda

// A grid-stride loop over i in [0, n): each thread starts at its global index and steps by the
// grid's thread count, so a grid_for()-sized grid covers any n.
#define GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// Calls `launch.template operator()<T>()` with T the storage type of `dt`.
#define PROGAN_CUDA_DISPATCH(dt, ...)                                                \
  [&] {                                                                              \
    switch (dt) {                                                                    \
      case ::progan::cuda::DType::Float32: { using scalar_t = float; __VA_ARGS__(); break; }          \
      case ::progan::cuda::DType::Float64: { using scalar_t = double; __VA_ARGS__(); break; }         \
      case ::progan::cuda::DType::BFloat16: { using scalar_t = __nv_bfloat16; __VA_ARGS__(); break; } \
      case ::progan::cuda::DType::Float16: { using scalar_t = __half; __VA_ARGS__(); break; }         \
    }                                                                                \
    return cudaGetLastError();                                                       \
  }()
