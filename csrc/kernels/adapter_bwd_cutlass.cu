// Host side of the adapter backward's dz and dx on the CUTLASS kernels (adapter_cutlass.cuh): where
// they apply, their workspace, the two launches. adapter_bwd.cu asks only after adapter_fused.cu's
// single pass declined; the weight gradients stay adapter_bwd.cu's. The kernels are instantiated in
// adapter_sm80.cu / adapter_sm90.cu with B N-major (kBMN): W_u and W_d are read along their rows, as
// the products need them, with no transposed copy.
//   dz [M, R] = s·(g [M, K] · W_u [K, R]) ⊙ act'(h)   N = R, reduction K; EpilogueActGrad
//   dx [M, K] = g + T(dz) [M, R] · W_d [R, K]          N = K, reduction R; EpilogueResidual (scale 1)
//
// Applies as the forward's CUTLASS path (adapter_cutlass.cu's rules, restated here for the backward's
// operands): half/bf16, any M >= 1 (few output tiles get split-K, splitk_rule.h, each product its
// own count), K and R multiples of 8 (16-byte rows of g, W_u, W_d and T(dz), and N % 8 for the
// N-major B), g, W_u, W_d and the workspace 16-byte aligned, sizes that fit CuTe's int shapes and
// the (⌈M/128⌉, ⌈N/128⌉, S) grid, and a device whose image of both kernels is loadable.
// dz is adapter_bwd.cu's dh (the same fp32 buffer); T(dz) goes to its workspace's dht, followed by
// the split-K partials (one buffer for both products: the launches are ordered on the stream).
// The tile is 128×128 in (rows, N): the dz product's N is R, so where R is not a multiple of 128
// part of the MMA work is on the zero-filled rows of W_u past R (R = 96: 25%; R = 32, reached only
// where the fused pass's g tile exceeds shared memory: 75%). A 128×64 tile would cut that where
// R mod 128 <= 64 (R = 32: 50%; R = 96: no change) at the price of more kernels to compile (and a
// change to cutlass_sm80.cuh / cutlass_sm90.cuh). dx's reduction is R: ⌈R/64⌉ k-tiles, too few to
// fill the pipeline; at R/2 FLOP per byte of g read and dx written it is memory-bound (arithmetic).
// Not run or timed yet: no GPU so far.
#include "adapter_cutlass.cuh"

namespace lk {
namespace adapter_detail {
namespace {

size_t dzt_bytes(size_t elem, int64_t M, int64_t R) { return round_up_256(elem * static_cast<size_t>(M * R)); }

}  // namespace

template <typename T>
size_t adapter_bwd_cutlass_workspace(int64_t M, int64_t K, int64_t R) {
  if (!is_16bit<T> || !lora_detail::adapter_cutlass_sizes_fit(M, K, R)) return 0;
  // T(dz) [M, R], then the partials
  return dzt_bytes(sizeof(T), M, R) + lora_detail::adapter_cutlass_partial_bytes(M, K, R);
}

template <typename T>
cudaError_t adapter_bwd_cutlass(const T* g, const T* w_down, const T* w_up, const acc_t<T>* h, acc_t<T>* dz,
                                T* dzt, T* dx, int64_t M, int64_t K, int64_t R, Activation act, double scale,
                                cudaStream_t stream) {
  using namespace lora_detail;
  if constexpr (!is_16bit<T>) {
    return cudaErrorNotSupported;
  } else {
    using Dz = EpilogueActGrad<T>;
    using Dx = EpilogueResidual<T>;
    if (dzt == nullptr || !adapter_cutlass_sizes_fit(M, K, R) || !aligned16(g) || !aligned16(w_down) ||
        !aligned16(w_up) || !aligned16(dzt))
      return cudaErrorNotSupported;
    const CutlassPath path = cutlass_device_path<Dz, true>();
    if (path == CutlassPath::none || (dx != nullptr && cutlass_device_path<Dx, true>() != path))
      return cudaErrorNotSupported;
    // dz [M, R]: A = g [M, K] (row stride K), B(n = r, k) = W_u[k, r], N-major with row stride R.
    // T(dz) only where dx needs it (the weight gradients read the fp32 dz).
    const CutlassGemm<Dz> pdz{g, K, w_up, R, nullptr, 0, nullptr, 0,
                              {h, R, dz, R, dx != nullptr ? dzt : nullptr, R, static_cast<float>(scale), act},
                              M, R, K, 0};
    float* partials = reinterpret_cast<float*>(reinterpret_cast<unsigned char*>(dzt) + dzt_bytes(sizeof(T), M, R));
    cudaError_t err = cutlass_launch<Dz, true>(path, pdz, stream, SplitK{partials, splitk::split_count(M, R, K)});
    if (err != cudaSuccess || dx == nullptr) return err;
    // dx [M, K] = g + T(dz) [M, R] · W_d: B(n = k, kk = r) = W_d[r, k], N-major with row stride K.
    const CutlassGemm<Dx> pdx{dzt, R, w_down, K, nullptr, 0, nullptr, 0, {nullptr, g, K, dx, K, 1.0f}, M, K, R, 0};
    return cutlass_launch<Dx, true>(path, pdx, stream, SplitK{partials, splitk::split_count(M, K, R)});
  }
}

#define LK_INSTANTIATE_ADAPTER_BWD_CUTLASS(T)                                                               \
  template size_t adapter_bwd_cutlass_workspace<T>(int64_t, int64_t, int64_t);                             \
  template cudaError_t adapter_bwd_cutlass<T>(const T*, const T*, const T*, const acc_t<T>*, acc_t<T>*, T*, \
                                              T*, int64_t, int64_t, int64_t, Activation, double, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_ADAPTER_BWD_CUTLASS)
#undef LK_INSTANTIATE_ADAPTER_BWD_CUTLASS

}  // namespace adapter_detail
}  // namespace lk
