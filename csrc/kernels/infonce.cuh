// Symmetric temperature-scaled InfoNCE: S = c·I Tᵀ (optionally on L2-normalised rows),
// L = (1/N) Σᵢ [λ(LSE_j S_ij − S_ii) + (1−λ)(LSE_j S_ji − S_ii)]. Tiled: S is never stored,
// memory O(N·D); reductions in a fixed order (deterministic, no float atomics).
#pragma once
#include "common.cuh"

namespace lk {

template <typename T>
size_t infonce_fwd_workspace(int64_t N, int64_t D);

// image, text: [N, D], row strides ldi, ldt (unit column strides). logit_scale: one acc_t on
// the device (c, already exponentiated). Outputs (acc_t, device): loss (one value),
// lse_row [N], lse_col [N].
template <typename T>
cudaError_t infonce_fwd(const T* image, int64_t ldi, const T* text, int64_t ldt,
                        const acc_t<T>* logit_scale, acc_t<T>* loss, acc_t<T>* lse_row,
                        acc_t<T>* lse_col, int64_t N, int64_t D, double lambda, bool normalize,
                        void* workspace, cudaStream_t stream);

template <typename T>
size_t infonce_bwd_workspace(int64_t N, int64_t D);

// gloss: one acc_t on the device (upstream gradient of the loss). Outputs: dimage [N, D] or
// nullptr, dtext [N, D] or nullptr (contiguous, element type T), dscale: one acc_t or nullptr.
template <typename T>
cudaError_t infonce_bwd(const acc_t<T>* gloss, const T* image, int64_t ldi, const T* text,
                        int64_t ldt, const acc_t<T>* logit_scale, const acc_t<T>* lse_row,
                        const acc_t<T>* lse_col, T* dimage, T* dtext, acc_t<T>* dscale,
                        int64_t N, int64_t D, double lambda, bool normalize, void* workspace,
                        cudaStream_t stream);

// One direction on a rectangular block, for the distributed loss: queries [M, D] (local rows)
// against keys [N, D] (gathered), query row i paired with key row i + offset (0 <= offset <= N − M).
// Outputs (acc_t, device): part = Σᵢ (LSE_j S_ij − S_i,i+offset) / N (one value), lse [M].
template <typename T>
size_t infonce_rows_fwd_workspace(int64_t M, int64_t N, int64_t D);

template <typename T>
cudaError_t infonce_rows_fwd(const T* queries, int64_t ldq, const T* keys, int64_t ldk,
                             const acc_t<T>* logit_scale, acc_t<T>* part, acc_t<T>* lse, int64_t M,
                             int64_t N, int64_t D, int64_t offset, bool normalize, void* workspace,
                             cudaStream_t stream);

template <typename T>
size_t infonce_rows_bwd_workspace(int64_t M, int64_t N, int64_t D);

// gpart: one acc_t on the device. Outputs: dqueries [M, D] or nullptr, dkeys [N, D] or nullptr
// (contiguous, element type T), dscale: one acc_t or nullptr.
template <typename T>
cudaError_t infonce_rows_bwd(const acc_t<T>* gpart, const T* queries, int64_t ldq, const T* keys,
                             int64_t ldk, const acc_t<T>* logit_scale, const acc_t<T>* lse,
                             T* dqueries, T* dkeys, acc_t<T>* dscale, int64_t M, int64_t N, int64_t D,
                             int64_t offset, bool normalize, void* workspace, cudaStream_t stream);

}  // namespace lk
