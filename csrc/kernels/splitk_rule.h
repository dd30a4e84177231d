// Split-K of the CUTLASS GEMMs (cutlass_sm80.cuh, cutlass_sm90.cuh): how many splits a shape gets
// and which k-tiles each split runs. Plain C++ with no CUDA header, so that
// tests/test_splitk_rule.py compiles it with g++ and checks it against its Python simulation;
// the kernels and the host (lora_cutlass.cu, adapter_cutlass.cu) use these functions and nothing else.
//
// Why: one block per 128×128 output tile, each running the whole K loop, leaves most of an
// H100/H200's 132 SMs idle when there are few tiles (M = 1..512 at N = 4096: 32..128 tiles). With
// S splits, grid (⌈M/128⌉, ⌈N/128⌉, S), split s accumulates a contiguous range of whole k-tiles of
// the first phase (a, b) and writes its fp32 tile to a workspace [S, M, N]; a finish kernel
// (cutlass_splitk.cuh) sums the S partials in the order s = 0..S-1 and applies the epilogue.
//
// The rule depends on the shape only (DESIGN: same result on every device and run, no float
// atomics, a fixed summation order):
//   tiles   = ⌈M/128⌉·⌈N/128⌉,   k_tiles = ⌈K/64⌉ (first phase only)
//   S       = clamp(⌊kSplitTarget / tiles⌋, 1, max(1, ⌊k_tiles / kMinTilesPerSplit⌋))
// kSplitTarget = 132 is the SM count of H100 SXM / H200, fixed (not read from the device) so the
// rounding of a result never depends on the GPU. S·tiles <= 132 whenever S > 1, so the workspace,
// S·M·N floats <= 132·128·128 floats (8.25 MiB), is bounded whatever the shape. Every split gets
// at least kMinTilesPerSplit >= 1 k-tiles (the mainloops have no zero-k-tile case), so no split
// is empty; the pipelines (3 stages on sm_80, 5 on sm_90a) also want a few tiles to overlap.
// Ranges: k_tiles = S·base + extra; split s runs base + (s < extra) tiles from
// s·base + min(s, extra) on. The second, low-rank phase (a2, b2; usually one k-tile) runs in the
// last split, S-1. The partial k-tile (K % 64 != 0) also falls in exactly one split: the first
// one on sm_80 (CUTLASS's cp.async mainloop reads the partial tile first, so element k-ranges
// there start at rem = K - 64·(k_tiles - 1), see sm80_k_begin) and the last on sm_90a (TMA tiles
// start at 0 and zero-fill past K).
// Not timed: no GPU so far; the constants are a starting point for a GPU run to tune.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LK_SPLITK_HD __host__ __device__ __forceinline__
#else
#define LK_SPLITK_HD inline
#endif

namespace lk {
namespace splitk {

constexpr int kTileM = 128, kTileN = 128, kTileK = 64;  // cutlass_sm80.cuh / cutlass_sm90.cuh's tile
constexpr int64_t kSplitTarget = 132;                    // blocks to aim for (H100/H200 SMs), fixed
constexpr int64_t kMinTilesPerSplit = 4;                 // k-tiles per split, at least

LK_SPLITK_HD int64_t k_tiles(int64_t K) { return (K + kTileK - 1) / kTileK; }

// S for an [M, N] output with a first-phase reduction of K (K >= 1).
LK_SPLITK_HD int split_count(int64_t M, int64_t N, int64_t K) {
  const int64_t tiles = ((M + kTileM - 1) / kTileM) * ((N + kTileN - 1) / kTileN);
  const int64_t most = k_tiles(K) / kMinTilesPerSplit;
  int64_t s = tiles > 0 ? kSplitTarget / tiles : 1;
  if (s > most) s = most;
  if (s < 1) s = 1;
  return static_cast<int>(s);
}

// The k-tiles of split s of S: [first, first + count), count >= 1 when S <= k_tiles.
struct TileRange {
  int first, count;
};
LK_SPLITK_HD TileRange split_tiles(int k_tiles, int splits, int s) {
  const int base = k_tiles / splits, extra = k_tiles % splits;
  return {s * base + (s < extra ? s : extra), base + (s < extra ? 1 : 0)};
}

// sm_80: where k-tile t starts in elements when tile 0 is the partial one (rem = K - 64·(k_tiles-1)
// elements, 1..64); split s then runs the sub-GEMM over k in [sm80_k_begin(first),
// sm80_k_begin(first + count)), whose own residue is rem - 64 for s = 0 and 0 for the others.
LK_SPLITK_HD int sm80_k_begin(int K, int t) {
  const int rem = K - kTileK * (static_cast<int>(k_tiles(K)) - 1);
  return t == 0 ? 0 : rem + kTileK * (t - 1);
}

}  // namespace splitk
}  // namespace lk
