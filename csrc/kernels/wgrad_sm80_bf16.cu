// The weight-gradient GEMM (cutlass_wgrad_sm80.cuh) for __nv_bfloat16, r tiles of 16, 32 and 64 (one file
// per element type so that two nvcc jobs share the compile).
#include "cutlass_wgrad_sm80.cuh"

namespace lk {
namespace wgrad {
LK_INSTANTIATE_WGRAD_SM80(__nv_bfloat16)
}  // namespace wgrad
}  // namespace lk
