// Adapter bottleneck: h = x W_dᵀ + b_d, y = x + s·(act(h) W_uᵀ + b_u), and its backward.
//
// Every product here is one tiled GEMM, C[i, j] = Σ_p A(i, p)·B(p, j), with the operand
// reads and the epilogue supplied by a small "problem" struct (which pointer, which stride
// is unit, what to do with each finished C element):
//   forward   h   = x·W_dᵀ (+b_d)                       [M, R] over K
//             y   = x + s·(act(h)·W_uᵀ + b_u)           [M, K] over R
//   backward  dh  = (s·g·W_u) ⊙ act'(h)                 [M, R] over K   (acc_t, workspace)
//             dW_u = s·gᵀ·act(h), db_u = s·Σ_m g        [K, R] over M
//             dW_d = dhᵀ·x,       db_d = Σ_m dh         [R, K] over M
//             dx  = g + dh·W_d                          [M, K] over R
// The forward's two GEMMs run only where adapter_fused.cu's single pass does not apply
// (R > 64, or its x tile exceeds shared memory).
// For half and bf16 the GEMM runs on tensor cores (WMMA, fp32 accumulation): on CUDA cores
// the 2·M·K·R multiply-adds would cost more than moving x and y once R reaches a few tens.
// fp32 and fp64 use a CUDA-core path with acc_t accumulation (fp32 stays exact fp32, no
// TF32). Both paths share the operand loads, the shared-memory tiles and the epilogue.
// Reductions over M (weight and bias gradients) are split over at most 64 fixed row ranges
// whose acc_t partials are then added in a fixed order: deterministic, no float atomics.
// Bias gradients come for free from the GEMM that already holds the operand tile in shared
// memory: the blocks of the first column tile also sum the rows of their A tile.
#include "adapter.cuh"
#include "adapter_detail.cuh"

#include <mma.h>

#include <type_traits>

namespace lk {
namespace {

namespace wmma = nvcuda::wmma;
using adapter_detail::act_fwd;
using adapter_detail::act_grad;
using adapter_detail::UseWmma;

// ---------------------------------------------------------------------------------------
// The tiled GEMM

// Block tile BM×BN of C, BK-deep steps over p, 256 threads in a 16×16 grid; thread (tx, ty)
// owns C rows ty + 16·r (r < TM) and columns tx + 16·c (c < TN). The strided ownership keeps
// shared-memory reads conflict-free and global writes of the epilogue coalesced along j.
// With WMMA the 8 warps form a WR×WC grid, each computing a (BM/WR)×(BN/WC) piece of C in
// 16×16 fragments; the result goes through shared memory to the same per-thread epilogue.
template <int BM_, int BN_, int TM_, int TN_, int WR_, int WC_>
struct Tile {
  static constexpr int BM = BM_, BN = BN_, TM = TM_, TN = TN_, BK = 32;
  static constexpr int TX = BN / TN, TY = BM / TM, kThreads = 256;
  static constexpr int WR = WR_, WC = WC_, FM = BM / (16 * WR), FN = BN / (16 * WC);
  static_assert(TX == 16 && TY == 16, "the thread grid is 16x16");
  static_assert(WR * WC == kThreads / 32 && FM * 16 * WR == BM && FN * 16 * WC == BN,
                "the warp grid covers the tile in 16x16 fragments");
};
using TileSquare = Tile<64, 64, 4, 4, 4, 2>;  // both C dimensions large
using TileTall = Tile<128, 16, 8, 1, 8, 1>;   // J = R <= 16
using TileWide = Tile<16, 128, 1, 8, 1, 8>;   // I = R <= 16

// Fields every problem carries. The p range is split into chunks of `chunk` (a multiple of
// BK), one per blockIdx.z; row_sums asks the blocks of column tile 0 for Σ_p A(i, p)
// (honoured only when A is unit-stride in i, as in the two weight-gradient problems).
// The C tiles are numbered along blockIdx.x; j_fastest puts the tiles of one row of tiles
// next to each other, so that blocks resident together share the A tile (the large operand
// read once from memory, then from L2); otherwise the tiles of one column are adjacent.
struct Shape {
  int64_t I, J, P, chunk;
  bool row_sums, j_fastest;
};

// Problem interface (see the structs below):
//   using Elem, Acc;                element type T and its accumulation type
//   static constexpr bool kAUnitI;  A(i, p) is unit-stride in i (else in p): sets the
//   static constexpr bool kBUnitJ;  B(p, j) is unit-stride in j (else in p): load pattern
//   Acc a(i, p), Acc b(p, j);       operand reads, called only in bounds
//   void out(i, j, v, split);       epilogue for C[i, j] = v (partial when split over p)
//   void out_row_sum(i, v, split);  only called when row_sums
// On the WMMA path the operands are rounded to T in shared memory (act(h) and dh, kept in
// acc_t elsewhere, included), as an eager half-precision matmul would hold them.
template <class Cfg, class Prob>
__global__ void __launch_bounds__(256, 2) gemm_kernel(const Prob pr) {
  using A = typename Prob::Acc;
  using T = typename Prob::Elem;
  constexpr bool kWmma = UseWmma<T>::value;
  using S = typename std::conditional<kWmma, T, A>::type;  // shared-memory operand type
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, TM = Cfg::TM, TN = Cfg::TN;
  constexpr int TX = Cfg::TX, TY = Cfg::TY, NT = Cfg::kThreads;
  constexpr int A_PER = BM * BK / NT, B_PER = BN * BK / NT;
  static_assert(A_PER * NT == BM * BK && B_PER * NT == BN * BK, "tile sizes");
  // Row pitch of the tiles: +1 breaks the bank stride of the p-major fill on CUDA cores;
  // WMMA needs a pitch that is a multiple of 16 bytes and 32-byte aligned fragment starts.
  constexpr int LDA = kWmma ? BM + 8 : BM + 1, LDB = kWmma ? BN + 8 : BN + 1, LDC = BN + 4;

  // Transposed tiles ([p][i], [p][j]) so the inner loop reads rows. For WMMA, As is the
  // column-major A tile and Bs the row-major B tile.
  __shared__ __align__(32) S As[BK][LDA];
  __shared__ __align__(32) S Bs[BK][LDB];

  const int tid = threadIdx.x;
  const int tx = tid % TX, ty = tid / TX;
  const int64_t tiles_i = (pr.I + BM - 1) / BM, tiles_j = (pr.J + BN - 1) / BN;
  const int64_t it = pr.j_fastest ? blockIdx.x / tiles_j : blockIdx.x % tiles_i;
  const int64_t jt = pr.j_fastest ? blockIdx.x % tiles_j : blockIdx.x / tiles_i;
  const int64_t i0 = it * BM, j0 = jt * BN;
  const int64_t p_begin = static_cast<int64_t>(blockIdx.z) * pr.chunk;
  const int64_t p_end = p_begin + pr.chunk < pr.P ? p_begin + pr.chunk : pr.P;
  // Row sums need each thread to meet the same row of A at every step: true when A is
  // unit-stride in i and the block's thread count is a multiple of BM (row = tid % BM).
  constexpr bool kRowSums = Prob::kAUnitI && NT % BM == 0;
  const bool row_sums = kRowSums && pr.row_sums && jt == 0;  // uniform over the block

  // Tile element e of this thread's q-th load: consecutive threads take consecutive
  // addresses along the operand's unit-stride dimension (coalesced).
  auto a_coord = [](int e, int& ii, int& pp) {
    if (Prob::kAUnitI) ii = e % BM, pp = e / BM;
    else pp = e % BK, ii = e / BK;
  };
  auto b_coord = [](int e, int& pp, int& jj) {
    if (Prob::kBUnitJ) jj = e % BN, pp = e / BN;
    else pp = e % BK, jj = e / BK;
  };

  // The next tile is read into registers while the current one is multiplied.
  A ra[A_PER], rb[B_PER];
  auto fetch = [&](int64_t p0) {
#pragma unroll
    for (int q = 0; q < A_PER; ++q) {
      int ii, pp;
      a_coord(tid + q * NT, ii, pp);
      const int64_t i = i0 + ii, p = p0 + pp;
      ra[q] = (i < pr.I && p < p_end) ? pr.a(i, p) : A(0);
    }
#pragma unroll
    for (int q = 0; q < B_PER; ++q) {
      int pp, jj;
      b_coord(tid + q * NT, pp, jj);
      const int64_t p = p0 + pp, j = j0 + jj;
      rb[q] = (j < pr.J && p < p_end) ? pr.b(p, j) : A(0);
    }
  };

  // CUDA-core accumulators (unused, and optimised away, on the WMMA path).
  A acc[TM][TN];
#pragma unroll
  for (int r = 0; r < TM; ++r)
#pragma unroll
    for (int c = 0; c < TN; ++c) acc[r][c] = A(0);
  // WMMA accumulators: this warp's FM×FN fragments, at rows wr·FM·16, columns wc·FN·16.
  using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  FragC cf[kWmma ? Cfg::FM : 1][kWmma ? Cfg::FN : 1];
  const int warp = tid / 32;
  const int wr = warp / Cfg::WC, wc = warp % Cfg::WC;
  if constexpr (kWmma) {
#pragma unroll
    for (int fm = 0; fm < Cfg::FM; ++fm)
#pragma unroll
      for (int fn = 0; fn < Cfg::FN; ++fn) wmma::fill_fragment(cf[fm][fn], 0.0f);
  }
  // This thread's share of Σ_p A(i0 + tid % BM, p), summed in acc_t before any rounding to
  // T for the tensor cores (dh is acc_t).
  A rsum = A(0);

  if (p_begin < p_end) fetch(p_begin);
  for (int64_t p0 = p_begin; p0 < p_end; p0 += BK) {
#pragma unroll
    for (int q = 0; q < A_PER; ++q) {
      int ii, pp;
      a_coord(tid + q * NT, ii, pp);
      As[pp][ii] = from_acc<S>(ra[q]);
      if (row_sums) rsum += ra[q];
    }
#pragma unroll
    for (int q = 0; q < B_PER; ++q) {
      int pp, jj;
      b_coord(tid + q * NT, pp, jj);
      Bs[pp][jj] = from_acc<S>(rb[q]);
    }
    __syncthreads();
    if (p0 + BK < p_end) fetch(p0 + BK);

    if constexpr (kWmma) {
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> af[Cfg::FM];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bf[Cfg::FN];
#pragma unroll
        for (int fm = 0; fm < Cfg::FM; ++fm)
          wmma::load_matrix_sync(af[fm], &As[kk][(wr * Cfg::FM + fm) * 16], LDA);
#pragma unroll
        for (int fn = 0; fn < Cfg::FN; ++fn)
          wmma::load_matrix_sync(bf[fn], &Bs[kk][(wc * Cfg::FN + fn) * 16], LDB);
#pragma unroll
        for (int fm = 0; fm < Cfg::FM; ++fm)
#pragma unroll
          for (int fn = 0; fn < Cfg::FN; ++fn)
            wmma::mma_sync(cf[fm][fn], af[fm], bf[fn], cf[fm][fn]);
      }
    } else {
#pragma unroll
      for (int pp = 0; pp < BK; ++pp) {
        A av[TM], bv[TN];
#pragma unroll
        for (int r = 0; r < TM; ++r) av[r] = As[pp][ty + TY * r];
#pragma unroll
        for (int c = 0; c < TN; ++c) bv[c] = Bs[pp][tx + TX * c];
#pragma unroll
        for (int r = 0; r < TM; ++r)
#pragma unroll
          for (int c = 0; c < TN; ++c) acc[r][c] += av[r] * bv[c];
      }
    }
    __syncthreads();  // the tile is overwritten at the top of the next step
  }

  if constexpr (kWmma) {
    // The fragments' element ownership is opaque: go through shared memory to reach the
    // per-thread layout of the epilogue.
    __shared__ __align__(32) float Cs[BM][LDC];
#pragma unroll
    for (int fm = 0; fm < Cfg::FM; ++fm)
#pragma unroll
      for (int fn = 0; fn < Cfg::FN; ++fn)
        wmma::store_matrix_sync(&Cs[(wr * Cfg::FM + fm) * 16][(wc * Cfg::FN + fn) * 16],
                                cf[fm][fn], LDC, wmma::mem_row_major);
    __syncthreads();
#pragma unroll
    for (int r = 0; r < TM; ++r)
#pragma unroll
      for (int c = 0; c < TN; ++c) acc[r][c] = Cs[ty + TY * r][tx + TX * c];
  }

  const int split = blockIdx.z;
#pragma unroll
  for (int r = 0; r < TM; ++r) {
    const int64_t i = i0 + ty + TY * r;
    if (i >= pr.I) continue;
#pragma unroll
    for (int c = 0; c < TN; ++c) {
      const int64_t j = j0 + tx + TX * c;
      if (j < pr.J) pr.out(i, j, acc[r][c], split);
    }
  }
  if constexpr (kRowSums) {
    if (row_sums) {
      // The NT / BM threads that share a row add their shares in a fixed order.
      __shared__ A red[NT];
      red[tid] = rsum;
      __syncthreads();
      if (tid < BM && i0 + tid < pr.I) {
        A t = A(0);
        for (int k = tid; k < NT; k += BM) t += red[k];
        pr.out_row_sum(i0 + tid, t, split);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The problems

// h[m, r] = Σ_k x[m, k]·W_d[r, k] + b_d[r]. i = m, j = r, p = k.
template <typename T>
struct DownFwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = false, kBUnitJ = false;
  const T* x;     // [M, K], row stride ldx
  int64_t ldx;
  const T* wd;    // [R, K]
  const T* bd;    // [R] or nullptr
  Acc* h;         // [M, R]
  int64_t K, R;
  __device__ Acc a(int64_t m, int64_t k) const { return to_acc<Acc>(x[m * ldx + k]); }
  __device__ Acc b(int64_t k, int64_t r) const { return to_acc<Acc>(wd[r * K + k]); }
  __device__ void out(int64_t m, int64_t r, Acc v, int) const {
    if (bd != nullptr) v += to_acc<Acc>(bd[r]);
    h[m * R + r] = v;
  }
  __device__ void out_row_sum(int64_t, Acc, int) const {}
};

// y[m, k] = x[m, k] + s·(Σ_r act(h[m, r])·W_u[k, r] + b_u[k]). i = m, j = k, p = r.
template <typename T>
struct UpFwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = false, kBUnitJ = false;
  const Acc* h;   // [M, R]
  const T* wu;    // [K, R]
  const T* bu;    // [K] or nullptr
  const T* x;     // [M, K], row stride ldx
  int64_t ldx;
  T* y;           // [M, K]
  int64_t K, R;
  Acc scale;
  Activation act;
  __device__ Acc a(int64_t m, int64_t r) const { return act_fwd(h[m * R + r], act); }
  __device__ Acc b(int64_t r, int64_t k) const { return to_acc<Acc>(wu[k * R + r]); }
  __device__ void out(int64_t m, int64_t k, Acc v, int) const {
    if (bu != nullptr) v += to_acc<Acc>(bu[k]);
    y[m * K + k] = from_acc<T>(to_acc<Acc>(x[m * ldx + k]) + scale * v);
  }
  __device__ void out_row_sum(int64_t, Acc, int) const {}
};

// dh[m, r] = s·(Σ_k g[m, k]·W_u[k, r])·act'(h[m, r]). i = m, j = r, p = k.
template <typename T>
struct DhBwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = false, kBUnitJ = true;
  const T* g;     // [M, K]
  const T* wu;    // [K, R]
  const Acc* h;   // [M, R]
  Acc* dh;        // [M, R]
  int64_t K, R;
  Acc scale;
  Activation act;
  __device__ Acc a(int64_t m, int64_t k) const { return to_acc<Acc>(g[m * K + k]); }
  __device__ Acc b(int64_t k, int64_t r) const { return to_acc<Acc>(wu[k * R + r]); }
  __device__ void out(int64_t m, int64_t r, Acc v, int) const {
    dh[m * R + r] = scale * v * act_grad(h[m * R + r], act);
  }
  __device__ void out_row_sum(int64_t, Acc, int) const {}
};

// Where a weight-gradient GEMM split over M puts its results: straight into the T outputs
// (scaled) when there is one split, else into acc_t partials [S, rows, cols] / [S, rows]
// that sum_splits_kernel adds up.
template <typename T>
struct GradSink {
  using Acc = acc_t<T>;
  T* w;           // [rows, cols]
  T* b;           // [rows] or nullptr
  Acc* pw;        // [S, rows, cols]
  Acc* pb;        // [S, rows]
  int64_t rows, cols;
  bool direct;    // S == 1
  Acc scale;
  __device__ void put_w(int64_t i, int64_t j, Acc v, int split) const {
    if (direct) w[i * cols + j] = from_acc<T>(scale * v);
    else pw[(split * rows + i) * cols + j] = v;
  }
  __device__ void put_b(int64_t i, Acc v, int split) const {
    if (direct) b[i] = from_acc<T>(scale * v);
    else pb[split * rows + i] = v;
  }
};

// dW_u[k, r] = s·Σ_m g[m, k]·act(h[m, r]); row sums give db_u[k] = s·Σ_m g[m, k].
// i = k, j = r, p = m.
template <typename T>
struct WuBwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = true, kBUnitJ = true;
  const T* g;     // [M, K]
  const Acc* h;   // [M, R]
  int64_t K, R;
  Activation act;
  GradSink<T> sink;
  __device__ Acc a(int64_t k, int64_t m) const { return to_acc<Acc>(g[m * K + k]); }
  __device__ Acc b(int64_t m, int64_t r) const { return act_fwd(h[m * R + r], act); }
  __device__ void out(int64_t k, int64_t r, Acc v, int split) const { sink.put_w(k, r, v, split); }
  __device__ void out_row_sum(int64_t k, Acc v, int split) const { sink.put_b(k, v, split); }
};

// dW_d[r, k] = Σ_m dh[m, r]·x[m, k]; row sums give db_d[r] = Σ_m dh[m, r]. i = r, j = k,
// p = m.
template <typename T>
struct WdBwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = true, kBUnitJ = true;
  const Acc* dh;  // [M, R]
  const T* x;     // [M, K], row stride ldx
  int64_t ldx, R;
  GradSink<T> sink;
  __device__ Acc a(int64_t r, int64_t m) const { return dh[m * R + r]; }
  __device__ Acc b(int64_t m, int64_t k) const { return to_acc<Acc>(x[m * ldx + k]); }
  __device__ void out(int64_t r, int64_t k, Acc v, int split) const { sink.put_w(r, k, v, split); }
  __device__ void out_row_sum(int64_t r, Acc v, int split) const { sink.put_b(r, v, split); }
};

// dx[m, k] = g[m, k] + Σ_r dh[m, r]·W_d[r, k]. i = m, j = k, p = r.
template <typename T>
struct DxBwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = false, kBUnitJ = true;
  const Acc* dh;  // [M, R]
  const T* wd;    // [R, K]
  const T* g;     // [M, K]
  T* dx;          // [M, K]
  int64_t K, R;
  __device__ Acc a(int64_t m, int64_t r) const { return dh[m * R + r]; }
  __device__ Acc b(int64_t r, int64_t k) const { return to_acc<Acc>(wd[r * K + k]); }
  __device__ void out(int64_t m, int64_t k, Acc v, int) const {
    dx[m * K + k] = from_acc<T>(to_acc<Acc>(g[m * K + k]) + v);
  }
  __device__ void out_row_sum(int64_t, Acc, int) const {}
};

// out[e] = scale·Σ_{z<S} part[z, e], z in increasing order.
template <typename T>
__global__ void __launch_bounds__(256)
sum_splits_kernel(const acc_t<T>* __restrict__ part, int S, int64_t n, acc_t<T> scale,
                  T* __restrict__ out) {
  using A = acc_t<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = A(0);
    for (int z = 0; z < S; ++z) s += part[z * n + e];
    out[e] = from_acc<T>(scale * s);
  }
}

// ---------------------------------------------------------------------------------------
// Launch helpers

template <class Cfg, class Prob>
cudaError_t launch_gemm(Prob pr, int64_t splits, cudaStream_t stream) {
  const int64_t tiles = ceil_div(pr.I, Cfg::BM) * ceil_div(pr.J, Cfg::BN);
  if (tiles > 0x7fffffff || splits > 65535) return cudaErrorInvalidValue;
  gemm_kernel<Cfg, Prob><<<dim3(static_cast<unsigned>(tiles), 1,
                                static_cast<unsigned>(splits)),
                           Cfg::kThreads, 0, stream>>>(pr);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_sum_splits(const acc_t<T>* part, int64_t S, int64_t n, double scale, T* out,
                              cudaStream_t stream) {
  const int64_t blocks = ceil_div(n, 256);
  const int64_t grid = blocks < 65536 ? blocks : 65536;
  sum_splits_kernel<T><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
      part, static_cast<int>(S), n, static_cast<acc_t<T>>(scale), out);
  return cudaGetLastError();
}

constexpr int kBK = TileSquare::BK;

// The weight-gradient GEMMs are split over M into S row ranges of `chunk` rows, enough to
// give ~512 blocks with at least 256 rows per range, at most 64 ranges. The same tile count
// holds for dW_u ([K, R]) and dW_d ([R, K]): TileTall and TileWide are transposes.
// Workspace (each piece 256-byte aligned): dh [M, R], then, when S > 1, the partials of
// dW_u [S, K, R], db_u [S, K], dW_d [S, R, K], db_d [S, R]; all acc_t.
struct BwdLayout {
  int64_t S, chunk;
  size_t dh, pwu, pbu, pwd, pbd, total;  // byte offsets, total size
};

template <typename T>
BwdLayout bwd_layout(int64_t M, int64_t K, int64_t R) {
  BwdLayout l{};
  const int64_t tiles = R <= 16 ? ceil_div(K, TileTall::BM)
                                : ceil_div(K, TileSquare::BM) * ceil_div(R, TileSquare::BN);
  int64_t S = ceil_div(512, tiles);
  const int64_t by_rows = ceil_div(M, 256);
  if (S > by_rows) S = by_rows;
  if (S > 64) S = 64;
  if (S < 1) S = 1;
  l.chunk = ceil_div(ceil_div(M, S), kBK) * kBK;
  l.S = ceil_div(M, l.chunk);
  const size_t a = sizeof(acc_t<T>);
  auto round = [](size_t b) { return (b + 255) / 256 * 256; };
  const size_t nS = l.S > 1 ? static_cast<size_t>(l.S) : 0;
  size_t off = 0;
  l.dh = off;  off += round(static_cast<size_t>(M) * R * a);
  l.pwu = off; off += round(nS * K * R * a);
  l.pbu = off; off += round(nS * K * a);
  l.pwd = off; off += round(nS * R * K * a);
  l.pbd = off; off += round(nS * R * a);
  l.total = off;
  return l;
}

bool valid_act(Activation act) {
  const int a = static_cast<int>(act);
  return a >= 0 && a <= 3;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Launchers

template <typename T>
cudaError_t adapter_fwd(const T* x, int64_t ldx, const T* w_down, const T* b_down, const T* w_up,
                        const T* b_up, T* y, acc_t<T>* h, int64_t M, int64_t K, int64_t R,
                        Activation act, double scale, cudaStream_t stream) {
  using A = acc_t<T>;
  if (M < 0 || K < 1 || R < 1 || ldx < 0 || !valid_act(act))
    return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  if (x == nullptr || w_down == nullptr || w_up == nullptr || y == nullptr || h == nullptr)
    return cudaErrorInvalidValue;

  // One pass (adapter_fused.cu) for R <= 64 where the x tile fits in shared memory; else the
  // two GEMMs below, which read x twice and pass h through memory.
  const cudaError_t fused = adapter_detail::adapter_fwd_fused<T>(x, ldx, w_down, b_down, w_up, b_up, y, h,
                                                                 M, K, R, act, scale, stream);
  if (fused != cudaErrorNotSupported) return fused;

  DownFwd<T> down{};
  //                           I  J  P  chunk row_sums j_fastest
  static_cast<Shape&>(down) = {M, R, K, K, false, true};
  down.x = x, down.ldx = ldx, down.wd = w_down, down.bd = b_down, down.h = h;
  down.K = K, down.R = R;
  const cudaError_t e = R <= 16 ? launch_gemm<TileTall>(down, 1, stream)
                                : launch_gemm<TileSquare>(down, 1, stream);
  if (e != cudaSuccess) return e;

  UpFwd<T> up{};
  static_cast<Shape&>(up) = {M, K, R, R, false, true};
  up.h = h, up.wu = w_up, up.bu = b_up, up.x = x, up.ldx = ldx, up.y = y;
  up.K = K, up.R = R, up.scale = static_cast<A>(scale), up.act = act;
  return launch_gemm<TileSquare>(up, 1, stream);
}

template <typename T>
size_t adapter_bwd_workspace(int64_t M, int64_t K, int64_t R) {
  if (M <= 0 || K <= 0 || R <= 0) return 0;
  return bwd_layout<T>(M, K, R).total;
}

template <typename T>
cudaError_t adapter_bwd(const T* g, const T* x, int64_t ldx, const T* w_down, const T* w_up,
                        const acc_t<T>* h, T* dx, T* dw_down, T* db_down, T* dw_up, T* db_up,
                        void* workspace, int64_t M, int64_t K, int64_t R, Activation act,
                        double scale, cudaStream_t stream) {
  using A = acc_t<T>;
  if (M < 0 || K < 1 || R < 1 || ldx < 0 || !valid_act(act))
    return cudaErrorInvalidValue;
  if (dw_down == nullptr || dw_up == nullptr) return cudaErrorInvalidValue;
  if (M == 0) {
    // The gradient over an empty batch is zero; all-zero bytes are +0 in every element type.
    const size_t rk = static_cast<size_t>(R) * K * sizeof(T);
    cudaError_t e = cudaMemsetAsync(dw_down, 0, rk, stream);
    if (e == cudaSuccess) e = cudaMemsetAsync(dw_up, 0, rk, stream);
    if (e == cudaSuccess && db_down != nullptr)
      e = cudaMemsetAsync(db_down, 0, static_cast<size_t>(R) * sizeof(T), stream);
    if (e == cudaSuccess && db_up != nullptr)
      e = cudaMemsetAsync(db_up, 0, static_cast<size_t>(K) * sizeof(T), stream);
    return e;
  }
  if (g == nullptr || x == nullptr || w_down == nullptr || w_up == nullptr || h == nullptr ||
      workspace == nullptr)
    return cudaErrorInvalidValue;

  const BwdLayout l = bwd_layout<T>(M, K, R);
  char* ws = static_cast<char*>(workspace);
  A* dh = reinterpret_cast<A*>(ws + l.dh);
  const bool direct = l.S == 1;
  cudaError_t e;

  // dh first: dW_d, db_d and dx read it.
  DhBwd<T> pdh{};
  //                          I  J  P  chunk row_sums j_fastest
  static_cast<Shape&>(pdh) = {M, R, K, K, false, true};
  pdh.g = g, pdh.wu = w_up, pdh.h = h, pdh.dh = dh, pdh.K = K, pdh.R = R;
  pdh.scale = static_cast<A>(scale), pdh.act = act;
  e = R <= 16 ? launch_gemm<TileTall>(pdh, 1, stream) : launch_gemm<TileSquare>(pdh, 1, stream);
  if (e != cudaSuccess) return e;

  WuBwd<T> pwu{};
  static_cast<Shape&>(pwu) = {K, R, M, l.chunk, db_up != nullptr, true};
  pwu.g = g, pwu.h = h, pwu.K = K, pwu.R = R, pwu.act = act;
  pwu.sink = GradSink<T>{dw_up, db_up, reinterpret_cast<A*>(ws + l.pwu),
                         reinterpret_cast<A*>(ws + l.pbu), K, R, direct, static_cast<A>(scale)};
  e = R <= 16 ? launch_gemm<TileTall>(pwu, l.S, stream)
              : launch_gemm<TileSquare>(pwu, l.S, stream);
  if (e != cudaSuccess) return e;

  WdBwd<T> pwd{};
  // Column-tile order: x, the large operand, is B here.
  static_cast<Shape&>(pwd) = {R, K, M, l.chunk, db_down != nullptr, false};
  pwd.dh = dh, pwd.x = x, pwd.ldx = ldx, pwd.R = R;
  pwd.sink = GradSink<T>{dw_down, db_down, reinterpret_cast<A*>(ws + l.pwd),
                         reinterpret_cast<A*>(ws + l.pbd), R, K, direct, A(1)};
  e = R <= 16 ? launch_gemm<TileWide>(pwd, l.S, stream)
              : launch_gemm<TileSquare>(pwd, l.S, stream);
  if (e != cudaSuccess) return e;

  if (!direct) {
    e = launch_sum_splits<T>(pwu.sink.pw, l.S, K * R, scale, dw_up, stream);
    if (e == cudaSuccess && db_up != nullptr)
      e = launch_sum_splits<T>(pwu.sink.pb, l.S, K, scale, db_up, stream);
    if (e == cudaSuccess) e = launch_sum_splits<T>(pwd.sink.pw, l.S, R * K, 1.0, dw_down, stream);
    if (e == cudaSuccess && db_down != nullptr)
      e = launch_sum_splits<T>(pwd.sink.pb, l.S, R, 1.0, db_down, stream);
    if (e != cudaSuccess) return e;
  }

  if (dx != nullptr) {
    DxBwd<T> pdx{};
    static_cast<Shape&>(pdx) = {M, K, R, R, false, true};
    pdx.dh = dh, pdx.wd = w_down, pdx.g = g, pdx.dx = dx, pdx.K = K, pdx.R = R;
    e = launch_gemm<TileSquare>(pdx, 1, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

#define LK_INSTANTIATE_ADAPTER(T)                                                               \
  template cudaError_t adapter_fwd<T>(const T*, int64_t, const T*, const T*, const T*,          \
                                      const T*, T*, acc_t<T>*, int64_t, int64_t, int64_t,       \
                                      Activation, double, cudaStream_t);                        \
  template size_t adapter_bwd_workspace<T>(int64_t, int64_t, int64_t);                          \
  template cudaError_t adapter_bwd<T>(const T*, const T*, int64_t, const T*, const T*,          \
                                      const acc_t<T>*, T*, T*, T*, T*, T*, void*, int64_t,      \
                                      int64_t, int64_t, Activation, double, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_ADAPTER)
#undef LK_INSTANTIATE_ADAPTER

}  // namespace lk
