// Adapter bottleneck: h = x W_dᵀ + b_d, y = x + s·(act(h) W_uᵀ + b_u), and its backward.
#pragma once
#include "common.cuh"

namespace lk {

// Same order as lora_kernels.reference.adapter.ACTIVATIONS.
enum class Activation : int { gelu = 0, gelu_tanh = 1, relu = 2, silu = 3 };

// x: [M, K], row stride ldx (any ldx >= 0: rows may overlap, as in x.expand(M, K), since x is
// only read), unit column stride. w_down: [R, K], w_up: [K, R] (contiguous);
// b_down: [R] or nullptr; b_up: [K] or nullptr. y: [M, K] contiguous; h: [M, R] (acc_t),
// the pre-activation saved for the backward. workspace: adapter_fwd_workspace(M, K, R) bytes,
// 16-byte aligned, or nullptr when that is 0 (or to keep off the CUTLASS path): the CUTLASS path's
// T(act(h)) [M, R], sized from the shapes alone, so also where the single pass takes over later.
template <typename T>
size_t adapter_fwd_workspace(int64_t M, int64_t K, int64_t R);

template <typename T>
cudaError_t adapter_fwd(const T* x, int64_t ldx, const T* w_down, const T* b_down, const T* w_up,
                        const T* b_up, T* y, acc_t<T>* h, void* workspace, int64_t M, int64_t K, int64_t R,
                        Activation act, double scale, cudaStream_t stream);

template <typename T>
size_t adapter_bwd_workspace(int64_t M, int64_t K, int64_t R);

// g: [M, K] contiguous. Outputs: dx [M, K] or nullptr; dw_down [R, K]; db_down [R] or nullptr;
// dw_up [K, R]; db_up [K] or nullptr. Weight/bias grads reduced deterministically.
template <typename T>
cudaError_t adapter_bwd(const T* g, const T* x, int64_t ldx, const T* w_down, const T* w_up,
                        const acc_t<T>* h, T* dx, T* dw_down, T* db_down, T* dw_up, T* db_up,
                        void* workspace, int64_t M, int64_t K, int64_t R, Activation act,
                        double scale, cudaStream_t stream);

}  // namespace lk
