// LoRA's GEMM kernels for sm_90a (cutlass_sm90.cuh) with EpilogueBias: y = T(a bᵀ + a2 b2ᵀ + bias). kBMN
// false: the forward (x, W0 then h, B); true: dx (g, W0 then T(v), A, B operands N-major).
#include "cutlass_sm90.cuh"

namespace lk {
namespace lora_detail {
LK_INSTANTIATE_CUTLASS_SM90(EpilogueBias<__half>, false)
LK_INSTANTIATE_CUTLASS_SM90(EpilogueBias<__nv_bfloat16>, false)
LK_INSTANTIATE_CUTLASS_SM90(EpilogueBias<__half>, true)
LK_INSTANTIATE_CUTLASS_SM90(EpilogueBias<__nv_bfloat16>, true)
}  // namespace lora_detail
}  // namespace lk
