// GEMMs for sm_90a (H100/H200) on CUTLASS 3.x: acc = a bᵀ + a2 b2ᵀ, then an epilogue policy
// (lora_cutlass.cuh's CutlassGemm<Epi>). LoRA's forward (x, W0 then h, B) and dx (g, W0 then
// T(v), A; B operands N-major) with EpilogueBias, instantiated in lora_sm90.cu; the adapter
// forward's two products (one phase each, K2 = 0) with adapter_cutlass.cuh's epilogues, in
// adapter_sm90.cu.
//
// One block per 128×128 tile of y, warp-specialized like CUTLASS's KernelTmaWarpSpecialized
// (non-persistent): warp group 0 is the producer, one warp of it issuing TMA loads into a
// 5-stage shared-memory pipeline (PipelineTmaAsync); warp group 1 consumes with wgmma
// (64×128×16 instructions, fp32 accumulators, 128 a thread). The collective is CUTLASS's
// MainloopSm90TmaGmmaWarpSpecialized, built by its CollectiveBuilder for 128×128×64 tiles.
// The low-rank term as extra k-iterations: the producer runs the collective's load() over
// (a, b) for ⌈K/64⌉ k-tiles, then over (a2, b2) for ⌈K2/64⌉ more through the same pipeline (same
// tile shape, so the same shared-memory layout and transaction bytes; a second pair of TMA
// descriptors), and the consumer's mma() runs once over all of them into one accumulator. Its
// first k-tile starts the accumulators from zero (wgmma scale-d 0): that is why the two
// mainloops share one mma() call rather than calling it twice. TMA fills out-of-bounds elements
// with zeros, which covers the residues in M, N and K (also K2 < 64). The epilogue policy gets
// each accumulator through the TiledMma's C partition, predicated on M and N.
// K2 = 0 (one phase): the host encodes no descriptor for it (TMA has no zero-length dimension;
// the first phase's stands in, unused), the producer issues no load for it and advances its
// pipeline state by 0, and mma() runs over the first phase's k-tiles alone.
// Why 128×128 with one consumer warp group: the simplest tested CUTLASS schedule; the
// cooperative/ping-pong persistent schedules with 128×256 tiles that cuBLAS-class speed needs are
// the next step once a GPU can time them. Not run or timed yet: no GPU so far.
//
// Split-K where there are few output tiles (splitk_rule.h, cutlass_splitk.cuh):
// cutlass_sm90_splitk_kernel, grid z = S. The collective's load() takes a k-tile iterator and a
// count, so split s starts the iterator at its first k-tile (make_coord_iterator(first, k_tiles))
// and the producer loads `count` tiles, plus the (a2, b2) tiles in split S-1; the consumer's
// mma() runs over the same total (it only counts, the pipeline carries the data). TMA tiles start
// at k = 0 and zero-fill past K, so the partial tile is the last split's. S = 1 launches
// cutlass_sm90_kernel, the same code as before split-K (same SASS for LoRA's).
//
// wgmma exists only in sm_90a code: for any other target the kernel body is empty and the host
// (cutlass_device_path) never launches it.
#pragma once
#include "cutlass_splitk.cuh"
#include "cute_sm80_types.cuh"
#include "lora_cutlass.cuh"

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/layout/matrix.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

namespace lk {
namespace lora_detail {
namespace {

using namespace cute;

template <typename T, bool kBMN>
struct Sm90Config {
  using E = typename CuteSm80<T>::E;  // cute_sm80_types.cuh: CuTe's 16-bit element type
  using TileShape = Shape<_128, _128, _64>;
  static constexpr int BM = 128, BN = 128;
  // A: [M, K] row-major (K-major). B(n, k): [N, K] row-major, i.e. K×N column-major (K-major), or
  // with kBMN [K, N] row-major (N-major). 8-element (16-byte) alignment, as TMA needs.
  using LayoutB = cute::conditional_t<kBMN, cutlass::layout::RowMajor, cutlass::layout::ColumnMajor>;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, cutlass::layout::RowMajor, 8, E, LayoutB, 8, float,
      TileShape, Shape<_1, _1, _1>,
      cutlass::gemm::collective::StageCount<5>, cutlass::gemm::KernelTmaWarpSpecialized>::CollectiveOp;
  using TiledMma = typename Mainloop::TiledMma;
  using Pipeline = typename Mainloop::MainloopPipeline;
  using StrideA = typename Mainloop::StrideA;
  using StrideB = typename Mainloop::StrideB;
  struct SharedStorage {
    typename Mainloop::TensorStorage tensors;
    alignas(16) typename Mainloop::PipelineStorage pipeline;
  };
  static constexpr int kConsumers = size(TiledMma{});  // one warp group
  static constexpr int kThreads = cutlass::NumThreadsPerWarpGroup + kConsumers;
  static constexpr int kSmem = static_cast<int>(sizeof(SharedStorage));
  static_assert(kConsumers == cutlass::NumThreadsPerWarpGroup, "one consumer warp group");
  static_assert(BM == splitk::kTileM && BN == splitk::kTileN && get<2>(TileShape{}) == splitk::kTileK,
                "splitk_rule.h's tile");
};

template <class Epi, bool kBMN>
struct Sm90Params {
  typename Sm90Config<typename Epi::Elem, kBMN>::Mainloop::Params main;  // TMA descriptors of a [M, K] and b
  typename Sm90Config<typename Epi::Elem, kBMN>::Mainloop::Params low;   // and of a2 [M, K2] and b2 (K2 > 0)
  Epi epi;
  int M, N, K, K2;
};

// One block's work: tile (blockIdx.x, blockIdx.y), with kSplit split blockIdx.z's k-tiles and its
// fp32 partial tile out instead of the epilogue. kSplit false is the one-split kernel, unchanged.
// p is the kernel's __grid_constant__ parameter (the TMA descriptors stay in parameter space).
template <class Epi, bool kBMN, bool kSplit>
__device__ __forceinline__ void sm90_tile(const Sm90Params<Epi, kBMN>& p, SplitK split) {
  using C = Sm90Config<typename Epi::Elem, kBMN>;
  using Pipeline = typename C::Pipeline;
  extern __shared__ __align__(128) char smem[];
  auto& shared = *reinterpret_cast<typename C::SharedStorage*>(smem);
  const int thread_idx = threadIdx.x;
  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int warp_group = cutlass::canonical_warp_group_idx();
  const int warp_group_thread = thread_idx % cutlass::NumThreadsPerWarpGroup;
  const int lane_predicate = cute::elect_one_sync();
  if (warp_idx == 0 && lane_predicate) {
    C::Mainloop::prefetch_tma_descriptors(p.main);
    C::Mainloop::prefetch_tma_descriptors(p.low);
  }

  typename Pipeline::Params pipe_params;
  if (warp_group == 0 && warp_idx == 0) pipe_params.role = Pipeline::ThreadCategory::Producer;
  if (warp_group == 1) pipe_params.role = Pipeline::ThreadCategory::Consumer;
  pipe_params.is_leader = warp_group_thread == 0;
  pipe_params.num_consumers = C::kConsumers;
  pipe_params.transaction_bytes = p.main.tma_transaction_bytes;  // per stage: the same for both phases
  Pipeline pipeline(shared.pipeline, pipe_params, Shape<_1, _1, _1>{});
  __syncthreads();  // the barriers' initialisation is visible to every warp

  typename C::Mainloop collective;
  auto main_in = collective.load_init(make_shape(p.M, p.N, p.K, 1), p.main);   // (BLK, BK, tiles, k, l)
  auto low_in = collective.load_init(make_shape(p.M, p.N, p.K2, 1), p.low);
  // The first phase's k-tiles [first, first + count) (splitk_rule.h; TMA tiles start at k = 0, so
  // only the last split's last tile can be partial) and the second phase's k_low tiles, in the last
  // split. Producer and consumer derive the same counts from the same values.
  int first = 0, count = size<3>(get<0>(main_in)), k_low = size<3>(get<0>(low_in));
  if constexpr (kSplit) {
    const splitk::TileRange r = splitk::split_tiles(count, split.splits, int(blockIdx.z));
    first = r.first;
    count = r.count;
    if (int(blockIdx.z) != split.splits - 1) k_low = 0;
  }
  const auto blk = make_coord(int(blockIdx.x), int(blockIdx.y), _, 0);

  if (warp_group == 0) {
    if (warp_idx == 0) {
      auto state = cutlass::make_producer_start_state<Pipeline>();
      collective.load(p.main, pipeline, state, main_in, blk, make_coord_iterator(first, shape<3>(get<0>(main_in))),
                      count, cutlass::canonical_lane_idx(), 0u, shared.tensors);
      state.advance(count);
      if (k_low > 0) {
        collective.load(p.low, pipeline, state, low_in, blk, make_coord_iterator(shape<3>(get<0>(low_in))), k_low,
                        cutlass::canonical_lane_idx(), 0u, shared.tensors);
        state.advance(k_low);
      }
      collective.load_tail(pipeline, state);
    }
  } else {
    typename C::TiledMma tiled_mma;
    Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<C::BM>, Int<C::BN>>{});  // (MMA, MMA_M, MMA_N) fp32
    typename C::Mainloop::PipelineState read;
    collective.mma(pipeline, read, acc, count + k_low, warp_group_thread, shared.tensors, p.main);
    collective.mma_tail(pipeline, read, count + k_low);

    Tensor coord = tiled_mma.get_slice(warp_group_thread)
                       .partition_C(make_identity_tensor(Shape<Int<C::BM>, Int<C::BN>>{}));
    const int64_t i0 = static_cast<int64_t>(blockIdx.x) * C::BM, j0 = static_cast<int64_t>(blockIdx.y) * C::BN;
    if constexpr (kSplit) {
      store_partial(acc, coord, split.partials + static_cast<int64_t>(blockIdx.z) * p.M * p.N, i0, j0, p.M, p.N);
    } else {
      p.epi.dispatch([&](const auto& out) {
        CUTLASS_PRAGMA_UNROLL
        for (int e = 0; e < size(acc); ++e) {
          const int64_t i = i0 + get<0>(coord(e)), j = j0 + get<1>(coord(e));
          if (i < p.M && j < p.N) out(i, j, acc(e));
        }
      });
    }
  }
}

template <class Epi, bool kBMN>
__global__ void __launch_bounds__(Sm90Config<typename Epi::Elem, kBMN>::kThreads, 1)
    cutlass_sm90_kernel(const __grid_constant__ Sm90Params<Epi, kBMN> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  sm90_tile<Epi, kBMN, false>(p, SplitK{});
#endif
}

// Split-K (split.splits > 1, grid z): partial tiles into split.partials, then splitk_finish_kernel.
template <class Epi, bool kBMN>
__global__ void __launch_bounds__(Sm90Config<typename Epi::Elem, kBMN>::kThreads, 1)
    cutlass_sm90_splitk_kernel(const __grid_constant__ Sm90Params<Epi, kBMN> p, const SplitK split) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  sm90_tile<Epi, kBMN, true>(p, split);
#endif
}

// TMA descriptors of one phase: A [M, K] and B(n, k), row strides lda and ldb (elements).
template <typename T, bool kBMN>
typename Sm90Config<T, kBMN>::Mainloop::Params tma_params(const T* a, int64_t lda, const T* b, int64_t ldb, int M,
                                                          int N, int K) {
  using C = Sm90Config<T, kBMN>;
  using E = typename C::E;
  typename C::StrideB stride_b{};
  if constexpr (kBMN) {
    stride_b = typename C::StrideB{Int<1>{}, ldb, int64_t(K) * ldb};
  } else {
    stride_b = typename C::StrideB{ldb, Int<1>{}, int64_t(N) * ldb};
  }
  typename C::Mainloop::Arguments args{reinterpret_cast<const E*>(a),
                                       typename C::StrideA{lda, Int<1>{}, int64_t(M) * lda},
                                       reinterpret_cast<const E*>(b), stride_b};
  return C::Mainloop::to_underlying_arguments(make_shape(M, N, K, 1), args, nullptr);
}

}  // namespace

template <class Epi, bool kBMN>
bool cutlass_sm90_ready(int device) {
  constexpr int smem = Sm90Config<typename Epi::Elem, kBMN>::kSmem;
  return kernel_runs_on(device, cutlass_sm90_kernel<Epi, kBMN>, smem) &&
         kernel_runs_on(device, cutlass_sm90_splitk_kernel<Epi, kBMN>, smem);
}

template <class Epi, bool kBMN>
cudaError_t cutlass_sm90_launch(const CutlassGemm<Epi>& f, cudaStream_t stream, SplitK split) {
  using T = typename Epi::Elem;
  using C = Sm90Config<T, kBMN>;
  const int M = static_cast<int>(f.M), N = static_cast<int>(f.N), K = static_cast<int>(f.K);
  const int K2 = static_cast<int>(f.K2);
  const int splits = grid_splits(f, split);
  if (splits == 0) return cudaErrorInvalidValue;
  // to_underlying_arguments encodes the descriptors through the driver (cuTensorMapEncodeTiled)
  const auto first = tma_params<T, kBMN>(f.a, f.lda, f.b, f.ldb, M, N, K);
  const Sm90Params<Epi, kBMN> p{first, K2 > 0 ? tma_params<T, kBMN>(f.a2, f.lda2, f.b2, f.ldb2, M, N, K2) : first,
                                f.epi, M, N, K, K2};
  const dim3 grid(static_cast<unsigned>(ceil_div(f.M, C::BM)), static_cast<unsigned>(ceil_div(f.N, C::BN)),
                  static_cast<unsigned>(splits));
  if (splits == 1) {
    const cudaError_t err =
        cudaFuncSetAttribute(cutlass_sm90_kernel<Epi, kBMN>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
    if (err != cudaSuccess) return err;
    cutlass_sm90_kernel<Epi, kBMN><<<grid, C::kThreads, C::kSmem, stream>>>(p);
    return cudaGetLastError();
  }
  cudaError_t err = cudaFuncSetAttribute(cutlass_sm90_splitk_kernel<Epi, kBMN>,
                                         cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  cutlass_sm90_splitk_kernel<Epi, kBMN><<<grid, C::kThreads, C::kSmem, stream>>>(p, split);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return launch_splitk_finish(f, split, stream);
}

}  // namespace lora_detail
}  // namespace lk

// In lora_detail, after including this header: the entry points of one epilogue policy.
#define LK_INSTANTIATE_CUTLASS_SM90(EPI, BMN)   \
  template bool cutlass_sm90_ready<EPI, BMN>(int); \
  template cudaError_t cutlass_sm90_launch<EPI, BMN>(const CutlassGemm<EPI>&, cudaStream_t, SplitK);
