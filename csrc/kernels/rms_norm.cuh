// RMSNorm for LN-tuning: y = x·rstd·(offset + γ), rstd = 1/√(mean(x²) + eps); a backward that
// gives dγ (when asked) and dx only when asked. Deterministic: dγ is fp32 (fp64 for double)
// partials per row block, then one fixed-order sum; no float atomics.
#pragma once
#include "common.cuh"

namespace lk {

// x: [M, N], row stride ldx (elements, any ldx >= 0: rows may overlap, as in x.expand(M, N),
// since x is only read), unit column stride. weight: [N] or nullptr (no scale;
// offset is then ignored). y: [M, N] contiguous. rstd: [M] (acc_t), or nullptr (inference: not
// kept). Any N >= 1, M >= 0.
template <typename T>
cudaError_t rms_norm_fwd(const T* x, int64_t ldx, const T* weight, T* y, acc_t<T>* rstd, int64_t M,
                         int64_t N, double eps, double offset, cudaStream_t stream);

// Bytes of scratch rms_norm_bwd needs (0 allowed); the caller allocates it on the device.
template <typename T>
size_t rms_norm_bwd_workspace(int64_t M, int64_t N);

// g: [M, N] contiguous; x as in the forward. dx: [M, N] contiguous, or nullptr (not needed).
// dweight: [N], or nullptr (not needed). weight may be nullptr (no scale).
template <typename T>
cudaError_t rms_norm_bwd(const T* g, const T* x, int64_t ldx, const T* weight, const acc_t<T>* rstd,
                         T* dx, T* dweight, void* workspace, int64_t M, int64_t N, double offset,
                         cudaStream_t stream);

}  // namespace lk
