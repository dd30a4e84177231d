// Weight gradients reduced over the tokens on CUTLASS 3.x / CuTe tensor cores:
//   C[w, r] = Σ_m A[m, w]·B[m, r]      A [M, W] 16-bit (g or x, row stride lda), B [M, RB] 16-bit
// with M (tokens) the long reduction and a small output (W = N or K, r < R <= a few hundred).
// Users: LoRA's dB = s·gᵀu and dA = vᵀx (lora.cu), the adapter's dW_up = s·gᵀ act(h) and
// dW_down = dhᵀx (adapter_bwd.cu). They used CUDA-core FMAs (lora_reduce.cu's colsum,
// adapter_gemm.cuh's split GEMM), which stay the fallback.
//
// Plan of one gradient (wgrad.cu):
//  1. prep: B = T(f(src)) [M, RB] from the fp32 [M, R] the backward has (u, v, act(h), dh), with
//     an optional column of ones at r = R (then C[w, R] = Σ_m A[m, w]: LoRA's db, the adapter's
//     db_up, for free), zeros up to RB = round8(R + ones): whole 16-byte rows for cp.async. The
//     rounding to T is where eager PyTorch rounds too: its half matmul takes u, v, act(h), dh as
//     half tensors. Optionally the per-block column sums of src (the adapter's db_down = Σ_m dh,
//     from fp32 dh, not from its rounding).
//  2. the GEMM: one block per 128 (w) × RT (r) output tile (RT = 16, 32, 64 by RB; more r tiles
//     past 64) and per split z of M; both operands MN-major (contiguous along w and r). sm_90a
//     (H100/H200 in a build with sm_90a code, rows not overlapping, else the old path there):
//     cutlass_wgrad_sm90.cuh, TMA + wgmma; other sm_80+: cutlass_wgrad_sm80.cuh, cp.async +
//     ldmatrix.trans + mma.sync.
//     One split writes T(scale·C) straight to the output; S > 1 splits write fp32 partials.
//  3. finish (S > 1): out = T(scale·Σ_{z=0..S-1} part[z]), z in increasing order.
// Determinism: no atomics; S and the m-ranges depend on (M, W, R) only (wgrad_split in wgrad.cu).
#pragma once
#include "lora_cutlass.cuh"

namespace lk {
namespace wgrad {

// The GEMM's parameters. Split z covers rows [z·chunk, min(M, (z+1)·chunk)) (chunk a multiple of
// the 64-row k-tile) and writes C, or its partial, for w < W, r < NC = R + (ones_out != nullptr).
template <typename T>
struct WgradGemm {
  const T* a;        // [M, W], row stride lda (W and lda multiples of 8, 16-byte aligned)
  int64_t lda;
  const T* b;        // [M, RB] contiguous, RB a multiple of 8
  int64_t M, W, RB, R, NC, chunk;
  float scale;       // out = T(scale·C[w, r]) for r < R
  T* out;            // element (w, r) at out[w·osw + r·osr]
  int64_t osw, osr;
  float ones_scale;  // ones_out[w] = T(ones_scale·C[w, R])
  T* ones_out;       // [W] or nullptr
  float* part;       // [S, W, NC] fp32 partials, or nullptr: write out/ones_out directly (S == 1)
};

// Where a finished accumulator C[w, r] of split `split` goes (both kernels' epilogue); the caller
// has checked w < W, r < NC.
template <typename T>
__device__ __forceinline__ void wgrad_store(const WgradGemm<T>& p, int split, int64_t w, int64_t r, float v) {
  if (p.part != nullptr)
    p.part[(static_cast<int64_t>(split) * p.W + w) * p.NC + r] = v;
  else if (r < p.R)
    p.out[w * p.osw + r * p.osr] = from_acc<T>(p.scale * v);
  else
    p.ones_out[w] = from_acc<T>(p.ones_scale * v);
}

// cutlass_wgrad_sm80.cuh, instantiated for T = __half / __nv_bfloat16 and RT = 16, 32, 64 in
// wgrad_sm80_f16.cu / wgrad_sm80_bf16.cu: whether the device can run the kernel, and its launch
// over the grid (⌈W/128⌉, ⌈RB/RT⌉, splits).
template <typename T, int RT> bool wgrad_sm80_ready(int device);
template <typename T, int RT> cudaError_t wgrad_sm80_launch(const WgradGemm<T>& p, int64_t splits, cudaStream_t stream);
// cutlass_wgrad_sm90.cuh (TMA + wgmma, sm_90a code only; wgrad_sm90_f16.cu / wgrad_sm90_bf16.cu): the
// same contract, run on capability 9.0 in a build with sm_90a code (LK_BUILT_SM90A, as
// lora_cutlass.cuh's cutlass_device_path explains), else the sm80 kernel.
template <typename T, int RT> bool wgrad_sm90_ready(int device);
template <typename T, int RT> cudaError_t wgrad_sm90_launch(const WgradGemm<T>& p, int64_t splits, cudaStream_t stream);

// ---------------------------------------------------------------- host API (wgrad.cu)

// No activation: B = T(src). Otherwise static_cast<int>(Activation): B = T(act(src)).
constexpr int kNoAct = -1;

// Bytes of workspace one gradient needs (B, partials, column-sum partials), 0 where the kernel
// never applies (fp32/fp64). ones: the column of ones; colsum: Σ_m src[m, r] wanted.
template <typename T>
size_t wgrad_workspace(int64_t M, int64_t W, int64_t R, bool ones, bool colsum);

// Whether the CUTLASS kernel runs this gradient: T half/bf16, M >= 1, R >= 1, W and lda multiples
// of 8, a and workspace 16-byte aligned, sizes below 2^31, a device of capability >= 8.0 that can
// load the kernel's image and give it its shared memory.
template <typename T>
bool wgrad_applies(const T* a, int64_t lda, int64_t M, int64_t W, int64_t R, bool ones, const void* workspace);

// out[w·osw + r·osr] = T(scale·Σ_m A[m, w]·f(src[m, r])), src [M, R] fp32 (acc_t) contiguous;
// ones_out [W] (or nullptr) = T(ones_scale·Σ_m A[m, w]); colsum_out [R] (or nullptr) = T(Σ_m src[m, r]).
// Only after wgrad_applies said yes, with wgrad_workspace(M, W, R, ones_out, colsum_out) bytes.
template <typename T>
cudaError_t wgrad(const T* a, int64_t lda, const acc_t<T>* src, int act, int64_t M, int64_t W, int64_t R,
                  double scale, T* out, int64_t osw, int64_t osr, T* ones_out, double ones_scale, T* colsum_out,
                  void* workspace, cudaStream_t stream);

}  // namespace wgrad
}  // namespace lk
