// Adapter backward:
//   dh  = (s·g·W_u) ⊙ act'(h)   [M, R] over K (acc_t, workspace)
//   dW_u = s·gᵀ·act(h), db_u = s·Σ_m g;   dW_d = dhᵀ·x, db_d = Σ_m dh   (split over M)
//   dx  = g + dh·W_d           [M, K] over R
// dh and dx come from adapter_fused.cu's single pass where its tiles fit (R <= 64, the g tile in
// shared memory), else from the CUTLASS kernels where they apply (adapter_bwd_cutlass.cu: 16-bit,
// K and R multiples of 8; split-K where output tiles are few), else from the DhBwd and DxBwd
// GEMMs. The weight gradients come from the tiled GEMM of adapter_gemm.cuh, or, for 16-bit
// operands where cutlass_wgrad.cuh applies (K and ldx multiples of 8, sm_80+), its CUTLASS
// tensor-core GEMM: dW_u from T(act(h)) with a column of ones giving db_u in the same pass, dW_d
// from T(dh) with db_d summed from the fp32 dh.
// Memory traffic of the M×K and M×R operands (e = sizeof(T), a = sizeof(acc_t); each kernel's
// operands counted once, the weights and the [S ≤ 64, K, R] split partials aside):
//   fused dh, dx    reads g MK·e, h MR·a     writes dh MR·a, dx MK·e
//   dW_u, db_u      reads g MK·e, h MR·a
//   dW_d, db_d      reads x MK·e, dh MR·a
// 4·MK·e + 4·MR·a in all, g read twice. The two-GEMM fallback reads g three times (DhBwd,
// dW_u, DxBwd) and dh once more: 5·MK·e + 5·MR·a. bf16, K = 4096, R = 64: 33.8 instead of
// 42.2 KB per row, -20% (arithmetic, not measured: no GPU so far). The CUTLASS dh and dx (R > 64)
// read g three times too (dx's epilogue reads it) and pass T(dh) to dx instead of dh:
// 5·MK·e + 4·MR·a + 2·MR·e, the same bytes as the fallback in 16-bit. g cannot be read once here:
// dW_u sums over rows, dh over columns, and a row-block pass owning dW_u would need a [K, R]
// acc_t partial per block of BM rows (2R/BM times the g bytes it saves: 2x at R = BM = 64), or
// float atomics (not deterministic).
#include "adapter.cuh"
#include "adapter_gemm.cuh"
#include "cutlass_wgrad.cuh"

#include <algorithm>

namespace lk {
namespace {

using adapter_detail::Shape;
using adapter_detail::TileSquare;
using adapter_detail::TileTall;
using adapter_detail::TileWide;
using adapter_detail::act_fwd;
using adapter_detail::act_grad;
using adapter_detail::launch_gemm;
using adapter_detail::valid_act;

// dh[m, r] = s·(Σ_k g[m, k]·W_u[k, r])·act'(h[m, r]). i = m, j = r, p = k.
template <typename T>
struct DhBwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = false, kBUnitJ = true;
  const T* g;     // [M, K]
  const T* wu;    // [K, R]
  const Acc* h;   // [M, R]
  Acc* dh;        // [M, R]
  int64_t K, R;
  Acc scale;
  Activation act;
  __device__ Acc a(int64_t m, int64_t k) const { return to_acc<Acc>(g[m * K + k]); }
  __device__ Acc b(int64_t k, int64_t r) const { return to_acc<Acc>(wu[k * R + r]); }
  __device__ void out(int64_t m, int64_t r, Acc v, int) const {
    dh[m * R + r] = scale * v * act_grad(h[m * R + r], act);
  }
  __device__ void out_row_sum(int64_t, Acc, int) const {}
};

// Where a weight-gradient GEMM split over M puts its results: straight into the T outputs
// (scaled) when there is one split, else into acc_t partials [S, rows, cols] / [S, rows]
// that sum_splits_kernel adds up.
template <typename T>
struct GradSink {
  using Acc = acc_t<T>;
  T* w;           // [rows, cols]
  T* b;           // [rows] or nullptr
  Acc* pw;        // [S, rows, cols]
  Acc* pb;        // [S, rows]
  int64_t rows, cols;
  bool direct;    // S == 1
  Acc scale;
  __device__ void put_w(int64_t i, int64_t j, Acc v, int split) const {
    if (direct) w[i * cols + j] = from_acc<T>(scale * v);
    else pw[(split * rows + i) * cols + j] = v;
  }
  __device__ void put_b(int64_t i, Acc v, int split) const {
    if (direct) b[i] = from_acc<T>(scale * v);
    else pb[split * rows + i] = v;
  }
};

// dW_u[k, r] = s·Σ_m g[m, k]·act(h[m, r]); row sums give db_u[k] = s·Σ_m g[m, k].
// i = k, j = r, p = m.
template <typename T>
struct WuBwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = true, kBUnitJ = true;
  const T* g;     // [M, K]
  const Acc* h;   // [M, R]
  int64_t K, R;
  Activation act;
  GradSink<T> sink;
  __device__ Acc a(int64_t k, int64_t m) const { return to_acc<Acc>(g[m * K + k]); }
  __device__ Acc b(int64_t m, int64_t r) const { return act_fwd(h[m * R + r], act); }
  __device__ void out(int64_t k, int64_t r, Acc v, int split) const { sink.put_w(k, r, v, split); }
  __device__ void out_row_sum(int64_t k, Acc v, int split) const { sink.put_b(k, v, split); }
};

// dW_d[r, k] = Σ_m dh[m, r]·x[m, k]; row sums give db_d[r] = Σ_m dh[m, r]. i = r, j = k,
// p = m.
template <typename T>
struct WdBwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = true, kBUnitJ = true;
  const Acc* dh;  // [M, R]
  const T* x;     // [M, K], row stride ldx
  int64_t ldx, R;
  GradSink<T> sink;
  __device__ Acc a(int64_t r, int64_t m) const { return dh[m * R + r]; }
  __device__ Acc b(int64_t m, int64_t k) const { return to_acc<Acc>(x[m * ldx + k]); }
  __device__ void out(int64_t r, int64_t k, Acc v, int split) const { sink.put_w(r, k, v, split); }
  __device__ void out_row_sum(int64_t r, Acc v, int split) const { sink.put_b(r, v, split); }
};

// dx[m, k] = g[m, k] + Σ_r dh[m, r]·W_d[r, k]. i = m, j = k, p = r.
template <typename T>
struct DxBwd : Shape {
  using Elem = T;
  using Acc = acc_t<T>;
  static constexpr bool kAUnitI = false, kBUnitJ = true;
  const Acc* dh;  // [M, R]
  const T* wd;    // [R, K]
  const T* g;     // [M, K]
  T* dx;          // [M, K]
  int64_t K, R;
  __device__ Acc a(int64_t m, int64_t r) const { return dh[m * R + r]; }
  __device__ Acc b(int64_t r, int64_t k) const { return to_acc<Acc>(wd[r * K + k]); }
  __device__ void out(int64_t m, int64_t k, Acc v, int) const {
    dx[m * K + k] = from_acc<T>(to_acc<Acc>(g[m * K + k]) + v);
  }
  __device__ void out_row_sum(int64_t, Acc, int) const {}
};

// out[e] = scale·Σ_{z<S} part[z, e], z in increasing order.
template <typename T>
__global__ void __launch_bounds__(256)
sum_splits_kernel(const acc_t<T>* __restrict__ part, int S, int64_t n, acc_t<T> scale,
                  T* __restrict__ out) {
  using A = acc_t<T>;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    A s = A(0);
    for (int z = 0; z < S; ++z) s += part[z * n + e];
    out[e] = from_acc<T>(scale * s);
  }
}

template <typename T>
cudaError_t launch_sum_splits(const acc_t<T>* part, int64_t S, int64_t n, double scale, T* out,
                              cudaStream_t stream) {
  const int64_t blocks = ceil_div(n, 256);
  const int64_t grid = blocks < 65536 ? blocks : 65536;
  sum_splits_kernel<T><<<static_cast<unsigned>(grid), 256, 0, stream>>>(
      part, static_cast<int>(S), n, static_cast<acc_t<T>>(scale), out);
  return cudaGetLastError();
}

constexpr int kBK = TileSquare::BK;

// The weight-gradient GEMMs are split over M into S row ranges of `chunk` rows, enough to
// give ~512 blocks with at least 256 rows per range, at most 64 ranges. The same tile count
// holds for dW_u ([K, R]) and dW_d ([R, K]): TileTall and TileWide are transposes.
// Workspace (each piece 256-byte aligned): dh [M, R] (acc_t); T(dh) [M, R] where the CUTLASS path
// can apply (adapter_bwd_cutlass_workspace: 16-bit T, sizes alone; else 0 bytes), written by that
// path only, when dx is asked for: the dx product's A operand; then, when S > 1, the acc_t partials
// of dW_u [S, K, R], db_u [S, K], dW_d [S, R, K], db_d [S, R].
struct BwdLayout {
  int64_t S, chunk;
  size_t dh, dht, pwu, pbu, pwd, pbd, total;  // byte offsets, total size
};

template <typename T>
BwdLayout bwd_layout(int64_t M, int64_t K, int64_t R) {
  BwdLayout l{};
  const int64_t tiles = R <= 16 ? ceil_div(K, TileTall::BM)
                                : ceil_div(K, TileSquare::BM) * ceil_div(R, TileSquare::BN);
  int64_t S = ceil_div(512, tiles);
  const int64_t by_rows = ceil_div(M, 256);
  if (S > by_rows) S = by_rows;
  if (S > 64) S = 64;
  if (S < 1) S = 1;
  l.chunk = ceil_div(ceil_div(M, S), kBK) * kBK;
  l.S = ceil_div(M, l.chunk);
  const size_t a = sizeof(acc_t<T>);
  auto round = [](size_t b) { return (b + 255) / 256 * 256; };
  const size_t nS = l.S > 1 ? static_cast<size_t>(l.S) : 0;
  size_t off = 0;
  l.dh = off;  off += round(static_cast<size_t>(M) * R * a);
  l.dht = off; off += round(adapter_detail::adapter_bwd_cutlass_workspace<T>(M, K, R));
  l.pwu = off; off += round(nS * K * R * a);
  l.pbu = off; off += round(nS * K * a);
  l.pwd = off; off += round(nS * R * K * a);
  l.pbd = off; off += round(nS * R * a);
  l.total = off;
  return l;
}

}  // namespace

template <typename T>
size_t adapter_bwd_workspace(int64_t M, int64_t K, int64_t R) {
  if (M <= 0 || K <= 0 || R <= 0) return 0;
  // then the CUTLASS weight gradients' (dW_u's then dW_d's on one stream: they share it)
  return bwd_layout<T>(M, K, R).total + std::max(wgrad::wgrad_workspace<T>(M, K, R, true, false),
                                                 wgrad::wgrad_workspace<T>(M, K, R, false, true));
}

template <typename T>
cudaError_t adapter_bwd(const T* g, const T* x, int64_t ldx, const T* w_down, const T* w_up,
                        const acc_t<T>* h, T* dx, T* dw_down, T* db_down, T* dw_up, T* db_up,
                        void* workspace, int64_t M, int64_t K, int64_t R, Activation act,
                        double scale, cudaStream_t stream) {
  using A = acc_t<T>;
  if (M < 0 || K < 1 || R < 1 || ldx < 0 || !valid_act(act))
    return cudaErrorInvalidValue;
  if (dw_down == nullptr || dw_up == nullptr) return cudaErrorInvalidValue;
  if (M == 0) {
    // The gradient over an empty batch is zero; all-zero bytes are +0 in every element type.
    const size_t rk = static_cast<size_t>(R) * K * sizeof(T);
    cudaError_t e = cudaMemsetAsync(dw_down, 0, rk, stream);
    if (e == cudaSuccess) e = cudaMemsetAsync(dw_up, 0, rk, stream);
    if (e == cudaSuccess && db_down != nullptr)
      e = cudaMemsetAsync(db_down, 0, static_cast<size_t>(R) * sizeof(T), stream);
    if (e == cudaSuccess && db_up != nullptr)
      e = cudaMemsetAsync(db_up, 0, static_cast<size_t>(K) * sizeof(T), stream);
    return e;
  }
  if (g == nullptr || x == nullptr || w_down == nullptr || w_up == nullptr || h == nullptr ||
      workspace == nullptr)
    return cudaErrorInvalidValue;

  const BwdLayout l = bwd_layout<T>(M, K, R);
  char* ws = static_cast<char*>(workspace);
  A* dh = reinterpret_cast<A*>(ws + l.dh);
  const bool direct = l.S == 1;
  cudaError_t e;

  // dh first: dW_d, db_d and dx read it. Where adapter_fused.cu's tiles fit, one pass makes dh
  // and dx, reading g once for both (first even where CUTLASS would apply: the two products below
  // read g twice, dh's GEMM and dx's epilogue, and pass T(dh) through memory); else the CUTLASS
  // kernels make dh and then dx; else the DhBwd GEMM here and the DxBwd GEMM last.
  e = adapter_detail::adapter_bwd_fused<T>(g, w_down, w_up, h, dh, dx, M, K, R, act, scale, stream);
  if (e != cudaSuccess && e != cudaErrorNotSupported) return e;
  bool dh_dx_done = e == cudaSuccess;
  if (!dh_dx_done) {
    T* dht = l.pwu > l.dht ? reinterpret_cast<T*>(ws + l.dht) : nullptr;  // 0 bytes: CUTLASS cannot apply
    e = adapter_detail::adapter_bwd_cutlass<T>(g, w_down, w_up, h, dh, dht, dx, M, K, R, act, scale, stream);
    if (e != cudaSuccess && e != cudaErrorNotSupported) return e;
    dh_dx_done = e == cudaSuccess;
  }
  if (!dh_dx_done) {
    DhBwd<T> pdh{};
    //                          I  J  P  chunk row_sums j_fastest
    static_cast<Shape&>(pdh) = {M, R, K, K, false, true};
    pdh.g = g, pdh.wu = w_up, pdh.h = h, pdh.dh = dh, pdh.K = K, pdh.R = R;
    pdh.scale = static_cast<A>(scale), pdh.act = act;
    e = R <= 16 ? launch_gemm<TileTall>(pdh, 1, stream) : launch_gemm<TileSquare>(pdh, 1, stream);
    if (e != cudaSuccess) return e;
  }

  // dW_u = s·gᵀ act(h) (db_u = s·Σ g as its ones column), dW_d = dhᵀ x (db_d = Σ dh beside it) on
  // the CUTLASS weight-gradient GEMM where it applies; the split GEMMs below otherwise.
  void* wg_ws = ws + l.total;
  const bool wg_up = wgrad::wgrad_applies<T>(g, K, M, K, R, db_up != nullptr, wg_ws);
  const bool wg_down = wgrad::wgrad_applies<T>(x, ldx, M, K, R, false, wg_ws);
  if (wg_up) {
    e = wgrad::wgrad<T>(g, K, h, static_cast<int>(act), M, K, R, scale, dw_up, R, 1, db_up, scale, nullptr, wg_ws,
                        stream);
    if (e != cudaSuccess) return e;
  }
  if (wg_down) {
    e = wgrad::wgrad<T>(x, ldx, dh, wgrad::kNoAct, M, K, R, 1.0, dw_down, 1, K, nullptr, 0.0, db_down, wg_ws, stream);
    if (e != cudaSuccess) return e;
  }

  WuBwd<T> pwu{};
  static_cast<Shape&>(pwu) = {K, R, M, l.chunk, db_up != nullptr, true};
  pwu.g = g, pwu.h = h, pwu.K = K, pwu.R = R, pwu.act = act;
  pwu.sink = GradSink<T>{dw_up, db_up, reinterpret_cast<A*>(ws + l.pwu),
                         reinterpret_cast<A*>(ws + l.pbu), K, R, direct, static_cast<A>(scale)};
  if (!wg_up) {
    e = R <= 16 ? launch_gemm<TileTall>(pwu, l.S, stream) : launch_gemm<TileSquare>(pwu, l.S, stream);
    if (e != cudaSuccess) return e;
  }

  WdBwd<T> pwd{};
  // Column-tile order: x, the large operand, is B here.
  static_cast<Shape&>(pwd) = {R, K, M, l.chunk, db_down != nullptr, false};
  pwd.dh = dh, pwd.x = x, pwd.ldx = ldx, pwd.R = R;
  pwd.sink = GradSink<T>{dw_down, db_down, reinterpret_cast<A*>(ws + l.pwd),
                         reinterpret_cast<A*>(ws + l.pbd), R, K, direct, A(1)};
  if (!wg_down) {
    e = R <= 16 ? launch_gemm<TileWide>(pwd, l.S, stream) : launch_gemm<TileSquare>(pwd, l.S, stream);
    if (e != cudaSuccess) return e;
  }

  if (!direct) {
    e = cudaSuccess;
    if (!wg_up) e = launch_sum_splits<T>(pwu.sink.pw, l.S, K * R, scale, dw_up, stream);
    if (e == cudaSuccess && db_up != nullptr && !wg_up)
      e = launch_sum_splits<T>(pwu.sink.pb, l.S, K, scale, db_up, stream);
    if (e == cudaSuccess && !wg_down) e = launch_sum_splits<T>(pwd.sink.pw, l.S, R * K, 1.0, dw_down, stream);
    if (e == cudaSuccess && db_down != nullptr && !wg_down)
      e = launch_sum_splits<T>(pwd.sink.pb, l.S, R, 1.0, db_down, stream);
    if (e != cudaSuccess) return e;
  }

  if (dx != nullptr && !dh_dx_done) {
    DxBwd<T> pdx{};
    static_cast<Shape&>(pdx) = {M, K, R, R, false, true};
    pdx.dh = dh, pdx.wd = w_down, pdx.g = g, pdx.dx = dx, pdx.K = K, pdx.R = R;
    e = launch_gemm<TileSquare>(pdx, 1, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

#define LK_INSTANTIATE_ADAPTER(T)                                                               \
  template size_t adapter_bwd_workspace<T>(int64_t, int64_t, int64_t);                          \
  template cudaError_t adapter_bwd<T>(const T*, const T*, int64_t, const T*, const T*,          \
                                      const acc_t<T>*, T*, T*, T*, T*, T*, void*, int64_t,      \
                                      int64_t, int64_t, Activation, double, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_ADAPTER)
#undef LK_INSTANTIATE_ADAPTER

}  // namespace lk
