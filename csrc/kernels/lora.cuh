// LoRA linear: y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, and its backward. Dropout masks come from
// a counter-based generator keyed on (seed, row, column): regenerated in the backward,
// never stored. dropout_p == 0 means no mask at all.
#pragma once
#include "common.cuh"

namespace lk {

// x: [M, K], row stride ldx; weight: [N, K], row stride ldw (unit column strides).
// bias: [N] or nullptr; lora_A: [R, K], lora_B: [N, R] contiguous.
// y: [M, N] contiguous; u = drop(x) Aᵀ: [M, R] (acc_t), saved for the backward.
// workspace: lora_fwd_workspace bytes (nullptr when 0), 16-byte aligned; the CUTLASS path keeps
// its low-rank operands there (lora_cutlass.cuh) and runs only when it is given.
template <typename T>
cudaError_t lora_fwd(const T* x, int64_t ldx, const T* weight, int64_t ldw, const T* bias,
                     const T* lora_A, const T* lora_B, T* y, acc_t<T>* u, int64_t M, int64_t N,
                     int64_t K, int64_t R, double scaling, double dropout_p, uint64_t seed,
                     void* workspace, cudaStream_t stream);

template <typename T>
size_t lora_fwd_workspace(int64_t M, int64_t N, int64_t K, int64_t R, double dropout_p);

template <typename T>
size_t lora_bwd_workspace(int64_t M, int64_t N, int64_t K, int64_t R);

// Extra workspace when dW is asked for (after lora_bwd_workspace's bytes): the CUTLASS dW path's
// transposed copy of g and its split-K partials; 0 where that path cannot apply.
template <typename T>
size_t lora_dw_workspace(int64_t M, int64_t N, int64_t K);

// g: [M, N] contiguous; x, weight, lora_A, lora_B, u as in the forward.
// Outputs: dx [M, K] or nullptr; dA [R, K]; dB [N, R]; dW [N, K] or nullptr; db [N] or nullptr.
// workspace: lora_bwd_workspace bytes, plus lora_dw_workspace when dW is not nullptr.
template <typename T>
cudaError_t lora_bwd(const T* g, const T* x, int64_t ldx, const T* weight, int64_t ldw,
                     const T* lora_A, const T* lora_B, const acc_t<T>* u, T* dx, T* dA, T* dB,
                     T* dW, T* db, void* workspace, int64_t M, int64_t N, int64_t K, int64_t R,
                     double scaling, double dropout_p, uint64_t seed, cudaStream_t stream);

}  // namespace lk
