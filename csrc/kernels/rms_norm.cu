// RMSNorm for LN-tuning: y = x·rstd·(offset + γ) over the last dimension, and its backward.
//
// The layout of layer_norm.cu: forward and dx give one row to a group of blockDim.x threads
// (blockDim.y rows per block), with 16-byte vector accesses when every pointer is aligned and N
// divides; dγ comes from a column-tiled kernel writing acc_t partials [P, N] (each block owns a
// fixed row range) and a second kernel adding the P partials in a fixed order, so results are
// bitwise reproducible. With dx not needed the backward reads g and x once.
// No fast-math: rstd is 1/sqrtf (both IEEE-rounded), not the approximate rsqrtf.
#include "rms_norm.cuh"

namespace lk {
namespace {

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

// Sum of v over the blockDim.x threads of this thread's row (threadIdx.y); every thread of the
// row gets the same bits. blockDim.x is a multiple of 32. Every thread of the block must call it.
// smem: blockDim.x*blockDim.y/32.
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

// The scale s = offset + γ of V consecutive columns (1 without a weight).
template <typename T, int V, typename A>
__device__ __forceinline__ void scale_of(const T* weight, int64_t u, A offset, A (&s)[V]) {
  if (weight == nullptr) {
#pragma unroll
    for (int k = 0; k < V; ++k) s[k] = A(1);
    return;
  }
  const Pack<T, V> pw = load_pack<T, V>(weight, u);
#pragma unroll
  for (int k = 0; k < V; ++k) s[k] = offset + to_acc<A>(pw.v[k]);
}

// Threads per block of the row kernels, at most: with __launch_bounds__(1024) ptxas held the
// 16-bit dx kernel to 32 registers on sm_80 and it spilled 20-24 B (as layer_norm.cu's kernels
// did; rerun: python benchmarks/cuda_ptx_check.py). Wider rows give each of 512 threads more vectors.
constexpr int kMaxRowThreads = 512;

// x: [M, N] (row stride ldx); weight: [N] or nullptr; y: [M, N]; rstd: [M] or nullptr.
template <typename T, int V>
__global__ void __launch_bounds__(kMaxRowThreads)
rms_fwd_kernel(const T* __restrict__ x, int64_t ldx, const T* __restrict__ weight, T* __restrict__ y,
               acc_t<T>* __restrict__ rstd, int64_t M, int64_t N, acc_t<T> eps, acc_t<T> offset) {
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
    A q = A(0);
    if (valid) {
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        const P p = load_pack<T, V>(xr, u);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A v = to_acc<A>(p.v[k]);
          q += v * v;
        }
      }
    }
    const A rs = rsqrt_acc(row_sum(q, red) * inv_n + eps);
    if (valid) {
      T* yr = y + row * N;
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        const P p = load_pack<T, V>(xr, u);
        A s[V];
        scale_of<T, V>(weight, u, offset, s);
        P out;
#pragma unroll
        for (int k = 0; k < V; ++k) out.v[k] = from_acc<T>(to_acc<A>(p.v[k]) * rs * s[k]);
        store_pack<T, V>(yr, u, out);
      }
      if (threadIdx.x == 0 && rstd != nullptr) rstd[row] = rs;
    }
  }
}

// dx = rstd·(s⊙g − x̂·mean_N(s⊙g⊙x̂)), x̂ = x·rstd, s = offset + γ (1 without weight).
template <typename T, int V>
__global__ void __launch_bounds__(kMaxRowThreads)
rms_bwd_dx_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t ldx,
                  const T* __restrict__ weight, const acc_t<T>* __restrict__ rstd, T* __restrict__ dx,
                  int64_t M, int64_t N, acc_t<T> offset) {
  using A = acc_t<T>;
  using P = Pack<T, V>;
  __shared__ A red[32];
  const int64_t units = N / V;
  const A inv_n = A(1) / static_cast<A>(N);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < M;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < M;
    const T* xr = x + (valid ? row : 0) * ldx;
    const T* gr = g + (valid ? row : 0) * N;
    const A rs = valid ? rstd[row] : A(0);
    A s2 = A(0);
    if (valid) {
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        const P px = load_pack<T, V>(xr, u);
        const P pg = load_pack<T, V>(gr, u);
        A s[V];
        scale_of<T, V>(weight, u, offset, s);
#pragma unroll
        for (int k = 0; k < V; ++k) s2 += s[k] * to_acc<A>(pg.v[k]) * to_acc<A>(px.v[k]);
      }
    }
    const A c2 = row_sum(s2, red) * rs * inv_n;
    if (valid) {
      T* dxr = dx + row * N;
      for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
        const P px = load_pack<T, V>(xr, u);
        const P pg = load_pack<T, V>(gr, u);
        A s[V];
        scale_of<T, V>(weight, u, offset, s);
        P out;
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const A xh = to_acc<A>(px.v[k]) * rs;
          out.v[k] = from_acc<T>(rs * (s[k] * to_acc<A>(pg.v[k]) - xh * c2));
        }
        store_pack<T, V>(dxr, u, out);
      }
    }
  }
}

// Partial column sums of dγ = Σ g⊙x̂. Block (bx, by) owns columns [64·bx, 64·bx + 64) and rows
// [by·rows_per, (by+1)·rows_per) and writes row `by` of pdw [P, N]. Each thread walks its column
// down every fourth row; the four row lanes are then added in a fixed order.
constexpr int kColTile = 64, kRowLanes = 4;

template <typename T>
__global__ void __launch_bounds__(kColTile* kRowLanes)
rms_bwd_partials_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t ldx,
                        const acc_t<T>* __restrict__ rstd, acc_t<T>* __restrict__ pdw, int64_t M,
                        int64_t N, int64_t rows_per) {
  using A = acc_t<T>;
  __shared__ A sw[kRowLanes][kColTile];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kColTile + tx;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * rows_per;
  const int64_t r1 = r0 + rows_per < M ? r0 + rows_per : M;
  A aw = A(0);
  if (col < N) {
    for (int64_t r = r0 + ty; r < r1; r += kRowLanes)
      aw += to_acc<A>(g[r * N + col]) * (to_acc<A>(x[r * ldx + col]) * rstd[r]);
  }
  sw[ty][tx] = aw;
  __syncthreads();
  if (ty == 0 && col < N) {
    A tw = A(0);
#pragma unroll
    for (int l = 0; l < kRowLanes; ++l) tw += sw[l][tx];
    pdw[static_cast<int64_t>(blockIdx.y) * N + col] = tw;
  }
}

// dweight[c] = Σ_p pdw[p, c], p in a fixed order: lane ty adds p ≡ ty (mod 8) in increasing p,
// then the 8 lanes are added in lane order.
constexpr int kSumCols = 32, kSumLanes = 8;

template <typename T>
__global__ void __launch_bounds__(kSumCols* kSumLanes)
rms_bwd_sum_partials_kernel(const acc_t<T>* __restrict__ pdw, T* __restrict__ dweight, int64_t P, int64_t N) {
  using A = acc_t<T>;
  __shared__ A sw[kSumLanes][kSumCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumCols + tx;
  A aw = A(0);
  if (col < N) {
    for (int64_t p = ty; p < P; p += kSumLanes) aw += pdw[p * N + col];
  }
  sw[ty][tx] = aw;
  __syncthreads();
  if (ty == 0 && col < N) {
    A tw = A(0);
#pragma unroll
    for (int l = 0; l < kSumLanes; ++l) tw += sw[l][tx];
    dweight[col] = from_acc<T>(tw);
  }
}

// ---------------------------------------------------------------------------------------
// Launch helpers (as layer_norm.cu's)

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct RowLaunch {
  dim3 block;
  unsigned grid;
};

// Threads per row: enough that each handles at most ~8 vector units, 32..kMaxRowThreads; rows per block
// fill 256 threads when the row needs fewer.
RowLaunch row_launch(int64_t M, int64_t units) {
  int tx = 32;
  while (tx < kMaxRowThreads && static_cast<int64_t>(tx) * 8 < units) tx *= 2;
  const int ty = tx >= 256 ? 1 : 256 / tx;
  const int64_t groups = ceil_div(M, ty);
  const int64_t max_grid = int64_t(1) << 20;  // the kernels loop over the remaining rows
  return {dim3(tx, ty), static_cast<unsigned>(groups < max_grid ? groups : max_grid)};
}

// Row blocks P of the dγ partials: about 2048 blocks in all, at least 16 rows each.
// rms_norm_bwd_workspace and rms_norm_bwd must agree, hence one function.
int64_t partial_row_blocks(int64_t M, int64_t N) {
  if (M <= 0) return 0;
  const int64_t col_tiles = ceil_div(N, kColTile);
  int64_t p = ceil_div(2048, col_tiles);
  const int64_t by_rows = ceil_div(M, 16);
  if (p > by_rows) p = by_rows;
  return p < 1 ? 1 : p;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers

template <typename T>
cudaError_t rms_norm_fwd(const T* x, int64_t ldx, const T* weight, T* y, acc_t<T>* rstd, int64_t M,
                         int64_t N, double eps, double offset, cudaStream_t stream) {
  if (M < 0 || N < 1 || (M > 1 && ldx < N)) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (x == nullptr || y == nullptr) return cudaErrorInvalidValue;
  using A = acc_t<T>;
  constexpr int V = kVec<T>;
  const bool vec = N % V == 0 && ldx % V == 0 && aligned16(x) && aligned16(y) &&
                   (weight == nullptr || aligned16(weight));
  const RowLaunch l = row_launch(M, vec ? N / V : N);
  if (vec)
    rms_fwd_kernel<T, V><<<l.grid, l.block, 0, stream>>>(x, ldx, weight, y, rstd, M, N, static_cast<A>(eps),
                                                         static_cast<A>(offset));
  else
    rms_fwd_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(x, ldx, weight, y, rstd, M, N, static_cast<A>(eps),
                                                         static_cast<A>(offset));
  return cudaGetLastError();
}

template <typename T>
size_t rms_norm_bwd_workspace(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 0;
  return static_cast<size_t>(partial_row_blocks(M, N)) * static_cast<size_t>(N) * sizeof(acc_t<T>);
}

template <typename T>
cudaError_t rms_norm_bwd(const T* g, const T* x, int64_t ldx, const T* weight, const acc_t<T>* rstd,
                         T* dx, T* dweight, void* workspace, int64_t M, int64_t N, double offset,
                         cudaStream_t stream) {
  if (M < 0 || N < 1 || (M > 1 && ldx < N)) return cudaErrorInvalidValue;
  using A = acc_t<T>;
  if (M == 0) {
    // The gradient over an empty batch is zero; all-zero bytes are +0 in every element type.
    if (dweight != nullptr) return cudaMemsetAsync(dweight, 0, static_cast<size_t>(N) * sizeof(T), stream);
    return cudaSuccess;
  }
  if (dx == nullptr && dweight == nullptr) return cudaSuccess;
  if (g == nullptr || x == nullptr || rstd == nullptr) return cudaErrorInvalidValue;
  if (dweight != nullptr && workspace == nullptr) return cudaErrorInvalidValue;

  if (dx != nullptr) {
    constexpr int V = kVec<T>;
    const bool vec = N % V == 0 && ldx % V == 0 && aligned16(x) && aligned16(g) && aligned16(dx) &&
                     (weight == nullptr || aligned16(weight));
    const RowLaunch l = row_launch(M, vec ? N / V : N);
    if (vec)
      rms_bwd_dx_kernel<T, V><<<l.grid, l.block, 0, stream>>>(g, x, ldx, weight, rstd, dx, M, N,
                                                              static_cast<A>(offset));
    else
      rms_bwd_dx_kernel<T, 1><<<l.grid, l.block, 0, stream>>>(g, x, ldx, weight, rstd, dx, M, N,
                                                              static_cast<A>(offset));
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }

  if (dweight != nullptr) {
    const int64_t P = partial_row_blocks(M, N);
    const int64_t col_tiles = ceil_div(N, kColTile);
    if (P > 65535 || col_tiles > 0x7fffffff) return cudaErrorInvalidValue;
    A* pdw = static_cast<A*>(workspace);
    rms_bwd_partials_kernel<T><<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(P)),
                                 dim3(kColTile, kRowLanes), 0, stream>>>(g, x, ldx, rstd, pdw, M, N,
                                                                         ceil_div(M, P));
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
    rms_bwd_sum_partials_kernel<T><<<static_cast<unsigned>(ceil_div(N, kSumCols)), dim3(kSumCols, kSumLanes), 0,
                                     stream>>>(pdw, dweight, P, N);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

#define LK_INSTANTIATE_RMS_NORM(T)                                                                  \
  template cudaError_t rms_norm_fwd<T>(const T*, int64_t, const T*, T*, acc_t<T>*, int64_t, int64_t, \
                                       double, double, cudaStream_t);                               \
  template size_t rms_norm_bwd_workspace<T>(int64_t, int64_t);                                      \
  template cudaError_t rms_norm_bwd<T>(const T*, const T*, int64_t, const T*, const acc_t<T>*, T*,  \
                                       T*, void*, int64_t, int64_t, double, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_RMS_NORM)
#undef LK_INSTANTIATE_RMS_NORM

}  // namespace lk
