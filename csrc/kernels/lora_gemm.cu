// The tiled GEMM of the two-launch LoRA path (plan in lora.cu): y = x Wᵀ + s·u Bᵀ + b,
// dx = g W + drop'(v A), dW = gᵀ x, with the low-rank term, mask and bias in the epilogue.
#include "lora_common.cuh"

#include <mma.h>

#include <climits>
#include <type_traits>

namespace lk {
namespace lora_detail {

// ------------------------------------------------------------------------------ tile loads

// Copies the D0×D1 tile at (o0, o1) of a strided matrix (element (a, b) at g[a·g0 + b·g1],
// valid for a < n0, b < n1) to shared memory at s[a·s0 + b·s1], zeros outside the matrix.
// Consecutive threads walk the dimension with unit global stride, so loads coalesce.
template <int D0, int D1, int NTH, typename TS, typename TG>
__device__ __forceinline__ void load_tile(TS* s, int s0, int s1, const TG* g, int64_t g0, int64_t g1,
                                          int64_t o0, int64_t o1, int64_t n0, int64_t n1, int tid) {
  const bool d1_fast = g1 == 1 || g0 != 1;
  for (int e = tid; e < D0 * D1; e += NTH) {
    const int a = d1_fast ? e / D1 : e % D0;
    const int b = d1_fast ? e % D1 : e / D0;
    const int64_t r = o0 + a, c = o1 + b;
    TS v = zero<TS>();
    if (r < n0 && c < n1) v = convert<TS>(g[r * g0 + c * g1]);
    s[a * s0 + b * s1] = v;
  }
}

// BM×BN output tile, BK reduction step. KS groups of threads each reduce every KS-th step of
// BK (a split of the reduction inside the block, for tiles too few to fill the GPU); their
// results are summed in group order. A group is GM×GN warps (tensor cores) or GM×GN threads
// (CUDA cores, each owning a (BM/GM)×(BN/GN) strided sub-tile). MB: blocks per SM the
// register budget must allow (__launch_bounds__), i.e. at most 65536 / (MB·threads) registers.
// Left to itself ptxas gave the fp32 wide tile 64 registers on sm_90 and spilled (ptxas -v,
// benchmarks/cuda_ptx_check.py); the other budgets are the counts it chose without spilling.
template <int BM_, int BN_, int BK_, int KS_, int GM_, int GN_, int MB_>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, KS = KS_, GM = GM_, GN = GN_, MB = MB_;
};

// kAT: A's tile is stored k-major in shared memory (A contiguous along i); kBT: B's tile is
// stored j-major (B contiguous along k). Either way the global loads and the shared stores
// both run along the contiguous direction.
template <typename T, typename Cfg, bool kAT, bool kBT>
struct GemmShape {
  using Acc = acc_t<T>;
  static constexpr bool kWmma = kLowPrecision<T>;
  static constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, KS = Cfg::KS, GM = Cfg::GM, GN = Cfg::GN;
  static constexpr int kGroupThreads = kWmma ? 32 * GM * GN : GM * GN;
  static constexpr int kThreads = kGroupThreads * KS;
  // WMMA needs leading dimensions that are multiples of 8 elements (16 bytes); the CUDA-core
  // loop wants odd ones to spread strided reads across banks.
  static constexpr int kPad = kWmma ? 8 : 1;
  static constexpr int LDA = (kAT ? BM : BK) + kPad;
  static constexpr int LDB = (kBT ? BK : BN) + kPad;
  static constexpr int LDC = BN + (kWmma ? 4 : 1);
  static constexpr int RC = sizeof(Acc) == 8 ? 8 : 16;  // low-rank chunk staged per pass
  static constexpr size_t kABytes = round128(sizeof(T) * (kAT ? BK : BM) * LDA);
  static constexpr size_t kBBytes = round128(sizeof(T) * (kBT ? BN : BK) * LDB);
  static constexpr size_t kMainBytes = KS * (kABytes + kBBytes);
  static constexpr size_t kCBytes = round128(sizeof(Acc) * KS * BM * LDC);
  static constexpr size_t kLBytes = round128(sizeof(Acc) * BM * RC);
  static constexpr size_t kRBytes = round128(sizeof(Acc) * RC * BN);
  static constexpr size_t kEpiBytes = kCBytes + kLBytes + kRBytes;
  static constexpr size_t kSmem = kMainBytes > kEpiBytes ? kMainBytes : kEpiBytes;
  static_assert(kSmem <= 48 * 1024, "static shared memory limit");
  static_assert(BM % 16 == 0 && BN % 16 == 0 && BK % 16 == 0, "tiles are multiples of 16");
  static_assert(!kWmma || (BM % (16 * GM) == 0 && BN % (16 * GN) == 0), "warp tiles");
  static_assert(kWmma || (BM % GM == 0 && BN % GN == 0), "thread tiles");
};

// Tensor-core main loop of one group; leaves the group's BM×BN sums in Cs (fp32).
template <typename T, typename S, bool kAT, bool kBT>
__device__ __forceinline__ void mainloop_wmma(const GemmParams<T>& p, T* As, T* Bs, float* Cs, int64_t i0,
                                              int64_t j0, int grp, int gt) {
  namespace wmma = nvcuda::wmma;
  using LayoutA = std::conditional_t<kAT, wmma::col_major, wmma::row_major>;
  using LayoutB = std::conditional_t<kBT, wmma::col_major, wmma::row_major>;
  constexpr int BM = S::BM, BN = S::BN, BK = S::BK, KS = S::KS, GN = S::GN;
  constexpr int LDA = S::LDA, LDB = S::LDB, LDC = S::LDC;
  constexpr int FM = BM / (16 * S::GM), FN = BN / (16 * GN);
  const int warp = gt / 32, wm = warp / GN, wn = warp % GN;

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int fi = 0; fi < FM; ++fi)
#pragma unroll
    for (int fj = 0; fj < FN; ++fj) wmma::fill_fragment(acc[fi][fj], 0.0f);

  const int64_t steps = dceil(dceil(p.K, BK), KS);
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t k0 = (step * KS + grp) * BK;  // past K: the tiles load as zeros
    load_tile<BM, BK, S::kGroupThreads>(As, kAT ? 1 : LDA, kAT ? LDA : 1, p.a, p.a_si, p.a_sk, i0, k0, p.M, p.K, gt);
    load_tile<BK, BN, S::kGroupThreads>(Bs, kBT ? 1 : LDB, kBT ? LDB : 1, p.b, p.b_sk, p.b_sj, k0, j0, p.K, p.N, gt);
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb[FN];
#pragma unroll
      for (int fi = 0; fi < FM; ++fi) {
        const int i = (wm * FM + fi) * 16;
        wmma::load_matrix_sync(fa[fi], kAT ? As + kk * LDA + i : As + i * LDA + kk, LDA);
      }
#pragma unroll
      for (int fj = 0; fj < FN; ++fj) {
        const int j = (wn * FN + fj) * 16;
        wmma::load_matrix_sync(fb[fj], kBT ? Bs + j * LDB + kk : Bs + kk * LDB + j, LDB);
      }
#pragma unroll
      for (int fi = 0; fi < FM; ++fi)
#pragma unroll
        for (int fj = 0; fj < FN; ++fj) wmma::mma_sync(acc[fi][fj], fa[fi], fb[fj], acc[fi][fj]);
    }
    __syncthreads();
  }
  // Cs may overlap the operand tiles: safe, the loop ends on a barrier after the last read.
  float* Cg = Cs + grp * BM * LDC;
#pragma unroll
  for (int fi = 0; fi < FM; ++fi)
#pragma unroll
    for (int fj = 0; fj < FN; ++fj)
      wmma::store_matrix_sync(Cg + (wm * FM + fi) * 16 * LDC + (wn * FN + fj) * 16, acc[fi][fj], LDC,
                              wmma::mem_row_major);
}

// CUDA-core main loop of one group (T is float or double, its own accumulator type).
template <typename T, typename S, bool kAT, bool kBT>
__device__ __forceinline__ void mainloop_simt(const GemmParams<T>& p, T* As, T* Bs, T* Cs, int64_t i0, int64_t j0,
                                              int grp, int gt) {
  constexpr int BM = S::BM, BN = S::BN, BK = S::BK, KS = S::KS, GM = S::GM, GN = S::GN;
  constexpr int LDA = S::LDA, LDB = S::LDB, LDC = S::LDC;
  constexpr int TM = BM / GM, TN = BN / GN;
  const int ty = gt / GN, tx = gt % GN;

  T acc[TM][TN];
#pragma unroll
  for (int a = 0; a < TM; ++a)
#pragma unroll
    for (int b = 0; b < TN; ++b) acc[a][b] = T(0);

  const int64_t steps = dceil(dceil(p.K, BK), KS);
  for (int64_t step = 0; step < steps; ++step) {
    const int64_t k0 = (step * KS + grp) * BK;
    load_tile<BM, BK, S::kGroupThreads>(As, kAT ? 1 : LDA, kAT ? LDA : 1, p.a, p.a_si, p.a_sk, i0, k0, p.M, p.K, gt);
    load_tile<BK, BN, S::kGroupThreads>(Bs, kBT ? 1 : LDB, kBT ? LDB : 1, p.b, p.b_sk, p.b_sj, k0, j0, p.K, p.N, gt);
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < BK; ++kk) {
      T av[TM], bv[TN];
#pragma unroll
      for (int a = 0; a < TM; ++a) {
        const int i = ty + GM * a;
        av[a] = kAT ? As[kk * LDA + i] : As[i * LDA + kk];
      }
#pragma unroll
      for (int b = 0; b < TN; ++b) {
        const int j = tx + GN * b;
        bv[b] = kBT ? Bs[j * LDB + kk] : Bs[kk * LDB + j];
      }
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int b = 0; b < TN; ++b) acc[a][b] += av[a] * bv[b];
    }
    __syncthreads();
  }
  T* Cg = Cs + grp * BM * LDC;
#pragma unroll
  for (int a = 0; a < TM; ++a)
#pragma unroll
    for (int b = 0; b < TN; ++b) Cg[(ty + GM * a) * LDC + tx + GN * b] = acc[a][b];
}

template <typename T, typename Cfg, bool kAT, bool kBT>
__global__ void __launch_bounds__(GemmShape<T, Cfg, kAT, kBT>::kThreads, Cfg::MB)
    gemm_kernel(const GemmParams<T> p) {
  using S = GemmShape<T, Cfg, kAT, kBT>;
  using Acc = acc_t<T>;
  constexpr int BM = S::BM, BN = S::BN, NT = S::kThreads, LDC = S::LDC, RC = S::RC;
  __shared__ __align__(128) unsigned char smem[S::kSmem];

  const int tid = threadIdx.x, grp = tid / S::kGroupThreads, gt = tid % S::kGroupThreads;
  // Consecutive blocks walk down one column tile: they share its tile of B in L2.
  const int64_t i0 = (static_cast<int64_t>(blockIdx.x) % p.tiles_m) * BM;
  const int64_t j0 = (static_cast<int64_t>(blockIdx.x) / p.tiles_m) * BN;
  T* As = reinterpret_cast<T*>(smem + grp * (S::kABytes + S::kBBytes));
  T* Bs = reinterpret_cast<T*>(smem + grp * (S::kABytes + S::kBBytes) + S::kABytes);
  Acc* Cs = reinterpret_cast<Acc*>(smem);
  if constexpr (S::kWmma) {
    mainloop_wmma<T, S, kAT, kBT>(p, As, Bs, Cs, i0, j0, grp, gt);
  } else {
    mainloop_simt<T, S, kAT, kBT>(p, As, Bs, Cs, i0, j0, grp, gt);
  }
  __syncthreads();

  // Epilogue: each thread owns groups of four consecutive columns (one dropout draw each),
  // consecutive threads consecutive groups, so the stores coalesce.
  constexpr int NQ = BM * BN / 4, EQ = (NQ + NT - 1) / NT;
  // Tile row and first column of this thread's q-th group (group 0 for the idle tail).
  auto row_of = [&](int q) { const int qi = tid + q * NT; return qi < NQ ? qi / (BN / 4) : 0; };
  auto col_of = [&](int q) { const int qi = tid + q * NT; return qi < NQ ? (qi % (BN / 4)) * 4 : 0; };
  Acc val[EQ][4];
#pragma unroll
  for (int q = 0; q < EQ; ++q) {
    const int i = row_of(q), j = col_of(q);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      Acc v = Acc(0);
#pragma unroll
      for (int g = 0; g < S::KS; ++g) v += Cs[(g * BM + i) * LDC + j + c];
      val[q][c] = v;
    }
  }

  if (p.R > 0) {
    Acc* Ls = reinterpret_cast<Acc*>(smem + S::kCBytes);
    Acc* Rs = reinterpret_cast<Acc*>(smem + S::kCBytes + S::kLBytes);
    Acc lr[EQ][4];
#pragma unroll
    for (int q = 0; q < EQ; ++q)
#pragma unroll
      for (int c = 0; c < 4; ++c) lr[q][c] = Acc(0);
    for (int64_t r0 = 0; r0 < p.R; r0 += RC) {
      load_tile<BM, RC, NT>(Ls, RC, 1, p.l, p.l_si, int64_t{1}, i0, r0, p.M, p.R, tid);
      load_tile<RC, BN, NT>(Rs, BN, 1, p.rt, p.rt_sr, p.rt_sj, r0, j0, p.R, p.N, tid);
      __syncthreads();
#pragma unroll
      for (int q = 0; q < EQ; ++q)
#pragma unroll
        for (int r = 0; r < RC; ++r) {
          const Acc lv = Ls[row_of(q) * RC + r];
          const Acc* rs = Rs + r * BN + col_of(q);
#pragma unroll
          for (int c = 0; c < 4; ++c) lr[q][c] += lv * rs[c];
        }
      __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < EQ; ++q) {
      const unsigned keep = p.drop.on ? keep_quad(p.drop, i0 + row_of(q), (j0 + col_of(q)) / 4) : 0xFu;
#pragma unroll
      for (int c = 0; c < 4; ++c)
        if ((keep >> c) & 1u) val[q][c] += p.lr_scale * lr[q][c];
    }
  }

#pragma unroll
  for (int q = 0; q < EQ; ++q) {
    const int64_t i = i0 + row_of(q);
    if (tid + q * NT >= NQ || i >= p.M) continue;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + col_of(q) + c;
      if (j >= p.N) continue;
      Acc v = val[q][c];
      if (p.bias != nullptr) v += convert<Acc>(p.bias[j]);
      p.out[i * p.ldo + j] = convert<T>(v);
    }
  }
}

// Wide tiles for many rows; narrow tiles with a split reduction when the wide ones are too
// few to occupy the GPU (decode-sized M).
template <typename T> struct GemmTiles;
template <> struct GemmTiles<__half> {
  using Wide = TileCfg<64, 64, 32, 1, 2, 2, 4>;    // 4 warps, 32×32 each; 128 registers
  using Narrow = TileCfg<16, 32, 32, 8, 1, 1, 4>;  // 8 groups of 1 warp; 64 registers
};
template <> struct GemmTiles<__nv_bfloat16> : GemmTiles<__half> {};
template <> struct GemmTiles<float> {
  using Wide = TileCfg<64, 64, 16, 1, 16, 16, 3>;  // 256 threads, 4×4 each; 85 registers
  using Narrow = TileCfg<16, 32, 16, 2, 8, 16, 5>; // 2 groups of 128 threads, 2×2 each; 51
};
template <> struct GemmTiles<double> {
  using Wide = TileCfg<64, 64, 16, 1, 16, 16, 2>;  // 128 registers
  using Narrow = TileCfg<16, 32, 16, 2, 8, 16, 4>; // 64 registers
};

constexpr int64_t kWideTilesWanted = 264;  // about two waves of a 132-SM H100

template <typename T, typename Cfg, bool kAT, bool kBT>
cudaError_t launch_gemm_cfg(GemmParams<T> p, cudaStream_t stream) {
  using S = GemmShape<T, Cfg, kAT, kBT>;
  p.tiles_m = ceil_div(p.M, S::BM);
  const int64_t blocks = p.tiles_m * ceil_div(p.N, S::BN);
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  gemm_kernel<T, Cfg, kAT, kBT><<<static_cast<unsigned>(blocks), S::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, bool kAT, bool kBT>
cudaError_t launch_gemm(const GemmParams<T>& p, cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return cudaSuccess;
  using W = typename GemmTiles<T>::Wide;
  if (ceil_div(p.M, W::BM) * ceil_div(p.N, W::BN) >= kWideTilesWanted)
    return launch_gemm_cfg<T, W, kAT, kBT>(p, stream);
  return launch_gemm_cfg<T, typename GemmTiles<T>::Narrow, kAT, kBT>(p, stream);
}

// The three operand layouts lora.cu asks for: y (x, Wᵀ), dx (g, W) and dW (gᵀ, x).
#define LK_LORA_INSTANTIATE(T)                                                         \
  template cudaError_t launch_gemm<T, false, true>(const GemmParams<T>&, cudaStream_t);  \
  template cudaError_t launch_gemm<T, false, false>(const GemmParams<T>&, cudaStream_t); \
  template cudaError_t launch_gemm<T, true, false>(const GemmParams<T>&, cudaStream_t);
LK_FOR_EACH_TYPE(LK_LORA_INSTANTIATE)
#undef LK_LORA_INSTANTIATE

}  // namespace lora_detail
}  // namespace lk
