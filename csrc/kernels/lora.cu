// LoRA linear in plain CUDA: y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, and its backward.
//
// Structure (the "split" form of the forward: it never recomputes u once per column tile;
// lora_fused.cu's single launch, which does, replaces it where that is cheap: 16-bit, no dropout,
// R <= 16 or one column tile, enough tiles):
//   forward   1. rowdot:  u = drop(x) Aᵀ                      [M, R] acc_t, saved
//             2. gemm:    y = x Wᵀ  + epilogue (s·u Bᵀ + b)   [M, N]
//   backward  1. rowdot:  v = s·g B                           [M, R] acc_t, workspace
//             2. colsum:  dB = s·gᵀu                          [N, R]
//             3. colsum:  dA = vᵀ drop(x)                     [R, K]
//             4. gemm:    dx = g W  + epilogue drop'(v A)     [M, K]  (if requested)
//             5. gemm:    dW = gᵀ x                           [N, K]  (if requested)
//             6. colsum:  db = Σ_rows g                       [N]     (if requested)
// One tiled GEMM template serves every large product: tensor cores (WMMA 16×16×16, fp32
// accumulators) for half/bf16, a register-tiled CUDA-core loop for float/double (fp32 stays
// fp32: no TF32). Its epilogue adds an optional low-rank term L·Rt (R in chunks, acc_t
// arithmetic) with an optional dropout mask and scale, and an optional bias.
// Determinism: no atomics anywhere. Each output element of a GEMM or rowdot is owned by one
// block that reduces in a fixed order; colsum reductions over rows are split into a number
// of row chunks that depends on the shapes only, whose partials are summed in chunk order.
//
// Dropout: keep(m, k) comes from Philox4x32-10 keyed on the seed, counter = m·⌈K/4⌉ + k/4;
// one call yields the four words of a group of four columns. The same function is evaluated
// by every kernel that touches drop(x) (rowdot for u, colsum for dA, the dx epilogue), so the
// backward sees exactly the forward's mask without storing it. The key, word order and
// threshold mirror the Triton kernels (lora_kernels/triton/lora.py), so both backends draw
// the same mask for the same seed.
#include "lora.cuh"
#include "lora_cutlass.cuh"
#include "lora_detail.cuh"

#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

namespace lk {
namespace {

// ------------------------------------------------------------------------------ numbers

template <typename T>
constexpr bool kLowPrecision = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename D, typename S>
__device__ __forceinline__ D convert(S v) {
  if constexpr (std::is_same_v<D, S>) {
    return v;
  } else if constexpr (kLowPrecision<S>) {
    return static_cast<D>(to_acc<float>(v));
  } else if constexpr (kLowPrecision<D>) {
    return from_acc<D>(static_cast<float>(v));
  } else {
    return static_cast<D>(v);
  }
}

template <typename T>
__device__ __forceinline__ T zero() {
  return convert<T>(0.0f);
}

__device__ __forceinline__ int64_t dmin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t dceil(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr size_t round128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// ------------------------------------------------------------------------------ dropout

struct Dropout {
  bool on;
  uint32_t k0, k1;     // Philox key
  uint32_t threshold;  // keep when (word >> 1) >= threshold: probability 1 − threshold/2³¹
  int64_t quads;       // ⌈K/4⌉ counters per row of x
};

Dropout make_dropout(double p, uint64_t seed, int64_t K) {
  Dropout d{};
  d.on = p > 0.0;
  if (!d.on) return d;
  // Same key as the Triton backend: bit 62 set on a 62-bit seed (idempotent, so a caller
  // that already applied it gets the same key).
  const uint64_t key = (seed & ((uint64_t{1} << 62) - 1)) | (uint64_t{1} << 62);
  d.k0 = static_cast<uint32_t>(key);
  d.k1 = static_cast<uint32_t>(key >> 32);
  // nearbyint rounds half to even, as Python's round() in the Triton launcher.
  const double t = std::nearbyint(p * 2147483648.0);
  d.threshold = static_cast<uint32_t>(std::min(t, 2147483647.0));
  d.quads = (K + 3) / 4;
  return d;
}

__device__ __forceinline__ uint4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// Keep bits of x[row, 4·quad + c] for c = 0..3 (bit c). Column c takes word (0, 2, 1, 3)[c]:
// the order in which the Triton kernels interleave randint4x's four outputs.
__device__ __forceinline__ unsigned keep_quad(const Dropout& d, int64_t row, int64_t quad) {
  const uint64_t ctr = static_cast<uint64_t>(row) * static_cast<uint64_t>(d.quads) + static_cast<uint64_t>(quad);
  const uint4 w = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), d.k0, d.k1);
  const uint32_t t = d.threshold;
  return static_cast<unsigned>((w.x >> 1) >= t) | (static_cast<unsigned>((w.z >> 1) >= t) << 1) |
         (static_cast<unsigned>((w.y >> 1) >= t) << 2) | (static_cast<unsigned>((w.w >> 1) >= t) << 3);
}

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

// ------------------------------------------------------------------------------ tiled GEMM

// out[i, j] = Σ_k A(i, k)·B(k, j)  +  lr_scale·keep(i, j)·Σ_r L[i, r]·Rt(r, j)  +  bias[j]
// A(i, k) = a[i·a_si + k·a_sk], B(k, j) = b[k·b_sk + j·b_sj]; C is M×N, the reduction has
// length K. L: [M, R] acc_t with row stride l_si; Rt(r, j) = rt[r·rt_sr + j·rt_sj].
template <typename T>
struct GemmParams {
  const T* a;
  int64_t a_si, a_sk;
  const T* b;
  int64_t b_sk, b_sj;
  int64_t M, N, K;
  const acc_t<T>* l;  // nullptr (with R = 0): no low-rank term
  int64_t l_si;
  const T* rt;
  int64_t rt_sr, rt_sj;
  int64_t R;
  acc_t<T> lr_scale;
  Dropout drop;  // mask of the low-rank term at (i, j) = (row of x, column of x)
  const T* bias;  // nullptr: none
  T* out;
  int64_t ldo;
  int64_t tiles_m;
};

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

// ------------------------------------------------------------------------------ rowdot

// out[m, r] = alpha·Σ_k drop(X[m, k])·Y(r, k), Y(r, k) = y[r·y_sr + k·y_sk]; out [M, R] acc_t.
// One block owns RM rows × RC ranks; its threads stride over groups of four k (one dropout
// draw each), then combine their partial sums in a fixed tree: deterministic.
template <typename T>
struct RowdotParams {
  const T* x;
  int64_t ldx;
  const T* y;
  int64_t y_sr, y_sk;
  acc_t<T>* out;
  int64_t M, K, R;
  acc_t<T> alpha;
  Dropout drop;
};

constexpr int kRowdotThreads = 256, kRowdotRows = 4;
template <typename T> constexpr int kRowdotRanks = sizeof(acc_t<T>) == 8 ? 8 : 16;

template <typename T>
__global__ void __launch_bounds__(kRowdotThreads) rowdot_kernel(const RowdotParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int NT = kRowdotThreads, RM = kRowdotRows, RC = kRowdotRanks<T>, NW = NT / 32;
  __shared__ Acc red[NW][RM * RC];
  const int tid = threadIdx.x;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * RM, r0 = static_cast<int64_t>(blockIdx.y) * RC;

  Acc acc[RM][RC];
#pragma unroll
  for (int mi = 0; mi < RM; ++mi)
#pragma unroll
    for (int r = 0; r < RC; ++r) acc[mi][r] = Acc(0);

  const int64_t nquads = dceil(p.K, 4);
  for (int64_t quad = tid; quad < nquads; quad += NT) {
    const int64_t k = 4 * quad;
    Acc xv[RM][4];
#pragma unroll
    for (int mi = 0; mi < RM; ++mi) {
      const int64_t m = m0 + mi;
      const unsigned keep = (p.drop.on && m < p.M) ? keep_quad(p.drop, m, quad) : 0xFu;
#pragma unroll
      for (int c = 0; c < 4; ++c)
        xv[mi][c] = (m < p.M && k + c < p.K && ((keep >> c) & 1u)) ? convert<Acc>(p.x[m * p.ldx + k + c]) : Acc(0);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      if (k + c >= p.K) break;
#pragma unroll
      for (int r = 0; r < RC; ++r) {
        const Acc yv = r0 + r < p.R ? convert<Acc>(p.y[(r0 + r) * p.y_sr + (k + c) * p.y_sk]) : Acc(0);
#pragma unroll
        for (int mi = 0; mi < RM; ++mi) acc[mi][r] += xv[mi][c] * yv;
      }
    }
  }

  const int lane = tid % 32, warp = tid / 32;
#pragma unroll
  for (int mi = 0; mi < RM; ++mi)
#pragma unroll
    for (int r = 0; r < RC; ++r) {
      Acc v = acc[mi][r];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp][mi * RC + r] = v;
    }
  __syncthreads();
  for (int e = tid; e < RM * RC; e += NT) {
    const int64_t m = m0 + e / RC, r = r0 + e % RC;
    if (m >= p.M || r >= p.R) continue;
    Acc v = Acc(0);
#pragma unroll
    for (int w = 0; w < NW; ++w) v += red[w][e];
    p.out[m * p.R + r] = p.alpha * v;
  }
}

template <typename T>
cudaError_t launch_rowdot(const RowdotParams<T>& p, cudaStream_t stream) {
  if (p.M <= 0 || p.R <= 0) return cudaSuccess;
  const int64_t gx = ceil_div(p.M, kRowdotRows), gy = ceil_div(p.R, kRowdotRanks<T>);
  if (gx > INT_MAX || gy > 65535) return cudaErrorInvalidValue;
  rowdot_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), kRowdotThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------ colsum

// Σ over rows m of drop(P[m, c])·Q[m, r] for c < C, r < R (Q == nullptr: R = 1, Q ≡ 1).
// Element (c, r) lives at c·o_sc + r·o_sr of a dense C×R output. Row chunk z of the grid
// covers rows [z·chunk, (z+1)·chunk): with one chunk the block writes T(alpha·sum) to out,
// otherwise the raw sum to part[z·C·R + ·] for colsum_finish.
template <typename T>
struct ColsumParams {
  const T* P;
  int64_t ldp;
  const acc_t<T>* Q;
  int64_t ldq;
  int64_t M, C, R, chunk;
  acc_t<T> alpha;
  Dropout drop;
  T* out;
  acc_t<T>* part;
  int64_t o_sc, o_sr;
};

constexpr int kColsumThreads = 128, kColsumRows = 32;
template <typename T> constexpr int kColsumRanks = sizeof(acc_t<T>) == 8 ? 8 : 16;

template <typename T>
__global__ void __launch_bounds__(kColsumThreads) colsum_kernel(const ColsumParams<T> p) {
  using Acc = acc_t<T>;
  constexpr int NT = kColsumThreads, MB = kColsumRows, RC = kColsumRanks<T>;
  __shared__ Acc qs[MB][RC];
  const int tid = threadIdx.x;
  // Each thread owns four consecutive columns: one dropout draw covers them.
  const int64_t quad = static_cast<int64_t>(blockIdx.x) * NT + tid, c0 = 4 * quad;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * RC;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.z) * p.chunk;
  const int64_t m_end = dmin(p.M, m_begin + p.chunk);

  Acc acc[4][RC];
#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int r = 0; r < RC; ++r) acc[c][r] = Acc(0);

  for (int64_t m = m_begin; m < m_end; m += MB) {
    const int rows = static_cast<int>(dmin(MB, m_end - m));
    for (int e = tid; e < MB * RC; e += NT) {
      const int mm = e / RC, r = e % RC;
      Acc v = Acc(0);
      if (mm < rows && r0 + r < p.R) v = p.Q != nullptr ? p.Q[(m + mm) * p.ldq + r0 + r] : Acc(1);
      qs[mm][r] = v;
    }
    __syncthreads();
    if (c0 < p.C) {
      for (int mm = 0; mm < rows; ++mm) {
        const int64_t row = m + mm;
        const unsigned keep = p.drop.on ? keep_quad(p.drop, row, quad) : 0xFu;
        Acc pv[4];
#pragma unroll
        for (int c = 0; c < 4; ++c)
          pv[c] = (c0 + c < p.C && ((keep >> c) & 1u)) ? convert<Acc>(p.P[row * p.ldp + c0 + c]) : Acc(0);
#pragma unroll
        for (int r = 0; r < RC; ++r) {
          const Acc qv = qs[mm][r];
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[c][r] += pv[c] * qv;
        }
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int c = 0; c < 4; ++c)
#pragma unroll
    for (int r = 0; r < RC; ++r) {
      if (c0 + c >= p.C || r0 + r >= p.R) continue;
      const int64_t idx = (c0 + c) * p.o_sc + (r0 + r) * p.o_sr;
      if (p.part != nullptr)
        p.part[static_cast<int64_t>(blockIdx.z) * p.C * p.R + idx] = acc[c][r];
      else
        p.out[idx] = convert<T>(p.alpha * acc[c][r]);
    }
}

template <typename T>
__global__ void colsum_finish_kernel(const acc_t<T>* part, int64_t splits, int64_t n, acc_t<T> alpha, T* out) {
  using Acc = acc_t<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    Acc v = Acc(0);
    for (int64_t s = 0; s < splits; ++s) v += part[s * n + e];
    out[e] = convert<T>(alpha * v);
  }
}

// Row chunks of a colsum: a pure function of the shapes, so the summation order (and the
// bits of the result) never depend on the device.
struct Split {
  int64_t count, chunk;
};

template <typename T>
Split colsum_split(int64_t M, int64_t C, int64_t R) {
  constexpr int64_t kTargetBlocks = 528, kMinRows = 128, kMaxPartial = int64_t{1} << 22, kMaxSplits = 1024;
  const int64_t blocks = ceil_div(C, 4 * kColsumThreads) * ceil_div(R, kColsumRanks<T>);
  int64_t s = ceil_div(kTargetBlocks, std::max<int64_t>(blocks, 1));
  s = std::min(s, std::max<int64_t>(1, ceil_div(M, kMinRows)));
  s = std::min(s, std::max<int64_t>(1, kMaxPartial / std::max<int64_t>(C * R, 1)));
  s = std::max<int64_t>(1, std::min(s, kMaxSplits));
  const int64_t rows = std::max<int64_t>(M, 1);
  const int64_t chunk = ceil_div(rows, s);
  return {ceil_div(rows, chunk), chunk};
}

template <typename T>
size_t colsum_part_bytes(const Split& s, int64_t C, int64_t R) {
  return s.count > 1 ? sizeof(acc_t<T>) * static_cast<size_t>(s.count * C * R) : 0;
}

template <typename T>
cudaError_t launch_colsum(ColsumParams<T> p, const Split& split, acc_t<T>* part, cudaStream_t stream) {
  if (p.C <= 0 || p.R <= 0) return cudaSuccess;
  p.chunk = split.chunk;
  p.part = split.count > 1 ? part : nullptr;
  const int64_t gx = ceil_div(p.C, 4 * kColsumThreads), gy = ceil_div(p.R, kColsumRanks<T>);
  if (gx > INT_MAX || gy > 65535 || split.count > 65535) return cudaErrorInvalidValue;
  colsum_kernel<T><<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(split.count)),
                     kColsumThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || split.count == 1) return err;
  const int64_t n = p.C * p.R;
  const int64_t blocks = std::min<int64_t>(ceil_div(n, 256), 4096);
  colsum_finish_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, split.count, n, p.alpha, p.out);
  return cudaGetLastError();
}

// ------------------------------------------------------------------------------ workspace

constexpr size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

template <typename T>
struct BwdPlan {
  Split dB, dA, db;
  size_t off_dB, off_dA, off_db, bytes;  // v sits at offset 0
};

template <typename T>
BwdPlan<T> plan_bwd(int64_t M, int64_t N, int64_t K, int64_t R) {
  BwdPlan<T> plan;
  plan.dB = colsum_split<T>(M, N, R);
  plan.dA = colsum_split<T>(M, K, R);
  plan.db = colsum_split<T>(M, N, 1);
  plan.off_dB = align256(sizeof(acc_t<T>) * static_cast<size_t>(M * R));
  plan.off_dA = plan.off_dB + align256(colsum_part_bytes<T>(plan.dB, N, R));
  plan.off_db = plan.off_dA + align256(colsum_part_bytes<T>(plan.dA, K, R));
  plan.bytes = plan.off_db + align256(colsum_part_bytes<T>(plan.db, N, 1));
  return plan;
}

bool bad_sizes(int64_t M, int64_t N, int64_t K, int64_t R, double dropout_p) {
  return M < 0 || N < 0 || K < 0 || R < 0 || !(dropout_p >= 0.0 && dropout_p < 1.0);
}

}  // namespace

// ------------------------------------------------------------------------------ launchers

template <typename T>
cudaError_t lora_fwd(const T* x, int64_t ldx, const T* weight, int64_t ldw, const T* bias, const T* lora_A,
                     const T* lora_B, T* y, acc_t<T>* u, int64_t M, int64_t N, int64_t K, int64_t R,
                     double scaling, double dropout_p, uint64_t seed, void* workspace, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (bad_sizes(M, N, K, R, dropout_p) || ldx < 0 || ldw < 0) return cudaErrorInvalidValue;
  if (M == 0) return cudaGetLastError();
  const Dropout drop = make_dropout(dropout_p, seed, K);
  // CUTLASS first where it applies (lora_cutlass.cuh: 16-bit, aligned, M >= 128, sm_80+)
  const lora_detail::CutlassPath cutlass =
      drop.on ? lora_detail::CutlassPath::none
              : lora_detail::lora_cutlass_path<T>(x, ldx, weight, ldw, M, N, K, R, workspace);
  if (!drop.on && cutlass == lora_detail::CutlassPath::none) {  // lora_fused.cu: 16-bit, R <= 64, ...
    const cudaError_t fused = lora_detail::lora_fwd_fused<T>(x, ldx, weight, ldw, bias, lora_A, lora_B, y, u,
                                                             M, N, K, R, scaling, stream);
    if (fused != cudaErrorNotSupported) return fused;
  }

  RowdotParams<T> down{};
  down.x = x;
  down.ldx = ldx;
  down.y = lora_A;  // Y(r, k) = A[r, k]
  down.y_sr = K;
  down.y_sk = 1;
  down.out = u;
  down.M = M;
  down.K = K;
  down.R = R;
  down.alpha = static_cast<Acc>(drop.on ? 1.0 / (1.0 - dropout_p) : 1.0);
  down.drop = drop;
  cudaError_t err = launch_rowdot(down, stream);
  if (err != cudaSuccess) return err;
  if (cutlass != lora_detail::CutlassPath::none)
    return lora_detail::lora_fwd_cutlass<T>(cutlass, x, ldx, weight, ldw, bias, lora_B, y, u, M, N, K, R, scaling,
                                            workspace, stream);

  GemmParams<T> gp{};
  gp.a = x;  // A(m, k) = x[m, k]
  gp.a_si = ldx;
  gp.a_sk = 1;
  gp.b = weight;  // B(k, n) = W[n, k]
  gp.b_sk = 1;
  gp.b_sj = ldw;
  gp.M = M;
  gp.N = N;
  gp.K = K;
  gp.l = R > 0 ? u : nullptr;
  gp.l_si = R;
  gp.rt = lora_B;  // Rt(r, n) = B[n, r]
  gp.rt_sr = 1;
  gp.rt_sj = R;
  gp.R = R;
  gp.lr_scale = static_cast<Acc>(scaling);
  gp.drop = Dropout{};
  gp.bias = bias;
  gp.out = y;
  gp.ldo = N;
  err = launch_gemm<T, false, true>(gp, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T>
size_t lora_bwd_workspace(int64_t M, int64_t N, int64_t K, int64_t R) {
  if (bad_sizes(M, N, K, R, 0.0)) return 0;
  return plan_bwd<T>(M, N, K, R).bytes + lora_detail::lora_dx_cutlass_workspace<T>(M, N, K, R);  // dx's after
}

template <typename T>
cudaError_t lora_bwd(const T* g, const T* x, int64_t ldx, const T* weight, int64_t ldw, const T* lora_A,
                     const T* lora_B, const acc_t<T>* u, T* dx, T* dA, T* dB, T* dW, T* db, void* workspace,
                     int64_t M, int64_t N, int64_t K, int64_t R, double scaling, double dropout_p, uint64_t seed,
                     cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (bad_sizes(M, N, K, R, dropout_p) || ldx < 0 || ldw < 0) return cudaErrorInvalidValue;
  const BwdPlan<T> plan = plan_bwd<T>(M, N, K, R);
  if (plan.bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  Acc* v = reinterpret_cast<Acc*>(ws);
  const Dropout drop = make_dropout(dropout_p, seed, K);
  const Acc s = static_cast<Acc>(scaling);
  const Acc inv_keep = static_cast<Acc>(drop.on ? 1.0 / (1.0 - dropout_p) : 1.0);

  // v = s·g B: Y(r, n) = B[n, r]
  RowdotParams<T> vp{};
  vp.x = g;
  vp.ldx = N;
  vp.y = lora_B;
  vp.y_sr = 1;
  vp.y_sk = R;
  vp.out = v;
  vp.M = M;
  vp.K = N;
  vp.R = R;
  vp.alpha = s;
  vp.drop = Dropout{};
  cudaError_t err = launch_rowdot(vp, stream);
  if (err != cudaSuccess) return err;

  // dB[n, r] = s·Σ_m g[m, n] u[m, r]
  ColsumParams<T> cb{};
  cb.P = g;
  cb.ldp = N;
  cb.Q = u;
  cb.ldq = R;
  cb.M = M;
  cb.C = N;
  cb.R = R;
  cb.alpha = s;
  cb.drop = Dropout{};
  cb.out = dB;
  cb.o_sc = R;
  cb.o_sr = 1;
  err = launch_colsum(cb, plan.dB, reinterpret_cast<Acc*>(ws + plan.off_dB), stream);
  if (err != cudaSuccess) return err;

  // dA[r, k] = Σ_m v[m, r] drop(x)[m, k]: the mask inside the sum, 1/(1−p) after it
  ColsumParams<T> ca{};
  ca.P = x;
  ca.ldp = ldx;
  ca.Q = v;
  ca.ldq = R;
  ca.M = M;
  ca.C = K;
  ca.R = R;
  ca.alpha = inv_keep;
  ca.drop = drop;
  ca.out = dA;
  ca.o_sc = 1;
  ca.o_sr = K;
  err = launch_colsum(ca, plan.dA, reinterpret_cast<Acc*>(ws + plan.off_dA), stream);
  if (err != cudaSuccess) return err;

  // dx on CUTLASS (lora_cutlass.cuh) without dropout where it applies, its workspace after lora.cu's
  void* dx_ws = lora_detail::lora_dx_cutlass_workspace<T>(M, N, K, R) > 0 ? ws + plan.bytes : nullptr;
  const lora_detail::CutlassPath dx_cutlass =
      dx == nullptr || drop.on ? lora_detail::CutlassPath::none
                               : lora_detail::lora_dx_cutlass_path<T>(g, weight, ldw, M, N, K, R, dx_ws);
  if (dx_cutlass != lora_detail::CutlassPath::none) {
    err = lora_detail::lora_dx_cutlass<T>(dx_cutlass, g, weight, ldw, lora_A, v, dx, M, N, K, R, dx_ws, stream);
    if (err != cudaSuccess) return err;
  } else if (dx != nullptr) {
    // dx[m, k] = Σ_n g[m, n] W[n, k] + keep(m, k)/(1−p)·Σ_r v[m, r] A[r, k]
    GemmParams<T> gp{};
    gp.a = g;
    gp.a_si = N;
    gp.a_sk = 1;
    gp.b = weight;
    gp.b_sk = ldw;
    gp.b_sj = 1;
    gp.M = M;
    gp.N = K;
    gp.K = N;
    gp.l = R > 0 ? v : nullptr;
    gp.l_si = R;
    gp.rt = lora_A;
    gp.rt_sr = K;
    gp.rt_sj = 1;
    gp.R = R;
    gp.lr_scale = inv_keep;
    gp.drop = drop;
    gp.bias = nullptr;
    gp.out = dx;
    gp.ldo = K;
    err = launch_gemm<T, false, false>(gp, stream);
    if (err != cudaSuccess) return err;
  }

  if (dW != nullptr) {
    // dW[n, k] = Σ_m g[m, n] x[m, k]; M = 0 runs an empty reduction, writing zeros
    GemmParams<T> gp{};
    gp.a = g;  // A(n, m) = g[m, n]
    gp.a_si = 1;
    gp.a_sk = N;
    gp.b = x;  // B(m, k) = x[m, k]
    gp.b_sk = ldx;
    gp.b_sj = 1;
    gp.M = N;
    gp.N = K;
    gp.K = M;
    gp.l = nullptr;
    gp.R = 0;
    gp.drop = Dropout{};
    gp.bias = nullptr;
    gp.out = dW;
    gp.ldo = K;
    err = launch_gemm<T, true, false>(gp, stream);
    if (err != cudaSuccess) return err;
  }

  if (db != nullptr) {
    ColsumParams<T> cd{};
    cd.P = g;
    cd.ldp = N;
    cd.Q = nullptr;
    cd.ldq = 0;
    cd.M = M;
    cd.C = N;
    cd.R = 1;
    cd.alpha = Acc(1);
    cd.drop = Dropout{};
    cd.out = db;
    cd.o_sc = 1;
    cd.o_sr = 0;
    err = launch_colsum(cd, plan.db, reinterpret_cast<Acc*>(ws + plan.off_db), stream);
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

#define LK_LORA_INSTANTIATE(T)                                                                                  \
  template cudaError_t lora_fwd<T>(const T*, int64_t, const T*, int64_t, const T*, const T*, const T*, T*,     \
                                   acc_t<T>*, int64_t, int64_t, int64_t, int64_t, double, double, uint64_t,   \
                                   void*, cudaStream_t);                                                       \
  template size_t lora_bwd_workspace<T>(int64_t, int64_t, int64_t, int64_t);                                   \
  template cudaError_t lora_bwd<T>(const T*, const T*, int64_t, const T*, int64_t, const T*, const T*,         \
                                   const acc_t<T>*, T*, T*, T*, T*, T*, void*, int64_t, int64_t, int64_t,      \
                                   int64_t, double, double, uint64_t, cudaStream_t);
LK_FOR_EACH_TYPE(LK_LORA_INSTANTIATE)
#undef LK_LORA_INSTANTIATE

}  // namespace lk
