// Pieces of the adapter shared by the tiled GEMM (adapter_gemm.cuh, launched by adapter.cu and
// adapter_bwd.cu) and adapter_fused.cu (the single-pass kernels): the activations, and the fused
// passes' entry points.
#pragma once
#include "adapter.cuh"

namespace lk {
namespace adapter_detail {

// Activations, evaluated in acc_t

__device__ __forceinline__ float erf_(float v) { return erff(v); }
__device__ __forceinline__ double erf_(double v) { return erf(v); }
__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float tanh_(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_(double v) { return tanh(v); }

constexpr double kSqrtHalf = 0.70710678118654752440;       // 1/√2
constexpr double kInvSqrt2Pi = 0.39894228040143267794;     // 1/√(2π)
constexpr double kSqrt2OverPi = 0.79788456080286535588;    // √(2/π)
constexpr double kTanhCoef = 0.044715;

template <typename A>
__device__ __forceinline__ A act_fwd(A h, Activation act) {
  switch (act) {
    case Activation::gelu:
      return A(0.5) * h * (A(1) + erf_(h * A(kSqrtHalf)));
    case Activation::gelu_tanh:
      return A(0.5) * h * (A(1) + tanh_(A(kSqrt2OverPi) * (h + A(kTanhCoef) * h * h * h)));
    case Activation::relu:
      return h < A(0) ? A(0) : h;  // NaN falls through unchanged
    default:  // silu
      return h / (A(1) + exp_(-h));
  }
}

// d act / dh, exact for each activation (no approximation of the approximation).
template <typename A>
__device__ __forceinline__ A act_grad(A h, Activation act) {
  switch (act) {
    case Activation::gelu: {
      const A cdf = A(0.5) * (A(1) + erf_(h * A(kSqrtHalf)));
      const A pdf = exp_(A(-0.5) * h * h) * A(kInvSqrt2Pi);
      return cdf + h * pdf;
    }
    case Activation::gelu_tanh: {
      const A t = tanh_(A(kSqrt2OverPi) * (h + A(kTanhCoef) * h * h * h));
      return A(0.5) * (A(1) + t) +
             A(0.5) * h * (A(1) - t * t) * A(kSqrt2OverPi) * (A(1) + A(3 * kTanhCoef) * h * h);
    }
    case Activation::relu:
      return h > A(0) ? A(1) : A(0);
    default: {  // silu
      const A sig = A(1) / (A(1) + exp_(-h));
      return sig * (A(1) + h * (A(1) - sig));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Tensor cores (WMMA m16n16k16, fp32 accumulators) for half and bf16, where the hardware has
// them for both (sm_80+); CUDA cores otherwise. Define LK_ADAPTER_NO_WMMA to force CUDA cores
// everywhere (a debugging switch: both paths share the loads and the epilogue).
#if (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800) && !defined(LK_ADAPTER_NO_WMMA)
#define LK_ADAPTER_WMMA 1
#else
#define LK_ADAPTER_WMMA 0
#endif
template <typename T> struct UseWmma { static constexpr bool value = false; };
template <> struct UseWmma<__half> { static constexpr bool value = LK_ADAPTER_WMMA; };
template <> struct UseWmma<__nv_bfloat16> { static constexpr bool value = LK_ADAPTER_WMMA; };

// The single-pass forward of adapter_fused.cu: x read once, y written once, h written once (for
// the backward) and kept on chip. Same contract as adapter_fwd, whose checks have passed.
// Returns cudaErrorNotSupported, having launched nothing, where it does not apply (R > 64, or the
// x tile does not fit the device's shared memory): the caller then takes the two-GEMM path.
template <typename T>
cudaError_t adapter_fwd_fused(const T* x, int64_t ldx, const T* w_down, const T* b_down, const T* w_up,
                              const T* b_up, T* y, acc_t<T>* h, int64_t M, int64_t K, int64_t R,
                              Activation act, double scale, cudaStream_t stream);

// The forward's two products on the CUTLASS kernels LoRA uses (adapter_cutlass.cu): same contract
// as adapter_fwd; returns cudaErrorNotSupported, having launched nothing, where they do not apply
// (adapter_cutlass.cu's rules): the caller then runs the two tiled GEMMs of adapter_gemm.cuh.
template <typename T>
cudaError_t adapter_fwd_cutlass(const T* x, int64_t ldx, const T* w_down, const T* b_down, const T* w_up,
                                const T* b_up, T* y, acc_t<T>* h, void* workspace, int64_t M, int64_t K,
                                int64_t R, Activation act, double scale, cudaStream_t stream);

// The backward's first and last products in one pass of the same kernel (g read once for both):
// dh = s·(g W_u) ⊙ act'(h) into dh [M, R] (acc_t), and dx = g + dh W_d into dx [M, K] unless dx is
// null. g: [M, K] contiguous; the rest as adapter_bwd. Returns cudaErrorNotSupported, having
// launched nothing, exactly where adapter_fwd_fused does (same tiles): the caller then runs the
// DhBwd and DxBwd GEMMs.
template <typename T>
cudaError_t adapter_bwd_fused(const T* g, const T* w_down, const T* w_up, const acc_t<T>* h, acc_t<T>* dh,
                              T* dx, int64_t M, int64_t K, int64_t R, Activation act, double scale,
                              cudaStream_t stream);

// The backward's dz and dx on the CUTLASS kernels (adapter_bwd_cutlass.cu), for adapter_bwd where
// adapter_bwd_fused declined: dz = s·(g W_u) ⊙ act'(h) into dz [M, R] (acc_t) and, when dx is not
// null, T(dz) into dzt [M, R], then dx = g + T(dz) W_d. dzt: adapter_bwd_cutlass_workspace(M, K, R)
// bytes, 16-byte aligned (0 bytes: the path never applies, from the sizes and T alone). Returns
// cudaErrorNotSupported, having launched nothing, where it does not apply (adapter_bwd_cutlass.cu's
// rules): the caller then runs the DhBwd and DxBwd GEMMs.
template <typename T>
size_t adapter_bwd_cutlass_workspace(int64_t M, int64_t K, int64_t R);
template <typename T>
cudaError_t adapter_bwd_cutlass(const T* g, const T* w_down, const T* w_up, const acc_t<T>* h, acc_t<T>* dz,
                                T* dzt, T* dx, int64_t M, int64_t K, int64_t R, Activation act, double scale,
                                cudaStream_t stream);

}  // namespace adapter_detail
}  // namespace lk
