// Adapter forward: adapter_fused.cu's single pass where it applies; else the two products on
// LoRA's CUTLASS kernels (adapter_cutlass.cu) where they apply; else two tiled GEMMs
// (adapter_gemm.cuh):
//   h = x·W_dᵀ (+b_d)  [M, R] over K,   y = x + s·(act(h)·W_uᵀ + b_u)  [M, K] over R.
#include "adapter.cuh"
#include "adapter_gemm.cuh"

namespace lk {
namespace {

using adapter_detail::Shape;
using adapter_detail::TileSquare;
using adapter_detail::TileTall;
using adapter_detail::act_fwd;
using adapter_detail::launch_gemm;
using adapter_detail::valid_act;

// h[m, r] = Σ_k x[m, k]·W_d[r, k] + b_d[r]. i = m, j = r, p = k.
template <typename T>
struct DownFwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = false, kBUnitJ = false;
  const T* x;     // [M, K], row stride ldx
  int64_t ldx;
  const T* wd;    // [R, K]
  const T* bd;    // [R] or nullptr
  Acc* h;         // [M, R]
  int64_t K, R;
  __device__ Acc a(int64_t m, int64_t k) const { return to_acc<Acc>(x[m * ldx + k]); }
  __device__ Acc b(int64_t k, int64_t r) const { return to_acc<Acc>(wd[r * K + k]); }
  __device__ void out(int64_t m, int64_t r, Acc v, int) const {
    if (bd != nullptr) v += to_acc<Acc>(bd[r]);
    h[m * R + r] = v;
  }
  __device__ void out_row_sum(int64_t, Acc, int) const {}
};

// y[m, k] = x[m, k] + s·(Σ_r act(h[m, r])·W_u[k, r] + b_u[k]). i = m, j = k, p = r.
template <typename T>
struct UpFwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = false, kBUnitJ = false;
  const Acc* h;   // [M, R]
  const T* wu;    // [K, R]
  const T* bu;    // [K] or nullptr
  const T* x;     // [M, K], row stride ldx
  int64_t ldx;
  T* y;           // [M, K]
  int64_t K, R;
  Acc scale;
  Activation act;
  __device__ Acc a(int64_t m, int64_t r) const { return act_fwd(h[m * R + r], act); }
  __device__ Acc b(int64_t r, int64_t k) const { return to_acc<Acc>(wu[k * R + r]); }
  __device__ void out(int64_t m, int64_t k, Acc v, int) const {
    if (bu != nullptr) v += to_acc<Acc>(bu[k]);
    y[m * K + k] = from_acc<T>(to_acc<Acc>(x[m * ldx + k]) + scale * v);
  }
  __device__ void out_row_sum(int64_t, Acc, int) const {}
};

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers

template <typename T>
cudaError_t adapter_fwd(const T* x, int64_t ldx, const T* w_down, const T* b_down, const T* w_up,
                        const T* b_up, T* y, acc_t<T>* h, void* workspace, int64_t M, int64_t K, int64_t R,
                        Activation act, double scale, cudaStream_t stream) {
  using A = acc_t<T>;
  if (M < 0 || K < 1 || R < 1 || ldx < 0 || !valid_act(act))
    return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (x == nullptr || w_down == nullptr || w_up == nullptr || y == nullptr || h == nullptr)
    return cudaErrorInvalidValue;

  // One pass (adapter_fused.cu) for R <= 64 where the x tile fits in shared memory, first even
  // where CUTLASS would apply: it reads x once and keeps act(h) on chip, where the two GEMMs below
  // read x twice and pass h through memory (the forward is memory-bound, ~R FLOP per byte).
  const cudaError_t fused = adapter_detail::adapter_fwd_fused<T>(x, ldx, w_down, b_down, w_up, b_up, y, h,
                                                                 M, K, R, act, scale, stream);
  if (fused != cudaErrorNotSupported) return fused;
  // Then the two products on CUTLASS's pipelined tensor-core mainloops (16-bit, split-K
  // at small M, 16-byte rows), then the same two products on adapter_gemm.cuh's tiled GEMM.
  const cudaError_t cutlass = adapter_detail::adapter_fwd_cutlass<T>(x, ldx, w_down, b_down, w_up, b_up, y, h,
                                                                     workspace, M, K, R, act, scale, stream);
  if (cutlass != cudaErrorNotSupported) return cutlass;

  DownFwd<T> down{};
  //                           I  J  P  chunk row_sums j_fastest
  static_cast<Shape&>(down) = {M, R, K, K, false, true};
  down.x = x, down.ldx = ldx, down.wd = w_down, down.bd = b_down, down.h = h;
  down.K = K, down.R = R;
  const cudaError_t e = R <= 16 ? launch_gemm<TileTall>(down, 1, stream)
                                : launch_gemm<TileSquare>(down, 1, stream);
  if (e != cudaSuccess) return e;

  UpFwd<T> up{};
  static_cast<Shape&>(up) = {M, K, R, R, false, true};
  up.h = h, up.wu = w_up, up.bu = b_up, up.x = x, up.ldx = ldx, up.y = y;
  up.K = K, up.R = R, up.scale = static_cast<A>(scale), up.act = act;
  return launch_gemm<TileSquare>(up, 1, stream);
}

#define LK_INSTANTIATE_ADAPTER(T)                                                               \
  template cudaError_t adapter_fwd<T>(const T*, int64_t, const T*, const T*, const T*,          \
                                      const T*, T*, acc_t<T>*, void*, int64_t, int64_t, int64_t, \
                                      Activation, double, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_ADAPTER)
#undef LK_INSTANTIATE_ADAPTER

}  // namespace lk
