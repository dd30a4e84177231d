// InfoNCE's 16-bit tile products on tensor cores, written with CuTe (CUTLASS 3.x): the S tile
// (S = X Yᵀ over D, both operands K-major) and the backward's H·(b⊙Y) over one D slab. Both use
// mma.sync m16n8k16 with fp32 accumulators (SM80_16x8x16_F32{F16,BF16}..._TN atoms, which sm_90
// runs too), operands from XOR-swizzled shared memory through ldmatrix. The fp32/fp64 path stays
// on CUDA-core FMAs (infonce_detail.cuh's dot_tile_fma): no TF32.
//
// S tile (BT = 64 rows × 64 columns, 8 warps as 4 along rows × 2 along columns, 16 fp32
// accumulators a thread): D is streamed in chunks of BK = 64 through two shared-memory stages
// per operand, filled by cp.async (16 bytes a thread-copy, zero-filled outside the N×D matrix),
// so the copies of chunk k+1 overlap the MMAs of chunk k. Inputs whose rows are not 16-byte
// aligned (vec = false) take plain stores instead. Each accumulator's (row, column) comes from the
// TiledMMA's C partition of an identity tensor; the tile goes through an fp32 shared tile to the
// (ty, tx) ownership the online log-sum-exp, the diagonal and the backward's G' use.
// Reduction order: k ascending in steps of 16 within one MMA chain per entry (inside a step, the
// hardware's fixed order), the same in every pass: results are deterministic, and the backward's
// d image pass recomputes the forward's S bit for bit. Its d text pass computes Sᵀ from the same
// products per step; that it matches bit for bit too is the hardware's summation order, not
// ours to promise (the 16-bit tolerances do not need it).
//
// X resident (forward): a block keeps its row block of X, all ⌈D/64⌉ chunks, in shared memory
// while it walks its column tiles when D <= kResidentD = 512, streaming only Y (the chunk index
// then names X's slot; streamed X uses slots 0 and 1 like Y). Same products in the same order, so
// the choice changes no result bit. Global→shared bytes of one square forward, nrb = ⌈N/64⌉ row
// tiles, Q column ranges (infonce_fwd.cu's grid), 2-byte elements (arithmetic, not measured):
//   streamed X:  nrb²·2·64·D·2           ≈ N²·D/16
//   resident X:  nrb²·64·D·2 + nrb·Q·64·D·2 ≈ N²·D/32 + 128·nrb·Q·D
// e.g. N = 16384, D = 512 (Q = 2): 8.59 GB → 4.33 GB; N = 32768, D = 256 (Q = 1): 17.2 → 8.61 GB.
// Occupancy (2 blocks an SM wanted, as the forward grid assumes): shared memory 8 KB per X chunk
// + 17 KB (Y's stages / the fp32 tile) + 4 KB, i.e. 29-85 KB: two blocks fit an sm_90 SM (228 KB)
// for every D, an sm_80 SM (164 KB) up to D = 448 and one block for D = 449..512.
// The backward's blocks each own one row block against all column tiles, so X stays resident
// there too where it fits beside the (b⊙Y) slab: 16-bit D <= 256 (infonce_bwd.cu's GradSmem).
// Its bytes per pass and slab, per tile pair: X + Y + slab = 3·64·256·2 → Y + slab (2/3) at D = 256.
#pragma once
#include "infonce_detail.cuh"
#include "cute_sm80_types.cuh"

#include <cute/tensor.hpp>
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>

namespace lk {
namespace infonce_detail {

constexpr int kChunk = 64;                        // BK of the 16-bit S product
constexpr int kChunkBytes = kChunk * kChunk * 2;  // one 64×64 16-bit operand chunk
constexpr int kResidentChunks = 8;                // X resident for D <= 512
constexpr int64_t kResidentD = kResidentChunks * kChunk;
constexpr int kLDD = 64 + 4;  // row stride of the fp32 S tile (padding spreads the C-fragment stores over banks)
constexpr int kDBytes = 64 * kLDD * 4;
// Y's two stages, also the fp32 S tile once the products are done.
constexpr int kYBytes = kDBytes > 2 * kChunkBytes ? kDBytes : 2 * kChunkBytes;
// The backward's (b⊙Y) chunk: 64 rows × a D slab of DV = 256 or 512 (infonce_bwd.cu picks).
constexpr int slab_bytes(int dv) { return dv * 64 * 2; }
constexpr int kHBytes = kChunkBytes;              // the backward's H = G' tile, 64×64

// Chunks of X held in shared memory by the forward: all of them when resident, else 2 stages.
__host__ __device__ constexpr int64_t x_slots(int64_t D) {
  const int64_t nk = (D + kChunk - 1) / kChunk;
  return nk <= kResidentChunks ? (nk > 0 ? nk : 1) : 2;
}

namespace mma16 {
using namespace cute;

template <typename T>
using Types = CuteSm80<T>;  // cute_sm80_types.cuh

// K-major 64×64 chunk: 8 rows of 64 k (128 bytes) XOR-swizzled so that ldmatrix's eight 16-byte
// rows hit distinct banks; 16-byte groups of 8 k stay contiguous and aligned (cp.async targets).
using KAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
template <int SLOTS>
using KChunks = decltype(tile_to_shape(KAtom{}, Shape<_64, _64, Int<SLOTS>>{}));  // (row, k, slot)
using KChunk = decltype(tile_to_shape(KAtom{}, Shape<_64, _64>{}));
// N-major (b⊙Y) chunk of the backward: (d, k) with 64 d (128 bytes) per k row, read by ldmatrix.trans.
using NAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, Stride<_1, _64>>{}));
template <int DV>
using SlabLayout = decltype(tile_to_shape(NAtom{}, Shape<Int<DV>, _64>{}));

// S: warps 4 (rows) × 2 (columns) of 16×32.
template <typename T>
using SMma = TiledMMA<MMA_Atom<typename Types<T>::Atom>, Layout<Shape<_4, _2, _1>>, Tile<_64, _64, _16>>;
// H·Y: warps 2 (rows) × 4 (d) of 32×DV/4: DV/4 accumulators a thread (64 for DV = 256, 128 for 512).
template <typename T, int DV>
using HYMma = TiledMMA<MMA_Atom<typename Types<T>::Atom>, Layout<Shape<_2, _4, _1>>, Tile<_64, Int<DV>, _16>>;

static_assert(cosize(KChunk{}) * 2 == kChunkBytes, "chunk size");
static_assert(cosize(SlabLayout<256>{}) * 2 == slab_bytes(256) && cosize(SlabLayout<512>{}) * 2 == slab_bytes(512),
              "slab size");

// 16 bytes global → shared, asynchronously; in = false writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool in) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(in ? 16 : 0));
#endif
}

// Chunk [row0, row0 + 64) × [k0, k0 + 64) of src into a swizzled K-major chunk, zero outside
// [0, nrows) × [0, D). vec: rows 16-byte aligned and D % 8 == 0 (a group starting in range is in
// range): cp.async, for the caller to fence and wait; otherwise plain element stores.
template <typename T>
__device__ __forceinline__ void load_chunk(T* dst, const T* __restrict__ src, int64_t ld, int64_t row0,
                                           int64_t nrows, int64_t k0, int64_t D, bool vec) {
  constexpr int GPR = kChunk / 8;  // 16-byte groups per row
  for (int g = threadIdx.x; g < kChunk * GPR; g += kThreads) {
    const int r = g / GPR, kk = (g % GPR) * 8;
    const int64_t row = row0 + r, k = k0 + kk;
    T* d = dst + KChunk{}(r, kk);
    if (vec) {
      const bool in = row < nrows && k < D;
      cp_async16(d, in ? src + row * ld + k : src, in);
    } else {
#pragma unroll
      for (int v = 0; v < 8; ++v) d[v] = (row < nrows && k + v < D) ? src[row * ld + k + v] : zero_of<T>();
    }
  }
}

// dot[a][b] = <X[row0 + ty + 16a], Y[col0 + tx + 16b]> (fp32, over all of D). sx: X's slots
// (x_slots(D) chunks when x_res, else 2), sy: Y's two stages, then the fp32 tile. load_x = false
// when x_res and this row block's X is already in place. Starts and ends with a barrier.
template <typename T>
__device__ __forceinline__ void dot_tile(float (&dot)[4][4], unsigned char* sx, unsigned char* sy, const T* X,
                                         int64_t ldx, const T* Y, int64_t ldy, int64_t row0, int64_t col0,
                                         int64_t nx, int64_t ny, int64_t D, bool vx, bool vy, bool x_res,
                                         bool load_x) {
  using E = typename Types<T>::E;
  T* tx_ = reinterpret_cast<T*>(sx);
  T* ty_ = reinterpret_cast<T*>(sy);
  const int nk = static_cast<int>((D + kChunk - 1) / kChunk);
  auto xslot = [&](int kc) { return x_res ? kc : (kc & 1); };
  auto issue = [&](int kc) {
    const int64_t k0 = static_cast<int64_t>(kc) * kChunk;
    if (load_x) load_chunk<T>(tx_ + xslot(kc) * (kChunk * kChunk), X, ldx, row0, nx, k0, D, vx);
    load_chunk<T>(ty_ + (kc & 1) * (kChunk * kChunk), Y, ldy, col0, ny, k0, D, vy);
    cp_async_fence();
  };

  SMma<T> mma;
  auto thr = mma.get_slice(threadIdx.x);
  Tensor sX = make_tensor(make_smem_ptr(reinterpret_cast<E*>(sx)), KChunks<kResidentChunks>{});
  Tensor sY = make_tensor(make_smem_ptr(reinterpret_cast<E*>(sy)), KChunks<2>{});
  Tensor acc = partition_fragment_C(mma, Shape<_64, _64>{});  // (MMA, MMA_M, MMA_N) fp32
  clear(acc);
  Tensor rA = thr.partition_fragment_A(sX(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor rB = thr.partition_fragment_B(sY(_, _, 0));
  auto ldA = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, E>{}, mma);
  auto ldB = make_tiled_copy_B(Copy_Atom<SM75_U32x4_LDSM_N, E>{}, mma);
  auto tA = ldA.get_slice(threadIdx.x);
  auto tB = ldB.get_slice(threadIdx.x);
  Tensor tAs = tA.partition_S(sX);  // (CPY, CPY_M, CPY_K, slot)
  Tensor tBs = tB.partition_S(sY);
  Tensor tAr = tA.retile_D(rA);
  Tensor tBr = tB.retile_D(rB);

  __syncthreads();  // the previous users of both regions are done
  if (nk > 0) issue(0);
  for (int kc = 0; kc < nk; ++kc) {
    if (kc + 1 < nk) {
      issue(kc + 1);  // into the stage chunk kc − 1 used, freed by the barrier closing that step
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const int xs = xslot(kc), ys = kc & 1;
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(rA); ++kb) {
      copy(ldA, tAs(_, _, kb, xs), tAr(_, _, kb));
      copy(ldB, tBs(_, _, kb, ys), tBr(_, _, kb));
      gemm(mma, rA(_, _, kb), rB(_, _, kb), acc);
    }
    __syncthreads();
  }

  float* sD = reinterpret_cast<float*>(sy);
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<_64, _64>{}));
  CUTE_UNROLL
  for (int e = 0; e < size(acc); ++e) sD[get<0>(coord(e)) * kLDD + get<1>(coord(e))] = acc(e);
  __syncthreads();
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int a = 0; a < 4; ++a)
#pragma unroll
    for (int b = 0; b < 4; ++b) dot[a][b] = sD[(ty + 16 * a) * kLDD + tx + 16 * b];
  __syncthreads();
}

// The (b⊙Y) chunk of the backward: rows [col0, col0 + 64) of Y (zero past ny), columns
// [d0, d0 + DV) (zero past D), each row times rscale[row] when given, as the N-major slab.
template <typename T, int DV>
__device__ __forceinline__ void load_slab(T* dst, const T* __restrict__ Y, int64_t ld, int64_t col0, int64_t ny,
                                          int64_t d0, int64_t D, bool vec, const float* __restrict__ rscale) {
  constexpr int GPR = DV / 8;
  for (int g = threadIdx.x; g < 64 * GPR; g += kThreads) {
    const int r = g / GPR, dd = (g % GPR) * 8;
    const int64_t row = col0 + r, d = d0 + dd;
    T e[8];
    if (vec && row < ny && d < D) {
      const uint4 raw = *reinterpret_cast<const uint4*>(Y + row * ld + d);
      memcpy(e, &raw, sizeof(raw));
    } else {
#pragma unroll
      for (int v = 0; v < 8; ++v) e[v] = (row < ny && d + v < D) ? Y[row * ld + d + v] : zero_of<T>();
    }
    if (rscale != nullptr && row < ny) {
      const float sc = rscale[row];
#pragma unroll
      for (int v = 0; v < 8; ++v) e[v] = from_acc<T>(to_acc<float>(e[v]) * sc);
    }
    uint4 raw;
    memcpy(&raw, e, sizeof(raw));
    *reinterpret_cast<uint4*>(dst + SlabLayout<DV>{}(dd, r)) = raw;  // 8 consecutive d: one aligned group
  }
}

// Offset of H = G' entry (row, column of the S tile) in its swizzled K-major tile.
__device__ __forceinline__ int h_offset(int r, int c) { return KChunk{}(r, c); }

// H·(b⊙Y) accumulators of one 64-row × DV-column slab.
template <typename T, int DV>
struct HY {
  using E = typename Types<T>::E;
  using Frag = decltype(partition_fragment_C(HYMma<T, DV>{}, Shape<_64, Int<DV>>{}));
  Frag acc;

  __device__ __forceinline__ void zero() { clear(acc); }

  // acc += H (64×64, sH) · slab (64 rows × DV, sYs), k ascending in steps of 16.
  __device__ __forceinline__ void mma(const T* sH, const T* sYs) {
    HYMma<T, DV> tm;
    auto thr = tm.get_slice(threadIdx.x);
    Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<const E*>(sH)), KChunk{});
    Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<const E*>(sYs)), SlabLayout<DV>{});
    Tensor rA = thr.partition_fragment_A(sA);
    Tensor rB = thr.partition_fragment_B(sB);
    auto ldA = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, E>{}, tm);
    auto ldB = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, E>{}, tm);
    auto tA = ldA.get_slice(threadIdx.x);
    auto tB = ldB.get_slice(threadIdx.x);
    Tensor tAs = tA.partition_S(sA);
    Tensor tBs = tB.partition_S(sB);
    Tensor tAr = tA.retile_D(rA);
    Tensor tBr = tB.retile_D(rB);
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(rA); ++kb) {
      copy(ldA, tAs(_, _, kb), tAr(_, _, kb));
      copy(ldB, tBs(_, _, kb), tBr(_, _, kb));
      gemm(tm, rA(_, _, kb), rB(_, _, kb), acc);
    }
  }

  // out[row][d] = scale·acc straight from the fragments, predicated on N and D.
  __device__ __forceinline__ void store(float scale, int64_t row0, int64_t d0, int64_t N, int64_t D, T* outT,
                                        float* outA) {
    HYMma<T, DV> tm;
    Tensor coord = tm.get_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<_64, Int<DV>>{}));
    CUTE_UNROLL
    for (int e = 0; e < size(acc); ++e) {
      const int64_t row = row0 + get<0>(coord(e)), d = d0 + get<1>(coord(e));
      if (row < N && d < D) {
        const float v = scale * acc(e);
        if (outT != nullptr) {
          outT[row * D + d] = from_acc<T>(v);
        } else {
          outA[row * D + d] = v;
        }
      }
    }
  }
};

}  // namespace mma16

// The S tile of either path (see dot_tile_fma and mma16::dot_tile): sx holds X's tiles, sy Y's
// (and the MMA path's fp32 tile). x_res/load_x: the forward's resident X (MMA path only).
template <typename T>
__device__ __forceinline__ void dot_tile(acc_t<T> (&dot)[Cfg<T>::TM][Cfg<T>::TM], unsigned char* sx,
                                         unsigned char* sy, const T* X, int64_t ldx, const T* Y, int64_t ldy,
                                         int64_t row0, int64_t col0, int64_t nx, int64_t ny, int64_t D, bool vx,
                                         bool vy, bool x_res, bool load_x) {
  using C = Cfg<T>;
  if constexpr (C::kMma) {
    mma16::dot_tile<T>(dot, sx, sy, X, ldx, Y, ldy, row0, col0, nx, ny, D, vx, vy, x_res, load_x);
  } else {
    dot_tile_fma<T>(dot, reinterpret_cast<typename C::S*>(sx), reinterpret_cast<typename C::S*>(sy), X, ldx, Y,
                    ldy, row0, col0, nx, ny, D, vx, vy);
  }
}

}  // namespace infonce_detail
}  // namespace lk
