// Adapter forward in one pass for bottlenecks R <= 64: y = x + s·(act(x W_dᵀ + b_d) W_uᵀ + b_u).
//
// A block owns BM rows of x (64, or 16 where a 64-row tile would not fit: pick_rows).
//   phase 0  the [BM, K] x tile goes to shared memory: x is read from HBM once;
//   phase 1  h = x W_dᵀ + b_d over K, W_d staged in 64-column chunks; h (acc_t) is written once,
//            for the backward, and act(h) stays in shared memory;
//   phase 2  y = x + s·(act(h) W_uᵀ + b_u) in 128-column chunks of W_u, the residual from the
//            x tile: y is written once.
// Traffic per row by construction: K·sizeof(T) read, K·sizeof(T) + R·sizeof(acc_t) written; the
// two-GEMM path (adapter.cu) reads x twice and writes and reads h (acc_t). The weights, 2·R·K
// elements, are read by every block from L2: with BM = 16 that is R/16 times the x and y bytes of
// the block, hence BM = 64 where it fits. Not timed (no GPU so far). ptxas -v (CUDA 13.0): no
// spills; 72-158 registers (rerun: python benchmarks/cuda_ptx_check.py csrc/kernels/adapter_fused.cu).
// Where it does not apply (R > 64, or even a 16-row tile exceeds the device's shared memory per
// block: K above 5696-6560 in 16-bit, 2832-3264 fp32, 1024-1456 fp64 on H100/H200 (R = 64-16);
// 3648-4512, 1808-2240, 512-944 on A100) the caller keeps the two-GEMM path.
// half/bf16 multiply on tensor cores (WMMA m16n16k16, fp32 accumulation; act(h) rounded to T in
// shared memory, as adapter_gemm.cuh's GEMM and an eager half matmul do); fp32/fp64 on CUDA cores.
// Deterministic: every sum has a fixed order (phase 1's k-slices are added in slice order).
// The backward's dh and dx (adapter_bwd_fused) run the same phases with the weights swapped:
// the g tile on chip, phase 1 dh = s·(g W_u) ⊙ act'(h) (written once, for dW_d, and kept),
// phase 2 dx = g + dh W_d; g is read once for both (traffic: adapter_bwd.cu). Same tiles, so it
// applies exactly where the forward does.
#include "adapter_detail.cuh"

#include <mma.h>

#include <type_traits>

namespace lk {
namespace adapter_detail {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;  // 8 warps
constexpr int kBK = 64;        // phase 1: columns of W_d staged per step
constexpr int kBN = 128;       // phase 2: columns of y per step, one 16-wide fragment per warp
constexpr int kPad = 8;        // row padding of the shared tiles: WMMA's ldm rule, bank shift
constexpr int kMaxR = 64;

template <typename T> struct alignas(16) Vec16 { T v[16 / sizeof(T)]; };

// Shared-memory carve-up, the same on host and device: it depends on (T, RP, BM, K) only. The
// operand tiles are sized in acc_t, which holds either operand type (T on the WMMA path).
struct Layout {
  int64_t ldx, ldw, ldu, ldh, ldc;  // row pitches, elements
  size_t xs, ws, acts, red, total;  // byte offsets, total bytes
};

__host__ __device__ inline size_t up128(size_t b) { return (b + 127) / 128 * 128; }

template <typename T, int RP, int BM>
__host__ __device__ inline Layout layout(int64_t K) {
  using A = acc_t<T>;
  constexpr int F = (BM / 16) * (RP / 16);
  constexpr int WS = F >= 8 ? 1 : 8 / F;
  Layout l{};
  l.ldx = (K + 15) / 16 * 16 + kPad;  // x tile [BM][ldx], T
  l.ldw = kBK + kPad;                 // W_d chunk [RP][ldw]
  l.ldu = RP + kPad;                  // W_u chunk [kBN][ldu]
  l.ldh = RP + kPad;                  // act(h) [BM][ldh]
  l.ldc = kBN + 4;                    // phase 2 WMMA results [BM][ldc], float
  const size_t w = RP * l.ldw > kBN * l.ldu ? RP * l.ldw : kBN * l.ldu;
  const size_t red = WS * BM * RP > BM * l.ldc ? WS * BM * RP : BM * l.ldc;
  size_t off = 0;
  l.xs = off;   off = up128(off + BM * l.ldx * sizeof(T));
  l.ws = off;   off = up128(off + w * sizeof(A));
  l.acts = off; off = up128(off + BM * l.ldh * sizeof(A));
  l.red = off;  off = up128(off + red * sizeof(A));
  l.total = off;
  return l;
}

// Both passes, written with the forward's names. kBwd swaps the roles: x is g, wd is W_u [K, R]
// (phase 1: dh = s·(g W_u) ⊙ act'(hin), written to h), wu is W_d [R, K] (phase 2: dx = g + dh W_d,
// written to y unless y is null); bd, bu are unused.
template <typename T, int RP, int BM, bool kBwd>
__device__ __forceinline__ void fused_pass(const T* __restrict__ x, int64_t ldx_g, const T* __restrict__ wd,
                                           const T* __restrict__ bd, const T* __restrict__ wu,
                                           const T* __restrict__ bu, T* __restrict__ y,
                                           acc_t<T>* __restrict__ h, const acc_t<T>* __restrict__ hin,
                                           int64_t M, int64_t K, int64_t R, Activation act, acc_t<T> scale,
                                           bool vec) {
  using A = acc_t<T>;
  constexpr bool kWmma = UseWmma<T>::value;
  using S = typename std::conditional<kWmma, T, A>::type;  // operand type in shared memory
  constexpr int FM = BM / 16, NF = RP / 16, F = FM * NF;
  // Phase 1 on WMMA: F output fragments over 8 warps; with fewer than 8, WS warps share a
  // fragment, each taking every WS-th 16-deep k step (a k-slice); slices added in order.
  constexpr int WS = kWmma ? (F >= 8 ? 1 : 8 / F) : 1;
  constexpr int FPW = F >= 8 ? F / 8 : 1;
  extern __shared__ __align__(128) unsigned char smem[];
  const Layout L = layout<T, RP, BM>(K);
  T* xs = reinterpret_cast<T*>(smem + L.xs);
  S* ws = reinterpret_cast<S*>(smem + L.ws);
  S* acts = reinterpret_cast<S*>(smem + L.acts);
  A* red = reinterpret_cast<A*>(smem + L.red);
  const int tid = threadIdx.x, warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t kp = (K + 15) / 16 * 16;

  // Phase 0: x tile, zero past M and K (the zeros feed phase 1's padded k steps).
  if (vec) {  // K and ldx multiples of V, x 16-byte aligned: a vector is all in or all out
    constexpr int V = 16 / sizeof(T);
    const int64_t units = kp / V;
    for (int64_t e = tid; e < BM * units; e += kThreads) {
      const int m = static_cast<int>(e / units);
      const int64_t u = e % units, row = row0 + m;
      Vec16<T> p;
      if (row < M && u * V < K) {
        p = reinterpret_cast<const Vec16<T>*>(x + row * ldx_g)[u];
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) p.v[j] = from_acc<T>(A(0));
      }
      *reinterpret_cast<Vec16<T>*>(xs + m * L.ldx + u * V) = p;
    }
  } else {
    for (int64_t e = tid; e < BM * kp; e += kThreads) {
      const int m = static_cast<int>(e / kp);
      const int64_t k = e % kp, row = row0 + m;
      xs[m * L.ldx + k] = (row < M && k < K) ? x[row * ldx_g + k] : from_acc<T>(A(0));
    }
  }

  // Phase 1: partial h tiles into red[slice][BM][RP].
  auto stage_wd = [&](int64_t k0) {
    for (int e = tid; e < RP * kBK; e += kThreads) {
      const int r = e / kBK, c = e % kBK;
      const int64_t k = k0 + c;
      const int64_t at = kBwd ? k * R + r : r * K + k;  // W_u[k, r] : W_d[r, k]
      ws[r * L.ldw + c] = (r < R && k < K) ? from_acc<S>(to_acc<A>(wd[at])) : from_acc<S>(A(0));
    }
  };
  if constexpr (kWmma) {
    using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
    FragC acc[FPW];
#pragma unroll
    for (int i = 0; i < FPW; ++i) wmma::fill_fragment(acc[i], 0.0f);
    const int slice = warp % WS, group = warp / WS;
    for (int64_t k0 = 0; k0 < kp; k0 += kBK) {
      stage_wd(k0);
      __syncthreads();  // also orders phase 0's x tile before the first read
#pragma unroll
      for (int kk = 0; kk < kBK; kk += 16) {
        if (k0 + kk < kp && ((k0 + kk) / 16) % WS == slice) {
#pragma unroll
          for (int i = 0; i < FPW; ++i) {
            const int f = group * FPW + i, fm = f / NF, fn = f % NF;
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
            wmma::load_matrix_sync(a, xs + fm * 16 * L.ldx + k0 + kk, L.ldx);
            wmma::load_matrix_sync(b, ws + fn * 16 * L.ldw + kk, L.ldw);
            wmma::mma_sync(acc[i], a, b, acc[i]);
          }
        }
      }
      __syncthreads();  // ws is restaged next step
    }
#pragma unroll
    for (int i = 0; i < FPW; ++i) {
      const int f = group * FPW + i, fm = f / NF, fn = f % NF;
      wmma::store_matrix_sync(red + slice * BM * RP + fm * 16 * RP + fn * 16, acc[i], RP,
                              wmma::mem_row_major);
    }
  } else {
    // Thread (lane, mrow) owns h rows mrow + 16·i and columns lane + 16·j.
    const int lane = tid % 16, mrow = tid / 16;
    A acc[FM][NF];
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < NF; ++j) acc[i][j] = A(0);
    for (int64_t k0 = 0; k0 < kp; k0 += kBK) {
      stage_wd(k0);
      __syncthreads();
      const int kend = K - k0 < kBK ? static_cast<int>(K - k0) : kBK;  // >= 1: k0 < kp < K + 16
      for (int c = 0; c < kend; ++c) {
        A xv[FM];
#pragma unroll
        for (int i = 0; i < FM; ++i) xv[i] = to_acc<A>(xs[(mrow + 16 * i) * L.ldx + k0 + c]);
#pragma unroll
        for (int j = 0; j < NF; ++j) {
          const A wv = ws[(lane + 16 * j) * L.ldw + c];
#pragma unroll
          for (int i = 0; i < FM; ++i) acc[i][j] += xv[i] * wv;
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < NF; ++j) red[(mrow + 16 * i) * RP + lane + 16 * j] = acc[i][j];
  }
  __syncthreads();

  // h = Σ slices + b_d, written once; act(h) kept (zero past R, so phase 2's padding adds 0).
  // Backward: dh = s·Σ slices·act'(h) (as adapter_bwd.cu's DhBwd), written once and kept.
  for (int e = tid; e < BM * RP; e += kThreads) {
    const int m = e / RP, r = e % RP;
    const int64_t row = row0 + m;
    A v = A(0);
#pragma unroll
    for (int s = 0; s < WS; ++s) v += red[s * BM * RP + e];
    A a = A(0);
    if (r < R) {
      if constexpr (kBwd) {
        if (row < M) {
          a = scale * v * act_grad(hin[row * R + r], act);
          h[row * R + r] = a;
        }
      } else {
        if (bd != nullptr) v += to_acc<A>(bd[r]);
        if (row < M) h[row * R + r] = v;
        a = act_fwd(v, act);
      }
    }
    acts[m * L.ldh + r] = from_acc<S>(a);
  }
  __syncthreads();
  if constexpr (kBwd) {
    if (y == nullptr) return;  // dx not asked for (uniform over the block)
  }

  // Phase 2: y chunks of kBN columns; W_u[k, r] staged as us[k - k0][r] (backward: W_d[r, k]).
  S* us = ws;
  float* cs = reinterpret_cast<float*>(red);  // WMMA path only (A is float there)
  for (int64_t k0 = 0; k0 < K; k0 += kBN) {
    for (int e = tid; e < kBN * RP; e += kThreads) {
      const int c = e / RP, r = e % RP;
      const int64_t k = k0 + c;
      const int64_t at = kBwd ? r * K + k : k * R + r;  // W_d[r, k] : W_u[k, r]
      us[c * L.ldu + r] = (r < R && k < K) ? from_acc<S>(to_acc<A>(wu[at])) : from_acc<S>(A(0));
    }
    __syncthreads();
    if constexpr (kWmma) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM];
#pragma unroll
      for (int i = 0; i < FM; ++i) wmma::fill_fragment(acc[i], 0.0f);
#pragma unroll
      for (int rr = 0; rr < RP; rr += 16) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(b, us + warp * 16 * L.ldu + rr, L.ldu);
#pragma unroll
        for (int i = 0; i < FM; ++i) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::load_matrix_sync(a, acts + i * 16 * L.ldh + rr, L.ldh);
          wmma::mma_sync(acc[i], a, b, acc[i]);
        }
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
        wmma::store_matrix_sync(cs + i * 16 * L.ldc + warp * 16, acc[i], L.ldc, wmma::mem_row_major);
      __syncthreads();
      for (int e = tid; e < BM * kBN; e += kThreads) {
        const int m = e / kBN, c = e % kBN;
        const int64_t row = row0 + m, k = k0 + c;
        if (row < M && k < K) {
          A v = cs[m * L.ldc + c];
          if constexpr (kBwd) {
            y[row * K + k] = from_acc<T>(to_acc<A>(xs[m * L.ldx + k]) + v);
          } else {
            if (bu != nullptr) v += to_acc<A>(bu[k]);
            y[row * K + k] = from_acc<T>(to_acc<A>(xs[m * L.ldx + k]) + scale * v);
          }
        }
      }
    } else {
      // Thread (lane, mrow) owns rows mrow + 16·i and chunk columns lane + 16·c.
      const int lane = tid % 16, mrow = tid / 16;
      constexpr int NC = kBN / 16;
      A acc[FM][NC];
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int c = 0; c < NC; ++c) acc[i][c] = A(0);
      for (int r = 0; r < R; ++r) {
        A av[FM];
#pragma unroll
        for (int i = 0; i < FM; ++i) av[i] = acts[(mrow + 16 * i) * L.ldh + r];
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const A uv = us[(lane + 16 * c) * L.ldu + r];
#pragma unroll
          for (int i = 0; i < FM; ++i) acc[i][c] += av[i] * uv;
        }
      }
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int m = mrow + 16 * i;
        const int64_t row = row0 + m;
#pragma unroll
        for (int c = 0; c < NC; ++c) {
          const int64_t k = k0 + lane + 16 * c;
          if (row < M && k < K) {
            A v = acc[i][c];
            if constexpr (kBwd) {
              y[row * K + k] = from_acc<T>(to_acc<A>(xs[m * L.ldx + k]) + v);
            } else {
              if (bu != nullptr) v += to_acc<A>(bu[k]);
              y[row * K + k] = from_acc<T>(to_acc<A>(xs[m * L.ldx + k]) + scale * v);
            }
          }
        }
      }
    }
    __syncthreads();  // us and cs are rewritten by the next chunk
  }
}

template <typename T, int RP, int BM>
__global__ void __launch_bounds__(kThreads, 1)
fused_fwd_kernel(const T* __restrict__ x, int64_t ldx_g, const T* __restrict__ wd,
                 const T* __restrict__ bd, const T* __restrict__ wu, const T* __restrict__ bu,
                 T* __restrict__ y, acc_t<T>* __restrict__ h, int64_t M, int64_t K, int64_t R,
                 Activation act, acc_t<T> scale, bool vec) {
  fused_pass<T, RP, BM, false>(x, ldx_g, wd, bd, wu, bu, y, h, nullptr, M, K, R, act, scale, vec);
}

// dh = s·(g W_u) ⊙ act'(h) into dh, and dx = g + dh W_d into dx unless it is null; g is [M, K].
template <typename T, int RP, int BM>
__global__ void __launch_bounds__(kThreads, 1)
fused_bwd_kernel(const T* __restrict__ g, const T* __restrict__ wu, const T* __restrict__ wd,
                 const acc_t<T>* __restrict__ h, acc_t<T>* __restrict__ dh, T* __restrict__ dx,
                 int64_t M, int64_t K, int64_t R, Activation act, acc_t<T> scale, bool vec) {
  fused_pass<T, RP, BM, true>(g, K, wu, nullptr, wd, nullptr, dx, dh, h, M, K, R, act, scale, vec);
}

// Launches kernel (one of the two above, for BM) over the row blocks of x [M, K], row stride ldx.
template <typename T, int BM, typename Kernel, typename... Args>
cudaError_t launch(Kernel kernel, const T* x, int64_t ldx, int64_t M, int64_t K, size_t smem,
                   cudaStream_t stream, Args... args) {
  const int64_t grid = ceil_div(M, BM);
  if (grid > 0x7fffffff) return cudaErrorNotSupported;
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  constexpr int V = 16 / sizeof(T);
  const bool vec = K % V == 0 && ldx % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
  kernel<<<static_cast<unsigned>(grid), kThreads, smem, stream>>>(args..., vec);
  return cudaGetLastError();
}

// BM = 64 where its tile leaves room for a second block on the SM, or, for R > 16, where it fits
// at all: with BM = 16 the weights read from L2 per block would outweigh x and y R/16 times over.
// Else BM = 16 where that fits. (Register use also caps BM = 64, RP = 64 16-bit blocks at one per
// SM: 144-148 registers, ptxas -v.) go(std::integral_constant<int, BM>, smem) launches.
template <typename T, int RP, typename Go>
cudaError_t pick_rows(int64_t K, size_t budget, Go&& go) {
  const size_t big = layout<T, RP, 64>(K).total, small = layout<T, RP, 16>(K).total;
  if (big <= budget / 2 || (RP > 16 && big <= budget)) return go(std::integral_constant<int, 64>{}, big);
  if (small <= budget) return go(std::integral_constant<int, 16>{}, small);
  return cudaErrorNotSupported;
}

// The largest dynamic shared memory a block may opt in to, or 0 (then nothing fits).
size_t smem_budget() {
  int dev = 0, budget = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&budget, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    cudaGetLastError();  // not sticky: leave no error behind for the fallback's launch check
    return 0;
  }
  return static_cast<size_t>(budget);
}

template <typename T, int RP>
cudaError_t fwd_rows(const T* x, int64_t ldx, const T* wd, const T* bd, const T* wu, const T* bu, T* y,
                     acc_t<T>* h, int64_t M, int64_t K, int64_t R, Activation act, double scale,
                     size_t budget, cudaStream_t stream) {
  const acc_t<T> s = static_cast<acc_t<T>>(scale);
  return pick_rows<T, RP>(K, budget, [&](auto bm, size_t smem) {
    constexpr int BM = decltype(bm)::value;
    return launch<T, BM>(fused_fwd_kernel<T, RP, BM>, x, ldx, M, K, smem, stream, x, ldx, wd, bd, wu, bu,
                         y, h, M, K, R, act, s);
  });
}

template <typename T, int RP>
cudaError_t bwd_rows(const T* g, const T* wu, const T* wd, const acc_t<T>* h, acc_t<T>* dh, T* dx, int64_t M,
                     int64_t K, int64_t R, Activation act, double scale, size_t budget, cudaStream_t stream) {
  const acc_t<T> s = static_cast<acc_t<T>>(scale);
  return pick_rows<T, RP>(K, budget, [&](auto bm, size_t smem) {
    constexpr int BM = decltype(bm)::value;
    return launch<T, BM>(fused_bwd_kernel<T, RP, BM>, g, K, M, K, smem, stream, g, wu, wd, h, dh, dx, M, K,
                         R, act, s);
  });
}

}  // namespace

template <typename T>
cudaError_t adapter_fwd_fused(const T* x, int64_t ldx, const T* w_down, const T* b_down, const T* w_up,
                              const T* b_up, T* y, acc_t<T>* h, int64_t M, int64_t K, int64_t R,
                              Activation act, double scale, cudaStream_t stream) {
  if (R > kMaxR || K > (int64_t(1) << 24)) return cudaErrorNotSupported;
  const size_t b = smem_budget();
  if (R <= 16) return fwd_rows<T, 16>(x, ldx, w_down, b_down, w_up, b_up, y, h, M, K, R, act, scale, b, stream);
  if (R <= 32) return fwd_rows<T, 32>(x, ldx, w_down, b_down, w_up, b_up, y, h, M, K, R, act, scale, b, stream);
  return fwd_rows<T, 64>(x, ldx, w_down, b_down, w_up, b_up, y, h, M, K, R, act, scale, b, stream);
}

template <typename T>
cudaError_t adapter_bwd_fused(const T* g, const T* w_down, const T* w_up, const acc_t<T>* h, acc_t<T>* dh,
                              T* dx, int64_t M, int64_t K, int64_t R, Activation act, double scale,
                              cudaStream_t stream) {
  if (R > kMaxR || K > (int64_t(1) << 24)) return cudaErrorNotSupported;
  const size_t b = smem_budget();
  if (R <= 16) return bwd_rows<T, 16>(g, w_up, w_down, h, dh, dx, M, K, R, act, scale, b, stream);
  if (R <= 32) return bwd_rows<T, 32>(g, w_up, w_down, h, dh, dx, M, K, R, act, scale, b, stream);
  return bwd_rows<T, 64>(g, w_up, w_down, h, dh, dx, M, K, R, act, scale, b, stream);
}

#define LK_INSTANTIATE_ADAPTER_FUSED(T)                                                              \
  template cudaError_t adapter_fwd_fused<T>(const T*, int64_t, const T*, const T*, const T*, const T*, \
                                            T*, acc_t<T>*, int64_t, int64_t, int64_t, Activation,    \
                                            double, cudaStream_t);                                   \
  template cudaError_t adapter_bwd_fused<T>(const T*, const T*, const T*, const acc_t<T>*, acc_t<T>*, T*,  \
                                            int64_t, int64_t, int64_t, Activation, double, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_ADAPTER_FUSED)
#undef LK_INSTANTIATE_ADAPTER_FUSED

}  // namespace adapter_detail
}  // namespace lk
