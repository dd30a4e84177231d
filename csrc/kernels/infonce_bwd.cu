// InfoNCE backward: the square loss (infonce_bwd) and the rows op's one direction
// (infonce_rows_bwd). See infonce_detail.cuh for the plan.
#include "infonce_mma.cuh"

namespace lk {
namespace infonce_detail {

// Shared memory of grad_kernel<T, DV>, dynamic. MMA: X's region (its row block's chunks, all of
// them when resident: DV = 256 and D <= 256, else two stages), Y's two stages (ending as the fp32 S
// tile), the (b⊙Y) slab chunk of the H·Y phase — over the X/Y stages when X is streamed (never
// live together), from Y's stages on when X is resident (X must outlive it) — then H and the
// block-sum scratch. FMA: one X and one Y tile, the slab chunk over them, H, scratch.
template <typename T, int DV>
struct GradSmem {
  using C = Cfg<T>;
  using S = typename C::S;
  bool x_res;
  size_t y, ys, h, red, total;
  __host__ __device__ explicit GradSmem(int64_t D) {
    size_t tiles, slab_end;
    if constexpr (C::kMma) {
      x_res = DV == 256 && D <= DV;
      y = static_cast<size_t>(x_res ? x_slots(D) : 2) * kChunkBytes;
      ys = x_res ? y : 0;
      tiles = y + kYBytes;
      slab_end = ys + slab_bytes(DV);
      h = tiles > slab_end ? tiles : slab_end;
      red = h + kHBytes;
    } else {
      const size_t tile = align128(sizeof(S) * C::BT * C::LDK);
      x_res = false;
      y = tile;
      ys = 0;
      tiles = 2 * tile;
      slab_end = align128(sizeof(S) * C::KC * C::LDV);
      h = tiles > slab_end ? tiles : slab_end;
      red = h + align128(sizeof(S) * C::BT * C::LDH);
    }
    total = red + align128(sizeof(typename C::A) * kWarps);
  }
  static_assert(C::kMma ? (DV == 256 || DV == 512) : DV == C::DV, "slab width");
};
// The largest (DV = 256 with 4 resident X chunks, or DV = 512): 72 KB, under the 99 KB of every
// sm_80+ GPU; two blocks an SM (for DV = 256's 128 registers) fit sm_80 (164 KB) and sm_90.
static_assert(4 * kChunkBytes + slab_bytes(256) + kHBytes + 128 <= 99 * 1024 &&
                  slab_bytes(512) + kHBytes + 128 <= 99 * 1024,
              "grad_kernel shared memory");

// Turns dẑ (gradient w.r.t. the unit rows, fp32/fp64, contiguous [N, D]) into dx:
// dx = a·(dẑ − ẑ(ẑ·dẑ)) with a = 1/‖x‖, ẑ = a·x. dz may alias out (fp32/fp64 outputs are
// reused as that buffer): each element is read, then written, by the same lane.
template <typename T>
__global__ void __launch_bounds__(kThreads) norm_bwd_kernel(const T* __restrict__ X, int64_t ld,
                                                            const acc_t<T>* __restrict__ inv,
                                                            const acc_t<T>* dz, T* out, int64_t N,
                                                            int64_t D) {
  using A = acc_t<T>;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (row >= N) return;
  const int lane = threadIdx.x & 31;
  const A a = inv[row];
  const A* g = dz + row * D;
  A r = A(0);
  for (int64_t k = lane; k < D; k += 32) r = vfma(a * to_acc<A>(X[row * ld + k]), g[k], r);
  r = group_sum(r, 32);
  for (int64_t k = lane; k < D; k += 32) {
    const A z = a * to_acc<A>(X[row * ld + k]);
    const A v = a * (g[k] - z * r);
    out[row * D + k] = from_acc<T>(v);
  }
}

// ---------------------------------------------------------------- backward tile kernel

// H·Y on CUDA cores: acc[a][j][e] += Σ_k H[ty+16a][k] · Yslab[k][4tx + 64j + e].
template <typename T>
__device__ __forceinline__ void hy_fma(acc_t<T> (&acc)[Cfg<T>::TM][Cfg<T>::TV][4],
                                       const acc_t<T>* sH, const acc_t<T>* sYs, int kc) {
  using C = Cfg<T>;
  using A = acc_t<T>;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
  for (int k = 0; k < C::KC; k += 4) {
    A h[C::TM][4];
#pragma unroll
    for (int a = 0; a < C::TM; ++a) load4(sH + (ty + 16 * a) * C::LDH + kc + k, h[a]);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      A yv[C::TV][4];
#pragma unroll
      for (int j = 0; j < C::TV; ++j) load4(sYs + (k + kk) * C::LDV + 4 * tx + 64 * j, yv[j]);
#pragma unroll
      for (int a = 0; a < C::TM; ++a)
#pragma unroll
        for (int j = 0; j < C::TV; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[a][j][e] = vfma(h[a][kk], yv[j][e], acc[a][j][e]);
    }
  }
}

// Accumulators of the H·Y product on CUDA cores, one D slab of BT rows in the (ty, tx) layout
// (the MMA path's are infonce_mma.cuh's mma16::HY).
template <typename T>
struct HYAcc {
  using C = Cfg<T>;
  using A = acc_t<T>;
  A acc[C::TM][C::TV][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int a = 0; a < C::TM; ++a)
#pragma unroll
      for (int j = 0; j < C::TV; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[a][j][e] = A(0);
  }
  __device__ __forceinline__ void mma(const A* sH, const A* sYs, int kc) {
    hy_fma<T>(acc, sH, sYs, kc);
  }
  // out[row][d] = scale·acc, to T (outT) or to the accumulator type (outA).
  __device__ __forceinline__ void store(A scale, int64_t row0, int64_t d0,
                                        int64_t N, int64_t D, T* outT, A* outA) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int a = 0; a < C::TM; ++a) {
      const int64_t row = row0 + ty + 16 * a;
      if (row >= N) continue;
#pragma unroll
      for (int j = 0; j < C::TV; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t d = d0 + 4 * tx + 64 * j + e;
          if (d >= D) continue;
          const A v = scale * acc[a][j][e];
          if (outT != nullptr) {
            outT[row * D + d] = from_acc<T>(v);
          } else {
            outA[row * D + d] = v;
          }
        }
    }
  }
};

// Grid (row blocks, D slabs). See infonce_detail.cuh's file comment for the roles of (X, Y, lse_x, lse_y, wx,
// wy); X has NX rows, Y has NY, and the −δ sits at column x + doff. A null lse_x (lse_y) drops
// its term, whose weight is then 0 (the rows op has one direction only). do_out = false: only
// Σ G'⊙u (d logit_scale), grid.y must be 1. Outputs [NX, D] contiguous, scaled by c·gloss/denom:
// outT (T, final) or outA (accumulator type, dẑ before the normalisation chain);
// dc_part[row block] (or nullptr) gets Σ G'⊙u of the block's rows.
// 16-bit, DV = 256: two blocks an SM (at most 128 registers; 72 KB of shared memory with X
// resident). DV = 512 (128 accumulators) and the FMA path take what they need, one block.
template <typename T, int DV>
constexpr int grad_min_blocks() { return Cfg<T>::kMma && DV == 256 ? 2 : 1; }

template <typename T, int DV>
__global__ void __launch_bounds__(kThreads, grad_min_blocks<T, DV>()) grad_kernel(
    const T* __restrict__ X, int64_t ldx, const T* __restrict__ Y, int64_t ldy,
    const acc_t<T>* __restrict__ scale_ptr, const acc_t<T>* __restrict__ gloss_ptr,
    const acc_t<T>* __restrict__ inv_x, const acc_t<T>* __restrict__ inv_y,
    const acc_t<T>* __restrict__ lse_x, const acc_t<T>* __restrict__ lse_y, acc_t<T> wx,
    acc_t<T> wy, int64_t NX, int64_t NY, int64_t doff, acc_t<T> denom, int64_t D, bool vx,
    bool vy, bool do_out, T* outT, acc_t<T>* outA, acc_t<T>* __restrict__ dc_part) {
  using C = Cfg<T>;
  using A = acc_t<T>;
  using S = typename C::S;
  using HYT = std::conditional_t<C::kMma, mma16::HY<T, DV>, HYAcc<T>>;
  constexpr int TM = C::TM, BT = C::BT;
  extern __shared__ __align__(1024) unsigned char smem[];
  const GradSmem<T, DV> L(D);
  S* sH = reinterpret_cast<S*>(smem + L.h);
  S* sYs = reinterpret_cast<S*>(smem + L.ys);

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int64_t ncb = (NY + BT - 1) / BT;
  const int64_t rb = blockIdx.x, row0 = rb * BT, d0 = static_cast<int64_t>(blockIdx.y) * DV;
  const A c = *scale_ptr;
  const bool has_x = lse_x != nullptr, has_y = lse_y != nullptr;

  bool rv[TM];
  A ax[TM], lx[TM];
#pragma unroll
  for (int a = 0; a < TM; ++a) {
    const int64_t row = row0 + ty + 16 * a;
    rv[a] = row < NX;
    ax[a] = (inv_x != nullptr && rv[a]) ? inv_x[row] : A(1);
    lx[a] = (has_x && rv[a]) ? lse_x[row] : A(0);
  }
  HYT hy;
  hy.zero();
  A dc = A(0);

  for (int64_t cb = 0; cb < ncb; ++cb) {
    const int64_t col0 = cb * BT;
    A s[TM][TM];
    // Begins with a barrier: the previous H·Y pass is done with sH and the slab chunk.
    // A resident X is loaded with the first column tile and kept for the others.
    dot_tile<T>(s, smem, smem + L.y, X, ldx, Y, ldy, row0, col0, NX, NY, D, vx, vy, L.x_res,
                !L.x_res || cb == 0);
    bool cv[TM];
    A by[TM], ly[TM];
#pragma unroll
    for (int b = 0; b < TM; ++b) {
      const int64_t col = col0 + tx + 16 * b;
      cv[b] = col < NY;
      by[b] = (inv_y != nullptr && cv[b]) ? inv_y[col] : A(1);
      ly[b] = (has_y && cv[b]) ? lse_y[col] : A(0);
    }
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        const bool valid = rv[a] && cv[b];
        const A u = s[a][b] * (ax[a] * by[b]);  // same expression as the forward: same bits
        const A sv = c * u;
        A g = A(0);
        if (has_x) g = wx * ex<T>(sv - lx[a]);
        if (has_y) g = vfma(wy, ex<T>(sv - ly[b]), g);
        if (row0 + ty + 16 * a + doff == col0 + tx + 16 * b) g -= A(1);
        g = valid ? g : A(0);
        if (valid) dc = vfma(g, u, dc);
        // H = G' ∈ [−1, 1]; b_y goes onto the Y slab rows instead (load_tile's rscale): a
        // fp16 H = G'·b_y would fall into subnormals for features of large norm.
        if (do_out) {
          const int r = ty + 16 * a, cc = tx + 16 * b;
          if constexpr (C::kMma) {
            sH[mma16::h_offset(r, cc)] = from_acc_s<S>(g);
          } else {
            sH[r * C::LDH + cc] = from_acc_s<S>(g);
          }
        }
      }
    if (!do_out) continue;
    __syncthreads();  // sH complete; the X/Y tiles (aliased by the slab chunk) no longer read
    if constexpr (C::kMma) {
      // One chunk of all 64 rows; the next dot_tile's opening barrier protects sH and the slab.
      mma16::load_slab<T, DV>(sYs, Y, ldy, col0, NY, d0, D, vy, inv_y);
      __syncthreads();
      hy.mma(sH, sYs);
    } else {
      for (int kc = 0; kc < BT; kc += C::KC) {
        load_tile<T, S, C::KC, C::DV, C::LDV>(sYs, Y, ldy, col0 + kc, NY, d0, D, vy, inv_y);
        __syncthreads();
        hy.mma(sH, sYs, kc);
        __syncthreads();
      }
    }
  }

  if (do_out) {
    const A scale = c * *gloss_ptr / denom;
    hy.store(scale, row0, d0, NX, D, outT, outA);
  }
  if (dc_part != nullptr && blockIdx.y == 0) {
    const A total = block_sum(dc, reinterpret_cast<A*>(smem + L.red));
    if (threadIdx.x == 0) dc_part[rb] = total;
  }
}

template <typename T>
struct BwdWs {
  using A = acc_t<T>;
  A *inv_x, *inv_y, *dc_part, *dz;
  size_t bytes;
  BwdWs(void* base, int64_t NX, int64_t NY, int64_t D) {
    const int64_t n = NX > NY ? NX : NY;
    Carver cv{static_cast<char*>(base)};
    inv_x = cv.take<A>(static_cast<size_t>(NX));
    inv_y = cv.take<A>(static_cast<size_t>(NY));
    dc_part = cv.take<A>(static_cast<size_t>(ceil_div(n, Cfg<T>::BT)));
    // dẑ in the accumulator type for the normalisation chain: 16-bit outputs cannot hold it,
    // fp32/fp64 outputs hold it in place. The passes run one after the other and share it.
    dz = cv.take<A>(sizeof(T) < sizeof(A) ? static_cast<size_t>(n) * static_cast<size_t>(D) : 0);
    bytes = cv.off;
  }
};

// One operand of the backward: n rows z (row stride ld), its inverse norms (normalize), and the
// log-sum-exp of its rows with that direction's weight (lse == nullptr: no direction from it).
template <typename T>
struct Side {
  const T* z;
  int64_t ld, n;
  bool vec;
  const acc_t<T>* inv;
  const acc_t<T>* lse;
  acc_t<T> w;
};

// Gradient w.r.t. the rows of x (against the columns y, −δ at column x + doff) into out
// [x.n, D], or only dc_part (per row block of x) when out is null.
template <typename T>
cudaError_t grad_pass(const Side<T>& x, const Side<T>& y, int64_t doff, double denom,
                      const acc_t<T>* scale, const acc_t<T>* gloss, int64_t D, bool normalize,
                      acc_t<T>* dz, T* out, acc_t<T>* dc_part, cudaStream_t stream) {
  using C = Cfg<T>;
  using A = acc_t<T>;
  const bool do_out = out != nullptr && D > 0;
  if (!do_out && dc_part == nullptr) return cudaSuccess;
  // 16-bit with D > 256: slabs of 512, half the S recomputes (infonce_detail.cuh's Backward).
  constexpr int kWide = C::kMma ? 512 : C::DV;
  const bool wide = do_out && D > C::DV;
  const int64_t nrb = ceil_div(x.n, C::BT), nslab = ceil_div(D, wide ? kWide : C::DV);
  if (nrb > 0x7fffffff || nslab > 65535) return cudaErrorInvalidValue;
  T* outT = nullptr;
  A* outA = nullptr;
  if (do_out) {
    if (!normalize) {
      outT = out;
    } else if constexpr (sizeof(T) < sizeof(A)) {
      outA = dz;
    } else {
      outA = reinterpret_cast<A*>(out);
    }
  }
  const dim3 grid(static_cast<unsigned>(nrb), do_out ? static_cast<unsigned>(nslab) : 1u);
  auto launch = [&](auto kernel, size_t smem) {
    if (smem > 48 * 1024) {
      const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem));
      if (e != cudaSuccess) return e;
    }
    kernel<<<grid, kThreads, smem, stream>>>(x.z, x.ld, y.z, y.ld, scale, gloss, x.inv, y.inv, x.lse,
                                             y.lse, x.w, y.w, x.n, y.n, doff, static_cast<A>(denom), D,
                                             x.vec, y.vec, do_out, outT, outA, dc_part);
    return cudaGetLastError();
  };
  const cudaError_t err = wide ? launch(grad_kernel<T, kWide>, GradSmem<T, kWide>(D).total)
                               : launch(grad_kernel<T, C::DV>, GradSmem<T, C::DV>(D).total);
  if (err != cudaSuccess || !do_out || !normalize) return err;
  norm_bwd_kernel<T><<<static_cast<unsigned>(ceil_div(x.n, kWarps)), kThreads, 0, stream>>>(
      x.z, x.ld, x.inv, outA, out, x.n, D);
  return cudaGetLastError();
}

// The backward of both ops: d a (rows of a against b, −δ at a-row + doff) and d b (the
// transposed problem, −δ at b-row − doff), then d logit_scale = gloss/denom · Σ G'⊙u, taken by
// the first pass that runs (a pass of its own when neither gradient is asked for).
template <typename T>
cudaError_t backward(const acc_t<T>* gloss, Side<T> a, Side<T> b, const acc_t<T>* scale, T* da,
                     T* db, acc_t<T>* dscale, int64_t doff, int64_t D, double denom, bool normalize,
                     void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  BwdWs<T> ws(workspace, a.n, b.n, D);
  cudaError_t e;
  if (normalize) {
    if ((e = launch_inv_norms(a.z, a.ld, a.n, D, ws.inv_x, stream)) != cudaSuccess) return e;
    if ((e = launch_inv_norms(b.z, b.ld, b.n, D, ws.inv_y, stream)) != cudaSuccess) return e;
    a.inv = ws.inv_x;
    b.inv = ws.inv_y;
  }
  A* dc_part = dscale != nullptr ? ws.dc_part : nullptr;
  int64_t dc_blocks = ceil_div(a.n, Cfg<T>::BT);
  if (da != nullptr) {
    e = grad_pass(a, b, doff, denom, scale, gloss, D, normalize, ws.dz, da, dc_part, stream);
    if (e != cudaSuccess) return e;
    dc_part = nullptr;
  }
  if (db != nullptr) {
    e = grad_pass(b, a, -doff, denom, scale, gloss, D, normalize, ws.dz, db, dc_part, stream);
    if (e != cudaSuccess) return e;
    if (dc_part != nullptr) dc_blocks = ceil_div(b.n, Cfg<T>::BT);
    dc_part = nullptr;
  }
  if (dc_part != nullptr) {
    e = grad_pass(a, b, doff, denom, scale, gloss, D, normalize, ws.dz, static_cast<T*>(nullptr),
                  dc_part, stream);
    if (e != cudaSuccess) return e;
  }
  if (dscale != nullptr)
    return launch_sum<A>(ws.dc_part, dc_blocks, gloss, static_cast<A>(denom), dscale, stream);
  return cudaGetLastError();
}

}  // namespace infonce_detail

template <typename T>
size_t infonce_bwd_workspace(int64_t N, int64_t D) {
  if (N <= 0 || D < 0) return 0;
  return infonce_detail::BwdWs<T>(nullptr, N, N, D).bytes;
}

template <typename T>
cudaError_t infonce_bwd(const acc_t<T>* gloss, const T* image, int64_t ldi, const T* text,
                        int64_t ldt, const acc_t<T>* logit_scale, const acc_t<T>* lse_row,
                        const acc_t<T>* lse_col, T* dimage, T* dtext, acc_t<T>* dscale,
                        int64_t N, int64_t D, double lambda, bool normalize, void* workspace,
                        cudaStream_t stream) {
  using namespace infonce_detail;
  using A = acc_t<T>;
  if (N < 0 || D < 0 || ldi < 0 || ldt < 0) return cudaErrorInvalidValue;
  if (N == 0) {
    const cudaError_t e = zero_fill(dscale, sizeof(A), stream);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
  if (workspace == nullptr || gloss == nullptr || image == nullptr || text == nullptr ||
      logit_scale == nullptr || lse_row == nullptr || lse_col == nullptr)
    return cudaErrorInvalidValue;
  // d image: rows of I against T, P_row weighted by λ; d text: rows of T against I, P_col by 1−λ.
  const Side<T> img{image, ldi, N, vec_ok(image, ldi, D), nullptr, lse_row, static_cast<A>(lambda)};
  const Side<T> txt{text, ldt, N, vec_ok(text, ldt, D), nullptr, lse_col,
                    static_cast<A>(1.0 - lambda)};
  return backward<T>(gloss, img, txt, logit_scale, dimage, dtext, dscale, 0, D,
                     static_cast<double>(N), normalize, workspace, stream);
}

template <typename T>
size_t infonce_rows_bwd_workspace(int64_t M, int64_t N, int64_t D) {
  if (M <= 0 || N <= 0 || D < 0) return 0;
  return infonce_detail::BwdWs<T>(nullptr, M, N, D).bytes;
}

template <typename T>
cudaError_t infonce_rows_bwd(const acc_t<T>* gpart, const T* queries, int64_t ldq, const T* keys,
                             int64_t ldk, const acc_t<T>* logit_scale, const acc_t<T>* lse,
                             T* dqueries, T* dkeys, acc_t<T>* dscale, int64_t M, int64_t N, int64_t D,
                             int64_t offset, bool normalize, void* workspace, cudaStream_t stream) {
  using namespace infonce_detail;
  using A = acc_t<T>;
  if (M < 0 || D < 0 || ldq < 0 || ldk < 0 || offset < 0 || offset > N - M)
    return cudaErrorInvalidValue;
  if (M == 0) {  // no query rows: every gradient is a sum over no terms
    cudaError_t e = zero_fill(dscale, sizeof(A), stream);
    const size_t nd = static_cast<size_t>(N) * static_cast<size_t>(D);
    if (e == cudaSuccess) e = zero_fill(dkeys, nd * sizeof(T), stream);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
  if (workspace == nullptr || gpart == nullptr || queries == nullptr || keys == nullptr ||
      logit_scale == nullptr || lse == nullptr)
    return cudaErrorInvalidValue;
  // One direction: G = gpart/N·(P_row − δ(key = query + offset)); the keys carry no log-sum-exp.
  const Side<T> q{queries, ldq, M, vec_ok(queries, ldq, D), nullptr, lse, A(1)};
  const Side<T> k{keys, ldk, N, vec_ok(keys, ldk, D), nullptr, nullptr, A(0)};
  return backward<T>(gpart, q, k, logit_scale, dqueries, dkeys, dscale, offset, D,
                     static_cast<double>(N), normalize, workspace, stream);
}

#define LK_INFONCE_INSTANTIATE(T)                                                                  \
  template size_t infonce_bwd_workspace<T>(int64_t, int64_t);                                      \
  template cudaError_t infonce_bwd<T>(const acc_t<T>*, const T*, int64_t, const T*, int64_t,       \
                                      const acc_t<T>*, const acc_t<T>*, const acc_t<T>*, T*, T*,   \
                                      acc_t<T>*, int64_t, int64_t, double, bool, void*,            \
                                      cudaStream_t);                                               \
  template size_t infonce_rows_bwd_workspace<T>(int64_t, int64_t, int64_t);                        \
  template cudaError_t infonce_rows_bwd<T>(const acc_t<T>*, const T*, int64_t, const T*, int64_t,  \
                                           const acc_t<T>*, const acc_t<T>*, T*, T*, acc_t<T>*,    \
                                           int64_t, int64_t, int64_t, int64_t, bool, void*,        \
                                           cudaStream_t);
LK_FOR_EACH_TYPE(LK_INFONCE_INSTANTIATE)
#undef LK_INFONCE_INSTANTIATE

}  // namespace lk
