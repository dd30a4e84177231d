// The LoRA forward on CUTLASS 3.x / CuTe, called by lora_fwd (lora.cu); half/bf16, no dropout.
// No CUTLASS header here: only lora_sm80.cu and lora_sm90.cu include CUTLASS, so lora.cu and
// lora_cutlass.cu compile as before.
//
//   1. u = x Aᵀ (fp32, saved for the backward): lora.cu's rowdot, as on the other paths.
//   2. lowrank_operands_kernel (lora_cutlass.cu): h = T(s·u) [M, RP] and a copy of lora_B
//      [N, RP], both zero past R (RP = R rounded up to 16), in the forward's workspace: 16-byte
//      rows whatever R is, as cp.async and TMA need.
//   3. one GEMM kernel per output tile: CUTLASS's mainloop over (x, W0) for ⌈K/64⌉ k-tiles, then
//      the same mainloop over (h, B) for ⌈RP/64⌉ more into the same accumulators, then bias, one
//      rounding and one write of y. sm_90a (H100/H200, built with 9.0a): lora_sm90.cu, TMA +
//      wgmma; any other sm_80+ GPU: lora_sm80.cu, cp.async + ldmatrix + mma.sync.
#pragma once
#include "lora.cuh"

namespace lk {
namespace lora_detail {

// What the GEMM kernels read and write (lora_cutlass.cu has checked every condition below).
template <typename T>
struct CutlassFwd {
  const T* x;     // [M, K], row stride ldx
  int64_t ldx;
  const T* w;     // [N, K], row stride ldw
  int64_t ldw;
  const T* h;     // [M, RP] contiguous: T(s·u), zero past R
  const T* b;     // [N, RP] contiguous: lora_B, zero past R
  int64_t rp;
  const T* bias;  // [N] or nullptr
  T* y;           // [M, N] contiguous
  int64_t M, N, K;
};

enum class CutlassPath { none, sm80, sm90a };

// The kernel this forward takes, or none (lora_fwd then keeps its other paths): T half/bf16,
// M >= 128, K, ldx and ldw multiples of 8 elements, x, weight and workspace 16-byte aligned,
// sizes below 2^31, a device of capability >= 8.0 whose image of the kernel is loadable and
// whose shared memory per block fits it. sm90a only on capability 9.0 in a build with sm_90a code.
template <typename T>
CutlassPath lora_cutlass_path(const T* x, int64_t ldx, const T* weight, int64_t ldw, int64_t M, int64_t N,
                              int64_t K, int64_t R, const void* workspace);

// Steps 2 and 3 above, after u has been written.
template <typename T>
cudaError_t lora_fwd_cutlass(CutlassPath path, const T* x, int64_t ldx, const T* weight, int64_t ldw,
                             const T* bias, const T* lora_B, T* y, const acc_t<T>* u, int64_t M, int64_t N,
                             int64_t K, int64_t R, double scaling, void* workspace, cudaStream_t stream);

// lora_sm80.cu / lora_sm90.cu: whether the current device can run the kernel (image loadable,
// shared memory), and its launch. T is __half or __nv_bfloat16.
template <typename T> bool lora_sm80_ready(int device);
template <typename T> cudaError_t lora_sm80_launch(const CutlassFwd<T>& p, cudaStream_t stream);
template <typename T> bool lora_sm90_ready(int device);
template <typename T> cudaError_t lora_sm90_launch(const CutlassFwd<T>& p, cudaStream_t stream);

}  // namespace lora_detail
}  // namespace lk
