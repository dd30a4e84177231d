// Row machinery shared by layer_norm.cu and rms_norm.cu: 16-byte packs, block row sums, launch
// geometry, and the deterministic two-stage column sums of dγ (and dβ).
// Everything sits in an anonymous namespace: each including .cu gets its own copy.
#pragma once
#include "common.cuh"

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

// No fast-math: 1/sqrt (both IEEE-rounded), not the approximate rsqrtf.
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
// registers, and the 16-byte-vector LayerNorm forward and RMSNorm dx spilled 20-24 B on sm_80
// (python benchmarks/cuda_ptx_check.py gates on it); wider rows give each thread more vectors.
constexpr int kMaxRowThreads = 512;

// The one-pass backward keeps PPT (1, 2 or 4) packs of g and x per thread in registers, so a
// row fits when units <= kMaxRowThreads·max_packs: N <= 8192 (16-bit), 8192 (fp32), 4096 (fp64),
// 2048 on the scalar path. Wider rows take the two-pass kernels. 16-bit 8-element packs stop at
// 2: with 4, g, x and the 2·32 fp32 partials need more than the 128 registers that 512 threads
// allow, and LayerNorm's kernel spilled 24-244 B (ptxas -v, sm_80/sm_90; rerun:
// python benchmarks/cuda_ptx_check.py csrc/kernels/layer_norm.cu after raising it).
constexpr int max_packs(int V) { return V == 8 ? 2 : 4; }

struct RowLaunch {
  dim3 block;
  unsigned grid;
};

// Two-pass kernels: threads per row enough that each handles at most ~8 vector units,
// 32..kMaxRowThreads; rows per block fill 256 threads when the row needs fewer.
RowLaunch row_launch(int64_t M, int64_t units) {
  int tx = 32;
  while (tx < kMaxRowThreads && static_cast<int64_t>(tx) * 8 < units) tx *= 2;
  const int ty = tx >= 256 ? 1 : 256 / tx;
  const int64_t groups = ceil_div(M, ty);
  const int64_t max_grid = int64_t(1) << 20;  // the kernels loop over the remaining rows
  return {dim3(tx, ty), static_cast<unsigned>(groups < max_grid ? groups : max_grid)};
}

// One-pass backward geometry: packs per thread, block shape, and rows per block (a multiple of
// blockDim.y; block b owns rows [b·rows_per, (b+1)·rows_per)). With the dγ partials each block
// writes one [N] row of acc_t partials per sum (8 B/column in fp32, written then read back), so
// blocks are few and long: about 2^17 threads in all (one H100/H200 at half occupancy, ~1K
// threads on each of 132 SMs), at least 16 rows each. The count depends only on (M, N, V), not
// on the device, so results are bitwise reproducible across GPUs too.
struct FusedLaunch {
  int packs;  // 0: the row does not fit, take the two-pass kernels
  dim3 block;
  int64_t rows_per;
  int64_t blocks;
};

constexpr int64_t kFusedThreads = int64_t(1) << 17;
constexpr int64_t kMinRowsPerBlock = 16;

FusedLaunch fused_launch(int64_t M, int64_t units, int V, bool partials) {
  FusedLaunch f{0, dim3(1, 1), 0, 0};
  if (M <= 0 || units > int64_t(kMaxRowThreads) * max_packs(V)) return f;
  f.packs = units <= kMaxRowThreads ? 1 : units <= 2 * kMaxRowThreads ? 2 : 4;
  int tx = 32;
  while (static_cast<int64_t>(tx) * f.packs < units) tx *= 2;
  const int ty = tx >= 256 ? 1 : 256 / tx;
  f.block = dim3(tx, ty);
  const int64_t groups = ceil_div(M, ty);
  int64_t per;  // row groups per block
  if (partials) {
    const int64_t want = kFusedThreads / (tx * ty);
    per = ceil_div(groups, want);
    const int64_t min_per = ceil_div(kMinRowsPerBlock, ty);
    if (per < min_per) per = min_per;
  } else {
    per = ceil_div(groups, int64_t(1) << 20);  // no partials: one group per block up to 2^20 blocks
  }
  f.rows_per = per * ty;
  f.blocks = ceil_div(M, f.rows_per);
  return f;
}

// The end of a one-pass block: lane ty of the block holds acc[k] (V column sums of pack k, over
// its rows); the lanes are added in lane order through shared memory (smem: blockDim.x*blockDim.y*V
// elements) and lane 0 writes them to out[unit·V + j], unit = threadIdx.x + k·blockDim.x.
// Every thread of the block must call it.
template <typename A, int V, int PPT>
__device__ __forceinline__ void flush_lanes(const A (&acc)[PPT][V], A* smem, A* __restrict__ out,
                                            int64_t units) {
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x;
#pragma unroll
  for (int k = 0; k < PPT; ++k) {
    const int64_t u = tx + static_cast<int64_t>(k) * bx;
    if (blockDim.y == 1) {
      if (u < units) {
#pragma unroll
        for (int j = 0; j < V; ++j) out[u * V + j] = acc[k][j];
      }
      continue;
    }
    __syncthreads();  // the previous pack's readers are done with smem
#pragma unroll
    for (int j = 0; j < V; ++j) smem[(ty * bx + tx) * V + j] = acc[k][j];
    __syncthreads();
    if (ty == 0 && u < units) {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        A t = A(0);
        for (int l = 0; l < static_cast<int>(blockDim.y); ++l) t += smem[(l * bx + tx) * V + j];
        out[u * V + j] = t;
      }
    }
  }
}

// out[c] = Σ_p part[p, c] (and out2 from part2 when both non-null), p in a fixed order: lane ty
// adds p ≡ ty (mod 8) in increasing p, then the 8 lanes are added in lane order.
constexpr int kSumCols = 32, kSumLanes = 8;

template <typename T>
__global__ void __launch_bounds__(kSumCols* kSumLanes)
sum_partials_kernel(const acc_t<T>* __restrict__ part, const acc_t<T>* __restrict__ part2,
                    T* __restrict__ out, T* __restrict__ out2, int64_t P, int64_t N) {
  using A = acc_t<T>;
  __shared__ A sw[kSumLanes][kSumCols];
  __shared__ A sb[kSumLanes][kSumCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kSumCols + tx;
  A aw = A(0), ab = A(0);
  if (col < N) {
    for (int64_t p = ty; p < P; p += kSumLanes) {
      if (out != nullptr) aw += part[p * N + col];
      if (out2 != nullptr) ab += part2[p * N + col];
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
    if (out != nullptr) out[col] = from_acc<T>(tw);
    if (out2 != nullptr) out2[col] = from_acc<T>(tb);
  }
}

// The column-tiled dγ (/dβ) partials kernels of layer_norm.cu and rms_norm.cu: a block owns
// kColTile columns and walks them with kRowLanes row lanes.
constexpr int kColTile = 64, kRowLanes = 4;

// Row blocks P of those partials: about 2048 blocks in all, at least 16 rows each. Each op's
// *_bwd_workspace and *_bwd must agree, hence one function.
int64_t partial_row_blocks(int64_t M, int64_t N) {
  if (M <= 0) return 0;
  const int64_t col_tiles = ceil_div(N, kColTile);
  int64_t p = ceil_div(2048, col_tiles);
  const int64_t by_rows = ceil_div(M, 16);
  if (p > by_rows) p = by_rows;
  return p < 1 ? 1 : p;
}

}  // namespace
}  // namespace lk
