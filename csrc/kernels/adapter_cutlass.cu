// Host side of the adapter forward on the CUTLASS kernels (adapter_cutlass.cuh): where it applies,
// its workspace, the two launches. The kernels are instantiated in adapter_sm80.cu / adapter_sm90.cu.
//
// Applies (as LoRA's CUTLASS forward, lora_cutlass.cu): half/bf16, any M >= 1 (few row tiles get
// split-K instead, splitk_rule.h; each product has its own split count), K, R and ldx multiples of
// 8 elements (16-byte rows for cp.async and TMA), ldx >= K, x, W_d, W_u and the workspace 16-byte
// aligned, sizes that fit CuTe's int shapes and the (⌈M/128⌉, ⌈N/128⌉, S) grid, and a device whose
// image of both kernels is loadable. adapter.cu asks only after
// adapter_fused.cu's single pass declined (R > 64, or its x tile exceeds shared memory).
// Traffic against that pass: x is read twice (down GEMM, then the residual in the up GEMM's
// epilogue) and h goes through memory (fp32 h for the backward, written by both paths, plus
// T(act(h)) written and read once); the GEMM work, 4·M·K·R FLOP, runs on mma.sync/wgmma tiles.
// Not run or timed yet: no GPU so far.
#include "adapter_cutlass.cuh"

namespace lk {
namespace lora_detail {
namespace {

// T(act(h)) [M, R] in the workspace, then the split-K partials (adapter_cutlass_partial_bytes).
size_t act_bytes(size_t elem, int64_t M, int64_t R) { return round_up_256(elem * static_cast<size_t>(M * R)); }

}  // namespace
}  // namespace lora_detail

template <typename T>
size_t adapter_fwd_workspace(int64_t M, int64_t K, int64_t R) {
  if (!is_16bit<T> || !lora_detail::adapter_cutlass_sizes_fit(M, K, R)) return 0;
  // T(act(h)) [M, R], then the split-K partials
  return lora_detail::act_bytes(sizeof(T), M, R) + lora_detail::adapter_cutlass_partial_bytes(M, K, R);
}

namespace adapter_detail {

template <typename T>
cudaError_t adapter_fwd_cutlass(const T* x, int64_t ldx, const T* w_down, const T* b_down, const T* w_up,
                                const T* b_up, T* y, acc_t<T>* h, void* workspace, int64_t M, int64_t K,
                                int64_t R, Activation act, double scale, cudaStream_t stream) {
  using namespace lora_detail;
  if constexpr (!is_16bit<T>) {
    return cudaErrorNotSupported;
  } else {
    using Down = EpilogueBiasAct<T>;
    using Up = EpilogueResidual<T>;
    if (workspace == nullptr || !adapter_cutlass_sizes_fit(M, K, R) || ldx < K || ldx % 8 != 0 ||
        !aligned16(x) || !aligned16(w_down) || !aligned16(w_up) || !aligned16(workspace))
      return cudaErrorNotSupported;
    const CutlassPath path = cutlass_device_path<Down, false>();
    if (path == CutlassPath::none || cutlass_device_path<Up, false>() != path) return cudaErrorNotSupported;
    T* a = static_cast<T*>(workspace);  // T(act(h)) [M, R]
    float* partials = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + act_bytes(sizeof(T), M, R));
    // h [M, R] = x [M, K] · W_d [R, K]ᵀ: B K-major with row stride K
    const CutlassGemm<Down> down{x, ldx, w_down, K, nullptr, 0, nullptr, 0, {b_down, h, R, a, R, act}, M, R, K, 0};
    cudaError_t err = cutlass_launch<Down, false>(path, down, stream, SplitK{partials, splitk::split_count(M, R, K)});
    if (err != cudaSuccess) return err;
    // y [M, K] = x + s·(T(act(h)) [M, R] · W_u [K, R]ᵀ + b_u)
    const CutlassGemm<Up> up{a, R, w_up, R, nullptr, 0, nullptr, 0,
                             {b_up, x, ldx, y, K, static_cast<float>(scale)}, M, K, R, 0};
    return cutlass_launch<Up, false>(path, up, stream, SplitK{partials, splitk::split_count(M, K, R)});
  }
}

}  // namespace adapter_detail

#define LK_INSTANTIATE_ADAPTER_CUTLASS(T)                                                                       \
  template size_t adapter_fwd_workspace<T>(int64_t, int64_t, int64_t);                                         \
  template cudaError_t adapter_detail::adapter_fwd_cutlass<T>(const T*, int64_t, const T*, const T*, const T*, \
                                                              const T*, T*, acc_t<T>*, void*, int64_t, int64_t, \
                                                              int64_t, Activation, double, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_ADAPTER_CUTLASS)
#undef LK_INSTANTIATE_ADAPTER_CUTLASS

}  // namespace lk
