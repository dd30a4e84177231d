// Host side of the CUTLASS LoRA forward and dx (lora_cutlass.cuh): which kernel applies, the
// workspaces, the low-rank operands. The GEMM kernels live in cutlass_sm80.cuh and cutlass_sm90.cuh
// (instantiated in lora_sm80.cu and lora_sm90.cu).
//
// Cost of computing u in a kernel of its own (lora.cu's rowdot) instead of inside the GEMM: one
// more read of x. At M = 8192, K = 4096 in bf16 that is 67 MB: ~14 µs at 4.8 TB/s (H200) if rowdot
// ran at full bandwidth, against ~350 µs for the main GEMM's 2·M·N·K = 275 GFLOP at N = 4096
// (~790 TFLOP/s), ~4% (arithmetic, not measured: no GPU so far). Computing u inside the GEMM
// would need x·Aᵀ in every column tile's mainloop (lora_fused.cu's design), which CUTLASS's
// collectives do not offer. The second mainloop's ⌈RP/64⌉ k-tiles cost 1/64 of the first's
// ⌈K/64⌉ at K = 4096, r <= 64 (1.6%; the zero columns past r are multiplied too). dx likewise:
// v = s·g B by rowdot (which lora_bwd needs for dA anyway), then g W0 + T(v) A in one GEMM.
#include "lora_cutlass.cuh"
#include "splitk_rule.h"

#include <algorithm>
#include <climits>
#include <type_traits>

namespace lk {
namespace lora_detail {
namespace {

constexpr int64_t kRankPad = 16;      // RP: R rounded up to a multiple of this

int64_t padded_rank(int64_t R) { return (R + kRankPad - 1) / kRankPad * kRankPad; }

// Split-K of an [M, N] output reduced over K (splitk_rule.h) and the bytes of its fp32 partials,
// 0 with one split. The grid's z counts the splits; S·M·N stays below 132·128·128.
int splits_of(int64_t M, int64_t N, int64_t K) { return splitk::split_count(M, N, K); }
size_t partial_bytes(int64_t M, int64_t N, int64_t K) {
  const int S = splits_of(M, N, K);
  return S > 1 ? round_up_256(sizeof(float) * static_cast<size_t>(S) * static_cast<size_t>(M * N)) : 0;
}

// h = T(scale·u) [M, RP] with zeros in the columns R..RP-1, and dst = src zero-padded from
// [src_rows, src_cols] to [dst_rows, dst_cols] (lora_B to [N, RP], or lora_A to [RP, K]): the
// second mainloop then reads whole 16-byte rows and k-tiles (TMA and cp.async want them).
template <typename T>
__global__ void __launch_bounds__(256) lowrank_operands_kernel(const float* __restrict__ u, T* __restrict__ h,
                                                               int64_t M, int64_t R, int64_t RP, float scale,
                                                               const T* __restrict__ src, int64_t src_rows,
                                                               int64_t src_cols, T* __restrict__ dst,
                                                               int64_t dst_rows, int64_t dst_cols) {
  const int64_t nh = M * RP, total = nh + dst_rows * dst_cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (e < nh) {
      const int64_t row = e / RP, r = e % RP;
      h[e] = from_acc<T>(r < R ? scale * u[row * R + r] : 0.0f);
    } else {
      const int64_t row = (e - nh) / dst_cols, col = (e - nh) % dst_cols;
      dst[e - nh] = row < src_rows && col < src_cols ? src[row * src_cols + col] : from_acc<T>(0.0f);
    }
  }
}

template <typename T>
cudaError_t launch_operands(const float* u, T* h, int64_t M, int64_t R, int64_t RP, double scale, const T* src,
                            int64_t src_rows, int64_t src_cols, T* dst, int64_t dst_rows, int64_t dst_cols,
                            cudaStream_t stream) {
  const int64_t total = M * RP + dst_rows * dst_cols;
  const int64_t blocks = std::min<int64_t>((total + 255) / 256, 4096);
  lowrank_operands_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      u, h, M, R, RP, static_cast<float>(scale), src, src_rows, src_cols, dst, dst_rows, dst_cols);
  return cudaGetLastError();
}

// The kernel for a GEMM of M rows, A [M, K] with row stride lda, B with row stride ldb (kBMN:
// N-major, which needs N % 8 == 0 too), per lora_cutlass.cuh's rules.
template <typename T, bool kBMN>
CutlassPath cutlass_path(const void* a, int64_t lda, const void* b, int64_t ldb, int64_t M, int64_t N, int64_t K,
                         int64_t R, const void* workspace) {
  // CuTe shapes are int; the tile grid is (⌈M/128⌉, ⌈N/128⌉, S) with N's count in gridDim.y. Any
  // M >= 1: rows past M are the collectives' residue (predicated cp.async, TMA zero fill); small M
  // gets its blocks from split-K instead of more row tiles.
  if (workspace == nullptr || M < 1 || N < 1 || K < 1 || R < 1 || M > INT_MAX || K > INT_MAX ||
      N > 65535LL * 128 || padded_rank(R) > INT_MAX || lda % 8 != 0 || ldb % 8 != 0 || K % 8 != 0 ||
      (kBMN && N % 8 != 0) || !aligned16(a) || !aligned16(b) || !aligned16(workspace))
    return CutlassPath::none;
  // Rows that overlap (x.expand(M, K): a row stride below the row) are valid input, but not a tensor
  // TMA can describe; they keep the older kernels.
  if (lda < K || ldb < (kBMN ? N : K)) return CutlassPath::none;
  return cutlass_device_path<EpilogueBias<T>, kBMN>();
}

// Two buffers in one workspace: bytes_a at offset 0, the second after it.
template <typename T>
T* second(void* workspace, size_t bytes_a) {
  return reinterpret_cast<T*>(static_cast<unsigned char*>(workspace) + round_up_256(bytes_a));
}

}  // namespace

template <typename T>
CutlassPath lora_cutlass_path(const T* x, int64_t ldx, const T* weight, int64_t ldw, int64_t M, int64_t N,
                              int64_t K, int64_t R, const void* workspace) {
  if constexpr (!is_16bit<T>) {
    return CutlassPath::none;
  } else {
    return cutlass_path<T, false>(x, ldx, weight, ldw, M, N, K, R, workspace);
  }
}

template <typename T>
cudaError_t lora_fwd_cutlass(CutlassPath path, const T* x, int64_t ldx, const T* weight, int64_t ldw,
                             const T* bias, const T* lora_B, T* y, const acc_t<T>* u, int64_t M, int64_t N,
                             int64_t K, int64_t R, double scaling, void* workspace, cudaStream_t stream) {
  if constexpr (!is_16bit<T>) {
    return cudaErrorNotSupported;
  } else {
    const int64_t RP = padded_rank(R);
    T* h = static_cast<T*>(workspace);
    T* bp = second<T>(workspace, sizeof(T) * M * RP);
    cudaError_t err = launch_operands<T>(u, h, M, R, RP, scaling, lora_B, N, R, bp, N, RP, stream);
    if (err != cudaSuccess) return err;
    const CutlassGemm<EpilogueBias<T>> p{x, ldx, weight, ldw, h, RP, bp, RP, {bias, y, N}, M, N, K, RP};
    const SplitK split{second<float>(bp, sizeof(T) * N * RP), splits_of(M, N, K)};
    return cutlass_launch<EpilogueBias<T>, false>(path, p, stream, split);
  }
}

template <typename T>
size_t lora_dx_cutlass_workspace(int64_t M, int64_t N, int64_t K, int64_t R) {
  if (!is_16bit<T> || M < 1 || N < 1 || K < 1 || R < 1) return 0;
  const int64_t RP = padded_rank(R);
  // the GEMM's output is [M, K], its reduction N
  return round_up_256(sizeof(T) * M * RP) + round_up_256(sizeof(T) * RP * K) + partial_bytes(M, K, N);
}

template <typename T>
CutlassPath lora_dx_cutlass_path(const T* g, const T* weight, int64_t ldw, int64_t M, int64_t N, int64_t K,
                                 int64_t R, const void* workspace) {
  if constexpr (!is_16bit<T>) {
    return CutlassPath::none;
  } else {
    // dx [M, K] = g [M, N] · W0 [N, K]: the GEMM's N is K, its reduction N; W0 N-major (kBMN).
    return cutlass_path<T, true>(g, N, weight, ldw, M, K, N, R, workspace);
  }
}

template <typename T>
cudaError_t lora_dx_cutlass(CutlassPath path, const T* g, const T* weight, int64_t ldw, const T* lora_A,
                            const acc_t<T>* v, T* dx, int64_t M, int64_t N, int64_t K, int64_t R, void* workspace,
                            cudaStream_t stream) {
  if constexpr (!is_16bit<T>) {
    return cudaErrorNotSupported;
  } else {
    const int64_t RP = padded_rank(R);
    T* h = static_cast<T*>(workspace);                   // T(v), v already holds s
    T* ap = second<T>(workspace, sizeof(T) * M * RP);   // lora_A [RP, K], zero rows past R
    cudaError_t err = launch_operands<T>(v, h, M, R, RP, 1.0, lora_A, R, K, ap, RP, K, stream);
    if (err != cudaSuccess) return err;
    const CutlassGemm<EpilogueBias<T>> p{g, N, weight, ldw, h, RP, ap, K, {nullptr, dx, K}, M, K, N, RP};
    const SplitK split{second<float>(ap, sizeof(T) * RP * K), splits_of(M, K, N)};
    return cutlass_launch<EpilogueBias<T>, true>(path, p, stream, split);
  }
}

// dW [N, K] = gᵀ x. The kernels take a K-major A only, and both of dW's operands run along M (g [M, N],
// x [M, K]): g is transposed into the workspace (gᵀ [N, M], one read and one write of g, against the
// GEMM's 2·M·N·K FLOP), x is read as it lies, an N-major B (B(n = k, kk = m) = x[m, k], row stride
// ldx). M is the reduction: a multiple of 8 for whole 16-byte rows of gᵀ. The tile grid covers
// [N, K] (split-K over M where tiles are few). lora_gemm.cu's WMMA GEMM stays for the other shapes.
template <typename T>
size_t lora_dw_cutlass_workspace(int64_t M, int64_t N, int64_t K) {
  if (!is_16bit<T> || M < 8 || M % 8 != 0 || N < 1 || K < 8 || K % 8 != 0) return 0;
  return round_up_256(sizeof(T) * N * M) + partial_bytes(N, K, M);
}

// dst [cols, rows] = srcᵀ for 16-bit src [rows, cols]: 32×32 tiles through shared memory (one
// padding column against bank conflicts), bits moved as they are; rows on grid x (M may be large).
__global__ void __launch_bounds__(256) transpose16_kernel(const uint16_t* __restrict__ src, uint16_t* __restrict__ dst,
                                                          int64_t rows, int64_t cols) {
  __shared__ uint16_t tile[32][33];
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * 32, c0 = static_cast<int64_t>(blockIdx.y) * 32;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = src[r * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (c < cols && r < rows) dst[c * rows + r] = tile[threadIdx.x][i];
  }
}

template <typename T>
cudaError_t lora_dw_cutlass(const T* g, const T* x, int64_t ldx, T* dW, int64_t M, int64_t N, int64_t K,
                            void* workspace, cudaStream_t stream) {
  if constexpr (!is_16bit<T>) {
    return cudaErrorNotSupported;
  } else {
    if (workspace == nullptr || lora_dw_cutlass_workspace<T>(M, N, K) == 0 || N > 65535LL * 32)
      return cudaErrorNotSupported;
    T* gt = static_cast<T*>(workspace);  // gᵀ [N, M]
    // the GEMM: rows N, columns K, reduction M; R = 1 stands for "no second phase" in the checks
    const CutlassPath path = cutlass_path<T, true>(gt, M, x, ldx, N, K, M, 1, workspace);
    if (path == CutlassPath::none) return cudaErrorNotSupported;
    const dim3 grid(static_cast<unsigned>(ceil_div(M, 32)), static_cast<unsigned>(ceil_div(N, 32)));
    transpose16_kernel<<<grid, dim3(32, 8), 0, stream>>>(reinterpret_cast<const uint16_t*>(g),
                                                        reinterpret_cast<uint16_t*>(gt), M, N);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    const CutlassGemm<EpilogueBias<T>> p{gt, M, x, ldx, nullptr, 0, nullptr, 0, {nullptr, dW, K}, N, K, M, 0};
    const SplitK split{second<float>(gt, sizeof(T) * N * M), splits_of(N, K, M)};
    return cutlass_launch<EpilogueBias<T>, true>(path, p, stream, split);
  }
}

}  // namespace lora_detail

template <typename T>
size_t lora_dw_workspace(int64_t M, int64_t N, int64_t K) {
  return lora_detail::lora_dw_cutlass_workspace<T>(M, N, K);
}

template <typename T>
size_t lora_fwd_workspace(int64_t M, int64_t N, int64_t K, int64_t R, double dropout_p) {
  if (!is_16bit<T> || dropout_p > 0.0 || M < 1 || N < 1 || K < 1 || R < 1) return 0;
  const int64_t RP = lora_detail::padded_rank(R);
  return round_up_256(sizeof(T) * M * RP) + round_up_256(sizeof(T) * N * RP) +
         lora_detail::partial_bytes(M, N, K);
}

#define LK_INSTANTIATE_LORA_CUTLASS(T)                                                                      \
  template size_t lora_fwd_workspace<T>(int64_t, int64_t, int64_t, int64_t, double);                       \
  template lora_detail::CutlassPath lora_detail::lora_cutlass_path<T>(const T*, int64_t, const T*, int64_t, \
                                                                      int64_t, int64_t, int64_t, int64_t,   \
                                                                      const void*);                         \
  template cudaError_t lora_detail::lora_fwd_cutlass<T>(lora_detail::CutlassPath, const T*, int64_t, const T*, \
                                                        int64_t, const T*, const T*, T*, const acc_t<T>*,   \
                                                        int64_t, int64_t, int64_t, int64_t, double, void*,  \
                                                        cudaStream_t);                                      \
  template size_t lora_detail::lora_dx_cutlass_workspace<T>(int64_t, int64_t, int64_t, int64_t);            \
  template lora_detail::CutlassPath lora_detail::lora_dx_cutlass_path<T>(const T*, const T*, int64_t, int64_t, \
                                                                         int64_t, int64_t, int64_t,         \
                                                                         const void*);                      \
  template cudaError_t lora_detail::lora_dx_cutlass<T>(lora_detail::CutlassPath, const T*, const T*, int64_t,  \
                                                       const T*, const acc_t<T>*, T*, int64_t, int64_t,      \
                                                       int64_t, int64_t, void*, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_LORA_CUTLASS)
#undef LK_INSTANTIATE_LORA_CUTLASS

#define LK_INSTANTIATE_LORA_DW_CUTLASS(T)                                                                   \
  template size_t lora_dw_workspace<T>(int64_t, int64_t, int64_t);                                         \
  template size_t lora_detail::lora_dw_cutlass_workspace<T>(int64_t, int64_t, int64_t);                    \
  template cudaError_t lora_detail::lora_dw_cutlass<T>(const T*, const T*, int64_t, T*, int64_t, int64_t,   \
                                                       int64_t, void*, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_LORA_DW_CUTLASS)
#undef LK_INSTANTIATE_LORA_DW_CUTLASS

}  // namespace lk
