// The weight-gradient GEMM of cutlass_wgrad.cuh for sm_80+: C[w, r] = Σ_m A[m, w]·B[m, r]. No body
// in sm_90a code, where cutlass_wgrad_sm90.cuh's kernel runs instead (half of this file's compile
// time); a plain sm_90 build keeps it and runs it on H100/H200.
//
// CUTLASS's multistage mainloop (CollectiveMma<MainloopSm80CpAsync>) with the GEMM's M = w, N = r,
// K = m: A(w, m) and B(r, m) are both MN-major (stride 1 along w and r), so the shared-memory tiles
// are MN-major swizzled atoms read by ldmatrix.trans into mma.sync m16n8k16 (fp32 accumulators).
// One 128-thread block (4 warps stacked along w) per 128 × RT output tile and split of M; the
// split's rows are a sub-tensor (pointer moved by z·chunk rows), so the collective's K residue is
// that split's own: only the last split has a partial 64-row k-tile (read first, zero-filled).
// Why these sizes: the product is memory-bound (2·RT FLOP per 2-byte element of A), so the block
// is small (4 warps, RT fp32 accumulators a thread: 16, 32 or 64) and many blocks stream A
// through deep cp.async pipelines: 4 stages (RT = 16, 32: 72 / 80 KB), 3 at RT = 64 (72 KB), so
// two blocks fit an A100 SM (164 KB). Not run or timed: no GPU so far.
// Residues: W and RB are multiples of 8 (the collective predicates each 8-element vector by its
// first element), R past RB is the caller's zero padding; the epilogue stores w < W, r < NC only.
#pragma once
#include "cutlass_wgrad.cuh"
#include "cute_sm80_types.cuh"

#include <cute/tensor.hpp>
#include <cutlass/gemm/collective/collective_mma.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/numeric_types.h>

namespace lk {
namespace wgrad {
namespace {

using namespace cute;

template <typename T>
using Types = CuteSm80<T>;  // cute_sm80_types.cuh

// MN-major shared-memory atoms: RT elements along MN (one row of the atom per k) by 8 k, XOR-swizzled
// in 16-byte units so that ldmatrix.trans's eight addresses (8 consecutive k at one MN offset) hit
// eight distinct 16-byte bank groups: a row of 16 / 32 / 64 elements spans 2 / 4 / 8 units, and
// Swizzle<1 / 2 / 3, 3, 3> folds the k bits above that into the unit index. Copy threads: 8 elements
// (16 bytes) each along MN, the rest along k.
template <int RT> struct MnAtom;
template <> struct MnAtom<16> {
  using Smem = decltype(composition(Swizzle<1, 3, 3>{}, Layout<Shape<_16, _8>, cute::Stride<_1, _16>>{}));
  using Threads = Layout<Shape<_2, _64>, cute::Stride<_1, _2>>;
};
template <> struct MnAtom<32> {
  using Smem = decltype(composition(Swizzle<2, 3, 3>{}, Layout<Shape<_32, _8>, cute::Stride<_1, _32>>{}));
  using Threads = Layout<Shape<_4, _32>, cute::Stride<_1, _4>>;
};
template <> struct MnAtom<64> {
  using Smem = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, cute::Stride<_1, _64>>{}));
  using Threads = Layout<Shape<_8, _16>, cute::Stride<_1, _8>>;
};
// A's 128-wide tile: 16 threads × 8 elements along w, 8 along k, over the 64-wide atom.
struct MnAtomA {
  using Smem = MnAtom<64>::Smem;
  using Threads = Layout<Shape<_16, _8>, cute::Stride<_1, _16>>;
};

template <typename T, int RT>
struct Config {
  using E = typename Types<T>::E;
  static constexpr int BW = 128, BK = 64, kStages = RT == 64 ? 3 : 4;
  using TileShape = Shape<Int<BW>, Int<RT>, Int<BK>>;
  using StrideMN = cute::Stride<_1, int64_t, int64_t>;  // (w or r, m, batch)
  // 4 warps along w; each step covers 64 w × 16 r × 16 k (16 × 16 per warp: ldmatrix.x4 for both)
  using TiledMma = TiledMMA<MMA_Atom<typename Types<T>::Atom>, Layout<Shape<_4, _1, _1>>, Tile<_64, _16, _16>>;
  // A is streamed once: .cg (L2 only) copies
  using GmemCopyA = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, E>{},
                                             typename MnAtomA::Threads{}, Layout<Shape<_8, _1>>{}));
  using GmemCopyB = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEALWAYS<uint128_t>, E>{},
                                             typename MnAtom<RT>::Threads{}, Layout<Shape<_8, _1>>{}));
  using SmemCopy = Copy_Atom<SM75_U16x8_LDSM_T, E>;
  using Mainloop = cutlass::gemm::collective::CollectiveMma<
      cutlass::gemm::MainloopSm80CpAsync<kStages>, TileShape, E, StrideMN, E, StrideMN, TiledMma, GmemCopyA,
      typename MnAtomA::Smem, SmemCopy, cute::identity, GmemCopyB, typename MnAtom<RT>::Smem, SmemCopy,
      cute::identity>;
  static constexpr int kThreads = size(TiledMma{});
  static constexpr int kSmem = static_cast<int>(sizeof(typename Mainloop::SharedStorage));
  static_assert(kThreads == 128, "4 warps");
  static_assert(RT == 16 || RT == 32 || RT == 64, "r tiles of 16, 32 or 64");
  // each copy covers whole tiles: every thread moves the same number of 16-byte vectors
  static_assert(BW * BK % (kThreads * 8) == 0 && RT * BK % (kThreads * 8) == 0, "copy tiling");
};

template <typename T, int RT>
__global__ void __launch_bounds__(128) wgrad_sm80_kernel(const WgradGemm<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Config<T, RT>;
  using E = typename C::E;
  extern __shared__ __align__(128) char smem[];
  const int tile_w = blockIdx.x, tile_r = blockIdx.y, split = blockIdx.z;
  const int64_t m0 = static_cast<int64_t>(split) * p.chunk;
  const int rows = static_cast<int>(p.M - m0 < p.chunk ? p.M - m0 : p.chunk);
  const int W = static_cast<int>(p.W), RB = static_cast<int>(p.RB);

  // this split's rows only: its k-tiles, and its K residue, are the collective's whole problem
  Tensor mA = make_tensor(make_gmem_ptr(reinterpret_cast<const E*>(p.a) + m0 * p.lda), make_shape(W, rows),
                          make_stride(_1{}, p.lda));
  Tensor mB = make_tensor(make_gmem_ptr(reinterpret_cast<const E*>(p.b) + m0 * p.RB), make_shape(RB, rows),
                          make_stride(_1{}, p.RB));
  Tensor gA = local_tile(mA, select<0, 2>(typename C::TileShape{}), make_coord(tile_w, _));  // (BW, BK, k)
  Tensor gB = local_tile(mB, select<1, 2>(typename C::TileShape{}), make_coord(tile_r, _));  // (RT, BK, k)
  auto residue = make_tuple(W - tile_w * C::BW, RB - tile_r * RT, rows - int(size<1>(gA)) * int(size<2>(gA)));

  typename C::TiledMma tiled_mma;
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<C::BW>, Int<RT>>{});
  clear(acc);
  typename C::Mainloop collective;
  collective(acc, gA, gB, acc, make_coord_iterator(shape<2>(gA)), int(size<2>(gA)), residue, int(threadIdx.x), smem);

  Tensor coord = tiled_mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<C::BW>, Int<RT>>{}));
  const int64_t w0 = static_cast<int64_t>(tile_w) * C::BW, r0 = static_cast<int64_t>(tile_r) * RT;
  CUTLASS_PRAGMA_UNROLL
  for (int e = 0; e < size(acc); ++e) {
    const int64_t w = w0 + get<0>(coord(e)), r = r0 + get<1>(coord(e));
    if (w < p.W && r < p.NC) wgrad_store(p, split, w, r, acc(e));
  }
#endif
}

}  // namespace

template <typename T, int RT>
bool wgrad_sm80_ready(int device) {
  return lora_detail::kernel_runs_on(device, wgrad_sm80_kernel<T, RT>, Config<T, RT>::kSmem);
}

template <typename T, int RT>
cudaError_t wgrad_sm80_launch(const WgradGemm<T>& p, int64_t splits, cudaStream_t stream) {
  using C = Config<T, RT>;
  cudaError_t err =
      cudaFuncSetAttribute(wgrad_sm80_kernel<T, RT>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.W, C::BW)), static_cast<unsigned>(ceil_div(p.RB, RT)),
                  static_cast<unsigned>(splits));
  wgrad_sm80_kernel<T, RT><<<grid, C::kThreads, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace wgrad
}  // namespace lk

// In lk::wgrad, after including this header: one element type's three r tiles.
#define LK_INSTANTIATE_WGRAD_SM80(T)                                                              \
  template bool wgrad_sm80_ready<T, 16>(int);                                                      \
  template bool wgrad_sm80_ready<T, 32>(int);                                                      \
  template bool wgrad_sm80_ready<T, 64>(int);                                                      \
  template cudaError_t wgrad_sm80_launch<T, 16>(const WgradGemm<T>&, int64_t, cudaStream_t);       \
  template cudaError_t wgrad_sm80_launch<T, 32>(const WgradGemm<T>&, int64_t, cudaStream_t);       \
  template cudaError_t wgrad_sm80_launch<T, 64>(const WgradGemm<T>&, int64_t, cudaStream_t);
