// The weight-gradient GEMM of cutlass_wgrad.cuh for sm_90a (H100/H200): C[w, r] = Σ_m A[m, w]·B[m, r]
// with TMA loads and wgmma, both operands MN-major in shared memory (wgmma reads 16-bit MN-major
// operands directly; no transposing copy).
//
// GEMM roles: M = w (A column-major: stride 1 along w), N = r (B "row-major" K×N: stride 1 along r),
// K = m. CUTLASS's MainloopSm90TmaGmmaWarpSpecialized collective, from its CollectiveBuilder, for
// 128 × RT × 64 tiles: one producer warp issues the TMA loads into a shared-memory pipeline, one
// consumer warp group runs wgmma (64 × RT × 16 instructions, RT fp32 accumulators a thread).
// Split z of M is a range of whole 64-row k-tiles: the producer starts its k-tile iterator at
// z·chunk/64 and loads this split's count; the consumer's mma() takes the same count and starts
// the accumulators from zero. TMA zero-fills what lies past M (the last split's partial k-tile),
// past W and past RB, so only the store is predicated (w < W, r < NC).
// Stages: 6 / 5 / 4 for RT = 16 / 32 / 64 (about 110 / 100 / 98 KB): two blocks per SM, as the
// split rule's target assumes. Not run or timed: no GPU so far.
// wgmma exists only in sm_90a code: elsewhere the body is empty and the host never launches it.
#pragma once
#include "cute_sm80_types.cuh"
#include "cutlass_wgrad.cuh"

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/layout/matrix.h>
#include <cutlass/numeric_types.h>
#include <cutlass/pipeline/pipeline.hpp>

namespace lk {
namespace wgrad {
namespace {

using namespace cute;

template <typename T, int RT>
struct Sm90Cfg {
  using E = typename CuteSm80<T>::E;  // cute_sm80_types.cuh: CuTe's 16-bit element type
  static constexpr int BW = 128, BK = 64, kStages = RT == 16 ? 6 : RT == 32 ? 5 : 4;
  using TileShape = Shape<Int<BW>, Int<RT>, Int<BK>>;
  // A(w, m) column-major = MN-major; B(m, r) as CUTLASS's K×N row-major = MN-major. 16-byte alignment.
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, E, cutlass::layout::ColumnMajor, 8, E,
      cutlass::layout::RowMajor, 8, float, TileShape, Shape<_1, _1, _1>, cutlass::gemm::collective::StageCount<kStages>,
      cutlass::gemm::KernelTmaWarpSpecialized>::CollectiveOp;
  using TiledMma = typename Mainloop::TiledMma;
  using Pipeline = typename Mainloop::MainloopPipeline;
  struct SharedStorage {
    typename Mainloop::TensorStorage tensors;
    alignas(16) typename Mainloop::PipelineStorage pipeline;
  };
  static constexpr int kConsumers = size(TiledMma{});
  static constexpr int kThreads = cutlass::NumThreadsPerWarpGroup + kConsumers;
  static constexpr int kSmem = static_cast<int>(sizeof(SharedStorage));
  static_assert(kConsumers == cutlass::NumThreadsPerWarpGroup, "one consumer warp group");
  static_assert(2 * kSmem <= 227 * 1024, "two blocks per SM");
};

template <typename T, int RT>
struct Sm90Args {
  typename Sm90Cfg<T, RT>::Mainloop::Params tma;  // descriptors of A [M, W] and B [M, RB]
  WgradGemm<T> g;
  int k_per_split;                                 // chunk / 64
};

template <typename T, int RT>
__global__ void __launch_bounds__(Sm90Cfg<T, RT>::kThreads, 1) wgrad_sm90_kernel(const __grid_constant__ Sm90Args<T, RT> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Sm90Cfg<T, RT>;
  using Pipeline = typename C::Pipeline;
  extern __shared__ __align__(128) char smem[];
  auto& shared = *reinterpret_cast<typename C::SharedStorage*>(smem);
  const int warp_idx = cutlass::canonical_warp_idx_sync();
  const int warp_group = cutlass::canonical_warp_group_idx();
  const int wg_thread = threadIdx.x % cutlass::NumThreadsPerWarpGroup;
  if (warp_idx == 0 && cute::elect_one_sync()) C::Mainloop::prefetch_tma_descriptors(p.tma);

  typename Pipeline::Params pp;
  if (warp_group == 0 && warp_idx == 0) pp.role = Pipeline::ThreadCategory::Producer;
  if (warp_group == 1) pp.role = Pipeline::ThreadCategory::Consumer;
  pp.is_leader = wg_thread == 0;
  pp.num_consumers = C::kConsumers;
  pp.transaction_bytes = p.tma.tma_transaction_bytes;
  Pipeline pipeline(shared.pipeline, pp, Shape<_1, _1, _1>{});
  __syncthreads();  // barrier initialisation seen by every warp before use

  const int W = static_cast<int>(p.g.W), RB = static_cast<int>(p.g.RB), M = static_cast<int>(p.g.M);
  typename C::Mainloop collective;
  auto in = collective.load_init(make_shape(W, RB, M, 1), p.tma);
  const int k_total = size<3>(get<0>(in));
  const int k_begin = static_cast<int>(blockIdx.z) * p.k_per_split;
  const int k_count = k_total - k_begin < p.k_per_split ? k_total - k_begin : p.k_per_split;  // >= 1 by the split rule

  if (warp_group == 0) {
    if (warp_idx == 0) {
      auto state = cutlass::make_producer_start_state<Pipeline>();
      collective.load(p.tma, pipeline, state, in, make_coord(int(blockIdx.x), int(blockIdx.y), _, 0),
                      make_coord_iterator(k_begin, shape<3>(get<0>(in))), k_count, cutlass::canonical_lane_idx(),
                      0u, shared.tensors);
      state.advance(k_count);
      collective.load_tail(pipeline, state);
    }
  } else {
    typename C::TiledMma tiled_mma;
    Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<C::BW>, Int<RT>>{});
    typename C::Mainloop::PipelineState read;
    collective.mma(pipeline, read, acc, k_count, wg_thread, shared.tensors, p.tma);
    collective.mma_tail(pipeline, read, k_count);

    Tensor coord = tiled_mma.get_slice(wg_thread).partition_C(make_identity_tensor(Shape<Int<C::BW>, Int<RT>>{}));
    const int64_t w0 = static_cast<int64_t>(blockIdx.x) * C::BW, r0 = static_cast<int64_t>(blockIdx.y) * RT;
    CUTLASS_PRAGMA_UNROLL
    for (int e = 0; e < size(acc); ++e) {
      const int64_t w = w0 + get<0>(coord(e)), r = r0 + get<1>(coord(e));
      if (w < p.g.W && r < p.g.NC) wgrad_store(p.g, static_cast<int>(blockIdx.z), w, r, acc(e));
    }
  }
#endif
}

}  // namespace

template <typename T, int RT>
bool wgrad_sm90_ready(int device) {
  return lora_detail::kernel_runs_on(device, wgrad_sm90_kernel<T, RT>, Sm90Cfg<T, RT>::kSmem);
}

template <typename T, int RT>
cudaError_t wgrad_sm90_launch(const WgradGemm<T>& g, int64_t splits, cudaStream_t stream) {
  using C = Sm90Cfg<T, RT>;
  using E = typename C::E;
  const int W = static_cast<int>(g.W), RB = static_cast<int>(g.RB), M = static_cast<int>(g.M);
  typename C::Mainloop::Arguments args{
      reinterpret_cast<const E*>(g.a), typename C::Mainloop::StrideA{Int<1>{}, g.lda, int64_t(M) * g.lda},
      reinterpret_cast<const E*>(g.b), typename C::Mainloop::StrideB{Int<1>{}, g.RB, int64_t(M) * g.RB}};
  // encodes the TMA descriptors through the driver (cuTensorMapEncodeTiled)
  const Sm90Args<T, RT> p{C::Mainloop::to_underlying_arguments(make_shape(W, RB, M, 1), args, nullptr), g,
                          static_cast<int>(g.chunk / C::BK)};
  cudaError_t err = cudaFuncSetAttribute(wgrad_sm90_kernel<T, RT>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(g.W, C::BW)), static_cast<unsigned>(ceil_div(g.RB, RT)),
                  static_cast<unsigned>(splits));
  wgrad_sm90_kernel<T, RT><<<grid, C::kThreads, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace wgrad
}  // namespace lk

// In lk::wgrad, after including this header: one element type's three r tiles.
#define LK_INSTANTIATE_WGRAD_SM90(T)                                                              \
  template bool wgrad_sm90_ready<T, 16>(int);                                                      \
  template bool wgrad_sm90_ready<T, 32>(int);                                                      \
  template bool wgrad_sm90_ready<T, 64>(int);                                                      \
  template cudaError_t wgrad_sm90_launch<T, 16>(const WgradGemm<T>&, int64_t, cudaStream_t);       \
  template cudaError_t wgrad_sm90_launch<T, 32>(const WgradGemm<T>&, int64_t, cudaStream_t);       \
  template cudaError_t wgrad_sm90_launch<T, 64>(const WgradGemm<T>&, int64_t, cudaStream_t);
