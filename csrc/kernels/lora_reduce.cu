// The reductions of the two-launch LoRA path (plan in lora.cu): rowdot sums along each row
// (u = drop(x) Aᵀ, v = s·g B), colsum over rows in fixed row chunks (dB, dA, db).
#include "lora_common.cuh"

#include <algorithm>
#include <climits>

namespace lk {
namespace lora_detail {

constexpr int kRowdotThreads = 256, kRowdotRows = 4;
template <typename T> constexpr int kRowdotRanks = sizeof(acc_t<T>) == 8 ? 8 : 16;

template <typename T>
__global__ void __launch_bounds__(kRowdotThreads) rowdot_kernel(const RowdotParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int NT = kRowdotThreads, RM = kRowdotRows, RC = kRowdotRanks<T>, NW = NT / 32;
  __shared__ Acc red[NW][RM * RC];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * RM, r0 = static_cast<int64_t>(blockIdx.y) * RC;

  Acc acc[RM][RC];
#pragma unroll
  for (int mi = 0; mi < RM; ++mi)
#pragma unroll
    for (int r = 0; r < RC; ++r) acc[mi][r] = Acc(0);

  const int64_t nquads = dceil(p.K, 4);
  for (int64_t quad = tid; quad < nquads; quad += NT) {
    const int64_t k = 4 * quad;
    Acc xv[RM][4];
#pragma unroll
    for (int mi = 0; mi < RM; ++mi) {
      const int64_t m = m0 + mi;
      const unsigned keep = (p.drop.on && m < p.M) ? keep_quad(p.drop, m, quad) : 0xFu;
#pragma unroll
      for (int c = 0; c < 4; ++c)
        xv[mi][c] = (m < p.M && k + c < p.K && ((keep >> c) & 1u)) ? convert<Acc>(p.x[m * p.ldx + k + c]) : Acc(0);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (k + c >= p.K) break;
#pragma unroll
      for (int r = 0; r < RC; ++r) {
        const Acc yv = r0 + r < p.R ? convert<Acc>(p.y[(r0 + r) * p.y_sr + (k + c) * p.y_sk]) : Acc(0);
#pragma unroll
        for (int mi = 0; mi < RM; ++mi) acc[mi][r] += xv[mi][c] * yv;
      }
    }
  }

  const int lane = tid % 32, warp = tid / 32;
#pragma unroll
  for (int mi = 0; mi < RM; ++mi)
#pragma unroll
    for (int r = 0; r < RC; ++r) {
      Acc v = acc[mi][r];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp][mi * RC + r] = v;
    }
  __syncthreads();
  for (int e = tid; e < RM * RC; e += NT) {
    const int64_t m = m0 + e / RC, r = r0 + e % RC;
    if (m >= p.M || r >= p.R) continue;
    Acc v = Acc(0);
#pragma unroll
    for (int w = 0; w < NW; ++w) v += red[w][e];
    p.out[m * p.R + r] = p.alpha * v;
  }
}

template <typename T>
cudaError_t launch_rowdot(const RowdotParams<T>& p, cudaStream_t stream) {
  if (p.M <= 0 || p.R <= 0) return cudaSuccess;
  const int64_t gx = ceil_div(p.M, kRowdotRows), gy = ceil_div(p.R, kRowdotRanks<T>);
  if (gx > INT_MAX || gy > 65535) return cudaErrorInvalidValue;
  rowdot_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kRowdotThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

constexpr int kColsumThreads = 128, kColsumRows = 32;
template <typename T> constexpr int kColsumRanks = sizeof(acc_t<T>) == 8 ? 8 : 16;

template <typename T>
__global__ void __launch_bounds__(kColsumThreads) colsum_kernel(const ColsumParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int NT = kColsumThreads, MB = kColsumRows, RC = kColsumRanks<T>;
  __shared__ Acc qs[MB][RC];
  const int tid = threadIdx.x;
  // Each thread owns four consecutive columns: one dropout draw covers them.
  const int64_t quad = static_cast<int64_t>(blockIdx.x) * NT + tid, c0 = 4 * quad;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * RC;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * p.chunk;
  const int64_t m_end = dmin(p.M, m_begin + p.chunk);

  Acc acc[4][RC];
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int r = 0; r < RC; ++r) acc[c][r] = Acc(0);

  for (int64_t m = m_begin; m < m_end; m += MB) {
    const int rows = static_cast<int>(dmin(MB, m_end - m));
    for (int e = tid; e < MB * RC; e += NT) {
      const int mm = e / RC, r = e % RC;
      Acc v = Acc(0);
      if (mm < rows && r0 + r < p.R) v = p.Q != nullptr ? p.Q[(m + mm) * p.ldq + r0 + r] : Acc(1);
      qs[mm][r] = v;
    }
    __syncthreads();
    if (c0 < p.C) {
      for (int mm = 0; mm < rows; ++mm) {
        const int64_t row = m + mm;
        const unsigned keep = p.drop.on ? keep_quad(p.drop, row, quad) : 0xFu;
        Acc pv[4];
#pragma unroll
        for (int c = 0; c < 4; ++c)
          pv[c] = (c0 + c < p.C && ((keep >> c) & 1u)) ? convert<Acc>(p.P[row * p.ldp + c0 + c]) : Acc(0);
#pragma unroll
        for (int r = 0; r < RC; ++r) {
          const Acc qv = qs[mm][r];
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[c][r] += pv[c] * qv;
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int r = 0; r < RC; ++r) {
      if (c0 + c >= p.C || r0 + r >= p.R) continue;
      const int64_t idx = (c0 + c) * p.o_sc + (r0 + r) * p.o_sr;
      if (p.part != nullptr)
        p.part[static_cast<int64_t>(blockIdx.z) * p.C * p.R + idx] = acc[c][r];
      else
        p.out[idx] = convert<T>(p.alpha * acc[c][r]);
    }
}

template <typename T>
__global__ void colsum_finish_kernel(const acc_t<T>* part, int64_t splits, int64_t n, acc_t<T> alpha, T* out) {
  using Acc = acc_t<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc v = Acc(0);
    for (int64_t s = 0; s < splits; ++s) v += part[s * n + e];
    out[e] = convert<T>(alpha * v);
  }
}

template <typename T>
Split colsum_split(int64_t M, int64_t C, int64_t R) {
  constexpr int64_t kTargetBlocks = 528, kMinRows = 128, kMaxPartial = int64_t{1} << 22, kMaxSplits = 1024;
  const int64_t blocks = ceil_div(C, 4 * kColsumThreads) * ceil_div(R, kColsumRanks<T>);
  int64_t s = ceil_div(kTargetBlocks, std::max<int64_t>(blocks, 1));
  s = std::min(s, std::max<int64_t>(1, ceil_div(M, kMinRows)));
  s = std::min(s, std::max<int64_t>(1, kMaxPartial / std::max<int64_t>(C * R, 1)));
  s = std::max<int64_t>(1, std::min(s, kMaxSplits));
  const int64_t rows = std::max<int64_t>(M, 1);
  const int64_t chunk = ceil_div(rows, s);
  return {ceil_div(rows, chunk), chunk};
}

template <typename T>
cudaError_t launch_colsum(ColsumParams<T> p, const Split& split, acc_t<T>* part, cudaStream_t stream) {
  if (p.C <= 0 || p.R <= 0) return cudaSuccess;
  p.chunk = split.chunk;
  p.part = split.count > 1 ? part : nullptr;
  const int64_t gx = ceil_div(p.C, 4 * kColsumThreads), gy = ceil_div(p.R, kColsumRanks<T>);
  if (gx > INT_MAX || gy > 65535 || split.count > 65535) return cudaErrorInvalidValue;
  colsum_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(split.count)),
                     kColsumThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || split.count == 1) return err;
  const int64_t n = p.C * p.R;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 4096);
  colsum_finish_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, split.count, n, p.alpha, p.out);
  return cudaGetLastError();
}

#define LK_LORA_INSTANTIATE(T)                                                                     \
  template cudaError_t launch_rowdot<T>(const RowdotParams<T>&, cudaStream_t);                      \
  template Split colsum_split<T>(int64_t, int64_t, int64_t);                                        \
  template cudaError_t launch_colsum<T>(ColsumParams<T>, const Split&, acc_t<T>*, cudaStream_t);
LK_FOR_EACH_TYPE(LK_LORA_INSTANTIATE)
#undef LK_LORA_INSTANTIATE

}  // namespace lora_detail
}  // namespace lk
