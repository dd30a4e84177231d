// Symmetric temperature-scaled InfoNCE (the CLIP loss): forward and backward, tiled like flash
// attention so that the N×N logit matrix never exists in memory.
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
//   * half / bf16: WMMA 16×16×16 with fp32 accumulation, for both products (S = X Yᵀ and the
//     backward's G·Y). Build with -DLK_INFONCE_NO_WMMA to run them on the FMA path instead
//     (a quick bisection switch if a tensor-core path is ever suspected).
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
#include "infonce.cuh"

#include <math_constants.h>
#include <mma.h>

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
#ifdef LK_INFONCE_NO_WMMA
  static constexpr bool kWmma = false;
#else
  static constexpr bool kWmma = kIs16<T>;
#endif
  static constexpr bool kF64 = std::is_same<T, double>::value;
  // fp64 (gradcheck sizes) gets smaller tiles so that every kernel stays in 48 KB of static
  // shared memory and its accumulators in registers.
  static constexpr int BT = kF64 ? 32 : 64;   // S tile: BT rows × BT columns
  // D chunk of the S product; 64 for WMMA so that a barrier pair covers 4 k-steps, not 2.
  static constexpr int BK = kF64 ? 16 : (kWmma ? 64 : 32);
  static constexpr int DV = kF64 ? 64 : 256;  // D slab of the backward output per block
  static constexpr int KC = kWmma ? 32 : 16;  // rows of Y per shared chunk in H·Y
  // Tile element in shared memory: raw T for WMMA, converted accumulator type for FMA.
  using S = std::conditional_t<kWmma, T, A>;
  // Row padding: keeps 16-byte (FMA vector loads) / 32-byte (WMMA pointers) alignment while
  // shifting consecutive rows across banks.
  static constexpr int kPad = kWmma ? 8 : 4;
  static constexpr int LDK = BK + kPad;  // X/Y tiles [BT][LDK]
  static constexpr int LDV = DV + kPad;  // Y slab chunk [KC][LDV]
  static constexpr int LDH = BT + kPad;  // H tile [BT][LDH]
  static constexpr int LDD = BT + 4;     // fp32 tile of WMMA results [BT][LDD]
  static constexpr int TM = BT / 16;     // tile entries per thread along each side
  static constexpr int TV = DV / 64;     // 4-wide column groups per thread in H·Y (FMA)
  static_assert(BT % 16 == 0 && BK % 16 == 0 && KC % 16 == 0 && DV % 64 == 0, "tile shape");
  static_assert(BT % KC == 0, "KC must divide BT");
  static_assert(!kWmma || (BT == 64 && DV == 256), "WMMA warp layout assumes these");
};

constexpr size_t align128(size_t x) { return (x + 127) / 128 * 128; }

template <typename T>
struct FwdSmem {
  using C = Cfg<T>;
  static constexpr size_t tile = align128(sizeof(typename C::S) * C::BT * C::LDK);
  static constexpr size_t x = 0, y = tile, d = 2 * tile;
  static constexpr size_t dbytes = C::kWmma ? align128(sizeof(float) * C::BT * C::LDD) : 0;
  static constexpr size_t stat = align128(sizeof(typename C::A) * kWarps * C::BT);
  static constexpr size_t cm = d + dbytes, cl = cm + stat, total = cl + stat;
  static_assert(total <= 48 * 1024, "static shared memory limit");
};

template <typename T>
struct GradSmem {
  using C = Cfg<T>;
  static constexpr size_t tile = align128(sizeof(typename C::S) * C::BT * C::LDK);
  static constexpr size_t slab = align128(sizeof(typename C::S) * C::KC * C::LDV);
  // The X/Y tiles (S phase) and the Y slab chunk (H·Y phase) are never live together.
  static constexpr size_t x = 0, y = tile, ys = 0;
  static constexpr size_t region = 2 * tile > slab ? 2 * tile : slab;
  static constexpr size_t d = region;
  static constexpr size_t dbytes = C::kWmma ? align128(sizeof(float) * C::BT * C::LDD) : 0;
  static constexpr size_t h = d + dbytes;
  static constexpr size_t red = h + align128(sizeof(typename C::S) * C::BT * C::LDH);
  static constexpr size_t total = red + align128(sizeof(typename C::A) * kWarps);
  static_assert(!C::kWmma || dbytes >= sizeof(float) * 256 * kWarps, "epilogue scratch");
  static_assert(total <= 48 * 1024, "static shared memory limit");
};

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

// Same contract with tensor cores (16-bit T, BT = 64): warp w computes the 16×32 strip
// (rows 16·(w/2), columns 32·(w%2)) in two fp32 fragments, which go through the fp32 tile sD
// to reach the (ty, tx) ownership used everywhere else.
template <typename T>
__device__ __forceinline__ void dot_tile_wmma(float (&dot)[Cfg<T>::TM][Cfg<T>::TM], T* sX, T* sY,
                                              float* sD, const T* X, int64_t ldx, const T* Y,
                                              int64_t ldy, int64_t row0, int64_t col0, int64_t nx,
                                              int64_t ny, int64_t D, bool vx, bool vy) {
  namespace wmma = nvcuda::wmma;
  using C = Cfg<T>;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4, warp = threadIdx.x >> 5;
  const int rf = warp >> 1, cf0 = (warp & 1) * 2;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  __syncthreads();
  for (int64_t k0 = 0; k0 < D; k0 += C::BK) {
    load_tile<T, T, C::BT, C::BK, C::LDK>(sX, X, ldx, row0, nx, k0, D, vx);
    load_tile<T, T, C::BT, C::BK, C::LDK>(sY, Y, ldy, col0, ny, k0, D, vy);
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < C::BK; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::load_matrix_sync(fa, sX + rf * 16 * C::LDK + ks, C::LDK);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        // Yᵀ as a column-major B: B[k][n] = sY[n][k].
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
        wmma::load_matrix_sync(fb, sY + (cf0 + j) * 16 * C::LDK + ks, C::LDK);
        wmma::mma_sync(acc[j], fa, fb, acc[j]);
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < 2; ++j)
    wmma::store_matrix_sync(sD + rf * 16 * C::LDD + (cf0 + j) * 16, acc[j], C::LDD,
                            wmma::mem_row_major);
  __syncthreads();
#pragma unroll
  for (int a = 0; a < C::TM; ++a)
#pragma unroll
    for (int b = 0; b < C::TM; ++b) dot[a][b] = sD[(ty + 16 * a) * C::LDD + tx + 16 * b];
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void dot_tile(acc_t<T> (&dot)[Cfg<T>::TM][Cfg<T>::TM], unsigned char* smem,
                                         size_t off_x, size_t off_y, size_t off_d, const T* X,
                                         int64_t ldx, const T* Y, int64_t ldy, int64_t row0,
                                         int64_t col0, int64_t nx, int64_t ny, int64_t D, bool vx,
                                         bool vy) {
  using C = Cfg<T>;
  using S = typename C::S;
  S* sX = reinterpret_cast<S*>(smem + off_x);
  S* sY = reinterpret_cast<S*>(smem + off_y);
  if constexpr (C::kWmma) {
    dot_tile_wmma<T>(dot, sX, sY, reinterpret_cast<float*>(smem + off_d), X, ldx, Y, ldy, row0,
                     col0, nx, ny, D, vx, vy);
  } else {
    dot_tile_fma<T>(dot, sX, sY, X, ldx, Y, ldy, row0, col0, nx, ny, D, vx, vy);
  }
}

// ---------------------------------------------------------------- small kernels

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

// Turns dẑ (gradient w.r.t. the unit rows, fp32/fp64, contiguous [N, D]) into dx:
// dx = a·(dẑ − ẑ(ẑ·dẑ)) with a = 1/‖x‖, ẑ = a·x. dz may alias out (fp32/fp64 outputs are
// reused as that buffer): each element is read, then written, by the same lane.
template <typename T>
__global__ void __launch_bounds__(kThreads) norm_bwd_kernel(const T* __restrict__ X, int64_t ld,
                                                            const acc_t<T>* __restrict__ inv,
                                                            const acc_t<T>* dz, T* out, int64_t N,
                                                            int64_t D) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;
  const int lane = threadIdx.x & 31;
  const A a = inv[row];
  const A* g = dz + row * D;
  A r = A(0);
  for (int64_t k = lane; k < D; k += 32) r = vfma(a * to_acc<A>(X[row * ld + k]), g[k], r);
  r = group_sum(r, 32);
  for (int64_t k = lane; k < D; k += 32) {
    const A z = a * to_acc<A>(X[row * ld + k]);
    const A v = a * (g[k] - z * r);
    out[row * D + k] = from_acc<T>(v);
  }
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

// log-sum-exp of a set of (max, sum) partials m[k·N + j], l[k·N + j], k = 0..K−1, in order.
// Every partial saw at least one finite entry, so its max is finite.
template <typename T>
__device__ __forceinline__ acc_t<T> merge_partials(const acc_t<T>* __restrict__ m,
                                                   const acc_t<T>* __restrict__ l, int64_t K,
                                                   int64_t N, int64_t j) {
  using A = acc_t<T>;
  A M = neg_inf<A>();
  for (int64_t k = 0; k < K; ++k) M = vmax(M, m[k * N + j]);
  A L = A(0);
  for (int64_t k = 0; k < K; ++k) L = vfma(l[k * N + j], ex<T>(m[k * N + j] - M), L);
  return M + lg(L);
}

// lse_row (and lse_col) from the forward's partials; loss term of index j; one sum per block.
// Without column partials (col_m == nullptr: the rows op) the term is lse_row − diag.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(
    const acc_t<T>* __restrict__ row_m, const acc_t<T>* __restrict__ row_l, int64_t Q,
    const acc_t<T>* __restrict__ col_m, const acc_t<T>* __restrict__ col_l, int64_t P,
    const acc_t<T>* __restrict__ diag, acc_t<T> lam, int64_t N, acc_t<T>* __restrict__ lse_row,
    acc_t<T>* __restrict__ lse_col, acc_t<T>* __restrict__ block_part) {
  using A = acc_t<T>;
  __shared__ A red[kWarps];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  A term = A(0);
  if (j < N) {
    const A lr = merge_partials<T>(row_m, row_l, Q, N, j);
    lse_row[j] = lr;
    const A d = diag[j];
    if (col_m != nullptr) {
      const A lc = merge_partials<T>(col_m, col_l, P, N, j);
      lse_col[j] = lc;
      term = lam * (lr - d) + (A(1) - lam) * (lc - d);
    } else {
      term = lr - d;
    }
  }
  term = block_sum(term, red);
  if (threadIdx.x == 0) block_part[blockIdx.x] = term;
}

// ---------------------------------------------------------------- forward tile kernel

// Grid (P, Q): see the file comment. X: NX rows (image, or the rows op's queries), Y: NY rows
// (text, or keys); row x pairs with column x + doff (0 for the square loss).
// row_m/row_l: [Q][NX] per-column-range row partials; col_m/col_l: [P][NY] per-stripe column
// partials, or nullptr (the rows op needs no column statistics); diag: [NX] the S_x,x+doff
// (written by the one block whose tile holds each).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(
    const T* __restrict__ X, int64_t ldx, const T* __restrict__ Y, int64_t ldy,
    const acc_t<T>* __restrict__ scale_ptr, const acc_t<T>* __restrict__ inv_x,
    const acc_t<T>* __restrict__ inv_y, int64_t NX, int64_t NY, int64_t doff, int64_t D, bool vx,
    bool vy, acc_t<T>* __restrict__ row_m, acc_t<T>* __restrict__ row_l,
    acc_t<T>* __restrict__ col_m, acc_t<T>* __restrict__ col_l, acc_t<T>* __restrict__ diag) {
  using C = Cfg<T>;
  using A = acc_t<T>;
  using L = FwdSmem<T>;
  constexpr int TM = C::TM, BT = C::BT;
  __shared__ __align__(128) unsigned char smem[L::total];
  A* s_cm = reinterpret_cast<A*>(smem + L::cm);  // [warp][column] tile column max
  A* s_cl = reinterpret_cast<A*>(smem + L::cl);  // [warp][column] tile column sum

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nrb = (NX + BT - 1) / BT, ncb = (NY + BT - 1) / BT;
  const int64_t P = gridDim.x, Q = gridDim.y, p = blockIdx.x, q = blockIdx.y;
  const int64_t cb_begin = q * ncb / Q, cb_end = (q + 1) * ncb / Q;
  const A c = *scale_ptr;
  const A ninf = neg_inf<A>();

  for (int64_t rb = p; rb < nrb; rb += P) {
    const bool first = rb == p;  // this block's first visit to its column partials
    const int64_t row0 = rb * BT;
    bool rv[TM];
    A ax[TM], m[TM], l[TM];
#pragma unroll
    for (int a = 0; a < TM; ++a) {
      const int64_t row = row0 + ty + 16 * a;
      rv[a] = row < NX;
      ax[a] = (inv_x != nullptr && rv[a]) ? inv_x[row] : A(1);
      m[a] = ninf;
      l[a] = A(0);
    }
    for (int64_t cb = cb_begin; cb < cb_end; ++cb) {
      const int64_t col0 = cb * BT;
      A s[TM][TM];
      dot_tile<T>(s, smem, L::x, L::y, L::d, X, ldx, Y, ldy, row0, col0, NX, NY, D, vx, vy);
      bool cv[TM];
      A by[TM];
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        const int64_t col = col0 + tx + 16 * b;
        cv[b] = col < NY;
        by[b] = (inv_y != nullptr && cv[b]) ? inv_y[col] : A(1);
      }
      // Entries outside the NX×NY matrix become −inf, i.e. exp() = 0 below.
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int b = 0; b < TM; ++b)
          s[a][b] = (rv[a] && cv[b]) ? c * (s[a][b] * (ax[a] * by[b])) : ninf;
      // Tile entry (a, b) is on the diagonal col = row + doff when tx + 16b = ty + 16a + dd.
      const int64_t dd = row0 + doff - col0;
      if (dd > -BT && dd < BT) {
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
          for (int b = 0; b < TM; ++b)
            if (rv[a] && cv[b] && tx + 16 * b == ty + 16 * a + dd)
              diag[row0 + ty + 16 * a] = s[a][b];
      }

      // Rows: the 16 lanes sharing ty hold a whole tile row between them. The reference point
      // mr is 0 for a row with no valid entry yet so that exp(−inf − mr) = 0, never NaN.
#pragma unroll
      for (int a = 0; a < TM; ++a) {
        A tmax = s[a][0];
#pragma unroll
        for (int b = 1; b < TM; ++b) tmax = vmax(tmax, s[a][b]);
        tmax = group_max(tmax, 16);
        const A mn = vmax(m[a], tmax);
        const A mr = mn == ninf ? A(0) : mn;
        A sum = A(0);
#pragma unroll
        for (int b = 0; b < TM; ++b) sum += ex<T>(s[a][b] - mr);
        sum = group_sum(sum, 16);
        l[a] = vfma(l[a], ex<T>(m[a] - mr), sum);
        m[a] = mn;
      }

      // Uniform over the block: every thread skips the barriers below together.
      if (col_m == nullptr) continue;

      // Columns: a tile column spans all 16 ty values, i.e. both halves of every warp and all
      // warps: reduce over a, then lanes ±16, then warps through shared memory.
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        A v = s[0][b];
#pragma unroll
        for (int a = 1; a < TM; ++a) v = vmax(v, s[a][b]);
        v = vmax(v, __shfl_xor_sync(0xffffffffu, v, 16));
        if (lane < 16) s_cm[warp * BT + tx + 16 * b] = v;
      }
      __syncthreads();
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        A cmax = ninf;
        for (int w = 0; w < kWarps; ++w) cmax = vmax(cmax, s_cm[w * BT + tx + 16 * b]);
        const A mr = cmax == ninf ? A(0) : cmax;
        A v = A(0);
#pragma unroll
        for (int a = 0; a < TM; ++a) v += ex<T>(s[a][b] - mr);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        if (lane < 16) s_cl[warp * BT + tx + 16 * b] = v;
      }
      __syncthreads();
      if (threadIdx.x < BT) {
        const int64_t col = col0 + threadIdx.x;
        if (col < NY) {
          // Row row0 < N is in every tile of this block, so cmax is finite.
          A cmax = ninf, lt = A(0);
          for (int w = 0; w < kWarps; ++w) cmax = vmax(cmax, s_cm[w * BT + threadIdx.x]);
          for (int w = 0; w < kWarps; ++w) lt += s_cl[w * BT + threadIdx.x];
          const int64_t idx = p * NY + col;
          if (first) {
            col_m[idx] = cmax;
            col_l[idx] = lt;
          } else {
            const A mo = col_m[idx], lo = col_l[idx];
            const A mn = vmax(mo, cmax);
            col_l[idx] = lo * ex<T>(mo - mn) + lt * ex<T>(cmax - mn);
            col_m[idx] = mn;
          }
        }
      }
      // The next tile's dot_tile begins with a barrier before s_cm/s_cl can be rewritten.
    }
    if (tx == 0) {
#pragma unroll
      for (int a = 0; a < TM; ++a) {
        if (rv[a]) {
          const int64_t row = row0 + ty + 16 * a;
          row_m[q * NX + row] = m[a];
          row_l[q * NX + row] = l[a];
        }
      }
    }
  }
}

// ---------------------------------------------------------------- backward tile kernel

// H·Y on CUDA cores: acc[a][j][e] += Σ_k H[ty+16a][k] · Yslab[k][4tx + 64j + e].
template <typename T>
__device__ __forceinline__ void hy_fma(acc_t<T> (&acc)[Cfg<T>::TM][Cfg<T>::TV][4],
                                       const acc_t<T>* sH, const acc_t<T>* sYs, int kc) {
  using C = Cfg<T>;
  using A = acc_t<T>;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int k = 0; k < C::KC; k += 4) {
    A h[C::TM][4];
#pragma unroll
    for (int a = 0; a < C::TM; ++a) load4(sH + (ty + 16 * a) * C::LDH + kc + k, h[a]);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      A yv[C::TV][4];
#pragma unroll
      for (int j = 0; j < C::TV; ++j) load4(sYs + (k + kk) * C::LDV + 4 * tx + 64 * j, yv[j]);
#pragma unroll
      for (int a = 0; a < C::TM; ++a)
#pragma unroll
        for (int j = 0; j < C::TV; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][j][e] = vfma(h[a][kk], yv[j][e], acc[a][j][e]);
    }
  }
}

// Accumulators of the H·Y product, one D slab of BT rows. FMA: registers in the (ty, tx)
// layout. WMMA: warp w holds rows 32·(w/4) + 16i, columns 64·(w%4) + 16j, i < 2, j < 4.
template <typename T, bool W = Cfg<T>::kWmma>
struct HYAcc;

template <typename T>
struct HYAcc<T, false> {
  using C = Cfg<T>;
  using A = acc_t<T>;
  A acc[C::TM][C::TV][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int a = 0; a < C::TM; ++a)
#pragma unroll
      for (int j = 0; j < C::TV; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[a][j][e] = A(0);
  }
  __device__ __forceinline__ void mma(const A* sH, const A* sYs, int kc) {
    hy_fma<T>(acc, sH, sYs, kc);
  }
  // out[row][d] = scale·acc, to T (outT) or to the accumulator type (outA).
  __device__ __forceinline__ void store(float* /*scratch*/, A scale, int64_t row0, int64_t d0,
                                        int64_t N, int64_t D, T* outT, A* outA) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int a = 0; a < C::TM; ++a) {
      const int64_t row = row0 + ty + 16 * a;
      if (row >= N) continue;
#pragma unroll
      for (int j = 0; j < C::TV; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t d = d0 + 4 * tx + 64 * j + e;
          if (d >= D) continue;
          const A v = scale * acc[a][j][e];
          if (outT != nullptr) {
            outT[row * D + d] = from_acc<T>(v);
          } else {
            outA[row * D + d] = v;
          }
        }
    }
  }
};

template <typename T>
struct HYAcc<T, true> {
  using C = Cfg<T>;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.f);
  }
  __device__ __forceinline__ void mma(const T* sH, const T* sYs, int kc) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x >> 5, rg = warp >> 2, cg = warp & 3;
#pragma unroll
    for (int ks = 0; ks < C::KC; ks += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        wmma::load_matrix_sync(fa[i], sH + (rg * 2 + i) * 16 * C::LDH + kc + ks, C::LDH);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
        wmma::load_matrix_sync(fb, sYs + ks * C::LDV + (cg * 4 + j) * 16, C::LDV);
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[i][j], fa[i], fb, acc[i][j]);
      }
    }
  }
  // Fragments go through a private 16×16 fp32 patch of `scratch` per warp (the fragment's
  // register layout is opaque), then out with bounds checks.
  __device__ __forceinline__ void store(float* scratch, float scale, int64_t row0, int64_t d0,
                                        int64_t N, int64_t D, T* outT, float* outA) {
    namespace wmma = nvcuda::wmma;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, rg = warp >> 2, cg = warp & 3;
    float* patch = scratch + warp * 256;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::store_matrix_sync(patch, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int idx = lane + 32 * e, r = idx >> 4, cc = idx & 15;
          const int64_t row = row0 + (rg * 2 + i) * 16 + r;
          const int64_t d = d0 + (cg * 4 + j) * 16 + cc;
          if (row < N && d < D) {
            const float v = scale * patch[idx];
            if (outT != nullptr) {
              outT[row * D + d] = from_acc<T>(v);
            } else {
              outA[row * D + d] = v;
            }
          }
        }
        __syncwarp();
      }
  }
};

// Grid (row blocks, D slabs). See the file comment for the roles of (X, Y, lse_x, lse_y, wx,
// wy); X has NX rows, Y has NY, and the −δ sits at column x + doff. A null lse_x (lse_y) drops
// its term, whose weight is then 0 (the rows op has one direction only). do_out = false: only
// Σ G'⊙u (d logit_scale), grid.y must be 1. Outputs [NX, D] contiguous, scaled by c·gloss/denom:
// outT (T, final) or outA (accumulator type, dẑ before the normalisation chain);
// dc_part[row block] (or nullptr) gets Σ G'⊙u of the block's rows.
template <typename T>
__global__ void __launch_bounds__(kThreads) grad_kernel(
    const T* __restrict__ X, int64_t ldx, const T* __restrict__ Y, int64_t ldy,
    const acc_t<T>* __restrict__ scale_ptr, const acc_t<T>* __restrict__ gloss_ptr,
    const acc_t<T>* __restrict__ inv_x, const acc_t<T>* __restrict__ inv_y,
    const acc_t<T>* __restrict__ lse_x, const acc_t<T>* __restrict__ lse_y, acc_t<T> wx,
    acc_t<T> wy, int64_t NX, int64_t NY, int64_t doff, acc_t<T> denom, int64_t D, bool vx,
    bool vy, bool do_out, T* outT, acc_t<T>* outA, acc_t<T>* __restrict__ dc_part) {
  using C = Cfg<T>;
  using A = acc_t<T>;
  using S = typename C::S;
  using L = GradSmem<T>;
  constexpr int TM = C::TM, BT = C::BT;
  __shared__ __align__(128) unsigned char smem[L::total];
  S* sH = reinterpret_cast<S*>(smem + L::h);
  S* sYs = reinterpret_cast<S*>(smem + L::ys);

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t ncb = (NY + BT - 1) / BT;
  const int64_t rb = blockIdx.x, row0 = rb * BT, d0 = static_cast<int64_t>(blockIdx.y) * C::DV;
  const A c = *scale_ptr;
  const bool has_x = lse_x != nullptr, has_y = lse_y != nullptr;

  bool rv[TM];
  A ax[TM], lx[TM];
#pragma unroll
  for (int a = 0; a < TM; ++a) {
    const int64_t row = row0 + ty + 16 * a;
    rv[a] = row < NX;
    ax[a] = (inv_x != nullptr && rv[a]) ? inv_x[row] : A(1);
    lx[a] = (has_x && rv[a]) ? lse_x[row] : A(0);
  }
  HYAcc<T> hy;
  hy.zero();
  A dc = A(0);

  for (int64_t cb = 0; cb < ncb; ++cb) {
    const int64_t col0 = cb * BT;
    A s[TM][TM];
    // Begins with a barrier: the previous H·Y pass is done with sH and the slab chunk.
    dot_tile<T>(s, smem, L::x, L::y, L::d, X, ldx, Y, ldy, row0, col0, NX, NY, D, vx, vy);
    bool cv[TM];
    A by[TM], ly[TM];
#pragma unroll
    for (int b = 0; b < TM; ++b) {
      const int64_t col = col0 + tx + 16 * b;
      cv[b] = col < NY;
      by[b] = (inv_y != nullptr && cv[b]) ? inv_y[col] : A(1);
      ly[b] = (has_y && cv[b]) ? lse_y[col] : A(0);
    }
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        const bool valid = rv[a] && cv[b];
        const A u = s[a][b] * (ax[a] * by[b]);  // same expression as the forward: same bits
        const A sv = c * u;
        A g = A(0);
        if (has_x) g = wx * ex<T>(sv - lx[a]);
        if (has_y) g = vfma(wy, ex<T>(sv - ly[b]), g);
        if (row0 + ty + 16 * a + doff == col0 + tx + 16 * b) g -= A(1);
        g = valid ? g : A(0);
        if (valid) dc = vfma(g, u, dc);
        // H = G' ∈ [−1, 1]; b_y goes onto the Y slab rows instead (load_tile's rscale): a
        // fp16 H = G'·b_y would fall into subnormals for features of large norm.
        if (do_out) sH[(ty + 16 * a) * C::LDH + tx + 16 * b] = from_acc_s<S>(g);
      }
    if (!do_out) continue;
    __syncthreads();  // sH complete; the X/Y tiles (aliased by the slab chunk) no longer read
    for (int kc = 0; kc < BT; kc += C::KC) {
      load_tile<T, S, C::KC, C::DV, C::LDV>(sYs, Y, ldy, col0 + kc, NY, d0, D, vy, inv_y);
      __syncthreads();
      hy.mma(sH, sYs, kc);
      __syncthreads();
    }
  }

  if (do_out) {
    const A scale = c * *gloss_ptr / denom;
    __syncthreads();  // the WMMA epilogue reuses the fp32 tile region as scratch
    hy.store(reinterpret_cast<float*>(smem + L::d), scale, row0, d0, NX, D, outT, outA);
  }
  if (dc_part != nullptr && blockIdx.y == 0) {
    const A total = block_sum(dc, reinterpret_cast<A*>(smem + L::red));
    if (threadIdx.x == 0) dc_part[rb] = total;
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

// Forward grid (P row stripes, Q column ranges) as a function of the sizes alone.
template <typename T>
void fwd_grid(int64_t NX, int64_t NY, int64_t& P, int64_t& Q) {
  const int64_t nrb = ceil_div(NX, Cfg<T>::BT), ncb = ceil_div(NY, Cfg<T>::BT);
  P = nrb < kFwdBlocks ? nrb : kFwdBlocks;
  Q = nrb >= kFwdBlocks ? 1 : (kFwdBlocks + nrb - 1) / nrb;
  if (Q > ncb) Q = ncb;
  if (P < 1) P = 1;
  if (Q < 1) Q = 1;
}

// X: NX rows, Y: NY rows; column partials only for the square loss (cols).
template <typename T>
struct FwdWs {
  using A = acc_t<T>;
  A *inv_x, *inv_y, *diag, *row_m, *row_l, *col_m, *col_l, *block_part;
  size_t bytes;
  FwdWs(void* base, int64_t NX, int64_t NY, bool cols) {
    int64_t P, Q;
    fwd_grid<T>(NX, NY, P, Q);
    const size_t nx = static_cast<size_t>(NX), ny = static_cast<size_t>(NY);
    Carver cv{static_cast<char*>(base)};
    inv_x = cv.take<A>(nx);
    inv_y = cv.take<A>(ny);
    diag = cv.take<A>(nx);
    row_m = cv.take<A>(static_cast<size_t>(Q) * nx);
    row_l = cv.take<A>(static_cast<size_t>(Q) * nx);
    col_m = cols ? cv.take<A>(static_cast<size_t>(P) * ny) : nullptr;
    col_l = cols ? cv.take<A>(static_cast<size_t>(P) * ny) : nullptr;
    block_part = cv.take<A>(static_cast<size_t>(ceil_div(NX, kThreads)));
    bytes = cv.off;
  }
};

template <typename T>
struct BwdWs {
  using A = acc_t<T>;
  A *inv_x, *inv_y, *dc_part, *dz;
  size_t bytes;
  BwdWs(void* base, int64_t NX, int64_t NY, int64_t D) {
    const int64_t n = NX > NY ? NX : NY;
    Carver cv{static_cast<char*>(base)};
    inv_x = cv.take<A>(static_cast<size_t>(NX));
    inv_y = cv.take<A>(static_cast<size_t>(NY));
    dc_part = cv.take<A>(static_cast<size_t>(ceil_div(n, Cfg<T>::BT)));
    // dẑ in the accumulator type for the normalisation chain: 16-bit outputs cannot hold it,
    // fp32/fp64 outputs hold it in place. The passes run one after the other and share it.
    dz = cv.take<A>(sizeof(T) < sizeof(A) ? static_cast<size_t>(n) * static_cast<size_t>(D) : 0);
    bytes = cv.off;
  }
};

template <typename T>
cudaError_t launch_inv_norms(const T* X, int64_t ld, int64_t N, int64_t D, acc_t<T>* inv,
                             cudaStream_t stream) {
  inv_norm_kernel<T><<<static_cast<unsigned>(ceil_div(N, kWarps)), kThreads, 0, stream>>>(X, ld, N, D, inv);
  return cudaGetLastError();
}

// The forward of both ops: X (NX rows) against Y (NY rows), row x paired with column x + doff.
// With lse_col: the square loss, Σ_x [λ(lse_row − diag) + (1−λ)(lse_col − diag)] / denom;
// without: Σ_x (lse_row − diag) / denom (the rows op).
template <typename T>
cudaError_t forward(const T* X, int64_t ldx, const T* Y, int64_t ldy, const acc_t<T>* scale,
                    acc_t<T>* loss, acc_t<T>* lse_row, acc_t<T>* lse_col, int64_t NX, int64_t NY,
                    int64_t doff, int64_t D, double lambda, double denom, bool normalize,
                    void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const bool cols = lse_col != nullptr;
  FwdWs<T> ws(workspace, NX, NY, cols);
  cudaError_t e;
  if (normalize) {
    if ((e = launch_inv_norms(X, ldx, NX, D, ws.inv_x, stream)) != cudaSuccess) return e;
    if ((e = launch_inv_norms(Y, ldy, NY, D, ws.inv_y, stream)) != cudaSuccess) return e;
  }
  int64_t P, Q;
  fwd_grid<T>(NX, NY, P, Q);
  fwd_kernel<T><<<dim3(static_cast<unsigned>(P), static_cast<unsigned>(Q)), kThreads, 0, stream>>>(
      X, ldx, Y, ldy, scale, normalize ? ws.inv_x : nullptr, normalize ? ws.inv_y : nullptr, NX, NY,
      doff, D, vec_ok(X, ldx, D), vec_ok(Y, ldy, D), ws.row_m, ws.row_l, ws.col_m, ws.col_l, ws.diag);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  const int64_t nb = ceil_div(NX, kThreads);
  combine_kernel<T><<<static_cast<unsigned>(nb), kThreads, 0, stream>>>(
      ws.row_m, ws.row_l, Q, ws.col_m, ws.col_l, P, ws.diag, static_cast<A>(lambda), NX, lse_row,
      lse_col, ws.block_part);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  sum_kernel<A><<<1, kThreads, 0, stream>>>(ws.block_part, nb, nullptr, static_cast<A>(denom),
                                            loss);
  return cudaGetLastError();
}

// One operand of the backward: n rows z (row stride ld), its inverse norms (normalize), and the
// log-sum-exp of its rows with that direction's weight (lse == nullptr: no direction from it).
template <typename T>
struct Side {
  const T* z;
  int64_t ld, n;
  bool vec;
  const acc_t<T>* inv;
  const acc_t<T>* lse;
  acc_t<T> w;
};

// Gradient w.r.t. the rows of x (against the columns y, −δ at column x + doff) into out
// [x.n, D], or only dc_part (per row block of x) when out is null.
template <typename T>
cudaError_t grad_pass(const Side<T>& x, const Side<T>& y, int64_t doff, double denom,
                      const acc_t<T>* scale, const acc_t<T>* gloss, int64_t D, bool normalize,
                      acc_t<T>* dz, T* out, acc_t<T>* dc_part, cudaStream_t stream) {
  using C = Cfg<T>;
  using A = acc_t<T>;
  const bool do_out = out != nullptr && D > 0;
  if (!do_out && dc_part == nullptr) return cudaSuccess;
  const int64_t nrb = ceil_div(x.n, C::BT), nslab = ceil_div(D, C::DV);
  if (nrb > 0x7fffffff || nslab > 65535) return cudaErrorInvalidValue;
  T* outT = nullptr;
  A* outA = nullptr;
  if (do_out) {
    if (!normalize) {
      outT = out;
    } else if constexpr (sizeof(T) < sizeof(A)) {
      outA = dz;
    } else {
      outA = reinterpret_cast<A*>(out);
    }
  }
  const dim3 grid(static_cast<unsigned>(nrb), do_out ? static_cast<unsigned>(nslab) : 1u);
  grad_kernel<T><<<grid, kThreads, 0, stream>>>(
      x.z, x.ld, y.z, y.ld, scale, gloss, x.inv, y.inv, x.lse, y.lse, x.w, y.w, x.n, y.n, doff,
      static_cast<A>(denom), D, x.vec, y.vec, do_out, outT, outA, dc_part);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || !do_out || !normalize) return err;
  norm_bwd_kernel<T><<<static_cast<unsigned>(ceil_div(x.n, kWarps)), kThreads, 0, stream>>>(
      x.z, x.ld, x.inv, outA, out, x.n, D);
  return cudaGetLastError();
}

// The backward of both ops: d a (rows of a against b, −δ at a-row + doff) and d b (the
// transposed problem, −δ at b-row − doff), then d logit_scale = gloss/denom · Σ G'⊙u, taken by
// the first pass that runs (a pass of its own when neither gradient is asked for).
template <typename T>
cudaError_t backward(const acc_t<T>* gloss, Side<T> a, Side<T> b, const acc_t<T>* scale, T* da,
                     T* db, acc_t<T>* dscale, int64_t doff, int64_t D, double denom, bool normalize,
                     void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  BwdWs<T> ws(workspace, a.n, b.n, D);
  cudaError_t e;
  if (normalize) {
    if ((e = launch_inv_norms(a.z, a.ld, a.n, D, ws.inv_x, stream)) != cudaSuccess) return e;
    if ((e = launch_inv_norms(b.z, b.ld, b.n, D, ws.inv_y, stream)) != cudaSuccess) return e;
    a.inv = ws.inv_x;
    b.inv = ws.inv_y;
  }
  A* dc_part = dscale != nullptr ? ws.dc_part : nullptr;
  int64_t dc_blocks = ceil_div(a.n, Cfg<T>::BT);
  if (da != nullptr) {
    e = grad_pass(a, b, doff, denom, scale, gloss, D, normalize, ws.dz, da, dc_part, stream);
    if (e != cudaSuccess) return e;
    dc_part = nullptr;
  }
  if (db != nullptr) {
    e = grad_pass(b, a, -doff, denom, scale, gloss, D, normalize, ws.dz, db, dc_part, stream);
    if (e != cudaSuccess) return e;
    if (dc_part != nullptr) dc_blocks = ceil_div(b.n, Cfg<T>::BT);
    dc_part = nullptr;
  }
  if (dc_part != nullptr) {
    e = grad_pass(a, b, doff, denom, scale, gloss, D, normalize, ws.dz, static_cast<T*>(nullptr),
                  dc_part, stream);
    if (e != cudaSuccess) return e;
  }
  if (dscale != nullptr) {
    sum_kernel<A><<<1, kThreads, 0, stream>>>(ws.dc_part, dc_blocks, gloss, static_cast<A>(denom),
                                              dscale);
  }
  return cudaGetLastError();
}

// The loss over no rows is 0, and so are the gradients of everything else (all-zero bytes are
// +0 in every element type).
inline cudaError_t zero_fill(void* p, size_t bytes, cudaStream_t stream) {
  if (p == nullptr || bytes == 0) return cudaSuccess;
  return cudaMemsetAsync(p, 0, bytes, stream);
}

}  // namespace infonce_detail

template <typename T>
size_t infonce_fwd_workspace(int64_t N, int64_t D) {
  (void)D;
  if (N <= 0) return 0;
  return infonce_detail::FwdWs<T>(nullptr, N, N, true).bytes;
}

template <typename T>
cudaError_t infonce_fwd(const T* image, int64_t ldi, const T* text, int64_t ldt,
                        const acc_t<T>* logit_scale, acc_t<T>* loss, acc_t<T>* lse_row,
                        acc_t<T>* lse_col, int64_t N, int64_t D, double lambda, bool normalize,
                        void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  if (N < 0 || D < 0 || ldi < 0 || ldt < 0) return cudaErrorInvalidValue;
  if (N == 0) {  // the reference's 0/max(N, 1): an empty batch has loss 0
    const cudaError_t e = infonce_detail::zero_fill(loss, sizeof(A), stream);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
  if (workspace == nullptr || image == nullptr || text == nullptr || logit_scale == nullptr ||
      loss == nullptr || lse_row == nullptr || lse_col == nullptr)
    return cudaErrorInvalidValue;
  return infonce_detail::forward<T>(image, ldi, text, ldt, logit_scale, loss, lse_row, lse_col, N, N,
                                    0, D, lambda, static_cast<double>(N), normalize, workspace,
                                    stream);
}

template <typename T>
size_t infonce_bwd_workspace(int64_t N, int64_t D) {
  if (N <= 0 || D < 0) return 0;
  return infonce_detail::BwdWs<T>(nullptr, N, N, D).bytes;
}

template <typename T>
cudaError_t infonce_bwd(const acc_t<T>* gloss, const T* image, int64_t ldi, const T* text,
                        int64_t ldt, const acc_t<T>* logit_scale, const acc_t<T>* lse_row,
                        const acc_t<T>* lse_col, T* dimage, T* dtext, acc_t<T>* dscale,
                        int64_t N, int64_t D, double lambda, bool normalize, void* workspace,
                        cudaStream_t stream) {
  using namespace infonce_detail;
  using A = acc_t<T>;
  if (N < 0 || D < 0 || ldi < 0 || ldt < 0) return cudaErrorInvalidValue;
  if (N == 0) {
    const cudaError_t e = zero_fill(dscale, sizeof(A), stream);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
  if (workspace == nullptr || gloss == nullptr || image == nullptr || text == nullptr ||
      logit_scale == nullptr || lse_row == nullptr || lse_col == nullptr)
    return cudaErrorInvalidValue;
  // d image: rows of I against T, P_row weighted by λ; d text: rows of T against I, P_col by 1−λ.
  const Side<T> img{image, ldi, N, vec_ok(image, ldi, D), nullptr, lse_row, static_cast<A>(lambda)};
  const Side<T> txt{text, ldt, N, vec_ok(text, ldt, D), nullptr, lse_col,
                    static_cast<A>(1.0 - lambda)};
  return backward<T>(gloss, img, txt, logit_scale, dimage, dtext, dscale, 0, D,
                     static_cast<double>(N), normalize, workspace, stream);
}

template <typename T>
size_t infonce_rows_fwd_workspace(int64_t M, int64_t N, int64_t D) {
  (void)D;
  if (M <= 0 || N <= 0) return 0;
  return infonce_detail::FwdWs<T>(nullptr, M, N, false).bytes;
}

template <typename T>
cudaError_t infonce_rows_fwd(const T* queries, int64_t ldq, const T* keys, int64_t ldk,
                             const acc_t<T>* logit_scale, acc_t<T>* part, acc_t<T>* lse, int64_t M,
                             int64_t N, int64_t D, int64_t offset, bool normalize, void* workspace,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  if (M < 0 || D < 0 || ldq < 0 || ldk < 0 || offset < 0 || offset > N - M)
    return cudaErrorInvalidValue;
  if (M == 0) {  // a sum over no query rows
    const cudaError_t e = infonce_detail::zero_fill(part, sizeof(A), stream);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
  if (workspace == nullptr || queries == nullptr || keys == nullptr || logit_scale == nullptr ||
      part == nullptr || lse == nullptr)
    return cudaErrorInvalidValue;
  return infonce_detail::forward<T>(queries, ldq, keys, ldk, logit_scale, part, lse, nullptr, M, N,
                                    offset, D, 1.0, static_cast<double>(N), normalize, workspace,
                                    stream);
}

template <typename T>
size_t infonce_rows_bwd_workspace(int64_t M, int64_t N, int64_t D) {
  if (M <= 0 || N <= 0 || D < 0) return 0;
  return infonce_detail::BwdWs<T>(nullptr, M, N, D).bytes;
}

template <typename T>
cudaError_t infonce_rows_bwd(const acc_t<T>* gpart, const T* queries, int64_t ldq, const T* keys,
                             int64_t ldk, const acc_t<T>* logit_scale, const acc_t<T>* lse,
                             T* dqueries, T* dkeys, acc_t<T>* dscale, int64_t M, int64_t N, int64_t D,
                             int64_t offset, bool normalize, void* workspace, cudaStream_t stream) {
  using namespace infonce_detail;
  using A = acc_t<T>;
  if (M < 0 || D < 0 || ldq < 0 || ldk < 0 || offset < 0 || offset > N - M)
    return cudaErrorInvalidValue;
  if (M == 0) {  // no query rows: every gradient is a sum over no terms
    cudaError_t e = zero_fill(dscale, sizeof(A), stream);
    const size_t nd = static_cast<size_t>(N) * static_cast<size_t>(D);
    if (e == cudaSuccess) e = zero_fill(dkeys, nd * sizeof(T), stream);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
  if (workspace == nullptr || gpart == nullptr || queries == nullptr || keys == nullptr ||
      logit_scale == nullptr || lse == nullptr)
    return cudaErrorInvalidValue;
  // One direction: G = gpart/N·(P_row − δ(key = query + offset)); the keys carry no log-sum-exp.
  const Side<T> q{queries, ldq, M, vec_ok(queries, ldq, D), nullptr, lse, A(1)};
  const Side<T> k{keys, ldk, N, vec_ok(keys, ldk, D), nullptr, nullptr, A(0)};
  return backward<T>(gpart, q, k, logit_scale, dqueries, dkeys, dscale, offset, D,
                     static_cast<double>(N), normalize, workspace, stream);
}

#define LK_INFONCE_INSTANTIATE(T)                                                                  \
  template size_t infonce_fwd_workspace<T>(int64_t, int64_t);                                      \
  template cudaError_t infonce_fwd<T>(const T*, int64_t, const T*, int64_t, const acc_t<T>*,       \
                                      acc_t<T>*, acc_t<T>*, acc_t<T>*, int64_t, int64_t, double,   \
                                      bool, void*, cudaStream_t);                                  \
  template size_t infonce_bwd_workspace<T>(int64_t, int64_t);                                      \
  template cudaError_t infonce_bwd<T>(const acc_t<T>*, const T*, int64_t, const T*, int64_t,       \
                                      const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, T*, T*,   \
                                      acc_t<T>*, int64_t, int64_t, double, bool, void*,            \
                                      cudaStream_t);                                               \
  template size_t infonce_rows_fwd_workspace<T>(int64_t, int64_t, int64_t);                        \
  template cudaError_t infonce_rows_fwd<T>(const T*, int64_t, const T*, int64_t, const acc_t<T>*,  \
                                           acc_t<T>*, acc_t<T>*, int64_t, int64_t, int64_t,        \
                                           int64_t, bool, void*, cudaStream_t);                    \
  template size_t infonce_rows_bwd_workspace<T>(int64_t, int64_t, int64_t);                        \
  template cudaError_t infonce_rows_bwd<T>(const acc_t<T>*, const T*, int64_t, const T*, int64_t,  \
                                           const acc_t<T>*, const acc_t<T>*, T*, T*, acc_t<T>*,    \
                                           int64_t, int64_t, int64_t, int64_t, bool, void*,        \
                                           cudaStream_t);
LK_FOR_EACH_TYPE(LK_INFONCE_INSTANTIATE)
#undef LK_INFONCE_INSTANTIATE

}  // namespace lk
