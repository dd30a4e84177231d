// LayerNorm for LN-tuning: y = γ ⊙ (x − μ)·rstd + β over the last dimension, and its backward.
//
// Forward and dx: one row per group of blockDim.x threads (blockDim.y rows per block, so
// narrow rows still fill a 256-thread block), looping over the row; 16-byte vector loads
// when every pointer is aligned and N divides, scalar loads otherwise.
// dγ/dβ: a column-tiled kernel writes acc_t partial sums [P, N] (each block owns a fixed row
// range), then a second kernel adds the P partials in a fixed order. No float atomics, so
// results are bitwise reproducible.
#include "layer_norm.cuh"

namespace lk {
namespace {

// Elements moved by one 16-byte access; V == 1 is the scalar fallback.
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p, int64_t unit) {
  return reinterpret_cast<const Pack<T, V>*>(p)[unit];
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, int64_t unit, const Pack<T, V>& v) {
  reinterpret_cast<Pack<T, V>*>(p)[unit] = v;
}

__device__ __forceinline__ float rsqrt_acc(float v) { return 1.0f / sqrtf(v); }
__device__ __forceinline__ double rsqrt_acc(double v) { return 1.0 / sqrt(v); }

// Sum of v over the blockDim.x threads of this thread's row (threadIdx.y); every thread of
// the row gets the same bits. blockDim.x is a multiple of 32, so a warp never spans two rows.
// Every thread of the block must call it (it synchronises). smem: blockDim.x*blockDim.y/32.
template <typename A>
__device__ __forceinline__ A row_sum(A v, A* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int nw = blockDim.x / 32;
  if (nw == 1) return v;
  A* mine = smem + threadIdx.y * nw;
  if (threadIdx.x % 32 == 0) mine[threadIdx.x / 32] = v;
  __syncthreads();
  A t = A(0);
  for (int w = 0; w < nw; ++w) t += mine[w];
  __syncthreads();  // smem is reused by the caller's next reduction
  return t;
}

// Two sums at once (one pair of barriers instead of two). smem: 2*blockDim.x*blockDim.y/32.
template <typename A>
__device__ __forceinline__ void row_sum2(A& a, A& b, A* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, o);
    b += __shfl_xor_sync(0xffffffffu, b, o);
  }
  const int nw = blockDim.x / 32;
  if (nw == 1) return;
  A* mine = smem + 2 * threadIdx.y * nw;
  if (threadIdx.x % 32 == 0) {
    mine[threadIdx.x / 32] = a;
    mine[nw + threadIdx.x / 32] = b;
  }
  __syncthreads();
  a = A(0);
  b = A(0);
  for (int w = 0; w < nw; ++w) {
    a += mine[w];
    b += mine[nw + w];
  }
  __syncthreads();
}

// Threads per block of the row kernels, at most. 512, not 1024: 1024 would cap them at 64
// registers, and the 16-byte-vector forward then spilled (ptxas -v; benchmarks/cuda_ptx_check.py
// gates on it); a row wide enough to want more threads gives each of 512 more vectors instead.
constexpr int kMaxRowThreads = 512;

// x: [M, N] (row stride ldx); weight, bias: [N] or nullptr; y: [M, N]; mean, rstd: [M].
// The statistics are taken around the row's first element (the pivot), as the reference
// does: for x = 1e4 + noise the shifted values are small and exact in fp32, so neither the
// variance nor (x − μ) loses digits to the large mean.
template <typename T, int V>
__global__ void __launch_bounds__(kMaxRowThreads)
ln_fwd_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ weight,
              const T* __restrict__ bias, T* __restrict__ y, acc_t<T>* __restrict__ mean,
              acc_t<T>* __restrict__ rstd, int64_t M, int64_t N, acc_t<T> eps) {
  using A = acc_t<T>;
  using P = Pack<T, V>;
  __shared__ A red[32];
  const int64_t units = N / V;
  const A inv_n = A(1) / static_cast<A>(N);
  // The loop bound is uniform over the block so that every thread reaches each barrier.
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < M;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < M;
    const T* xr = x + (valid ? row : 0) * ldx;
    const A pivot = valid ? to_acc<A>(xr[0]) : A(0);

    A s = A(0);
    if (valid) {
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        const P p = load_pack<T, V>(xr, u);
#pragma unroll
        for (int k = 0; k < V; ++k) s += to_acc<A>(p.v[k]) - pivot;
      }
    }
    const A shift = row_sum(s, red) * inv_n;

    A q = A(0);
    if (valid) {
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        const P p = load_pack<T, V>(xr, u);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A c = (to_acc<A>(p.v[k]) - pivot) - shift;
          q += c * c;
        }
      }
    }
    const A rs = rsqrt_acc(row_sum(q, red) * inv_n + eps);

    if (valid) {
      T* yr = y + row * N;
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        const P p = load_pack<T, V>(xr, u);
        A w[V], b[V];
#pragma unroll
        for (int k = 0; k < V; ++k) w[k] = A(1), b[k] = A(0);
        if (weight != nullptr) {
          const P pw = load_pack<T, V>(weight, u);
#pragma unroll
          for (int k = 0; k < V; ++k) w[k] = to_acc<A>(pw.v[k]);
        }
        if (bias != nullptr) {
          const P pb = load_pack<T, V>(bias, u);
#pragma unroll
          for (int k = 0; k < V; ++k) b[k] = to_acc<A>(pb.v[k]);
        }
        P out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A c = (to_acc<A>(p.v[k]) - pivot) - shift;
          out.v[k] = from_acc<T>(c * rs * w[k] + b[k]);
        }
        store_pack<T, V>(yr, u, out);
      }
      if (threadIdx.x == 0) {
        mean[row] = pivot + shift;
        rstd[row] = rs;
      }
    }
  }
}

// dx = rstd·(γg − mean_N(γg) − x̂·mean_N(γg⊙x̂)), x̂ = (x − μ)·rstd, γ = 1 without weight.
// g, dx: [M, N] contiguous; x: row stride ldx; weight: [N] or nullptr; mean, rstd: [M].
template <typename T, int V>
__global__ void __launch_bounds__(kMaxRowThreads)
ln_bwd_dx_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t ldx,
                 const T* __restrict__ weight, const acc_t<T>* __restrict__ mean,
                 const acc_t<T>* __restrict__ rstd, T* __restrict__ dx, int64_t M, int64_t N) {
  using A = acc_t<T>;
  using P = Pack<T, V>;
  __shared__ A red[64];
  const int64_t units = N / V;
  const A inv_n = A(1) / static_cast<A>(N);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < M;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < M;
    const T* xr = x + (valid ? row : 0) * ldx;
    const T* gr = g + (valid ? row : 0) * N;
    const A mu = valid ? mean[row] : A(0);
    const A rs = valid ? rstd[row] : A(0);

    // γg and x̂ are recomputed in the second pass rather than kept: N is unbounded.
    auto wg_xhat = [&](int64_t u, A (&wg)[V], A (&xh)[V]) {
      const P px = load_pack<T, V>(xr, u);
      const P pg = load_pack<T, V>(gr, u);
#pragma unroll
      for (int k = 0; k < V; ++k) {
        xh[k] = (to_acc<A>(px.v[k]) - mu) * rs;
        wg[k] = to_acc<A>(pg.v[k]);
      }
      if (weight != nullptr) {
        const P pw = load_pack<T, V>(weight, u);
#pragma unroll
        for (int k = 0; k < V; ++k) wg[k] *= to_acc<A>(pw.v[k]);
      }
    };

    A s1 = A(0), s2 = A(0);
    if (valid) {
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        A wg[V], xh[V];
        wg_xhat(u, wg, xh);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          s1 += wg[k];
          s2 += wg[k] * xh[k];
        }
      }
    }
    row_sum2(s1, s2, red);
    const A c1 = s1 * inv_n, c2 = s2 * inv_n;

    if (valid) {
      T* dxr = dx + row * N;
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        A wg[V], xh[V];
        wg_xhat(u, wg, xh);
        P out;
#pragma unroll
        for (int k = 0; k < V; ++k) out.v[k] = from_acc<T>(rs * (wg[k] - c1 - xh[k] * c2));
        store_pack<T, V>(dxr, u, out);
      }
    }
  }
}

// Partial column sums for dγ = Σ g⊙x̂ and dβ = Σ g. Block (bx, by) owns columns
// [64·bx, 64·bx + 64) and rows [by·rows_per, (by+1)·rows_per); it writes row `by` of
// pdw / pdb ([P, N], either may be nullptr). Each thread walks its column down every
// fourth row, then the four row lanes are added in a fixed order.
constexpr int kColTile = 64, kRowLanes = 4;

template <typename T>
__global__ void __launch_bounds__(kColTile* kRowLanes)
ln_bwd_partials_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t ldx,
                       const acc_t<T>* __restrict__ mean, const acc_t<T>* __restrict__ rstd,
                       acc_t<T>* __restrict__ pdw, acc_t<T>* __restrict__ pdb, int64_t M,
                       int64_t N, int64_t rows_per) {
  using A = acc_t<T>;
  __shared__ A sw[kRowLanes][kColTile];
  __shared__ A sb[kRowLanes][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per;
  const int64_t r1 = r0 + rows_per < M ? r0 + rows_per : M;
  A aw = A(0), ab = A(0);
  if (col < N) {
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes) {
      const A gv = to_acc<A>(g[r * N + col]);
      ab += gv;
      if (pdw != nullptr) aw += gv * ((to_acc<A>(x[r * ldx + col]) - mean[r]) * rstd[r]);
    }
  }
  sw[ty][tx] = aw;
  sb[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && col < N) {
    A tw = A(0), tb = A(0);
#pragma unroll
    for (int l = 0; l < kRowLanes; ++l) {
      tw += sw[l][tx];
      tb += sb[l][tx];
    }
    const int64_t at = static_cast<int64_t>(blockIdx.y) * N + col;
    if (pdw != nullptr) pdw[at] = tw;
    if (pdb != nullptr) pdb[at] = tb;
  }
}

// dweight[c] = Σ_p pdw[p, c] (same for dbias), p in a fixed order: lane ty adds p ≡ ty
// (mod 8) in increasing p, then the 8 lanes are added in lane order.
constexpr int kSumCols = 32, kSumLanes = 8;

template <typename T>
__global__ void __launch_bounds__(kSumCols* kSumLanes)
ln_bwd_sum_partials_kernel(const acc_t<T>* __restrict__ pdw, const acc_t<T>* __restrict__ pdb,
                           T* __restrict__ dweight, T* __restrict__ dbias, int64_t P, int64_t N) {
  using A = acc_t<T>;
  __shared__ A sw[kSumLanes][kSumCols];
  __shared__ A sb[kSumLanes][kSumCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumCols + tx;
  A aw = A(0), ab = A(0);
  if (col < N) {
    for (int64_t p = ty; p < P; p += kSumLanes) {
      if (dweight != nullptr) aw += pdw[p * N + col];
      if (dbias != nullptr) ab += pdb[p * N + col];
    }
  }
  sw[ty][tx] = aw;
  sb[ty][tx] = ab;
  __syncthreads();
  if (ty == 0 && col < N) {
    A tw = A(0), tb = A(0);
#pragma unroll
    for (int l = 0; l < kSumLanes; ++l) {
      tw += sw[l][tx];
      tb += sb[l][tx];
    }
    if (dweight != nullptr) dweight[col] = from_acc<T>(tw);
    if (dbias != nullptr) dbias[col] = from_acc<T>(tb);
  }
}

// ---------------------------------------------------------------------------------------
// Launch helpers

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Threads per row: enough that each handles at most ~8 vector units, 32..kMaxRowThreads. Rows per
// block: fill 256 threads when the row needs fewer.
struct RowLaunch {
  dim3 block;
  unsigned grid;
};

RowLaunch row_launch(int64_t M, int64_t units) {
  int tx = 32;
  while (tx < kMaxRowThreads && static_cast<int64_t>(tx) * 8 < units) tx *= 2;
  const int ty = tx >= 256 ? 1 : 256 / tx;
  const int64_t groups = ceil_div(M, ty);
  const int64_t max_grid = int64_t(1) << 20;  // the kernels loop over the remaining rows
  return {dim3(tx, ty), static_cast<unsigned>(groups < max_grid ? groups : max_grid)};
}

// Number of row blocks P of the dγ/dβ partials: about 2048 blocks in all, at least 16 rows
// each. layer_norm_bwd_workspace and layer_norm_bwd must agree, hence one function.
int64_t partial_row_blocks(int64_t M, int64_t N) {
  if (M <= 0) return 0;
  const int64_t col_tiles = ceil_div(N, kColTile);
  int64_t p = ceil_div(2048, col_tiles);
  const int64_t by_rows = ceil_div(M, 16);
  if (p > by_rows) p = by_rows;
  return p < 1 ? 1 : p;
}

cudaError_t last_error() { return cudaGetLastError(); }

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers

template <typename T>
cudaError_t layer_norm_fwd(const T* x, int64_t ldx, const T* weight, const T* bias, T* y,
                           acc_t<T>* mean, acc_t<T>* rstd, int64_t M, int64_t N, double eps,
                           cudaStream_t stream) {
  if (M < 0 || N < 1 || ldx < 0) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr || mean == nullptr || rstd == nullptr)
    return cudaErrorInvalidValue;
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const bool vec = N % V == 0 && ldx % V == 0 && aligned16(x) && aligned16(y) &&
                   (weight == nullptr || aligned16(weight)) && (bias == nullptr || aligned16(bias));
  const RowLaunch l = row_launch(M, vec ? N / V : N);
  if (vec)
    ln_fwd_kernel<T, V><<<l.grid, l.block, 0, stream>>>(x, ldx, weight, bias, y, mean, rstd, M,
                                                        N, static_cast<A>(eps));
  else
    ln_fwd_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(x, ldx, weight, bias, y, mean, rstd, M,
                                                        N, static_cast<A>(eps));
  return last_error();
}

template <typename T>
size_t layer_norm_bwd_workspace(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 0;
  // Two [P, N] acc_t arrays: dγ partials, then dβ partials.
  return 2 * static_cast<size_t>(partial_row_blocks(M, N)) * static_cast<size_t>(N) *
         sizeof(acc_t<T>);
}

template <typename T>
cudaError_t layer_norm_bwd(const T* g, const T* x, int64_t ldx, const T* weight,
                           const acc_t<T>* mean, const acc_t<T>* rstd, T* dx, T* dweight, T* dbias,
                           void* workspace, int64_t M, int64_t N, cudaStream_t stream) {
  if (M < 0 || N < 1 || ldx < 0) return cudaErrorInvalidValue;
  using A = acc_t<T>;
  const bool want_params = dweight != nullptr || dbias != nullptr;
  if (M == 0) {
    // The gradient over an empty batch is zero; all-zero bytes are +0 in every element type.
    if (dweight != nullptr) {
      const cudaError_t e = cudaMemsetAsync(dweight, 0, static_cast<size_t>(N) * sizeof(T), stream);
      if (e != cudaSuccess) return e;
    }
    if (dbias != nullptr) {
      const cudaError_t e = cudaMemsetAsync(dbias, 0, static_cast<size_t>(N) * sizeof(T), stream);
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  }
  if (dx == nullptr && !want_params) return cudaSuccess;
  if (g == nullptr || x == nullptr || mean == nullptr || rstd == nullptr)
    return cudaErrorInvalidValue;
  if (want_params && workspace == nullptr) return cudaErrorInvalidValue;

  if (dx != nullptr) {
    constexpr int V = kVec<T>;
    const bool vec = N % V == 0 && ldx % V == 0 && aligned16(x) && aligned16(g) &&
                     aligned16(dx) && (weight == nullptr || aligned16(weight));
    const RowLaunch l = row_launch(M, vec ? N / V : N);
    if (vec)
      ln_bwd_dx_kernel<T, V><<<l.grid, l.block, 0, stream>>>(g, x, ldx, weight, mean, rstd, dx,
                                                             M, N);
    else
      ln_bwd_dx_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(g, x, ldx, weight, mean, rstd, dx,
                                                             M, N);
    const cudaError_t e = last_error();
    if (e != cudaSuccess) return e;
  }

  if (want_params) {
    const int64_t P = partial_row_blocks(M, N);
    const int64_t col_tiles = ceil_div(N, kColTile);
    if (P > 65535 || col_tiles > 0x7fffffff) return cudaErrorInvalidValue;
    A* pdw = static_cast<A*>(workspace);
    A* pdb = pdw + P * N;
    const int64_t rows_per = ceil_div(M, P);
    ln_bwd_partials_kernel<T>
        <<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(P)),
           dim3(kColTile, kRowLanes), 0, stream>>>(g, x, ldx, mean, rstd,
                                                   dweight != nullptr ? pdw : nullptr,
                                                   dbias != nullptr ? pdb : nullptr, M, N,
                                                   rows_per);
    cudaError_t e = last_error();
    if (e != cudaSuccess) return e;
    ln_bwd_sum_partials_kernel<T>
        <<<static_cast<unsigned>(ceil_div(N, kSumCols)), dim3(kSumCols, kSumLanes), 0, stream>>>(
            pdw, pdb, dweight, dbias, P, N);
    e = last_error();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

#define LK_INSTANTIATE_LAYER_NORM(T)                                                           \
  template cudaError_t layer_norm_fwd<T>(const T*, int64_t, const T*, const T*, T*, acc_t<T>*, \
                                         acc_t<T>*, int64_t, int64_t, double, cudaStream_t);   \
  template size_t layer_norm_bwd_workspace<T>(int64_t, int64_t);                               \
  template cudaError_t layer_norm_bwd<T>(const T*, const T*, int64_t, const T*,                \
                                         const acc_t<T>*, const acc_t<T>*, T*, T*, T*, void*,  \
                                         int64_t, int64_t, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_LAYER_NORM)
#undef LK_INSTANTIATE_LAYER_NORM

}  // namespace lk
