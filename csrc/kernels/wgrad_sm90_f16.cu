// The weight-gradient GEMM for sm_90a (cutlass_wgrad_sm90.cuh) for __half, r tiles of 16, 32 and 64.
#include "cutlass_wgrad_sm90.cuh"

namespace lk {
namespace wgrad {
LK_INSTANTIATE_WGRAD_SM90(__half)
}  // namespace wgrad
}  // namespace lk
