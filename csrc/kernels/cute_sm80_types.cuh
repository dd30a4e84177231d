// The CuTe element type and the sm_80 tensor-core atom (mma.sync m16n8k16 with fp32 accumulators,
// the TN form) of each 16-bit element type: one table for every CuTe kernel here (the sm_80 and
// sm_90a GEMMs take E from it; the atom runs on sm_90 too).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>

namespace lk {

template <typename T> struct CuteSm80;
template <> struct CuteSm80<__half> {
  using E = cutlass::half_t;
  using Atom = cute::SM80_16x8x16_F32F16F16F32_TN;
};
template <> struct CuteSm80<__nv_bfloat16> {
  using E = cutlass::bfloat16_t;
  using Atom = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};

}  // namespace lk
