// Shared by every kernel file: element types, their accumulator type, conversions.
// Plain CUDA, no torch headers: each kernels/*.cu compiles with `nvcc -c` alone.
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace lk {

// Accumulation (and saved statistics) type: fp32 for half, bf16 and fp32; fp64 for fp64.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

template <typename A, typename T> __device__ __forceinline__ A to_acc(T v) { return static_cast<A>(v); }
template <> __device__ __forceinline__ float to_acc<float, __half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_acc<float, __nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, typename A> __device__ __forceinline__ T from_acc(A v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __half from_acc<__half, float>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16, float>(float v) { return __float2bfloat16_rn(v); }

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// For the launchers: the element types of the 16-bit tensor-core paths; 16-byte alignment (vector
// loads, cp.async and TMA move whole 16-byte rows); workspace pieces on 256-byte boundaries.
template <typename T>
inline constexpr bool is_16bit = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
inline size_t round_up_256(size_t bytes) { return (bytes + 255) / 256 * 256; }

}  // namespace lk

// Every launcher is explicitly instantiated for these four element types in its .cu file.
#define LK_FOR_EACH_TYPE(MACRO) MACRO(__half) MACRO(__nv_bfloat16) MACRO(float) MACRO(double)
