// LoRA forward GEMM for sm_80+ on CUTLASS 3.x: y = x W0ᵀ + h Bᵀ + b (lora_cutlass.cuh).
//
// One 256-thread block per 128×128 tile of y. CUTLASS's multistage mainloop
// (CollectiveMma<MainloopSm80CpAsync<3>>: cp.async into swizzled shared memory, ldmatrix,
// mma.sync m16n8k16 with fp32 accumulators) runs twice into the same accumulator fragment: over
// (x, W0) for ⌈K/64⌉ k-tiles, then over (h, B) for ⌈RP/64⌉ (its closing cp.async wait and
// barrier free shared memory for the second run). Residues in M, N and K are the collective's:
// predicated copies into zero-filled tiles, K's partial tile first; our epilogue adds the bias
// and stores y through the TiledMma's C partition, predicated on M and N.
// Tile: 128×128×64, 3 stages, 96 KB of shared memory (fits the 99 KB of sm_86/sm_89 too), 2×4
// warps of 64×32. CUTLASS's own sm_80 16-bit configuration (4 warps of 64×64, k-tiles of 32)
// needs 128 accumulators a thread: with our epilogue ptxas gave it 254-255 registers and spilled
// (16-184 bytes, k-tiles of 32 or 64); 8 warps take 210 registers and spill nothing (ptxas -v,
// CUDA 13.0, sm_80; benchmarks/cuda_ptx_check.py). Not run or timed yet: no GPU so far.
#include "lora_cutlass.cuh"

#include <cute/tensor.hpp>
#include <cutlass/gemm/collective/collective_mma.hpp>
#include <cutlass/gemm/dispatch_policy.hpp>
#include <cutlass/numeric_types.h>

namespace lk {
namespace lora_detail {
namespace {

using namespace cute;

template <typename T> struct Sm80Types;
template <> struct Sm80Types<__half> {
  using E = cutlass::half_t;
  using Atom = SM80_16x8x16_F32F16F16F32_TN;
};
template <> struct Sm80Types<__nv_bfloat16> {
  using E = cutlass::bfloat16_t;
  using Atom = SM80_16x8x16_F32BF16BF16F32_TN;
};

template <typename T>
struct Sm80Config {
  using E = typename Sm80Types<T>::E;
  using TileShape = Shape<_128, _128, _64>;
  static constexpr int BM = 128, BN = 128;
  using StrideK = cute::Stride<int64_t, _1, int64_t>;  // (row, k, batch): both operands K-major
  using TiledMma = TiledMMA<MMA_Atom<typename Sm80Types<T>::Atom>, Layout<Shape<_2, _4, _1>>, Tile<_32, _64, _16>>;
  // 8 rows of 64 k (128 bytes), XOR-swizzled so that ldmatrix's eight 16-byte rows hit distinct banks
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, cute::Stride<_64, _1>>{}));
  // 256 threads × 8 elements (16 bytes): 32 rows × 64 k per copy
  using GmemCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEALWAYS<uint128_t>, E>{},
                                            Layout<Shape<_32, _8>, cute::Stride<_8, _1>>{}, Layout<Shape<_1, _8>>{}));
  using SmemCopy = Copy_Atom<SM75_U32x4_LDSM_N, E>;
  using Mainloop = cutlass::gemm::collective::CollectiveMma<
      cutlass::gemm::MainloopSm80CpAsync<3>, TileShape, E, StrideK, E, StrideK, TiledMma, GmemCopy, SmemAtom, SmemCopy,
      cute::identity, GmemCopy, SmemAtom, SmemCopy, cute::identity>;
  static constexpr int kThreads = size(TiledMma{});
  static constexpr int kSmem = static_cast<int>(sizeof(typename Mainloop::SharedStorage));
  static_assert(kThreads == 256, "2x4 warps");
};

// acc += A Bᵀ over one tile row of A [rows_a, K] and one of B [rows_b, K], both K-major.
template <typename C, typename Acc>
__device__ __forceinline__ void mainloop(Acc& acc, const typename C::E* a, int64_t lda, const typename C::E* b,
                                         int64_t ldb, int rows_a, int rows_b, int K, int tile_m, int tile_n,
                                         char* smem) {
  Tensor mA = make_tensor(make_gmem_ptr(a), make_shape(rows_a, K), make_stride(lda, _1{}));
  Tensor mB = make_tensor(make_gmem_ptr(b), make_shape(rows_b, K), make_stride(ldb, _1{}));
  Tensor gA = local_tile(mA, select<0, 2>(typename C::TileShape{}), make_coord(tile_m, _));  // (BM, BK, k)
  Tensor gB = local_tile(mB, select<1, 2>(typename C::TileShape{}), make_coord(tile_n, _));  // (BN, BK, k)
  // rows left from this tile on, and K - BK·⌈K/BK⌉ <= 0: the collective reads the partial k-tile first
  auto residue = make_tuple(rows_a - tile_m * C::BM, rows_b - tile_n * C::BN, K - int(size<1>(gA)) * int(size<2>(gA)));
  typename C::Mainloop collective;
  collective(acc, gA, gB, acc, make_coord_iterator(shape<2>(gA)), int(size<2>(gA)), residue, int(threadIdx.x), smem);
}

template <typename T>
__global__ void __launch_bounds__(256, 1) lora_sm80_kernel(const CutlassFwd<T> p) {
// No body in sm_90a code, where lora_sm90.cu's kernel runs instead (lora_cutlass_path): half of
// this file's compile time. A plain sm_90 build keeps it and runs it on H100/H200.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800 && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using C = Sm80Config<T>;
  using E = typename C::E;
  extern __shared__ __align__(128) char smem[];
  const int tile_m = blockIdx.x, tile_n = blockIdx.y;
  const int M = static_cast<int>(p.M), N = static_cast<int>(p.N);

  typename C::TiledMma tiled_mma;
  Tensor acc = partition_fragment_C(tiled_mma, Shape<Int<C::BM>, Int<C::BN>>{});  // (MMA, MMA_M, MMA_N) fp32
  clear(acc);
  mainloop<C>(acc, reinterpret_cast<const E*>(p.x), p.ldx, reinterpret_cast<const E*>(p.w), p.ldw, M, N,
              static_cast<int>(p.K), tile_m, tile_n, smem);
  mainloop<C>(acc, reinterpret_cast<const E*>(p.h), p.rp, reinterpret_cast<const E*>(p.b), p.rp, M, N,
              static_cast<int>(p.rp), tile_m, tile_n, smem);

  // Each accumulator's (row, column) in the tile, from the same partition applied to coordinates.
  Tensor coord = tiled_mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<C::BM>, Int<C::BN>>{}));
  const int64_t i0 = static_cast<int64_t>(tile_m) * C::BM, j0 = static_cast<int64_t>(tile_n) * C::BN;
  CUTLASS_PRAGMA_UNROLL
  for (int e = 0; e < size(acc); ++e) {
    const int64_t i = i0 + get<0>(coord(e)), j = j0 + get<1>(coord(e));
    if (i < p.M && j < p.N) {
      float v = acc(e);
      if (p.bias != nullptr) v += to_acc<float>(p.bias[j]);
      p.y[i * p.N + j] = from_acc<T>(v);
    }
  }
#endif
}

}  // namespace

template <typename T>
bool lora_sm80_ready(int device) {
  int optin = 0;
  cudaFuncAttributes attr{};
  const bool ok = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
                  optin >= Sm80Config<T>::kSmem && cudaFuncGetAttributes(&attr, lora_sm80_kernel<T>) == cudaSuccess;
  if (!ok) (void)cudaGetLastError();  // no image for this device: not an error of the forward
  return ok;
}

template <typename T>
cudaError_t lora_sm80_launch(const CutlassFwd<T>& p, cudaStream_t stream) {
  using C = Sm80Config<T>;
  cudaError_t err = cudaFuncSetAttribute(lora_sm80_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, C::kSmem);
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.M, C::BM)), static_cast<unsigned>(ceil_div(p.N, C::BN)));
  lora_sm80_kernel<T><<<grid, C::kThreads, C::kSmem, stream>>>(p);
  return cudaGetLastError();
}

#define LK_INSTANTIATE_LORA_SM80(T)                      \
  template bool lora_sm80_ready<T>(int);                 \
  template cudaError_t lora_sm80_launch<T>(const CutlassFwd<T>&, cudaStream_t);
LK_INSTANTIATE_LORA_SM80(__half)
LK_INSTANTIATE_LORA_SM80(__nv_bfloat16)
#undef LK_INSTANTIATE_LORA_SM80

}  // namespace lora_detail
}  // namespace lk
