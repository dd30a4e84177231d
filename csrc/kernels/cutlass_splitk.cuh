// Split-K pieces shared by cutlass_sm80.cuh and cutlass_sm90.cuh (the rule: splitk_rule.h).
// With split.splits = S > 1, split s = blockIdx.z of a GEMM kernel writes its fp32 accumulators to
// the plane s of split.partials [S, M, N] (store_partial), and splitk_finish_kernel then sums the S
// planes of each element in the order s = 0..S-1 and hands the sum to the epilogue policy's
// out(i, j, acc), exactly as the one-split kernel hands its accumulator: every epilogue policy
// works unchanged, and the result depends on the shape only (no atomics, no order that varies
// from run to run). Memory-bound: S·M·N floats written by the splits, read once here.
#pragma once
#include "lora_cutlass.cuh"
#include "splitk_rule.h"

#include <cute/tensor.hpp>

namespace lk {
namespace lora_detail {
namespace {

// One split's accumulators into its plane of the workspace, row stride N. The TiledMma's C
// partition gives each thread pairs of adjacent columns (mma.sync's and wgmma's fp32 C fragments):
// those go out as one 8-byte store where in bounds and aligned, so a warp fills whole 32-byte
// sectors. __stcg (st.global.cg: through L2, where the finish kernel reads them back) also keeps
// nvcc from merging the vector branch with the scalar one, which it did with plain stores (two
// STG.E per pair; cuobjdump -sass of a cutlass_sm80_splitk_kernel, CUDA 13.0).
template <class Acc, class Coord>
__device__ __forceinline__ void store_partial(const Acc& acc, const Coord& coord, float* plane, int64_t i0,
                                              int64_t j0, int64_t M, int64_t N) {
  using cute::get;
  static_assert(decltype(cute::size(acc))::value % 2 == 0, "accumulators come in pairs");
  CUTLASS_PRAGMA_UNROLL
  for (int e = 0; e < cute::size(acc); e += 2) {
    const int64_t i = i0 + get<0>(coord(e)), j = j0 + get<1>(coord(e));
    const int64_t i1 = i0 + get<0>(coord(e + 1)), j1 = j0 + get<1>(coord(e + 1));
    float* dst = plane + i * N + j;
    if (i1 == i && j1 == j + 1 && i < M && j1 < N && ((i * N + j) & 1) == 0) {
      __stcg(reinterpret_cast<float2*>(dst), make_float2(acc(e), acc(e + 1)));
    } else {
      if (i < M && j < N) __stcg(dst, acc(e));
      if (i1 < M && j1 < N) __stcg(plane + i1 * N + j1, acc(e + 1));
    }
  }
}

// y(i, j) = epilogue(Σ_s partials[s, i, j]), s ascending. One element a thread, consecutive
// threads along a row: coalesced reads of each plane and writes of the output. The host (below)
// launches it only when S > 1, where S·M·N < 2^31 (splitk_rule.h bounds it by 132·128·128).
template <class Epi>
__global__ void __launch_bounds__(256) splitk_finish_kernel(const float* __restrict__ partials, int splits, int M,
                                                            int N, const Epi epi) {
  const int total = M * N;
  epi.dispatch([&](const auto& out) {
    for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < total; e += gridDim.x * blockDim.x) {
      float acc = partials[e];
      for (int s = 1; s < splits; ++s) acc += partials[static_cast<int64_t>(s) * total + e];
      const int i = e / N;
      out(i, e - i * N, acc);
    }
  });
}

template <class Epi>
cudaError_t launch_splitk_finish(const CutlassGemm<Epi>& p, SplitK split, cudaStream_t stream) {
  const int64_t total = p.M * p.N;
  if (split.partials == nullptr || total * split.splits >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
  const int64_t blocks = ceil_div(total, 256) < 4096 ? ceil_div(total, 256) : 4096;
  splitk_finish_kernel<Epi><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      split.partials, split.splits, static_cast<int>(p.M), static_cast<int>(p.N), p.epi);
  return cudaGetLastError();
}

// The grid's z (splits) for a launch, or 0 when p asks for something the kernels cannot do:
// more splits than k-tiles (an empty split) or a missing workspace.
template <class Epi>
int grid_splits(const CutlassGemm<Epi>& p, SplitK split) {
  if (split.splits < 1 || split.splits > splitk::k_tiles(p.K) || (split.splits > 1 && split.partials == nullptr))
    return 0;
  return split.splits;
}

}  // namespace
}  // namespace lora_detail
}  // namespace lk
