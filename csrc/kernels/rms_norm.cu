// RMSNorm for LN-tuning: y = x·rstd·(offset + γ) over the last dimension, and its backward.
//
// The layout of layer_norm.cu (shared machinery in norm_common.cuh): forward and the two-pass dx
// give one row to a group of blockDim.x threads (blockDim.y rows per block), with 16-byte vector
// accesses when every pointer is aligned and N divides. Backward with dx, rows up to 8192 wide
// (16-bit and fp32; 4096 fp64, 2048 unaligned): one pass (rms_bwd_fused_kernel), g and x read
// once into registers, dx written once, the dγ partials [P, N] of each block's rows accumulated
// on the way: per row 2·N·sizeof(T) bytes read and N·sizeof(T) written, plus 2·4·N bytes of
// fp32 partials per block of >= 16 rows (written, then read by the sum); the two-pass path reads
// g and x three times. Wider rows take the two-pass dx kernel and the column-tiled partials
// kernel; dγ without dx takes the latter alone (g and x read once). One kernel then adds the P
// partials in a fixed order, so results are bitwise reproducible.
// No fast-math: rstd is 1/sqrtf (both IEEE-rounded), not the approximate rsqrtf.
#include "rms_norm.cuh"
#include "norm_common.cuh"

namespace lk {
namespace {

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

// One-pass backward (as layer_norm.cu's ln_bwd_fused_kernel): g and x read once into registers
// (PPT packs per thread), dx written from them, and the dγ = Σ g⊙x̂ partials of the thread's
// columns accumulated over block blockIdx.x's rows [b·rows_per, (b+1)·rows_per) in row order,
// then written to row b of pdw [P, N] (nullptr: dγ not wanted) with the lanes added in order.
// __launch_bounds__(512, 1): with (512) alone ptxas held the 16-bit V=8 build to 64 registers and
// spilled 16-24 B on sm_80 and sm_90; now 72-89 registers, no spills.
template <typename T, int V, int PPT>
__global__ void __launch_bounds__(kMaxRowThreads, 1)
rms_bwd_fused_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t ldx,
                     const T* __restrict__ weight, const acc_t<T>* __restrict__ rstd, T* __restrict__ dx,
                     acc_t<T>* __restrict__ pdw, int64_t M, int64_t N, int64_t rows_per, acc_t<T> offset) {
  using A = acc_t<T>;
  using P = Pack<T, V>;
  __shared__ A red[32];
  __shared__ A lanes[kMaxRowThreads * V];
  const int64_t units = N / V;
  const A inv_n = A(1) / static_cast<A>(N);
  const int bx = blockDim.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per;
  const int64_t r1 = r0 + rows_per < M ? r0 + rows_per : M;
  A aw[PPT][V];
#pragma unroll
  for (int k = 0; k < PPT; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) aw[k][j] = A(0);

  // The bound is uniform over the block (r0, r1 are), so every thread reaches each barrier.
  for (int64_t base = r0; base < r1; base += blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < r1;
    const T* xr = x + (valid ? row : 0) * ldx;
    const T* gr = g + (valid ? row : 0) * N;
    const A rs = valid ? rstd[row] : A(0);
    // Outside the row g = x = 0, so the sums get exact zeros from there without a branch
    // (and no array element is read uninitialised, which made ptxas spill in layer_norm.cu).
    P px[PPT], pg[PPT];
    A s2 = A(0);
#pragma unroll
    for (int k = 0; k < PPT; ++k) {
      const int64_t u = threadIdx.x + static_cast<int64_t>(k) * bx;
      const bool in = valid && u < units;
#pragma unroll
      for (int j = 0; j < V; ++j) px[k].v[j] = pg[k].v[j] = from_acc<T>(A(0));
      if (in) {
        px[k] = load_pack<T, V>(xr, u);
        pg[k] = load_pack<T, V>(gr, u);
      }
      A s[V];
      scale_of<T, V>(in ? weight : nullptr, u, offset, s);  // outside: s = 1, times g = 0
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A gx = to_acc<A>(pg[k].v[j]) * to_acc<A>(px[k].v[j]);
        s2 += s[j] * gx;
        aw[k][j] += gx * rs;
      }
    }
    const A c2 = row_sum(s2, red) * rs * inv_n;
    if (valid) {
      T* dxr = dx + row * N;
#pragma unroll
      for (int k = 0; k < PPT; ++k) {
        const int64_t u = threadIdx.x + static_cast<int64_t>(k) * bx;
        if (u < units) {
          A s[V];
          scale_of<T, V>(weight, u, offset, s);
          P out;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const A xh = to_acc<A>(px[k].v[j]) * rs;
            out.v[j] = from_acc<T>(rs * (s[j] * to_acc<A>(pg[k].v[j]) - xh * c2));
          }
          store_pack<T, V>(dxr, u, out);
        }
      }
    }
  }
  if (pdw != nullptr) flush_lanes<A, V, PPT>(aw, lanes, pdw + static_cast<int64_t>(blockIdx.x) * N, units);
}

// Partial column sums of dγ = Σ g⊙x̂. Block (bx, by) owns columns [64·bx, 64·bx + 64) and rows
// [by·rows_per, (by+1)·rows_per) and writes row `by` of pdw [P, N]. Each thread walks its column
// down every fourth row; the four row lanes are then added in a fixed order (kColTile,
// kRowLanes: norm_common.cuh).

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

// ---------------------------------------------------------------------------------------
// Launch helpers: row_launch, fused_launch, partial_row_blocks (norm_common.cuh)

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers

template <typename T>
cudaError_t rms_norm_fwd(const T* x, int64_t ldx, const T* weight, T* y, acc_t<T>* rstd, int64_t M,
                         int64_t N, double eps, double offset, cudaStream_t stream) {
  if (M < 0 || N < 1 || ldx < 0) return cudaErrorInvalidValue;
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
  // One [P, N] acc_t array, P the larger of what either path (column-tiled partials, or the
  // one-pass kernel with or without vectors) would take.
  constexpr int V = kVec<T>;
  int64_t p = partial_row_blocks(M, N);
  const int64_t fused[2] = {fused_launch(M, N, 1, true).blocks,
                            N % V == 0 ? fused_launch(M, N / V, V, true).blocks : 0};
  for (int64_t f : fused) p = f > p ? f : p;
  return static_cast<size_t>(p) * static_cast<size_t>(N) * sizeof(acc_t<T>);
}

template <typename T>
cudaError_t rms_norm_bwd(const T* g, const T* x, int64_t ldx, const T* weight, const acc_t<T>* rstd,
                         T* dx, T* dweight, void* workspace, int64_t M, int64_t N, double offset,
                         cudaStream_t stream) {
  if (M < 0 || N < 1 || ldx < 0) return cudaErrorInvalidValue;
  using A = acc_t<T>;
  if (M == 0) {
    // The gradient over an empty batch is zero; all-zero bytes are +0 in every element type.
    if (dweight != nullptr) return cudaMemsetAsync(dweight, 0, static_cast<size_t>(N) * sizeof(T), stream);
    return cudaSuccess;
  }
  if (dx == nullptr && dweight == nullptr) return cudaSuccess;
  if (g == nullptr || x == nullptr || rstd == nullptr) return cudaErrorInvalidValue;
  if (dweight != nullptr && workspace == nullptr) return cudaErrorInvalidValue;
  A* pdw = static_cast<A*>(workspace);
  int64_t P = 0;  // partial rows written, for the final sum

  constexpr int V = kVec<T>;
  const bool vec = dx != nullptr && N % V == 0 && ldx % V == 0 && aligned16(x) && aligned16(g) &&
                   aligned16(dx) && (weight == nullptr || aligned16(weight));
  const FusedLaunch f = fused_launch(M, vec ? N / V : N, vec ? V : 1, dweight != nullptr);
  if (dx != nullptr && f.packs > 0) {
    // One pass: dx, and the dγ partials when wanted.
    P = dweight != nullptr ? f.blocks : 0;
    A* pw = dweight != nullptr ? pdw : nullptr;
    const unsigned grid = static_cast<unsigned>(f.blocks);
#define LK_RMS_FUSED(VV, PP)                                                                  \
  rms_bwd_fused_kernel<T, VV, PP><<<grid, f.block, 0, stream>>>(g, x, ldx, weight, rstd, dx, pw, \
                                                                M, N, f.rows_per,            \
                                                                static_cast<A>(offset))
    if (vec) {
      if (f.packs == 1) LK_RMS_FUSED(V, 1);
      else if constexpr (max_packs(V) == 2) LK_RMS_FUSED(V, 2);  // not even instantiated with 4
      else if (f.packs == 2) LK_RMS_FUSED(V, 2);
      else LK_RMS_FUSED(V, 4);
    } else {
      if (f.packs == 1) LK_RMS_FUSED(1, 1);
      else if (f.packs == 2) LK_RMS_FUSED(1, 2);
      else LK_RMS_FUSED(1, 4);
    }
#undef LK_RMS_FUSED
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  } else {
    // Rows too wide for registers (or dγ alone, which reads g and x once already): two passes
    // for dx, and the column-tiled partials kernel for dγ.
    if (dx != nullptr) {
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
      P = partial_row_blocks(M, N);
      const int64_t col_tiles = ceil_div(N, kColTile);
      if (P > 65535 || col_tiles > 0x7fffffff) return cudaErrorInvalidValue;
      rms_bwd_partials_kernel<T><<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(P)),
                                   dim3(kColTile, kRowLanes), 0, stream>>>(g, x, ldx, rstd, pdw, M, N,
                                                                           ceil_div(M, P));
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
  }

  if (dweight != nullptr) {
    sum_partials_kernel<T><<<static_cast<unsigned>(ceil_div(N, kSumCols)), dim3(kSumCols, kSumLanes), 0,
                             stream>>>(pdw, nullptr, dweight, nullptr, P, N);
    const cudaError_t e = cudaGetLastError();
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
