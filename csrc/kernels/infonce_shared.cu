// InfoNCE: the kernels both passes launch. See infonce_detail.cuh for the plan.
#include "infonce_detail.cuh"

namespace lk {
namespace infonce_detail {

// inv[r] = 1/max(‖X[r]‖, 1e-12) (warp per row), as F.normalize: a zero row stays zero.
template <typename T>
__global__ void __launch_bounds__(kThreads) inv_norm_kernel(const T* __restrict__ X, int64_t ld,
                                                            int64_t N, int64_t D,
                                                            acc_t<T>* __restrict__ inv) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;
  const int lane = threadIdx.x & 31;
  A ss = A(0);
  for (int64_t k = lane; k < D; k += 32) {
    const A v = to_acc<A>(X[row * ld + k]);
    ss = vfma(v, v, ss);
  }
  ss = group_sum(ss, 32);
  constexpr A kNormEps2 = A(1e-24);  // the reference's NORM_EPS squared, normal in fp32
  if (lane == 0) inv[row] = inv_sqrt(ss > kNormEps2 ? ss : kNormEps2);
}

// out = (Σ parts[i], in a fixed order) · (*mul or 1) / denom, by one block.
template <typename A>
__global__ void __launch_bounds__(kThreads) sum_kernel(const A* __restrict__ parts, int64_t n,
                                                       const A* __restrict__ mul, A denom,
                                                       A* __restrict__ out) {
  __shared__ A red[kWarps];
  A v = A(0);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) v += parts[i];
  v = block_sum(v, red);
  if (threadIdx.x == 0) *out = v * (mul ? *mul : A(1)) / denom;
}

template <typename T>
cudaError_t launch_inv_norms(const T* X, int64_t ld, int64_t N, int64_t D, acc_t<T>* inv,
                             cudaStream_t stream) {
  inv_norm_kernel<T><<<static_cast<unsigned>(ceil_div(N, kWarps)), kThreads, 0, stream>>>(X, ld, N, D, inv);
  return cudaGetLastError();
}

template <typename A>
cudaError_t launch_sum(const A* parts, int64_t n, const A* mul, A denom, A* out,
                       cudaStream_t stream) {
  sum_kernel<A><<<1, kThreads, 0, stream>>>(parts, n, mul, denom, out);
  return cudaGetLastError();
}

#define LK_INFONCE_INSTANTIATE(T)                                                                  \
  template cudaError_t launch_inv_norms<T>(const T*, int64_t, int64_t, int64_t, acc_t<T>*,         \
                                           cudaStream_t);
LK_FOR_EACH_TYPE(LK_INFONCE_INSTANTIATE)
#undef LK_INFONCE_INSTANTIATE
template cudaError_t launch_sum<float>(const float*, int64_t, const float*, float, float*,
                                       cudaStream_t);
template cudaError_t launch_sum<double>(const double*, int64_t, const double*, double, double*,
                                        cudaStream_t);

}  // namespace infonce_detail
}  // namespace lk
