// GEMMs for sm_80+ on CUTLASS 3.x: acc = a bᵀ + a2 b2ᵀ, then an epilogue policy (lora_cutlass.cuh's
// CutlassGemm<Epi>). LoRA's forward (x, W0 then h, B) and dx (g, W0 then T(v), A; B operands
// N-major) with EpilogueBias, instantiated in lora_sm80.cu; the adapter forward's two products
// (one phase each, K2 = 0) with adapter_cutlass.cuh's epilogues, in adapter_sm80.cu.
//
// One 256-thread block per 128×128 tile of y. CUTLASS's multistage mainloop
// (CollectiveMma<MainloopSm80CpAsync<3>>: cp.async into swizzled shared memory, ldmatrix,
// mma.sync m16n8k16 with fp32 accumulators) runs twice into the same accumulator fragment: over
// (a, b) for ⌈K/64⌉ k-tiles, then over (a2, b2) for ⌈K2/64⌉ (its closing cp.async wait and
// barrier free shared memory for the second run). Residues in M, N and K are the collective's:
// predicated copies into zero-filled tiles, K's partial tile first; our epilogue adds the bias
// and stores y through the TiledMma's C partition, predicated on M and N.
// Tile: 128×128×64, 3 stages, 96 KB of shared memory (fits the 99 KB of sm_86/sm_89 too), 2×4
// warps of 64×32. CUTLASS's own sm_80 16-bit configuration (4 warps of 64×64, k-tiles of 32)
// needs 128 accumulators a thread: with our epilogue ptxas gave it 254-255 registers and spilled
// (16-184 bytes, k-tiles of 32 or 64); 8 warps take 210 registers and spill nothing (ptxas -v,
// CUDA 13.0, sm_80; benchmarks/cuda_ptx_check.py). Not run or timed yet: no GPU so far.
// K2 = 0 skips the second run: the collective always loads its first k-tile (it has no
// zero-k-tile case), which would read past a2 and b2.
// Split-K where there are few output tiles (splitk_rule.h: the rule, the ranges; cutlass_splitk.cuh:
// the partial stores and the fixed-order finish): cutlass_sm80_splitk_kernel, grid z = S, runs
// the mainloop over a contiguous range of whole k-tiles of (a, b) as a sub-GEMM starting at
// element k0 (the partial tile stays first, in split 0), the (a2, b2) run in split S-1 only.
// S = 1 launches cutlass_sm80_kernel, whose code is what it was before split-K (same PTX).
#pragma once
#include "cutlass_splitk.cuh"
#include "lora_cutlass.cuh"
#include "cute_sm80_types.cuh"

#include <cute/tensor.hpp>
#include <cutlass/gemm/collective/collective_mma.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/numeric_types.h>

namespace lk {
namespace lora_detail {
namespace {

using namespace cute;

template <typename T>
using Sm80Types = CuteSm80<T>;  // cute_sm80_types.cuh

template <typename T, bool kBMN>
struct Sm80Config {
  using E = typename Sm80Types<T>::E;
  using TileShape = Shape<_128, _128, _64>;
  static constexpr int BM = 128, BN = 128;
  using StrideK = cute::Stride<int64_t, _1, int64_t>;  // (row, k, batch): K-major
  using StrideN = cute::Stride<_1, int64_t, int64_t>;  // (n, k, batch): N-major B
  using TiledMma = TiledMMA<MMA_Atom<typename Sm80Types<T>::Atom>, Layout<Shape<_2, _4, _1>>, Tile<_32, _64, _16>>;
  // 8 rows of 64 k (128 bytes), XOR-swizzled so that ldmatrix's eight 16-byte rows hit distinct banks
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, cute::Stride<_64, _1>>{}));
  // 256 threads × 8 elements (16 bytes): 32 rows × 64 k per copy
  using GmemCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEALWAYS<uint128_t>, E>{},
                                            Layout<Shape<_32, _8>, cute::Stride<_8, _1>>{}, Layout<Shape<_1, _8>>{}));
  using SmemCopy = Copy_Atom<SM75_U32x4_LDSM_N, E>;
  // N-major B: 64 n (128 bytes) by 8 k, 16 threads × 8 n along a k row, ldmatrix.trans
  using SmemAtomN = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_64, _8>, cute::Stride<_1, _64>>{}));
  using GmemCopyN = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEALWAYS<uint128_t>, E>{},
                                             Layout<Shape<_16, _16>, cute::Stride<_1, _16>>{}, Layout<Shape<_8, _1>>{}));
  using SmemCopyN = Copy_Atom<SM75_U16x8_LDSM_T, E>;
  using Mainloop = cutlass::gemm::collective::CollectiveMma<
      cutlass::gemm::MainloopSm80CpAsync<3>, TileShape, E, StrideK, E, cute::conditional_t<kBMN, StrideN, StrideK>,
      TiledMma, GmemCopy, SmemAtom, SmemCopy, cute::identity, cute::conditional_t<kBMN, GmemCopyN, GmemCopy>,
      cute::conditional_t<kBMN, SmemAtomN, SmemAtom>, cute::conditional_t<kBMN, SmemCopyN, SmemCopy>, cute::identity>;
  static constexpr int kThreads = size(TiledMma{});
  static constexpr int kSmem = static_cast<int>(sizeof(typename Mainloop::SharedStorage));
  static_assert(kThreads == 256, "2x4 warps");
  static_assert(BM == splitk::kTileM && BN == splitk::kTileN && get<2>(TileShape{}) == splitk::kTileK,
                "splitk_rule.h's tile");
};

// B(n, k) of an N-major or a K-major B.
template <bool kBMN, typename E>
__device__ __forceinline__ const E* b_at_k(const E* b, int64_t ldb, int k0) {
  return kBMN ? b + static_cast<int64_t>(k0) * ldb : b + k0;
}

template <bool kBMN, typename E>
__device__ __forceinline__ auto b_tensor(const E* b, int64_t ldb, int rows_b, int K) {
  if constexpr (kBMN) {
    return make_tensor(make_gmem_ptr(b), make_shape(rows_b, K), make_stride(_1{}, ldb));
  } else {
    return make_tensor(make_gmem_ptr(b), make_shape(rows_b, K), make_stride(ldb, _1{}));
  }
}

// acc += A Bᵀ over one tile row of A [rows_a, K] (K-major) and one of B(n, k), n < rows_b.
template <typename C, bool kBMN, typename Acc>
__device__ __forceinline__ void mainloop(Acc& acc, const typename C::E* a, int64_t lda, const typename C::E* b,
                                         int64_t ldb, int rows_a, int rows_b, int K, int tile_m, int tile_n,
                                         char* smem) {
  Tensor mA = make_tensor(make_gmem_ptr(a), make_shape(rows_a, K), make_stride(lda, _1{}));
  Tensor mB = b_tensor<kBMN>(b, ldb, rows_b, K);
  Tensor gA = local_tile(mA, select<0, 2>(typename C::TileShape{}), make_coord(tile_m, _));  // (BM, BK, k)
  Tensor gB = local_tile(mB, select<1, 2>(typename C::TileShape{}), make_coord(tile_n, _));  // (BN, BK, k)
  // rows left from this tile on, and K - BK·⌈K/BK⌉ <= 0: the collective reads the partial k-tile first
  auto residue = make_tuple(rows_a - tile_m * C::BM, rows_b - tile_n * C::BN, K - int(size<1>(gA)) * int(size<2>(gA)));
  typename C::Mainloop collective;
  collective(acc, gA, gB, acc, make_coord_iterator(shape<2>(gA)), int(size<2>(gA)), residue, int(threadIdx.x), smem);
}

// No body in sm_90a code, where cutlass_sm90.cuh's kernels run instead (cutlass_device_path): half
// of the compile time. A plain sm_90 build keeps them and runs them on H100/H200.
template <class Epi, bool kBMN>
__global__ void __launch_bounds__(256, 1) cutlass_sm80_kernel(const CutlassGemm<Epi> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Epi::Elem;
  using C = Sm80Config<T, kBMN>;
  using E = typename C::E;
  extern __shared__ __align__(128) char smem[];
  const int tile_m = blockIdx.x, tile_n = blockIdx.y;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N);

  typename C::TiledMma tiled_mma;
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<C::BM>, Int<C::BN>>{});  // (MMA, MMA_M, MMA_N) fp32
  clear(acc);
  mainloop<C, kBMN>(acc, reinterpret_cast<const E*>(p.a), p.lda, reinterpret_cast<const E*>(p.b), p.ldb, M, N,
                    static_cast<int>(p.K), tile_m, tile_n, smem);
  if (p.K2 > 0)
    mainloop<C, kBMN>(acc, reinterpret_cast<const E*>(p.a2), p.lda2, reinterpret_cast<const E*>(p.b2), p.ldb2, M, N,
                      static_cast<int>(p.K2), tile_m, tile_n, smem);

  // Each accumulator's (row, column) in the tile, from the same partition applied to coordinates.
  Tensor coord = tiled_mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<C::BM>, Int<C::BN>>{}));
  const int64_t i0 = static_cast<int64_t>(tile_m) * C::BM, j0 = static_cast<int64_t>(tile_n) * C::BN;
  p.epi.dispatch([&](const auto& out) {
    CUTLASS_PRAGMA_UNROLL
    for (int e = 0; e < size(acc); ++e) {
      const int64_t i = i0 + get<0>(coord(e)), j = j0 + get<1>(coord(e));
      if (i < p.M && j < p.N) out(i, j, acc(e));
    }
  });
#endif
}

// Split-K (split.splits > 1, grid z): the same tile over split blockIdx.z's k-range of the first
// phase, [k0, k0 + k_len) (splitk_rule.h), a sub-GEMM whose residue the collective handles as it
// does K's (so only split 0's first k-tile can be partial); the second phase in the last split; the
// fp32 tile into split.partials, summed and finished by splitk_finish_kernel. A kernel of its own
// rather than a template flag on the one above: sharing a body changed the one-split kernel's PTX
// (same operations, reordered; 176 registers instead of 174 for the adapter's, ptxas -v, CUDA
// 13.0), and this way its SASS stays what it was (cuobjdump -sass against the previous build).
template <class Epi, bool kBMN>
__global__ void __launch_bounds__(256, 1) cutlass_sm80_splitk_kernel(const CutlassGemm<Epi> p, const SplitK split) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Epi::Elem;
  using C = Sm80Config<T, kBMN>;
  using E = typename C::E;
  extern __shared__ __align__(128) char smem[];
  const int tile_m = blockIdx.x, tile_n = blockIdx.y, s = blockIdx.z;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N), K = static_cast<int>(p.K);
  const splitk::TileRange r = splitk::split_tiles(static_cast<int>(splitk::k_tiles(K)), split.splits, s);
  const int k0 = splitk::sm80_k_begin(K, r.first), k_len = splitk::sm80_k_begin(K, r.first + r.count) - k0;

  typename C::TiledMma tiled_mma;
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<C::BM>, Int<C::BN>>{});  // (MMA, MMA_M, MMA_N) fp32
  clear(acc);
  mainloop<C, kBMN>(acc, reinterpret_cast<const E*>(p.a) + k0, p.lda,
                    b_at_k<kBMN>(reinterpret_cast<const E*>(p.b), p.ldb, k0), p.ldb, M, N, k_len, tile_m, tile_n,
                    smem);
  if (p.K2 > 0 && s == split.splits - 1)
    mainloop<C, kBMN>(acc, reinterpret_cast<const E*>(p.a2), p.lda2, reinterpret_cast<const E*>(p.b2), p.ldb2, M, N,
                      static_cast<int>(p.K2), tile_m, tile_n, smem);

  Tensor coord = tiled_mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<C::BM>, Int<C::BN>>{}));
  store_partial(acc, coord, split.partials + static_cast<int64_t>(s) * p.M * p.N, static_cast<int64_t>(tile_m) * C::BM,
                static_cast<int64_t>(tile_n) * C::BN, p.M, p.N);
#endif
}

}  // namespace

template <class Epi, bool kBMN>
bool cutlass_sm80_ready(int device) {
  constexpr int smem = Sm80Config<typename Epi::Elem, kBMN>::kSmem;
  return kernel_runs_on(device, cutlass_sm80_kernel<Epi, kBMN>, smem) &&
         kernel_runs_on(device, cutlass_sm80_splitk_kernel<Epi, kBMN>, smem);
}

template <class Epi, bool kBMN>
cudaError_t cutlass_sm80_launch(const CutlassGemm<Epi>& p, cudaStream_t stream, SplitK split) {
  using C = Sm80Config<typename Epi::Elem, kBMN>;
  const int splits = grid_splits(p, split);
  if (splits == 0) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, C::BM)), static_cast<unsigned>(ceil_div(p.N, C::BN)),
                  static_cast<unsigned>(splits));
  if (splits == 1) {
    const cudaError_t err =
        cudaFuncSetAttribute(cutlass_sm80_kernel<Epi, kBMN>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
    if (err != cudaSuccess) return err;
    cutlass_sm80_kernel<Epi, kBMN><<<grid, C::kThreads, C::kSmem, stream>>>(p);
    return cudaGetLastError();
  }
  cudaError_t err = cudaFuncSetAttribute(cutlass_sm80_splitk_kernel<Epi, kBMN>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  cutlass_sm80_splitk_kernel<Epi, kBMN><<<grid, C::kThreads, C::kSmem, stream>>>(p, split);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_splitk_finish(p, split, stream);
}

}  // namespace lora_detail
}  // namespace lk

// In lora_detail, after including this header: the entry points of one epilogue policy.
#define LK_INSTANTIATE_CUTLASS_SM80(EPI, BMN)   \
  template bool cutlass_sm80_ready<EPI, BMN>(int); \
  template cudaError_t cutlass_sm80_launch<EPI, BMN>(const CutlassGemm<EPI>&, cudaStream_t, SplitK);
