// LoRA forward in one launch for half/bf16 without dropout: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ.
//
// A block owns a 64×64 tile of y. Its K loop stages the x tile once and multiplies it both by
// the W tile (into the y accumulators) and by the A tile (into u = x Aᵀ, [64, RP]); then s·u,
// rounded to T, and the B tile run as RP/16 extra k steps into the same y accumulators, and y
// is written once with the bias. x is read once, not a second time by a separate u kernel, and
// u does not go through memory in between: the blocks of column tile 0 write it (acc_t) once,
// for the backward. The price: every column tile recomputes u, RP/64 more tensor-core work per
// tile, so lora_fwd_fused takes R <= 16 (25%) unless there is a single column tile, and only
// the shapes whose tile count fills the GPU (lora_gemm.cu's wide-tile rule). Not timed (no GPU
// so far).
// Numerics: the low-rank term multiplies T(s·u) by B on tensor cores (fp32 accumulation), where
// lora_gemm.cu's epilogue keeps s·u in fp32: one more rounding of that term, 2^-9 (bf16) or 2^-12
// (fp16) relative. Deterministic: each output has one owner and a fixed order.
#include "lora_detail.cuh"

#include <mma.h>

#include <type_traits>

namespace lk {
namespace lora_detail {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int BM = 64, BN = 64, BK = 32, kThreads = 128;  // 4 warps, 2×2, 32×32 each
constexpr int LDA = BK + 8;                                // x, W, A tiles (T), WMMA ldm rule
constexpr int LDC = BN + 4;                                // y tile (float)
constexpr int64_t kTilesWanted = 264;                      // as lora_gemm.cu's kWideTilesWanted

__host__ __device__ constexpr size_t up128(size_t b) { return (b + 127) / 128 * 128; }

// Shared memory: region 0 holds the K loop's tiles, then s·u (T) and the B tile; region 1 holds
// u (float), then the y tile (float). Each reuse follows a barrier after the last read.
template <int RP>
struct Smem {
  static constexpr int LDU = RP + 4, LDH = RP + 8;
  static constexpr size_t kLoop = 2 * up128(BM * LDA * 2) + up128(RP * LDA * 2);
  static constexpr size_t kLow = up128(BM * LDH * 2) + up128(BN * LDH * 2);
  static constexpr size_t kR0 = kLoop > kLow ? kLoop : kLow;
  static constexpr size_t kR1 = up128((BM * LDU > BM * LDC ? BM * LDU : BM * LDC) * 4);
  static constexpr size_t kTotal = kR0 + kR1;
  static_assert(kTotal <= 48 * 1024, "static shared memory limit");
};

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads)
lora_fused_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ w, int64_t ldw,
                  const T* __restrict__ bias, const T* __restrict__ la, const T* __restrict__ lb,
                  T* __restrict__ y, float* __restrict__ u, int64_t M, int64_t N, int64_t K, int64_t R,
                  float scaling, int64_t tiles_m) {
  using Sm = Smem<RP>;
  constexpr int NU = RP / 16, LDU = Sm::LDU, LDH = Sm::LDH;
  __shared__ __align__(128) unsigned char smem[Sm::kTotal];
  T* xs = reinterpret_cast<T*>(smem);                           // [BM][LDA]: (i, k)
  T* wsm = reinterpret_cast<T*>(smem + up128(BM * LDA * 2));    // [BN][LDA]: (k, n) col-major
  T* as = reinterpret_cast<T*>(smem + 2 * up128(BM * LDA * 2)); // [RP][LDA]: (k, r) col-major
  T* hs = reinterpret_cast<T*>(smem);                           // [BM][LDH]: T(s·u)
  T* bs = reinterpret_cast<T*>(smem + up128(BM * LDH * 2));     // [BN][LDH]: (r, n) col-major
  float* us = reinterpret_cast<float*>(smem + Sm::kR0);         // [BM][LDU]
  float* cs = us;                                               // [BM][LDC]
  const int tid = threadIdx.x, warp = tid / 32, wm = warp / 2, wn = warp % 2;
  // Consecutive blocks walk down one column tile: they share its W tile in L2.
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) % tiles_m) * BM;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) / tiles_m) * BN;
  const T zero = from_acc<T>(0.0f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2], uacc[NU];
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b) wmma::fill_fragment(acc[a][b], 0.0f);
#pragma unroll
  for (int c = 0; c < NU; ++c) wmma::fill_fragment(uacc[c], 0.0f);

  for (int64_t k0 = 0; k0 < K; k0 += BK) {
    // Rows of 32 consecutive k per tile: loads run along each operand's unit stride.
    for (int e = tid; e < BM * BK; e += kThreads) {
      const int a = e / BK, b = e % BK;
      const int64_t k = k0 + b, i = i0 + a, j = j0 + a;
      xs[a * LDA + b] = (i < M && k < K) ? x[i * ldx + k] : zero;
      wsm[a * LDA + b] = (j < N && k < K) ? w[j * ldw + k] : zero;
    }
    for (int e = tid; e < RP * BK; e += kThreads) {
      const int r = e / BK, b = e % BK;
      const int64_t k = k0 + b;
      as[r * LDA + b] = (r < R && k < K) ? la[r * K + k] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2], fu;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2], fau;
#pragma unroll
      for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], xs + (wm * 2 + a) * 16 * LDA + kk, LDA);
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::load_matrix_sync(fb[b], wsm + (wn * 2 + b) * 16 * LDA + kk, LDA);
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
      // u rows warp·16 .. +16: the x fragment of this warp's 16 rows times every A column.
      wmma::load_matrix_sync(fu, xs + warp * 16 * LDA + kk, LDA);
#pragma unroll
      for (int c = 0; c < NU; ++c) {
        wmma::load_matrix_sync(fau, as + c * 16 * LDA + kk, LDA);
        wmma::mma_sync(uacc[c], fu, fau, uacc[c]);
      }
    }
    __syncthreads();  // the tiles are restaged next step (and region 0 reused after the loop)
  }

#pragma unroll
  for (int c = 0; c < NU; ++c)
    wmma::store_matrix_sync(us + warp * 16 * LDU + c * 16, uacc[c], LDU, wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * RP; e += kThreads) {
    const int m = e / RP, r = e % RP;
    const int64_t i = i0 + m;
    const float v = us[m * LDU + r];
    if (j0 == 0 && i < M && r < R) u[i * R + r] = v;  // saved for the backward, once
    hs[m * LDH + r] = r < R ? from_acc<T>(scaling * v) : zero;
  }
  for (int e = tid; e < BN * RP; e += kThreads) {
    const int n = e / RP, r = e % RP;
    const int64_t j = j0 + n;
    bs[n * LDH + r] = (j < N && r < R) ? lb[j * R + r] : zero;
  }
  __syncthreads();
  // The low-rank term as RP/16 more k steps into the same accumulators.
#pragma unroll
  for (int rr = 0; rr < RP; rr += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
#pragma unroll
    for (int a = 0; a < 2; ++a) wmma::load_matrix_sync(fa[a], hs + (wm * 2 + a) * 16 * LDH + rr, LDH);
#pragma unroll
    for (int b = 0; b < 2; ++b) wmma::load_matrix_sync(fb[b], bs + (wn * 2 + b) * 16 * LDH + rr, LDH);
#pragma unroll
    for (int a = 0; a < 2; ++a)
#pragma unroll
      for (int b = 0; b < 2; ++b) wmma::mma_sync(acc[a][b], fa[a], fb[b], acc[a][b]);
  }
  // cs overlays us, whose last reads came before the barrier above.
#pragma unroll
  for (int a = 0; a < 2; ++a)
#pragma unroll
    for (int b = 0; b < 2; ++b)
      wmma::store_matrix_sync(cs + (wm * 2 + a) * 16 * LDC + (wn * 2 + b) * 16, acc[a][b], LDC,
                              wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += kThreads) {
    const int m = e / BN, n = e % BN;
    const int64_t i = i0 + m, j = j0 + n;
    if (i < M && j < N) {
      float v = cs[m * LDC + n];
      if (bias != nullptr) v += to_acc<float>(bias[j]);
      y[i * N + j] = from_acc<T>(v);
    }
  }
}

template <typename T, int RP>
cudaError_t launch(const T* x, int64_t ldx, const T* w, int64_t ldw, const T* bias, const T* la, const T* lb,
                   T* y, float* u, int64_t M, int64_t N, int64_t K, int64_t R, double scaling,
                   int64_t tiles_m, int64_t blocks, cudaStream_t stream) {
  lora_fused_kernel<T, RP><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      x, ldx, w, ldw, bias, la, lb, y, u, M, N, K, R, static_cast<float>(scaling), tiles_m);
  return cudaGetLastError();
}

}  // namespace

template <typename T>
cudaError_t lora_fwd_fused(const T* x, int64_t ldx, const T* weight, int64_t ldw, const T* bias,
                           const T* lora_A, const T* lora_B, T* y, acc_t<T>* u, int64_t M, int64_t N,
                           int64_t K, int64_t R, double scaling, cudaStream_t stream) {
  constexpr bool k16 = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;
  if constexpr (!k16) {
    return cudaErrorNotSupported;
  } else {
    const int64_t tiles_m = ceil_div(M, BM), tiles_n = ceil_div(N, BN), blocks = tiles_m * tiles_n;
    if (R < 1 || R > 64 || K < 1 || blocks < kTilesWanted || blocks > 0x7fffffff || (R > 16 && tiles_n > 1))
      return cudaErrorNotSupported;
    if (R <= 16)
      return launch<T, 16>(x, ldx, weight, ldw, bias, lora_A, lora_B, y, u, M, N, K, R, scaling, tiles_m, blocks, stream);
    if (R <= 32)
      return launch<T, 32>(x, ldx, weight, ldw, bias, lora_A, lora_B, y, u, M, N, K, R, scaling, tiles_m, blocks, stream);
    return launch<T, 64>(x, ldx, weight, ldw, bias, lora_A, lora_B, y, u, M, N, K, R, scaling, tiles_m, blocks, stream);
  }
}

#define LK_INSTANTIATE_LORA_FUSED(T)                                                                    \
  template cudaError_t lora_fwd_fused<T>(const T*, int64_t, const T*, int64_t, const T*, const T*, const T*, \
                                         T*, acc_t<T>*, int64_t, int64_t, int64_t, int64_t, double, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_LORA_FUSED)
#undef LK_INSTANTIATE_LORA_FUSED

}  // namespace lora_detail
}  // namespace lk
