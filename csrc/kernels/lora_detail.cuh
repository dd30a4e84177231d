// The single-pass LoRA forward of lora_fused.cu, called by lora_fwd (lora.cu).
#pragma once
#include "lora.cuh"

namespace lk {
namespace lora_detail {

// Same contract as lora_fwd without dropout, whose checks have passed. Returns
// cudaErrorNotSupported, having launched nothing, where it does not apply (fp32/fp64, R > 64,
// fewer than 264 output tiles, or R > 16 with more than one column tile): lora_fwd then takes
// its two-launch path.
template <typename T>
cudaError_t lora_fwd_fused(const T* x, int64_t ldx, const T* weight, int64_t ldw, const T* bias,
                           const T* lora_A, const T* lora_B, T* y, acc_t<T>* u, int64_t M, int64_t N,
                           int64_t K, int64_t R, double scaling, cudaStream_t stream);

}  // namespace lora_detail
}  // namespace lk
