// The CUDA execution model on CPU threads of execution, for running kernels/cuda/*.cu unchanged
// with the host C++ compiler (tests only; never part of progan_fast._C). See ../../README.md.
//
// What a kernel source sees: the CUDA keywords as macros, the built-in variables, dim3/uint3,
// __half/__nv_bfloat16 with CUDA's conversion intrinsics, __syncthreads, warp shuffles and votes,
// atomics, cudaStream_t/cudaError_t/cudaGetLastError, and the device math intrinsics math.h calls.
// A launch `k<<<grid, block, smem, stream>>>(args)` is rewritten by build.py (the only change to
// the source text) into `::progan_emu::launch(k, "k", __FILE__, __LINE__, grid, block, smem,
// stream)(args)`, which runs every block of the grid on fibers, one per CUDA thread
// (runtime.cpp).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ----- keywords ------------------------------------------------------------------------------
// Defined after the standard headers above, so they never see these macros.
#define __CUDACC__ 1
#define __CUDA_ARCH__ 900  // the device branches of progan/math.h (__fmaf_rn, rsqrtf) are the ones compiled
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// One object per __shared__ variable, shared by all fibers; blocks run one at a time, and the
// runtime poisons every __shared__ variable (found in the library's symbol table) before each block.
#define __shared__ static
#define __constant__ static

// ----- runtime types ---------------------------------------------------------------------------
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};
using cudaStream_t = struct CUstream_st*;
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchFailure = 719,
};
cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);

// The built-in variables of the fiber that runs (set by the scheduler before each switch).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ----- half and bfloat16: storage types with CUDA's round-to-nearest-even conversions ---------
struct __half {
  unsigned short __x;
  __half() = default;
};
struct __nv_bfloat16 {
  unsigned short __x;
  __nv_bfloat16() = default;
};

namespace progan_emu {
inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace progan_emu

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.__x & 0x8000u) << 16, exp = (h.__x >> 10) & 0x1f, man = h.__x & 0x3ffu;
  if (exp == 0x1f) return progan_emu::bits_float(sign | 0x7f800000u | (man << 13));  // inf, nan
  if (exp == 0) {  // zero and subnormals: man * 2^-24, exact in float
    const float v = std::ldexp(float(man), -24);
    return sign ? -v : v;
  }
  return progan_emu::bits_float(sign | ((exp + 112) << 23) | (man << 13));
}
inline __half __float2half_rn(float f) {
  const uint32_t u = progan_emu::float_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  __half h;
  if (a > 0x7f800000u) {
    h.__x = 0x7fff;  // CUDA's canonical NaN
  } else if (a >= 0x477ff000u) {
    h.__x = static_cast<unsigned short>(sign | 0x7c00u);  // rounds to infinity (>= 65520)
  } else if (a < 0x38800000u) {  // below the smallest normal 2^-14: a subnormal (or zero), in 2^-24 units
    h.__x = static_cast<unsigned short>(sign | uint32_t(std::nearbyint(std::ldexp(progan_emu::bits_float(a), 24))));
  } else {
    const uint32_t m = a - 0x38000000u;  // rebias the exponent (127 -> 15), then round away 13 bits
    h.__x = static_cast<unsigned short>(sign | ((m + 0x0fffu + ((m >> 13) & 1u)) >> 13));
  }
  return h;
}
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return progan_emu::bits_float(uint32_t(b.__x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = progan_emu::float_bits(f);
  __nv_bfloat16 b;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    b.__x = 0x7fff;  // CUDA's canonical NaN
  } else {
    b.__x = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
  return b;
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline __half __ushort_as_half(unsigned short v) {
  __half h;
  h.__x = v;
  return h;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) {
  __nv_bfloat16 b;
  b.__x = v;
  return b;
}

// ----- device math intrinsics --------------------------------------------------------------
// Correctly rounded here. On the device __fmaf_rn/__fma_rn are exact too, rsqrtf has up to 2 ulp
// of error and rsqrt (double) 1 ulp: tests compare with tolerances that cover them.
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
inline double rsqrt(double v) { return 1.0 / std::sqrt(v); }
inline void __threadfence() {}  // one host thread runs every fiber: memory is always coherent

// ----- synchronization and warp collectives (runtime.cpp) -------------------------------------
namespace progan_emu {
struct Site {
  const char* file;
  int line;
};
enum class Collective : int { ShflIdx, ShflUp, ShflDown, ShflXor, Ballot, Any, All, SyncWarp };
void syncthreads(Site site);
uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int param, int width, Site site);
unsigned active_mask();

template <typename T>
T shuffle(Collective op, unsigned mask, T var, int param, int width, Site site) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "a shuffled value is at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_collective(op, mask, bits, param, width, site);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}
}  // namespace progan_emu

// Each call site is named in reports (__builtin_FILE/LINE are evaluated where the call is written).
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  progan_emu::syncthreads({file, line});
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  progan_emu::warp_collective(progan_emu::Collective::SyncWarp, mask, 0, 0, warpSize, {file, line});
}
template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return progan_emu::shuffle(progan_emu::Collective::ShflIdx, mask, var, src_lane, width, {file, line});
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                 int line = __builtin_LINE()) {
  return progan_emu::shuffle(progan_emu::Collective::ShflUp, mask, var, int(delta), width, {file, line});
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE()) {
  return progan_emu::shuffle(progan_emu::Collective::ShflDown, mask, var, int(delta), width, {file, line});
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize, const char* file = __builtin_FILE(),
                  int line = __builtin_LINE()) {
  return progan_emu::shuffle(progan_emu::Collective::ShflXor, mask, var, lane_mask, width, {file, line});
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return unsigned(progan_emu::warp_collective(progan_emu::Collective::Ballot, mask, pred != 0, 0, warpSize, {file, line}));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return int(progan_emu::warp_collective(progan_emu::Collective::Any, mask, pred != 0, 0, warpSize, {file, line}));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return int(progan_emu::warp_collective(progan_emu::Collective::All, mask, pred != 0, 0, warpSize, {file, line}));
}
inline unsigned __activemask() { return progan_emu::active_mask(); }

// Atomics: a fiber only yields at a barrier or a warp collective, so a read-modify-write is atomic.
template <typename T>
T atomicAdd(T* address, T val) {
  const T old = *address;
  *address = old + val;
  return old;
}
template <typename T>
T atomicExch(T* address, T val) {
  const T old = *address;
  *address = val;
  return old;
}
template <typename T>
T atomicMax(T* address, T val) {
  const T old = *address;
  if (val > old) *address = val;
  return old;
}
template <typename T>
T atomicMin(T* address, T val) {
  const T old = *address;
  if (val < old) *address = val;
  return old;
}
template <typename T>
T atomicCAS(T* address, T compare, T val) {
  const T old = *address;
  if (old == compare) *address = val;
  return old;
}

// ----- launches ----------------------------------------------------------------------------------
namespace progan_emu {
// Runs `body(ctx)` as every thread of every block of the grid; errors go to cudaGetLastError.
void launch_kernel(const char* name, const void* kernel, Site site, dim3 grid, dim3 block, size_t dynamic_smem,
                   cudaStream_t stream, void (*body)(void*), void* ctx);
// Dynamic shared memory (`extern __shared__ T name[];`, rewritten by build.py to a pointer).
void* dynamic_shared();
template <typename T>
T* dynamic_shared() {
  return static_cast<T*>(dynamic_shared());
}
// The grid cap of common.cuh's grid_for (PROGAN_MAX_GRID_BLOCKS), lowered by tests so that a
// grid-stride loop makes several passes on small tensors.
int64_t max_grid_blocks();

// Each argument converts to its parameter type as in a call (implicitly, never by a cast).
template <typename P>
P as_parameter(P value) {
  return value;
}

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  Site site;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "wrong number of kernel arguments");
    struct Context {
      void (*kernel)(P...);
      std::tuple<P...> params;
    } ctx{kernel, std::tuple<P...>(as_parameter<P>(std::forward<A>(args))...)};
    // Every thread calls the kernel with its own copy of the parameters, as on the device.
    launch_kernel(name, reinterpret_cast<const void*>(kernel), site, grid, block, smem, stream,
                  [](void* c) {
                    auto* x = static_cast<Context*>(c);
                    std::tuple<P...> own = x->params;
                    std::apply(x->kernel, own);
                  },
                  &ctx);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), const char* name, const char* file, int line, dim3 grid, dim3 block,
                    size_t smem = 0, cudaStream_t stream = nullptr) {
  return Launch<P...>{kernel, name, Site{file, line}, grid, block, smem, stream};
}
}  // namespace progan_emu
