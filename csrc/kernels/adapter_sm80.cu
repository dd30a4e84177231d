// The adapter forward's GEMM kernels for sm_80 (cutlass_sm80.cuh, LoRA's kernels) with
// adapter_cutlass.cuh's epilogues: h = x W_dᵀ + b_d (and T(act(h))), y = x + s·(T(act(h)) W_uᵀ + b_u);
// backward dz = s·(g W_u) ⊙ act'(h) (and T(dz)), dx = g + T(dz) W_d.
#include "adapter_cutlass.cuh"
#include "cutlass_sm80.cuh"

namespace lk {
namespace lora_detail {
LK_INSTANTIATE_CUTLASS_SM80(EpilogueBiasAct<__half>, false)
LK_INSTANTIATE_CUTLASS_SM80(EpilogueBiasAct<__nv_bfloat16>, false)
LK_INSTANTIATE_CUTLASS_SM80(EpilogueResidual<__half>, false)
LK_INSTANTIATE_CUTLASS_SM80(EpilogueResidual<__nv_bfloat16>, false)
// the backward's dz and dx (adapter_bwd_cutlass.cu): W_u and W_d read N-major
LK_INSTANTIATE_CUTLASS_SM80(EpilogueActGrad<__half>, true)
LK_INSTANTIATE_CUTLASS_SM80(EpilogueActGrad<__nv_bfloat16>, true)
LK_INSTANTIATE_CUTLASS_SM80(EpilogueResidual<__half>, true)
LK_INSTANTIATE_CUTLASS_SM80(EpilogueResidual<__nv_bfloat16>, true)
}  // namespace lora_detail
}  // namespace lk
