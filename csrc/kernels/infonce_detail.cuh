// Symmetric temperature-scaled InfoNCE (the CLIP loss): forward and backward, tiled like flash
// attention so that the N×N logit matrix never exists in memory. This header holds the plan
// (below), the tile shapes and the device helpers both passes use; the kernels and their
// launchers live in infonce_fwd.cu (forward and the rows op's forward), infonce_bwd.cu
// (backward) and infonce_shared.cu (the inverse row norms and the final fixed-order sum,
// launched by both).
//
// Notation. Both passes see the problem as "rows x of X against columns y of Y" with
//   u_xy = (a_x·b_y)·<X_x, Y_y>   (a, b = inverse L2 norms when normalising, else 1)
//   S_xy = c·u_xy                  (c = logit_scale, read from the device)
// The forward uses (X, Y) = (image, text). The backward runs one kernel twice, with
// (X, Y) = (image, text) for d image and (text, image) for d text, because
//   G_xy·N/gloss = wx·exp(S_xy − lse_x[x]) + wy·exp(S_xy − lse_y[y]) − δ_xy
// covers both directions with (lse_x, wx, lse_y, wy) = (lse_row, λ, lse_col, 1−λ) or
// (lse_col, 1−λ, lse_row, λ): the −δ terms sum to −δ since wx + wy = 1.
//
// Tiles. Every kernel that touches S works on BT×BT tiles with 256 threads in a 16×16 grid;
// thread (ty, tx) owns the tile entries (ty + 16a, tx + 16b). The dot products come from
// shared-memory tiles of X and Y streamed over D in BK-wide chunks:
//   * float / double: CUDA-core FMA in the accumulator type. fp32 must meet 1e-5 without TF32,
//     which rules tensor cores out; every dot is one fma chain over k = 0..D−1, so a tile
//     recomputed in the backward (in either orientation) is bitwise the forward's S.
//   * half / bf16: tensor-core mma.sync (m16n8k16, fp32 accumulation) through CuTe, for both
//     products (S = X Yᵀ and the backward's G·Y): infonce_mma.cuh, which also keeps the
//     forward's X tile resident in shared memory for D <= 512. Build with -DLK_INFONCE_NO_MMA
//     to run them on the FMA path instead (a bisection switch if the tensor-core path is ever
//     suspected).
//
// Forward (no N×N, no N²/tile buffer, no float atomics):
//   1. [normalize] inverse norms of the rows of I and T (warp per row).
//   2. fwd_kernel on a fixed grid (P, Q): block (p, q) owns row blocks p, p+P, ... and the
//      q-th contiguous range of column blocks. It keeps an online (max, sum) per row in
//      registers and writes it once per row block to row_part[q][row]; for its columns it
//      keeps a running (max, sum) over its row blocks in col_part[p][col] (only block (p, q)
//      ever touches that slice, so plain read-modify-write is race free). P·Q ≈ 264 blocks
//      (2 per SM on H100/H200); the grid depends on N alone, so results do not depend on the
//      device or on timing.
//   3. combine_kernel merges the Q row partials and the P column partials of each index in a
//      fixed order into lse_row / lse_col, forms the loss term of that index and writes one
//      partial sum per block; sum_kernel adds those in a fixed order.
// Backward:
//   grad_kernel on grid (row blocks, D slabs of DV): each block recomputes S tiles for its rows
//   against every column block, forms H = G' in shared memory and accumulates H·(b⊙Y)[:, slab]
//   in registers (the slab bounds the accumulator for any D; S is recomputed once per slab).
//   S recomputes: each of the nrb² tile pairs gets its S computed once per slab and pass, i.e.
//   2·⌈D/DV⌉ times for both gradients, each 64·64·D MACs, beside the H·Y products' 2·64·64·D in
//   all (counted, not measured). 16-bit with D > 256 uses slabs of DV = 512 (grad_kernel<T, 512>,
//   128 fp32 accumulators a thread, 240 registers on sm_80: one block of 8 warps per SM where
//   DV = 256 runs two at 128): D = 512: 4 → 2 S computations per pair, MACs 6 → 4 ·N²·D;
//   D = 768: 6 → 4, 8 → 6 ·N²·D; D = 1024: 8 → 4, 10 → 6 ·N²·D. Whether that pays for the
//   halved occupancy is for a GPU benchmark to say; grad_pass's kWide is the switch.
//   16-bit with D <= 256 keeps X's row block resident across the column tiles (infonce_mma.cuh).
//   Slab 0 also sums G'⊙u, written per row block (d logit_scale = gloss/N·Σ). With normalize,
//   dẑ goes to an accumulator-type buffer (the output itself when T is fp32/fp64) and norm_bwd_kernel
//   applies dx = (dz − z(z·dz))/‖x‖ per row.
//
// Precision. The choices below hold whatever the flags (setup.py builds without --use_fast_math,
// and benchmarks/cuda_ptx_check.py keeps approximate instructions out of the fp32/fp64 PTX): fp32
// uses exp_acc below (range reduction + degree-7 polynomial, ~2 ulp), logs go through double (N of
// them only), norms use __fsqrt_rn/__frcp_rn. The 16-bit types use __expf (~2 + 1.16·|x| ulp of
// fp32, at most ~6e-6 relative for |x| < 88): their tolerances, 3e-3 and 2e-2, are far looser, and the
// exponentials would otherwise cost as much as the tensor-core products.
#pragma once
#include "infonce.cuh"

#include <math_constants.h>

#include <cstring>
#include <type_traits>

namespace lk {
namespace infonce_detail {

constexpr int kThreads = 256;  // the 16×16 thread grid of every tile kernel
constexpr int kWarps = kThreads / 32;
// Forward grid size target: 2 resident blocks per SM on the 132-SM H100/H200. A constant (not
// a device query) keeps the workspace size and the reduction order a function of N alone.
constexpr int64_t kFwdBlocks = 264;
constexpr size_t kAlign = 256;  // of every buffer carved out of the workspace

template <typename T>
constexpr bool kIs16 = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

template <typename T>
struct Cfg {
  using A = acc_t<T>;
#ifdef LK_INFONCE_NO_MMA
  static constexpr bool kMma = false;
#else
  static constexpr bool kMma = kIs16<T>;
#endif
  static constexpr bool kF64 = std::is_same<T, double>::value;
  // fp64 (gradcheck sizes) gets smaller tiles so that every kernel stays in 48 KB of static
  // shared memory and its accumulators in registers.
  static constexpr int BT = kF64 ? 32 : 64;   // S tile: BT rows × BT columns
  // D chunk of the S product on the FMA path (the MMA path's is infonce_mma.cuh's kChunk).
  static constexpr int BK = kF64 ? 16 : 32;
  static constexpr int DV = kF64 ? 64 : 256;  // D slab of the backward output per block
  static constexpr int KC = 16;               // rows of Y per shared chunk in H·Y (FMA)
  // Tile element in shared memory: raw T for the MMAs, converted accumulator type for FMA.
  using S = std::conditional_t<kMma, T, A>;
  // FMA tiles (the MMA path uses CuTe's swizzled layouts instead): the row padding keeps
  // 16-byte alignment for the vector loads while shifting consecutive rows across banks.
  static constexpr int kPad = 4;
  static constexpr int LDK = BK + kPad;  // X/Y tiles [BT][LDK]
  static constexpr int LDV = DV + kPad;  // Y slab chunk [KC][LDV]
  static constexpr int LDH = BT + kPad;  // H tile [BT][LDH]
  static constexpr int TM = BT / 16;     // tile entries per thread along each side
  static constexpr int TV = DV / 64;     // 4-wide column groups per thread in H·Y (FMA)
  static_assert(BT % 16 == 0 && BK % 16 == 0 && KC % 16 == 0 && DV % 64 == 0, "tile shape");
  static_assert(BT % KC == 0, "KC must divide BT");
  static_assert(!kMma || (BT == 64 && DV == 256), "infonce_mma.cuh's tiles assume these");
};

constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

// ---------------------------------------------------------------- scalar helpers

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -CUDART_INF_F; }
template <> __device__ __forceinline__ double neg_inf<double>() { return -CUDART_INF; }

__device__ __forceinline__ float vmax(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ double vmax(double a, double b) { return fmax(a, b); }
__device__ __forceinline__ float vfma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double vfma(double a, double b, double c) { return fma(a, b, c); }

// exp for fp32 that keeps ~2 ulp under any flags: x = n·ln2 + r with |r| ≤ ln2/2
// (Cody–Waite split of ln2, exact products through fma), Taylor to r⁷ (truncation ≈ 0.1 ulp),
// and 2ⁿ built from its bits. Results below FLT_MIN are 0 (-ftz flushes them anyway); −inf → 0.
__device__ __forceinline__ float exp_acc(float x) {
  if (x < -87.3f) return 0.f;
  if (x > 88.7f) return CUDART_INF_F;
  const float n = rintf(x * 1.44269504088896341f);
  float r = fmaf(n, -0.693145751953125f, x);
  r = fmaf(n, -1.428606765330187e-06f, r);
  float p = 1.98412698e-4f;
  p = fmaf(p, r, 1.38888889e-3f);
  p = fmaf(p, r, 8.33333333e-3f);
  p = fmaf(p, r, 4.16666667e-2f);
  p = fmaf(p, r, 1.66666667e-1f);
  p = fmaf(p, r, 0.5f);
  p = fmaf(p, r, 1.0f);
  p = fmaf(p, r, 1.0f);
  return p * __int_as_float((static_cast<int>(n) + 127) << 23);
}

template <typename T>
__device__ __forceinline__ acc_t<T> ex(acc_t<T> x) {
  if constexpr (kIs16<T>) {
    return __expf(x);
  } else if constexpr (std::is_same<T, float>::value) {
    return exp_acc(x);
  } else {
    return exp(x);
  }
}

__device__ __forceinline__ float lg(float x) { return static_cast<float>(log(static_cast<double>(x))); }
__device__ __forceinline__ double lg(double x) { return log(x); }

__device__ __forceinline__ float inv_sqrt(float x) { return __frcp_rn(__fsqrt_rn(x)); }
__device__ __forceinline__ double inv_sqrt(double x) { return 1.0 / sqrt(x); }

template <typename S, typename T>
__device__ __forceinline__ S cvt(T v) {
  if constexpr (std::is_same<S, T>::value) {
    return v;
  } else {
    return to_acc<S, T>(v);
  }
}

template <typename S, typename A>
__device__ __forceinline__ S from_acc_s(A v) {
  if constexpr (std::is_same<S, A>::value) {
    return v;
  } else {
    return from_acc<S>(v);
  }
}

// Zero without relying on implicit half/bf16 conversions (torch builds disable them).
template <typename S>
__device__ __forceinline__ S zero_of() {
  if constexpr (std::is_same<S, __half>::value) {
    return __float2half_rn(0.f);
  } else if constexpr (std::is_same<S, __nv_bfloat16>::value) {
    return __float2bfloat16_rn(0.f);
  } else {
    return S(0);
  }
}

__device__ __forceinline__ void load4(const float* p, float (&v)[4]) {
  const float4 q = *reinterpret_cast<const float4*>(p);
  v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
}
__device__ __forceinline__ void load4(const double* p, double (&v)[4]) {
  const double2 q0 = *reinterpret_cast<const double2*>(p);
  const double2 q1 = *reinterpret_cast<const double2*>(p + 2);
  v[0] = q0.x; v[1] = q0.y; v[2] = q1.x; v[3] = q1.y;
}

// Butterfly reductions within aligned groups of `width` lanes. merge/add/max are commutative
// bit for bit, so every lane of a group ends with the same value.
template <typename A>
__device__ __forceinline__ A group_max(A v, int width) {
  for (int o = width / 2; o > 0; o >>= 1) v = vmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
template <typename A>
__device__ __forceinline__ A group_sum(A v, int width) {
  for (int o = width / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block sum in a fixed shape (warp butterfly, then warps in order): deterministic. The result is
// valid in thread 0. `red` holds kWarps values. Every thread of the block must call it.
template <typename A>
__device__ __forceinline__ A block_sum(A v, A* red) {
  v = group_sum(v, 32);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  A s = A(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < kWarps; ++w) s += red[w];
  }
  return s;
}

// ---------------------------------------------------------------- tile loads and products

// dst[r][kk] = src[row0 + r][k0 + kk] (· rscale[row0 + r] when rscale is given) for a
// ROWS × COLS tile, zero outside [0, nrows) × [0, D), converted to the shared element type.
// Each thread moves 16-byte groups; `vec` says the source rows are 16-byte aligned and D is a
// multiple of the group, so a group that starts in range is entirely in range.
template <typename T, typename S, int ROWS, int COLS, int LD>
__device__ __forceinline__ void load_tile(S* __restrict__ dst, const T* __restrict__ src, int64_t ld,
                                          int64_t row0, int64_t nrows, int64_t k0, int64_t D,
                                          bool vec, const acc_t<T>* __restrict__ rscale = nullptr) {
  using A = acc_t<T>;
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  // 16-byte stores of raw groups need 16-byte aligned destination rows.
  static_assert(COLS % V == 0 && (!std::is_same<S, T>::value || LD % V == 0), "tile group");
  constexpr int GPR = COLS / V;
  for (int g = threadIdx.x; g < ROWS * GPR; g += kThreads) {
    const int r = g / GPR, kk = (g % GPR) * V;
    const int64_t row = row0 + r, k = k0 + kk;
    S* d = dst + r * LD + kk;
    if (rscale != nullptr && row < nrows) {
      const A sc = rscale[row];
      T e[V];
      if (vec && k < D) {
        const uint4 raw = *reinterpret_cast<const uint4*>(src + row * ld + k);
        memcpy(e, &raw, sizeof(raw));
      } else {
#pragma unroll
        for (int v = 0; v < V; ++v) e[v] = k + v < D ? src[row * ld + k + v] : zero_of<T>();
      }
#pragma unroll
      for (int v = 0; v < V; ++v) d[v] = from_acc_s<S>(to_acc<A>(e[v]) * sc);
    } else if (vec && row < nrows && k < D) {
      const uint4 raw = *reinterpret_cast<const uint4*>(src + row * ld + k);
      if constexpr (std::is_same<S, T>::value) {
        *reinterpret_cast<uint4*>(d) = raw;
      } else {
        T e[V];
        memcpy(e, &raw, sizeof(raw));
#pragma unroll
        for (int v = 0; v < V; ++v) d[v] = cvt<S>(e[v]);
      }
    } else {
#pragma unroll
      for (int v = 0; v < V; ++v)
        d[v] = (row < nrows && k + v < D) ? cvt<S>(src[row * ld + k + v]) : zero_of<S>();
    }
  }
}

// dot[a][b] = <X[row0 + ty + 16a], Y[col0 + tx + 16b]> over all of D (zero-padded tiles make
// entries outside X's nx rows or Y's ny rows 0). Starts and ends with a barrier, so callers may
// reuse shared memory on either side freely.
template <typename T>
__device__ __forceinline__ void dot_tile_fma(acc_t<T> (&dot)[Cfg<T>::TM][Cfg<T>::TM],
                                             typename Cfg<T>::S* sX, typename Cfg<T>::S* sY,
                                             const T* X, int64_t ldx, const T* Y, int64_t ldy,
                                             int64_t row0, int64_t col0, int64_t nx, int64_t ny,
                                             int64_t D, bool vx, bool vy) {
  using C = Cfg<T>;
  using A = acc_t<T>;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int a = 0; a < C::TM; ++a)
#pragma unroll
    for (int b = 0; b < C::TM; ++b) dot[a][b] = A(0);
  __syncthreads();
  for (int64_t k0 = 0; k0 < D; k0 += C::BK) {
    load_tile<T, typename C::S, C::BT, C::BK, C::LDK>(sX, X, ldx, row0, nx, k0, D, vx);
    load_tile<T, typename C::S, C::BT, C::BK, C::LDK>(sY, Y, ldy, col0, ny, k0, D, vy);
    __syncthreads();
#pragma unroll
    for (int kq = 0; kq < C::BK; kq += 4) {
      A xa[C::TM][4], yb[C::TM][4];
#pragma unroll
      for (int a = 0; a < C::TM; ++a) load4(sX + (ty + 16 * a) * C::LDK + kq, xa[a]);
#pragma unroll
      for (int b = 0; b < C::TM; ++b) load4(sY + (tx + 16 * b) * C::LDK + kq, yb[b]);
      // k ascending inside one fma chain per entry: fma(x, y, s) == fma(y, x, s), so the
      // transposed recomputation in the backward reproduces these values exactly.
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
#pragma unroll
        for (int a = 0; a < C::TM; ++a)
#pragma unroll
          for (int b = 0; b < C::TM; ++b) dot[a][b] = vfma(xa[a][kk], yb[b][kk], dot[a][b]);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------- host side

template <typename T>
bool vec_ok(const T* p, int64_t ld, int64_t D) {
  constexpr int64_t V = 16 / static_cast<int64_t>(sizeof(T));
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && ld % V == 0 && D % V == 0;
}

// Carves aligned buffers out of the workspace; with base == nullptr it only measures.
struct Carver {
  char* base;
  size_t off = 0;
  template <typename U>
  U* take(size_t n) {
    off = (off + kAlign - 1) / kAlign * kAlign;
    U* p = base != nullptr ? reinterpret_cast<U*>(base + off) : nullptr;
    off += n * sizeof(U);
    return p;
  }
};

// The two kernels both passes launch (infonce_shared.cu).
template <typename T>
cudaError_t launch_inv_norms(const T* X, int64_t ld, int64_t N, int64_t D, acc_t<T>* inv,
                             cudaStream_t stream);

// out = (Σ parts[i], in a fixed order) · (*mul or 1) / denom, by one block.
template <typename A>
cudaError_t launch_sum(const A* parts, int64_t n, const A* mul, A denom, A* out,
                       cudaStream_t stream);

// The loss over no rows is 0, and so are the gradients of everything else (all-zero bytes are
// +0 in every element type).
inline cudaError_t zero_fill(void* p, size_t bytes, cudaStream_t stream) {
  if (p == nullptr || bytes == 0) return cudaSuccess;
  return cudaMemsetAsync(p, 0, bytes, stream);
}

}  // namespace infonce_detail
}  // namespace lk
