// LayerNorm for LN-tuning: forward, and a backward that gives dγ/dβ always (when asked) and
// dx only when asked. Deterministic: dγ/dβ are fp32 (fp64 for double) partials per row block,
// then one fixed-order sum; no float atomics.
#pragma once
#include "common.cuh"

namespace lk {

// x: [M, N], row stride ldx (elements, any ldx >= 0: rows may overlap, as in x.expand(M, N),
// since x is only read), unit column stride. weight, bias: [N] or nullptr.
// y: [M, N] contiguous. mean, rstd: [M] (acc_t). Any N >= 1, M >= 0.
template <typename T>
cudaError_t layer_norm_fwd(const T* x, int64_t ldx, const T* weight, const T* bias, T* y,
                           acc_t<T>* mean, acc_t<T>* rstd, int64_t M, int64_t N, double eps,
                           cudaStream_t stream);

// Bytes of scratch layer_norm_bwd needs (0 allowed); the caller allocates it on the device.
template <typename T>
size_t layer_norm_bwd_workspace(int64_t M, int64_t N);

// g: [M, N] contiguous; x as in the forward. dx: [M, N] contiguous, or nullptr (not needed).
// dweight, dbias: [N], or nullptr (not needed). weight may be nullptr (no affine).
template <typename T>
cudaError_t layer_norm_bwd(const T* g, const T* x, int64_t ldx, const T* weight,
                           const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, T* dweight, T* dbias,
                           void* workspace, int64_t M, int64_t N, cudaStream_t stream);

}  // namespace lk
