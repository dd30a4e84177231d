// Shared by the two-launch LoRA path's files (see lora.cu for the plan): lora.cu (launchers),
// lora_gemm.cu (the tiled GEMM) and lora_reduce.cu (rowdot, colsum). Number conversions, the
// dropout generator every kernel that touches drop(x) evaluates, the kernels' parameter blocks
// and their launch entry points.
#pragma once
#include "common.cuh"

#include <type_traits>

namespace lk {
namespace lora_detail {

// ------------------------------------------------------------------------------ numbers

template <typename T>
constexpr bool kLowPrecision = std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <typename D, typename S>
__device__ __forceinline__ D convert(S v) {
  if constexpr (std::is_same_v<D, S>) {
    return v;
  } else if constexpr (kLowPrecision<S>) {
    return static_cast<D>(to_acc<float>(v));
  } else if constexpr (kLowPrecision<D>) {
    return from_acc<D>(static_cast<float>(v));
  } else {
    return static_cast<D>(v);
  }
}

template <typename T>
__device__ __forceinline__ T zero() {
  return convert<T>(0.0f);
}

__device__ __forceinline__ int64_t dmin(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t dceil(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr size_t round128(size_t bytes) { return (bytes + 127) / 128 * 128; }

// ------------------------------------------------------------------------------ dropout

struct Dropout {
  bool on;
  uint32_t k0, k1;     // Philox key
  uint32_t threshold;  // keep when (word >> 1) >= threshold: probability 1 − threshold/2³¹
  int64_t quads;       // ⌈K/4⌉ counters per row of x
};

__device__ __forceinline__ uint4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return make_uint4(c0, c1, c2, c3);
}

// Keep bits of x[row, 4·quad + c] for c = 0..3 (bit c). Column c takes word (0, 2, 1, 3)[c]:
// the order in which the Triton kernels interleave randint4x's four outputs.
__device__ __forceinline__ unsigned keep_quad(const Dropout& d, int64_t row, int64_t quad) {
  const uint64_t ctr = static_cast<uint64_t>(row) * static_cast<uint64_t>(d.quads) + static_cast<uint64_t>(quad);
  const uint4 w = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), d.k0, d.k1);
  const uint32_t t = d.threshold;
  return static_cast<unsigned>((w.x >> 1) >= t) | (static_cast<unsigned>((w.z >> 1) >= t) << 1) |
         (static_cast<unsigned>((w.y >> 1) >= t) << 2) | (static_cast<unsigned>((w.w >> 1) >= t) << 3);
}

// ------------------------------------------------------------------------------ tiled GEMM

// out[i, j] = Σ_k A(i, k)·B(k, j)  +  lr_scale·keep(i, j)·Σ_r L[i, r]·Rt(r, j)  +  bias[j]
// A(i, k) = a[i·a_si + k·a_sk], B(k, j) = b[k·b_sk + j·b_sj]; C is M×N, the reduction has
// length K. L: [M, R] acc_t with row stride l_si; Rt(r, j) = rt[r·rt_sr + j·rt_sj].
template <typename T>
struct GemmParams {
  const T* a;
  int64_t a_si, a_sk;
  const T* b;
  int64_t b_sk, b_sj;
  int64_t M, N, K;
  const acc_t<T>* l;  // nullptr (with R = 0): no low-rank term
  int64_t l_si;
  const T* rt;
  int64_t rt_sr, rt_sj;
  int64_t R;
  acc_t<T> lr_scale;
  Dropout drop;  // mask of the low-rank term at (i, j) = (row of x, column of x)
  const T* bias;  // nullptr: none
  T* out;
  int64_t ldo;
  int64_t tiles_m;
};

// One GEMM, on the wide or the narrow tiles as the shape asks (lora_gemm.cu).
// kAT: A is contiguous along i; kBT: B is contiguous along k.
template <typename T, bool kAT, bool kBT>
cudaError_t launch_gemm(const GemmParams<T>& p, cudaStream_t stream);

// ------------------------------------------------------------------------------ rowdot

// out[m, r] = alpha·Σ_k drop(X[m, k])·Y(r, k), Y(r, k) = y[r·y_sr + k·y_sk]; out [M, R] acc_t.
// One block owns RM rows × RC ranks; its threads stride over groups of four k (one dropout
// draw each), then combine their partial sums in a fixed tree: deterministic.
template <typename T>
struct RowdotParams {
  const T* x;
  int64_t ldx;
  const T* y;
  int64_t y_sr, y_sk;
  acc_t<T>* out;
  int64_t M, K, R;
  acc_t<T> alpha;
  Dropout drop;
};

template <typename T>
cudaError_t launch_rowdot(const RowdotParams<T>& p, cudaStream_t stream);

// ------------------------------------------------------------------------------ colsum

// Σ over rows m of drop(P[m, c])·Q[m, r] for c < C, r < R (Q == nullptr: R = 1, Q ≡ 1).
// Element (c, r) lives at c·o_sc + r·o_sr of a dense C×R output. Row chunk z of the grid
// covers rows [z·chunk, (z+1)·chunk): with one chunk the block writes T(alpha·sum) to out,
// otherwise the raw sum to part[z·C·R + ·] for colsum_finish.
template <typename T>
struct ColsumParams {
  const T* P;
  int64_t ldp;
  const acc_t<T>* Q;
  int64_t ldq;
  int64_t M, C, R, chunk;
  acc_t<T> alpha;
  Dropout drop;
  T* out;
  acc_t<T>* part;
  int64_t o_sc, o_sr;
};

// Row chunks of a colsum: a pure function of the shapes, so the summation order (and the
// bits of the result) never depend on the device.
struct Split {
  int64_t count, chunk;
};

// The split of a colsum over rows for these shapes (lora_reduce.cu: it follows the kernel's block).
template <typename T>
Split colsum_split(int64_t M, int64_t C, int64_t R);

template <typename T>
size_t colsum_part_bytes(const Split& s, int64_t C, int64_t R) {
  return s.count > 1 ? sizeof(acc_t<T>) * static_cast<size_t>(s.count * C * R) : 0;
}

template <typename T>
cudaError_t launch_colsum(ColsumParams<T> p, const Split& split, acc_t<T>* part, cudaStream_t stream);

}  // namespace lora_detail
}  // namespace lk
