// Adapter bottleneck: h = x W_dᵀ + b_d, y = x + s·(act(h) W_uᵀ + b_u), and its backward.
// This header holds the tiled GEMM that every product below runs on; adapter.cu launches the
// forward's problems, adapter_bwd.cu the backward's.
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
#pragma once
#include "adapter_detail.cuh"

#include <mma.h>

#include <type_traits>

namespace lk {
namespace adapter_detail {

namespace wmma = nvcuda::wmma;

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

template <class Cfg, class Prob>
cudaError_t launch_gemm(Prob pr, int64_t splits, cudaStream_t stream) {
  const int64_t tiles = ceil_div(pr.I, Cfg::BM) * ceil_div(pr.J, Cfg::BN);
  if (tiles > 0x7fffffff || splits > 65535) return cudaErrorInvalidValue;
  gemm_kernel<Cfg, Prob><<<dim3(static_cast<unsigned>(tiles), 1,
                                static_cast<unsigned>(splits)),
                           Cfg::kThreads, 0, stream>>>(pr);
  return cudaGetLastError();
}

inline bool valid_act(Activation act) {
  const int a = static_cast<int>(act);
  return a >= 0 && a <= 3;
}

}  // namespace adapter_detail
}  // namespace lk
