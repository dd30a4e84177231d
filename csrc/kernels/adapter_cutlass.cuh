// The adapter forward's two products on the CUTLASS GEMM kernels LoRA uses (lora_cutlass.cuh,
// cutlass_sm80.cuh / cutlass_sm90.cuh), one phase each (K2 = 0), with these epilogue policies:
//   down  h = x W_dᵀ + b_d    EpilogueBiasAct: h in fp32 (the pre-activation the backward reads,
//                             as adapter.cu's DownFwd saves it) and T(act(h)), the up product's
//                             operand, into the forward's workspace [M, R]
//   up    y = x + s·(T(act(h)) W_uᵀ + b_u)   EpilogueResidual: x read in the epilogue
// act(h) is rounded to T between the two, as adapter_gemm.cuh's tensor-core GEMM (and an eager
// half-precision matmul) rounds it in shared memory. The activations are adapter_detail.cuh's act_fwd.
// The backward's dz and dx (adapter_bwd_cutlass.cu), B operands N-major (W_u [K, R], W_d [R, K] read
// along their rows):
//   dz  = s·(g W_u) ⊙ act'(h)   EpilogueActGrad: fp32 dz and T(dz) into the backward's workspace
//   dx  = g + T(dz) W_d         EpilogueResidual with no bias and scale 1: g read in the epilogue
// No CUTLASS header here; adapter_cutlass.cu and adapter_bwd_cutlass.cu (host) and adapter_sm80.cu /
// adapter_sm90.cu include it.
#pragma once
#include "adapter_detail.cuh"
#include "lora_cutlass.cuh"
#include "splitk_rule.h"

#include <algorithm>
#include <climits>

namespace lk {
namespace lora_detail {

// The sizes alone (no pointers, no device) for which the adapter's CUTLASS products (forward:
// adapter_cutlass.cu, backward: adapter_bwd_cutlass.cu) can apply; their workspace functions and
// paths share it. CuTe's shapes are int; gridDim.y counts the output's 128-column tiles.
inline bool adapter_cutlass_sizes_fit(int64_t M, int64_t K, int64_t R) {
  constexpr int64_t kMaxCols = 65535LL * 128;
  return M >= 1 && M <= INT_MAX && K >= 8 && K <= kMaxCols && R >= 8 && R <= kMaxCols && K % 8 == 0 &&
         R % 8 == 0;
}

// The fp32 split-K partials (splitk_rule.h) of an adapter's pair of products, [M, R] reduced over K
// (down, dz) and [M, K] over R (up, dx): one buffer for both (the launches are ordered on the
// stream), as large as the larger; 0 where both run one split.
inline size_t adapter_cutlass_partial_bytes(int64_t M, int64_t K, int64_t R) {
  const int64_t narrow = splitk::split_count(M, R, K), wide = splitk::split_count(M, K, R);
  const int64_t floats = std::max(narrow > 1 ? narrow * M * R : 0, wide > 1 ? wide * M * K : 0);
  return sizeof(float) * static_cast<size_t>(floats);
}

template <typename T>
struct EpilogueBiasAct {
  using Elem = T;
  const T* bias;   // b_d [N] or nullptr
  float* h;        // [M, N], row stride ldh: acc + b_d
  int64_t ldh;
  T* a;            // [M, N], row stride lda: T(act(h))
  int64_t lda;
  Activation act;

  // The activation as a constant: one unrolled loop per activation, no switch per element.
  template <Activation kAct>
  struct Out {
    const T* bias;
    float* h;
    int64_t ldh;
    T* a;
    int64_t lda;
    __device__ __forceinline__ void operator()(int64_t i, int64_t j, float v) const {
      if (bias != nullptr) v += to_acc<float>(bias[j]);
      h[i * ldh + j] = v;
      a[i * lda + j] = from_acc<T>(adapter_detail::act_fwd(v, kAct));
    }
  };
  template <class Visit>
  __device__ __forceinline__ void dispatch(Visit&& visit) const {
    switch (act) {
      case Activation::gelu: visit(Out<Activation::gelu>{bias, h, ldh, a, lda}); break;
      case Activation::gelu_tanh: visit(Out<Activation::gelu_tanh>{bias, h, ldh, a, lda}); break;
      case Activation::relu: visit(Out<Activation::relu>{bias, h, ldh, a, lda}); break;
      default: visit(Out<Activation::silu>{bias, h, ldh, a, lda}); break;
    }
  }
};

template <typename T>
struct EpilogueResidual {
  using Elem = T;
  const T* bias;   // b_u [N] or nullptr
  const T* x;      // [M, N], row stride ldx: the residual
  int64_t ldx;
  T* y;            // [M, N], row stride ldy
  int64_t ldy;
  float scale;
  template <class Visit>
  __device__ __forceinline__ void dispatch(Visit&& visit) const { visit(*this); }
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, float v) const {
    if (bias != nullptr) v += to_acc<float>(bias[j]);
    y[i * ldy + j] = from_acc<T>(to_acc<float>(x[i * ldx + j]) + scale * v);
  }
};

// The backward's dz = s·(g W_u) ⊙ act'(h) [M, R] from acc = g W_u (adapter_bwd_cutlass.cu): dz in fp32,
// what adapter_bwd.cu's weight-gradient GEMMs read (as DhBwd and adapter_fused.cu's pass write it),
// and, where dzt is set, T(dz), the dx product's A operand: rounded once, as DhBwd's dh is rounded in
// the WMMA tiles of the DxBwd GEMM it replaces. act' is adapter_detail.cuh's act_grad.
template <typename T>
struct EpilogueActGrad {
  using Elem = T;
  const float* h;  // [M, N], row stride ldh: the forward's pre-activation
  int64_t ldh;
  float* dz;       // [M, N], row stride ldz
  int64_t ldz;
  T* dzt;          // [M, N], row stride ldzt, or nullptr
  int64_t ldzt;
  float scale;
  Activation act;

  template <Activation kAct>
  struct Out {
    const float* h;
    int64_t ldh;
    float* dz;
    int64_t ldz;
    T* dzt;
    int64_t ldzt;
    float scale;
    __device__ __forceinline__ void operator()(int64_t i, int64_t j, float v) const {
      const float d = scale * v * adapter_detail::act_grad(h[i * ldh + j], kAct);
      dz[i * ldz + j] = d;
      if (dzt != nullptr) dzt[i * ldzt + j] = from_acc<T>(d);
    }
  };
  template <class Visit>
  __device__ __forceinline__ void dispatch(Visit&& visit) const {
    switch (act) {
      case Activation::gelu: visit(Out<Activation::gelu>{h, ldh, dz, ldz, dzt, ldzt, scale}); break;
      case Activation::gelu_tanh: visit(Out<Activation::gelu_tanh>{h, ldh, dz, ldz, dzt, ldzt, scale}); break;
      case Activation::relu: visit(Out<Activation::relu>{h, ldh, dz, ldz, dzt, ldzt, scale}); break;
      default: visit(Out<Activation::silu>{h, ldh, dz, ldz, dzt, ldzt, scale}); break;
    }
  }
};

}  // namespace lora_detail
}  // namespace lk
