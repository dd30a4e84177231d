// LoRA linear in plain CUDA: y = x Wᵀ + b + s·(drop(x) Aᵀ) Bᵀ, and its backward.
//
// Structure (the "split" form of the forward: it never recomputes u once per column tile;
// lora_fused.cu's single launch, which does, replaces it where that is cheap: 16-bit, no dropout,
// R <= 16 or one column tile, enough tiles):
//   forward   1. rowdot:  u = drop(x) Aᵀ                      [M, R] acc_t, saved
//             2. gemm:    y = x Wᵀ  + epilogue (s·u Bᵀ + b)   [M, N]
//   backward  1. rowdot:  v = s·g B                           [M, R] acc_t, workspace
//             2. colsum:  dB = s·gᵀu                          [N, R]  (+ db, see 6)
//             3. colsum:  dA = vᵀ drop(x)                     [R, K]
//             (2, 3 on CUTLASS tensor cores where cutlass_wgrad.cuh applies: 16-bit, aligned,
//             sm_80+; dA without dropout only (its mask sits inside the sum); db then comes
//             from dB's GEMM as a column of ones beside u, without reading g again.)
//             4. gemm:    dx = g W  + epilogue drop'(v A)     [M, K]  (if requested)
//             5. gemm:    dW = gᵀ x                           [N, K]  (if requested; on the
//                         CUTLASS kernels of the forward after a transposed copy of g, where
//                         16-bit and M, K, ldx multiples of 8 (lora_cutlass.cu); else
//                         lora_gemm.cu's WMMA GEMM. Not cutlass_wgrad.cuh: a full [N, K] output
//                         is not the narrow product its tiles are for (they would read x N/64
//                         times); not cuBLAS: it picks split-K by device, against the
//                         determinism rule below)
//             6. colsum:  db = Σ_rows g                       [N]     (if requested)
// One tiled GEMM template serves every large product: tensor cores (WMMA 16×16×16, fp32
// accumulators) for half/bf16, a register-tiled CUDA-core loop for float/double (fp32 stays
// fp32: no TF32). Its epilogue adds an optional low-rank term L·Rt (R in chunks, acc_t
// arithmetic) with an optional dropout mask and scale, and an optional bias.
// Files: this one holds the plan (workspace, dropout key) and the launchers; lora_gemm.cu the
// GEMM, lora_reduce.cu rowdot and colsum, lora_common.cuh what they share (conversions, the
// dropout generator, the kernels' parameter blocks and entry points).
// Determinism: no atomics anywhere. Each output element of a GEMM or rowdot is owned by one
// block that reduces in a fixed order; colsum reductions over rows are split into a number
// of row chunks that depends on the shapes only, whose partials are summed in chunk order.
//
// Dropout: keep(m, k) comes from Philox4x32-10 keyed on the seed, counter = m·⌈K/4⌉ + k/4;
// one call yields the four words of a group of four columns. The same function is evaluated
// by every kernel that touches drop(x) (rowdot for u, colsum for dA, the dx epilogue), so the
// backward sees exactly the forward's mask without storing it. The key, word order and
// threshold mirror the Triton kernels (lora_kernels/triton/lora.py), so both backends draw
// the same mask for the same seed.
#include "lora.cuh"
#include "lora_common.cuh"
#include "lora_cutlass.cuh"
#include "lora_detail.cuh"
#include "cutlass_wgrad.cuh"

#include <algorithm>
#include <cmath>

namespace lk {
namespace {

using lora_detail::ColsumParams;
using lora_detail::Dropout;
using lora_detail::GemmParams;
using lora_detail::RowdotParams;
using lora_detail::Split;
using lora_detail::colsum_part_bytes;
using lora_detail::colsum_split;
using lora_detail::launch_colsum;
using lora_detail::launch_gemm;
using lora_detail::launch_rowdot;

Dropout make_dropout(double p, uint64_t seed, int64_t K) {
  Dropout d{};
  d.on = p > 0.0;
  if (!d.on) return d;
  // Same key as the Triton backend: bit 62 set on a 62-bit seed (idempotent, so a caller
  // that already applied it gets the same key).
  const uint64_t key = (seed & ((uint64_t{1} << 62) - 1)) | (uint64_t{1} << 62);
  d.k0 = static_cast<uint32_t>(key);
  d.k1 = static_cast<uint32_t>(key >> 32);
  // nearbyint rounds half to even, as Python's round() in the Triton launcher.
  const double t = std::nearbyint(p * 2147483648.0);
  d.threshold = static_cast<uint32_t>(std::min(t, 2147483647.0));
  d.quads = (K + 3) / 4;
  return d;
}

// ------------------------------------------------------------------------------ workspace

constexpr size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

template <typename T>
struct BwdPlan {
  Split dB, dA, db;
  size_t off_dB, off_dA, off_db, bytes;  // v sits at offset 0
};

template <typename T>
BwdPlan<T> plan_bwd(int64_t M, int64_t N, int64_t K, int64_t R) {
  BwdPlan<T> plan;
  plan.dB = colsum_split<T>(M, N, R);
  plan.dA = colsum_split<T>(M, K, R);
  plan.db = colsum_split<T>(M, N, 1);
  plan.off_dB = align256(sizeof(acc_t<T>) * static_cast<size_t>(M * R));
  plan.off_dA = plan.off_dB + align256(colsum_part_bytes<T>(plan.dB, N, R));
  plan.off_db = plan.off_dA + align256(colsum_part_bytes<T>(plan.dA, K, R));
  plan.bytes = plan.off_db + align256(colsum_part_bytes<T>(plan.db, N, 1));
  return plan;
}

// dB (with the ones column for db) and dA on cutlass_wgrad.cuh's GEMM: one region for both.
template <typename T>
size_t wgrad_bytes(int64_t M, int64_t N, int64_t K, int64_t R) {
  return std::max(wgrad::wgrad_workspace<T>(M, N, R, true, false), wgrad::wgrad_workspace<T>(M, K, R, false, false));
}

bool bad_sizes(int64_t M, int64_t N, int64_t K, int64_t R, double dropout_p) {
  return M < 0 || N < 0 || K < 0 || R < 0 || !(dropout_p >= 0.0 && dropout_p < 1.0);
}

}  // namespace

// ------------------------------------------------------------------------------ launchers

template <typename T>
cudaError_t lora_fwd(const T* x, int64_t ldx, const T* weight, int64_t ldw, const T* bias, const T* lora_A,
                     const T* lora_B, T* y, acc_t<T>* u, int64_t M, int64_t N, int64_t K, int64_t R,
                     double scaling, double dropout_p, uint64_t seed, void* workspace, cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (bad_sizes(M, N, K, R, dropout_p) || ldx < 0 || ldw < 0) return cudaErrorInvalidValue;
  if (M == 0) return cudaGetLastError();
  const Dropout drop = make_dropout(dropout_p, seed, K);
  // CUTLASS first where it applies (lora_cutlass.cuh: 16-bit, aligned, sm_80+; split-K at small M)
  const lora_detail::CutlassPath cutlass =
      drop.on ? lora_detail::CutlassPath::none
              : lora_detail::lora_cutlass_path<T>(x, ldx, weight, ldw, M, N, K, R, workspace);
  if (!drop.on && cutlass == lora_detail::CutlassPath::none) {  // lora_fused.cu: 16-bit, R <= 64, ...
    const cudaError_t fused = lora_detail::lora_fwd_fused<T>(x, ldx, weight, ldw, bias, lora_A, lora_B, y, u,
                                                             M, N, K, R, scaling, stream);
    if (fused != cudaErrorNotSupported) return fused;
  }

  RowdotParams<T> down{};
  down.x = x;
  down.ldx = ldx;
  down.y = lora_A;  // Y(r, k) = A[r, k]
  down.y_sr = K;
  down.y_sk = 1;
  down.out = u;
  down.M = M;
  down.K = K;
  down.R = R;
  down.alpha = static_cast<Acc>(drop.on ? 1.0 / (1.0 - dropout_p) : 1.0);
  down.drop = drop;
  cudaError_t err = launch_rowdot(down, stream);
  if (err != cudaSuccess) return err;
  if (cutlass != lora_detail::CutlassPath::none)
    return lora_detail::lora_fwd_cutlass<T>(cutlass, x, ldx, weight, ldw, bias, lora_B, y, u, M, N, K, R, scaling,
                                            workspace, stream);

  GemmParams<T> gp{};
  gp.a = x;  // A(m, k) = x[m, k]
  gp.a_si = ldx;
  gp.a_sk = 1;
  gp.b = weight;  // B(k, n) = W[n, k]
  gp.b_sk = 1;
  gp.b_sj = ldw;
  gp.M = M;
  gp.N = N;
  gp.K = K;
  gp.l = R > 0 ? u : nullptr;
  gp.l_si = R;
  gp.rt = lora_B;  // Rt(r, n) = B[n, r]
  gp.rt_sr = 1;
  gp.rt_sj = R;
  gp.R = R;
  gp.lr_scale = static_cast<Acc>(scaling);
  gp.drop = Dropout{};
  gp.bias = bias;
  gp.out = y;
  gp.ldo = N;
  err = launch_gemm<T, false, true>(gp, stream);
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

template <typename T>
size_t lora_bwd_workspace(int64_t M, int64_t N, int64_t K, int64_t R) {
  if (bad_sizes(M, N, K, R, 0.0)) return 0;
  // dx's after lora.cu's, then the weight gradients' (dB's then dA's on one stream: they share it)
  return plan_bwd<T>(M, N, K, R).bytes + lora_detail::lora_dx_cutlass_workspace<T>(M, N, K, R) +
         wgrad_bytes<T>(M, N, K, R);
}

template <typename T>
cudaError_t lora_bwd(const T* g, const T* x, int64_t ldx, const T* weight, int64_t ldw, const T* lora_A,
                     const T* lora_B, const acc_t<T>* u, T* dx, T* dA, T* dB, T* dW, T* db, void* workspace,
                     int64_t M, int64_t N, int64_t K, int64_t R, double scaling, double dropout_p, uint64_t seed,
                     cudaStream_t stream) {
  using Acc = acc_t<T>;
  if (bad_sizes(M, N, K, R, dropout_p) || ldx < 0 || ldw < 0) return cudaErrorInvalidValue;
  const BwdPlan<T> plan = plan_bwd<T>(M, N, K, R);
  if (plan.bytes > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  Acc* v = reinterpret_cast<Acc*>(ws);
  const Dropout drop = make_dropout(dropout_p, seed, K);
  const Acc s = static_cast<Acc>(scaling);
  const Acc inv_keep = static_cast<Acc>(drop.on ? 1.0 / (1.0 - dropout_p) : 1.0);

  // v = s·g B: Y(r, n) = B[n, r]
  RowdotParams<T> vp{};
  vp.x = g;
  vp.ldx = N;
  vp.y = lora_B;
  vp.y_sr = 1;
  vp.y_sk = R;
  vp.out = v;
  vp.M = M;
  vp.K = N;
  vp.R = R;
  vp.alpha = s;
  vp.drop = Dropout{};
  cudaError_t err = launch_rowdot(vp, stream);
  if (err != cudaSuccess) return err;

  // dB[n, r] = s·Σ_m g[m, n] u[m, r] (u holds the dropout mask already), and db[n] = Σ_m g[m, n]
  // alongside on the CUTLASS path; then dA[r, k] = Σ_m v[m, r] x[m, k] without dropout.
  void* wg_ws = ws != nullptr && wgrad_bytes<T>(M, N, K, R) > 0
                    ? ws + plan.bytes + lora_detail::lora_dx_cutlass_workspace<T>(M, N, K, R)
                    : nullptr;
  const bool wg_dB = wgrad::wgrad_applies<T>(g, N, M, N, R, db != nullptr, wg_ws);
  const bool wg_dA = !drop.on && wgrad::wgrad_applies<T>(x, ldx, M, K, R, false, wg_ws);
  if (wg_dB) {
    err = wgrad::wgrad<T>(g, N, u, wgrad::kNoAct, M, N, R, scaling, dB, R, 1, db, 1.0, nullptr, wg_ws, stream);
    if (err != cudaSuccess) return err;
  }
  if (wg_dA) {
    err = wgrad::wgrad<T>(x, ldx, v, wgrad::kNoAct, M, K, R, 1.0, dA, 1, K, nullptr, 0.0, nullptr, wg_ws, stream);
    if (err != cudaSuccess) return err;
  }

  ColsumParams<T> cb{};
  cb.P = g;
  cb.ldp = N;
  cb.Q = u;
  cb.ldq = R;
  cb.M = M;
  cb.C = N;
  cb.R = R;
  cb.alpha = s;
  cb.drop = Dropout{};
  cb.out = dB;
  cb.o_sc = R;
  cb.o_sr = 1;
  if (!wg_dB) err = launch_colsum(cb, plan.dB, reinterpret_cast<Acc*>(ws + plan.off_dB), stream);
  if (err != cudaSuccess) return err;

  // dA[r, k] = Σ_m v[m, r] drop(x)[m, k]: the mask inside the sum, 1/(1−p) after it
  ColsumParams<T> ca{};
  ca.P = x;
  ca.ldp = ldx;
  ca.Q = v;
  ca.ldq = R;
  ca.M = M;
  ca.C = K;
  ca.R = R;
  ca.alpha = inv_keep;
  ca.drop = drop;
  ca.out = dA;
  ca.o_sc = 1;
  ca.o_sr = K;
  if (!wg_dA) err = launch_colsum(ca, plan.dA, reinterpret_cast<Acc*>(ws + plan.off_dA), stream);
  if (err != cudaSuccess) return err;

  // dx on CUTLASS (lora_cutlass.cuh) without dropout where it applies, its workspace after lora.cu's
  void* dx_ws = lora_detail::lora_dx_cutlass_workspace<T>(M, N, K, R) > 0 ? ws + plan.bytes : nullptr;
  const lora_detail::CutlassPath dx_cutlass =
      dx == nullptr || drop.on ? lora_detail::CutlassPath::none
                               : lora_detail::lora_dx_cutlass_path<T>(g, weight, ldw, M, N, K, R, dx_ws);
  if (dx_cutlass != lora_detail::CutlassPath::none) {
    err = lora_detail::lora_dx_cutlass<T>(dx_cutlass, g, weight, ldw, lora_A, v, dx, M, N, K, R, dx_ws, stream);
    if (err != cudaSuccess) return err;
  } else if (dx != nullptr) {
    // dx[m, k] = Σ_n g[m, n] W[n, k] + keep(m, k)/(1−p)·Σ_r v[m, r] A[r, k]
    GemmParams<T> gp{};
    gp.a = g;
    gp.a_si = N;
    gp.a_sk = 1;
    gp.b = weight;
    gp.b_sk = ldw;
    gp.b_sj = 1;
    gp.M = M;
    gp.N = K;
    gp.K = N;
    gp.l = R > 0 ? v : nullptr;
    gp.l_si = R;
    gp.rt = lora_A;
    gp.rt_sr = K;
    gp.rt_sj = 1;
    gp.R = R;
    gp.lr_scale = inv_keep;
    gp.drop = drop;
    gp.bias = nullptr;
    gp.out = dx;
    gp.ldo = K;
    err = launch_gemm<T, false, false>(gp, stream);
    if (err != cudaSuccess) return err;
  }

  // dW on CUTLASS where it applies (lora_cutlass.cuh), its workspace after all of the above
  const size_t dw_bytes = dW != nullptr ? lora_detail::lora_dw_cutlass_workspace<T>(M, N, K) : 0;
  err = dw_bytes > 0 && ws != nullptr
            ? lora_detail::lora_dw_cutlass<T>(g, x, ldx, dW, M, N, K, ws + lora_bwd_workspace<T>(M, N, K, R), stream)
            : cudaErrorNotSupported;
  if (err != cudaSuccess && err != cudaErrorNotSupported) return err;
  if (dW != nullptr && err == cudaErrorNotSupported) {
    // dW[n, k] = Σ_m g[m, n] x[m, k]; M = 0 runs an empty reduction, writing zeros
    GemmParams<T> gp{};
    gp.a = g;  // A(n, m) = g[m, n]
    gp.a_si = 1;
    gp.a_sk = N;
    gp.b = x;  // B(m, k) = x[m, k]
    gp.b_sk = ldx;
    gp.b_sj = 1;
    gp.M = N;
    gp.N = K;
    gp.K = M;
    gp.l = nullptr;
    gp.R = 0;
    gp.drop = Dropout{};
    gp.bias = nullptr;
    gp.out = dW;
    gp.ldo = K;
    err = launch_gemm<T, true, false>(gp, stream);
    if (err != cudaSuccess) return err;
  }

  if (db != nullptr && !wg_dB) {
    ColsumParams<T> cd{};
    cd.P = g;
    cd.ldp = N;
    cd.Q = nullptr;
    cd.ldq = 0;
    cd.M = M;
    cd.C = N;
    cd.R = 1;
    cd.alpha = Acc(1);
    cd.drop = Dropout{};
    cd.out = db;
    cd.o_sc = 1;
    cd.o_sr = 0;
    err = launch_colsum(cd, plan.db, reinterpret_cast<Acc*>(ws + plan.off_db), stream);
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

#define LK_LORA_INSTANTIATE(T)                                                                                  \
  template cudaError_t lora_fwd<T>(const T*, int64_t, const T*, int64_t, const T*, const T*, const T*, T*,     \
                                   acc_t<T>*, int64_t, int64_t, int64_t, int64_t, double, double, uint64_t,   \
                                   void*, cudaStream_t);                                                       \
  template size_t lora_bwd_workspace<T>(int64_t, int64_t, int64_t, int64_t);                                   \
  template cudaError_t lora_bwd<T>(const T*, const T*, int64_t, const T*, int64_t, const T*, const T*,         \
                                   const acc_t<T>*, T*, T*, T*, T*, T*, void*, int64_t, int64_t, int64_t,      \
                                   int64_t, double, double, uint64_t, cudaStream_t);
LK_FOR_EACH_TYPE(LK_LORA_INSTANTIATE)
#undef LK_LORA_INSTANTIATE

}  // namespace lk
