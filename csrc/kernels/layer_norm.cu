// LayerNorm for LN-tuning: y = γ ⊙ (x − μ)·rstd + β over the last dimension, and its backward.
//
// Forward: one row per group of blockDim.x threads (blockDim.y rows per block, so narrow rows
// still fill a 256-thread block), looping over the row; 16-byte vector loads when every pointer
// is aligned and N divides, scalar loads otherwise.
// Backward with dx, rows up to 8192 wide (16-bit and fp32; 4096 fp64, 2048 unaligned): one
// pass, g and x read once into registers, dx written once, and the dγ/dβ partials [P, N] of each
// block's row range accumulated on the way (ln_bwd_fused_kernel). Per row that is
// 2·N·sizeof(T) bytes read and N·sizeof(T) written, plus 2·8·N bytes of fp32 partials per block
// of >= 16 rows (written, then read by the sum); the two-pass path reads g and x three times.
// Wider rows, or dγ/dβ without dx: the two-pass dx kernel and a column-tiled partials kernel.
// Then one kernel adds the P partials in a fixed order. No float atomics, so results are bitwise
// reproducible (P depends on M, N and alignment only, not on the device).
#include "layer_norm.cuh"
#include "norm_common.cuh"

namespace lk {
namespace {

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

// One-pass backward for rows that fit in registers (fused_launch: N <= 8192 in 16-bit): each
// thread loads its PPT packs of g and x once, the row sums c1, c2 come from them, and dx is
// written from the same registers; the dγ = Σ g⊙x̂ and dβ = Σ g partials of the columns the
// thread owns accumulate in registers over the block's rows, in row order. Per row: g and x
// read once, dx written once (the two-pass dx kernel reads both twice, the partials kernel a
// third time). Block b owns rows [b·rows_per, (b+1)·rows_per) (rows_per a multiple of
// blockDim.y; lane ty takes every blockDim.y-th) and writes row b of pdw, pdb [P, N]
// (nullptr: not wanted); flush_lanes adds the lanes in lane order, so no float atomics.
// __launch_bounds__(512, 1): with (512) alone ptxas held RMSNorm's twin to 64 registers and spilled.
template <typename T, int V, int PPT>
__global__ void __launch_bounds__(kMaxRowThreads, 1)
ln_bwd_fused_kernel(const T* __restrict__ g, const T* __restrict__ x, int64_t ldx,
                    const T* __restrict__ weight, const acc_t<T>* __restrict__ mean,
                    const acc_t<T>* __restrict__ rstd, T* __restrict__ dx, acc_t<T>* __restrict__ pdw,
                    acc_t<T>* __restrict__ pdb, int64_t M, int64_t N, int64_t rows_per) {
  using A = acc_t<T>;
  using P = Pack<T, V>;
  __shared__ A red[64];
  __shared__ A lanes[kMaxRowThreads * V];
  const int64_t units = N / V;
  const A inv_n = A(1) / static_cast<A>(N);
  const int bx = blockDim.x;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * rows_per;
  const int64_t r1 = r0 + rows_per < M ? r0 + rows_per : M;
  A aw[PPT][V], ab[PPT][V];
#pragma unroll
  for (int k = 0; k < PPT; ++k)
#pragma unroll
    for (int j = 0; j < V; ++j) aw[k][j] = ab[k][j] = A(0);

  // γ for V columns (1 without weight): read per row from L1/L2 rather than held, to leave the
  // registers to g, x and the partials.
  // u < 0: outside the row, γ = 0.
  auto gamma = [&](int64_t u, A (&w)[V]) {
    if (u < 0 || weight == nullptr) {
#pragma unroll
      for (int j = 0; j < V; ++j) w[j] = u < 0 ? A(0) : A(1);
    } else {
      const P pw = load_pack<T, V>(weight, u);
#pragma unroll
      for (int j = 0; j < V; ++j) w[j] = to_acc<A>(pw.v[j]);
    }
  };

  // The bound is uniform over the block (r0, r1 are), so every thread reaches each barrier.
  for (int64_t base = r0; base < r1; base += blockDim.y) {
    const int64_t row = base + threadIdx.y;
    const bool valid = row < r1;
    const T* xr = x + (valid ? row : 0) * ldx;
    const T* gr = g + (valid ? row : 0) * N;
    const A mu = valid ? mean[row] : A(0);
    const A rs = valid ? rstd[row] : A(0);
    // Outside the row, g = 0 (and γ = 0): every sum below gets exact zeros from there, so the
    // arithmetic needs no branch and no array element is ever read uninitialised (with
    // conditionally loaded arrays ptxas put them on the stack and spilled).
    P px[PPT], pg[PPT];
    A s1 = A(0), s2 = A(0);
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
      A w[V];
      gamma(in ? u : -1, w);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const A gv = to_acc<A>(pg[k].v[j]);
        const A xh = (to_acc<A>(px[k].v[j]) - mu) * rs;
        s1 += w[j] * gv;
        s2 += w[j] * gv * xh;
        aw[k][j] += gv * xh;
        ab[k][j] += gv;
      }
    }
    row_sum2(s1, s2, red);
    const A c1 = s1 * inv_n, c2 = s2 * inv_n;
    if (valid) {
      T* dxr = dx + row * N;
#pragma unroll
      for (int k = 0; k < PPT; ++k) {
        const int64_t u = threadIdx.x + static_cast<int64_t>(k) * bx;
        if (u < units) {
          A w[V];
          gamma(u, w);
          P out;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const A xh = (to_acc<A>(px[k].v[j]) - mu) * rs;
            out.v[j] = from_acc<T>(rs * (w[j] * to_acc<A>(pg[k].v[j]) - c1 - xh * c2));
          }
          store_pack<T, V>(dxr, u, out);
        }
      }
    }
  }
  if (pdw != nullptr) flush_lanes<A, V, PPT>(aw, lanes, pdw + static_cast<int64_t>(blockIdx.x) * N, units);
  if (pdb != nullptr) flush_lanes<A, V, PPT>(ab, lanes, pdb + static_cast<int64_t>(blockIdx.x) * N, units);
}

// Partial column sums for dγ = Σ g⊙x̂ and dβ = Σ g. Block (bx, by) owns columns
// [64·bx, 64·bx + 64) and rows [by·rows_per, (by+1)·rows_per); it writes row `by` of
// pdw / pdb ([P, N], either may be nullptr). Each thread walks its column down every
// fourth row, then the four row lanes are added in a fixed order (kColTile, kRowLanes:
// norm_common.cuh).

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

// ---------------------------------------------------------------------------------------
// Launch helpers (row_launch, fused_launch, partial_row_blocks: norm_common.cuh)

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

// Whether the one-pass backward's vector path applies (else its scalar path, V = 1).
template <typename T>
bool bwd_vec(const T* g, const T* x, int64_t ldx, const T* weight, const T* dx, int64_t N) {
  constexpr int V = kVec<T>;
  return N % V == 0 && ldx % V == 0 && aligned16(x) && aligned16(g) && aligned16(dx) &&
         (weight == nullptr || aligned16(weight));
}

template <typename T>
size_t layer_norm_bwd_workspace(int64_t M, int64_t N) {
  if (M <= 0 || N <= 0) return 0;
  // Two [P, N] acc_t arrays (dγ partials, then dβ partials), P the larger of what either path
  // (column-tiled partials, or the one-pass kernel with or without vectors) would take.
  constexpr int V = kVec<T>;
  int64_t p = partial_row_blocks(M, N);
  const int64_t fused[2] = {fused_launch(M, N, 1, true).blocks,
                            N % V == 0 ? fused_launch(M, N / V, V, true).blocks : 0};
  for (int64_t f : fused) p = f > p ? f : p;
  return 2 * static_cast<size_t>(p) * static_cast<size_t>(N) * sizeof(acc_t<T>);
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
  A* pdw = static_cast<A*>(workspace);
  int64_t P = 0;  // partial rows written, for the final sum

  constexpr int V = kVec<T>;
  const bool vec = dx != nullptr && bwd_vec(g, x, ldx, weight, dx, N);
  const FusedLaunch f = fused_launch(M, vec ? N / V : N, vec ? V : 1, want_params);
  if (dx != nullptr && f.packs > 0) {
    // One pass: dx, and the dγ/dβ partials when wanted.
    P = want_params ? f.blocks : 0;
    A* pw = dweight != nullptr ? pdw : nullptr;
    A* pb = dbias != nullptr ? pdw + P * N : nullptr;
    const unsigned grid = static_cast<unsigned>(f.blocks);
#define LK_LN_FUSED(VV, PP)                                                                   \
  ln_bwd_fused_kernel<T, VV, PP><<<grid, f.block, 0, stream>>>(g, x, ldx, weight, mean, rstd, \
                                                               dx, pw, pb, M, N, f.rows_per)
    if (vec) {
      if (f.packs == 1) LK_LN_FUSED(V, 1);
      else if constexpr (max_packs(V) == 2) LK_LN_FUSED(V, 2);  // not even instantiated with 4
      else if (f.packs == 2) LK_LN_FUSED(V, 2);
      else LK_LN_FUSED(V, 4);
    } else {
      if (f.packs == 1) LK_LN_FUSED(1, 1);
      else if (f.packs == 2) LK_LN_FUSED(1, 2);
      else LK_LN_FUSED(1, 4);
    }
#undef LK_LN_FUSED
    const cudaError_t e = last_error();
    if (e != cudaSuccess) return e;
  } else {
    // Rows too wide for registers (or dx not wanted): two passes for dx, and the
    // column-tiled partials kernel (one more read of g and x) for dγ/dβ.
    if (dx != nullptr) {
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
      P = partial_row_blocks(M, N);
      const int64_t col_tiles = ceil_div(N, kColTile);
      if (P > 65535 || col_tiles > 0x7fffffff) return cudaErrorInvalidValue;
      const int64_t rows_per = ceil_div(M, P);
      ln_bwd_partials_kernel<T>
          <<<dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(P)),
             dim3(kColTile, kRowLanes), 0, stream>>>(g, x, ldx, mean, rstd,
                                                     dweight != nullptr ? pdw : nullptr,
                                                     dbias != nullptr ? pdw + P * N : nullptr, M,
                                                     N, rows_per);
      const cudaError_t e = last_error();
      if (e != cudaSuccess) return e;
    }
  }

  if (want_params) {
    sum_partials_kernel<T>
        <<<static_cast<unsigned>(ceil_div(N, kSumCols)), dim3(kSumCols, kSumLanes), 0, stream>>>(
            pdw, pdw + P * N, dweight, dbias, P, N);
    const cudaError_t e = last_error();
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
