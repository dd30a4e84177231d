// InfoNCE forward: the square loss (infonce_fwd) and one direction on a rectangular block
// (infonce_rows_fwd, the distributed loss). See infonce_detail.cuh for the plan.
#include "infonce_mma.cuh"

namespace lk {
namespace infonce_detail {

// Shared memory of fwd_kernel, dynamic: with the MMAs, X's region holds all of its row block's
// chunks when resident (D <= kResidentD), else two stages like Y's (infonce_mma.cuh).
template <typename T>
struct FwdSmem {
  using C = Cfg<T>;
  static constexpr size_t stat = align128(sizeof(typename C::A) * kWarps * C::BT);
  bool x_res;
  size_t y, cm, cl, total;
  __host__ __device__ explicit FwdSmem(int64_t D) {
    if constexpr (C::kMma) {
      x_res = D <= kResidentD;
      y = static_cast<size_t>(x_slots(D)) * kChunkBytes;
      cm = y + kYBytes;
    } else {
      const size_t tile = align128(sizeof(typename C::S) * C::BT * C::LDK);
      x_res = false;
      y = tile;
      cm = 2 * tile;
    }
    cl = cm + stat;
    total = cl + stat;
  }
};
// Largest footprint: 8 resident X chunks (64 KB) + Y's stages (17 KB) + statistics (4 KB) = 85 KB,
// so that two blocks fit an sm_90 SM (228 KB); sm_80 (164 KB) fits two up to D = 448.
static_assert(kResidentChunks * kChunkBytes + kYBytes + 2 * 2048 <= 113 * 1024, "2 blocks per sm_90 SM");

// log-sum-exp of a set of (max, sum) partials m[k·N + j], l[k·N + j], k = 0..K−1, in order.
// Every partial saw at least one finite entry, so its max is finite.
template <typename T>
__device__ __forceinline__ acc_t<T> merge_partials(const acc_t<T>* __restrict__ m,
                                                   const acc_t<T>* __restrict__ l, int64_t K,
                                                   int64_t N, int64_t j) {
  using A = acc_t<T>;
  A M = neg_inf<A>();
  for (int64_t k = 0; k < K; ++k) M = vmax(M, m[k * N + j]);
  A L = A(0);
  for (int64_t k = 0; k < K; ++k) L = vfma(l[k * N + j], ex<T>(m[k * N + j] - M), L);
  return M + lg(L);
}

// lse_row (and lse_col) from the forward's partials; loss term of index j; one sum per block.
// Without column partials (col_m == nullptr: the rows op) the term is lse_row − diag.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(
    const acc_t<T>* __restrict__ row_m, const acc_t<T>* __restrict__ row_l, int64_t Q,
    const acc_t<T>* __restrict__ col_m, const acc_t<T>* __restrict__ col_l, int64_t P,
    const acc_t<T>* __restrict__ diag, acc_t<T> lam, int64_t N, acc_t<T>* __restrict__ lse_row,
    acc_t<T>* __restrict__ lse_col, acc_t<T>* __restrict__ block_part) {
  using A = acc_t<T>;
  __shared__ A red[kWarps];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  A term = A(0);
  if (j < N) {
    const A lr = merge_partials<T>(row_m, row_l, Q, N, j);
    lse_row[j] = lr;
    const A d = diag[j];
    if (col_m != nullptr) {
      const A lc = merge_partials<T>(col_m, col_l, P, N, j);
      lse_col[j] = lc;
      term = lam * (lr - d) + (A(1) - lam) * (lc - d);
    } else {
      term = lr - d;
    }
  }
  term = block_sum(term, red);
  if (threadIdx.x == 0) block_part[blockIdx.x] = term;
}

// ---------------------------------------------------------------- forward tile kernel

// Grid (P, Q): see infonce_detail.cuh's file comment. X: NX rows (image, or the rows op's queries), Y: NY rows
// (text, or keys); row x pairs with column x + doff (0 for the square loss).
// row_m/row_l: [Q][NX] per-column-range row partials; col_m/col_l: [P][NY] per-stripe column
// partials, or nullptr (the rows op needs no column statistics); diag: [NX] the S_x,x+doff
// (written by the one block whose tile holds each).
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) fwd_kernel(
    const T* __restrict__ X, int64_t ldx, const T* __restrict__ Y, int64_t ldy,
    const acc_t<T>* __restrict__ scale_ptr, const acc_t<T>* __restrict__ inv_x,
    const acc_t<T>* __restrict__ inv_y, int64_t NX, int64_t NY, int64_t doff, int64_t D, bool vx,
    bool vy, acc_t<T>* __restrict__ row_m, acc_t<T>* __restrict__ row_l,
    acc_t<T>* __restrict__ col_m, acc_t<T>* __restrict__ col_l, acc_t<T>* __restrict__ diag) {
  using C = Cfg<T>;
  using A = acc_t<T>;
  constexpr int TM = C::TM, BT = C::BT;
  extern __shared__ __align__(1024) unsigned char smem[];
  const FwdSmem<T> L(D);
  A* s_cm = reinterpret_cast<A*>(smem + L.cm);  // [warp][column] tile column max
  A* s_cl = reinterpret_cast<A*>(smem + L.cl);  // [warp][column] tile column sum

  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t nrb = (NX + BT - 1) / BT, ncb = (NY + BT - 1) / BT;
  const int64_t P = gridDim.x, Q = gridDim.y, p = blockIdx.x, q = blockIdx.y;
  const int64_t cb_begin = q * ncb / Q, cb_end = (q + 1) * ncb / Q;
  const A c = *scale_ptr;
  const A ninf = neg_inf<A>();

  for (int64_t rb = p; rb < nrb; rb += P) {
    const bool first = rb == p;  // this block's first visit to its column partials
    const int64_t row0 = rb * BT;
    bool rv[TM];
    A ax[TM], m[TM], l[TM];
#pragma unroll
    for (int a = 0; a < TM; ++a) {
      const int64_t row = row0 + ty + 16 * a;
      rv[a] = row < NX;
      ax[a] = (inv_x != nullptr && rv[a]) ? inv_x[row] : A(1);
      m[a] = ninf;
      l[a] = A(0);
    }
    for (int64_t cb = cb_begin; cb < cb_end; ++cb) {
      const int64_t col0 = cb * BT;
      A s[TM][TM];
      // A resident X is loaded with this block's first column tile of each row block.
      dot_tile<T>(s, smem, smem + L.y, X, ldx, Y, ldy, row0, col0, NX, NY, D, vx, vy, L.x_res,
                  !L.x_res || cb == cb_begin);
      bool cv[TM];
      A by[TM];
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        const int64_t col = col0 + tx + 16 * b;
        cv[b] = col < NY;
        by[b] = (inv_y != nullptr && cv[b]) ? inv_y[col] : A(1);
      }
      // Entries outside the NX×NY matrix become −inf, i.e. exp() = 0 below.
#pragma unroll
      for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int b = 0; b < TM; ++b)
          s[a][b] = (rv[a] && cv[b]) ? c * (s[a][b] * (ax[a] * by[b])) : ninf;
      // Tile entry (a, b) is on the diagonal col = row + doff when tx + 16b = ty + 16a + dd.
      const int64_t dd = row0 + doff - col0;
      if (dd > -BT && dd < BT) {
#pragma unroll
        for (int a = 0; a < TM; ++a)
#pragma unroll
          for (int b = 0; b < TM; ++b)
            if (rv[a] && cv[b] && tx + 16 * b == ty + 16 * a + dd)
              diag[row0 + ty + 16 * a] = s[a][b];
      }

      // Rows: the 16 lanes sharing ty hold a whole tile row between them. The reference point
      // mr is 0 for a row with no valid entry yet so that exp(−inf − mr) = 0, never NaN.
#pragma unroll
      for (int a = 0; a < TM; ++a) {
        A tmax = s[a][0];
#pragma unroll
        for (int b = 1; b < TM; ++b) tmax = vmax(tmax, s[a][b]);
        tmax = group_max(tmax, 16);
        const A mn = vmax(m[a], tmax);
        const A mr = mn == ninf ? A(0) : mn;
        A sum = A(0);
#pragma unroll
        for (int b = 0; b < TM; ++b) sum += ex<T>(s[a][b] - mr);
        sum = group_sum(sum, 16);
        l[a] = vfma(l[a], ex<T>(m[a] - mr), sum);
        m[a] = mn;
      }

      // Uniform over the block: every thread skips the barriers below together.
      if (col_m == nullptr) continue;

      // Columns: a tile column spans all 16 ty values, i.e. both halves of every warp and all
      // warps: reduce over a, then lanes ±16, then warps through shared memory.
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        A v = s[0][b];
#pragma unroll
        for (int a = 1; a < TM; ++a) v = vmax(v, s[a][b]);
        v = vmax(v, __shfl_xor_sync(0xffffffffu, v, 16));
        if (lane < 16) s_cm[warp * BT + tx + 16 * b] = v;
      }
      __syncthreads();
#pragma unroll
      for (int b = 0; b < TM; ++b) {
        A cmax = ninf;
        for (int w = 0; w < kWarps; ++w) cmax = vmax(cmax, s_cm[w * BT + tx + 16 * b]);
        const A mr = cmax == ninf ? A(0) : cmax;
        A v = A(0);
#pragma unroll
        for (int a = 0; a < TM; ++a) v += ex<T>(s[a][b] - mr);
        v += __shfl_xor_sync(0xffffffffu, v, 16);
        if (lane < 16) s_cl[warp * BT + tx + 16 * b] = v;
      }
      __syncthreads();
      if (threadIdx.x < BT) {
        const int64_t col = col0 + threadIdx.x;
        if (col < NY) {
          // Row row0 < N is in every tile of this block, so cmax is finite.
          A cmax = ninf, lt = A(0);
          for (int w = 0; w < kWarps; ++w) cmax = vmax(cmax, s_cm[w * BT + threadIdx.x]);
          for (int w = 0; w < kWarps; ++w) lt += s_cl[w * BT + threadIdx.x];
          const int64_t idx = p * NY + col;
          if (first) {
            col_m[idx] = cmax;
            col_l[idx] = lt;
          } else {
            const A mo = col_m[idx], lo = col_l[idx];
            const A mn = vmax(mo, cmax);
            col_l[idx] = lo * ex<T>(mo - mn) + lt * ex<T>(cmax - mn);
            col_m[idx] = mn;
          }
        }
      }
      // The next tile's dot_tile begins with a barrier before s_cm/s_cl can be rewritten.
    }
    if (tx == 0) {
#pragma unroll
      for (int a = 0; a < TM; ++a) {
        if (rv[a]) {
          const int64_t row = row0 + ty + 16 * a;
          row_m[q * NX + row] = m[a];
          row_l[q * NX + row] = l[a];
        }
      }
    }
  }
}

// Forward grid (P row stripes, Q column ranges) as a function of the sizes alone.
template <typename T>
void fwd_grid(int64_t NX, int64_t NY, int64_t& P, int64_t& Q) {
  const int64_t nrb = ceil_div(NX, Cfg<T>::BT), ncb = ceil_div(NY, Cfg<T>::BT);
  P = nrb < kFwdBlocks ? nrb : kFwdBlocks;
  Q = nrb >= kFwdBlocks ? 1 : (kFwdBlocks + nrb - 1) / nrb;
  if (Q > ncb) Q = ncb;
  if (P < 1) P = 1;
  if (Q < 1) Q = 1;
}

// X: NX rows, Y: NY rows; column partials only for the square loss (cols).
template <typename T>
struct FwdWs {
  using A = acc_t<T>;
  A *inv_x, *inv_y, *diag, *row_m, *row_l, *col_m, *col_l, *block_part;
  size_t bytes;
  FwdWs(void* base, int64_t NX, int64_t NY, bool cols) {
    int64_t P, Q;
    fwd_grid<T>(NX, NY, P, Q);
    const size_t nx = static_cast<size_t>(NX), ny = static_cast<size_t>(NY);
    Carver cv{static_cast<char*>(base)};
    inv_x = cv.take<A>(nx);
    inv_y = cv.take<A>(ny);
    diag = cv.take<A>(nx);
    row_m = cv.take<A>(static_cast<size_t>(Q) * nx);
    row_l = cv.take<A>(static_cast<size_t>(Q) * nx);
    col_m = cols ? cv.take<A>(static_cast<size_t>(P) * ny) : nullptr;
    col_l = cols ? cv.take<A>(static_cast<size_t>(P) * ny) : nullptr;
    block_part = cv.take<A>(static_cast<size_t>(ceil_div(NX, kThreads)));
    bytes = cv.off;
  }
};

// The forward of both ops: X (NX rows) against Y (NY rows), row x paired with column x + doff.
// With lse_col: the square loss, Σ_x [λ(lse_row − diag) + (1−λ)(lse_col − diag)] / denom;
// without: Σ_x (lse_row − diag) / denom (the rows op).
template <typename T>
cudaError_t forward(const T* X, int64_t ldx, const T* Y, int64_t ldy, const acc_t<T>* scale,
                    acc_t<T>* loss, acc_t<T>* lse_row, acc_t<T>* lse_col, int64_t NX, int64_t NY,
                    int64_t doff, int64_t D, double lambda, double denom, bool normalize,
                    void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  const bool cols = lse_col != nullptr;
  FwdWs<T> ws(workspace, NX, NY, cols);
  cudaError_t e;
  if (normalize) {
    if ((e = launch_inv_norms(X, ldx, NX, D, ws.inv_x, stream)) != cudaSuccess) return e;
    if ((e = launch_inv_norms(Y, ldy, NY, D, ws.inv_y, stream)) != cudaSuccess) return e;
  }
  int64_t P, Q;
  fwd_grid<T>(NX, NY, P, Q);
  const FwdSmem<T> L(D);
  if (L.total > 48 * 1024 &&
      (e = cudaFuncSetAttribute(fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                static_cast<int>(L.total))) != cudaSuccess)
    return e;
  fwd_kernel<T><<<dim3(static_cast<unsigned>(P), static_cast<unsigned>(Q)), kThreads, L.total, stream>>>(
      X, ldx, Y, ldy, scale, normalize ? ws.inv_x : nullptr, normalize ? ws.inv_y : nullptr, NX, NY,
      doff, D, vec_ok(X, ldx, D), vec_ok(Y, ldy, D), ws.row_m, ws.row_l, ws.col_m, ws.col_l, ws.diag);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  const int64_t nb = ceil_div(NX, kThreads);
  combine_kernel<T><<<static_cast<unsigned>(nb), kThreads, 0, stream>>>(
      ws.row_m, ws.row_l, Q, ws.col_m, ws.col_l, P, ws.diag, static_cast<A>(lambda), NX, lse_row,
      lse_col, ws.block_part);
  if ((e = cudaGetLastError()) != cudaSuccess) return e;
  return launch_sum<A>(ws.block_part, nb, nullptr, static_cast<A>(denom), loss, stream);
}

}  // namespace infonce_detail

template <typename T>
size_t infonce_fwd_workspace(int64_t N, int64_t D) {
  (void)D;
  if (N <= 0) return 0;
  return infonce_detail::FwdWs<T>(nullptr, N, N, true).bytes;
}

template <typename T>
cudaError_t infonce_fwd(const T* image, int64_t ldi, const T* text, int64_t ldt,
                        const acc_t<T>* logit_scale, acc_t<T>* loss, acc_t<T>* lse_row,
                        acc_t<T>* lse_col, int64_t N, int64_t D, double lambda, bool normalize,
                        void* workspace, cudaStream_t stream) {
  using A = acc_t<T>;
  if (N < 0 || D < 0 || ldi < 0 || ldt < 0) return cudaErrorInvalidValue;
  if (N == 0) {  // the reference's 0/max(N, 1): an empty batch has loss 0
    const cudaError_t e = infonce_detail::zero_fill(loss, sizeof(A), stream);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
  if (workspace == nullptr || image == nullptr || text == nullptr || logit_scale == nullptr ||
      loss == nullptr || lse_row == nullptr || lse_col == nullptr)
    return cudaErrorInvalidValue;
  return infonce_detail::forward<T>(image, ldi, text, ldt, logit_scale, loss, lse_row, lse_col, N, N,
                                    0, D, lambda, static_cast<double>(N), normalize, workspace,
                                    stream);
}

template <typename T>
size_t infonce_rows_fwd_workspace(int64_t M, int64_t N, int64_t D) {
  (void)D;
  if (M <= 0 || N <= 0) return 0;
  return infonce_detail::FwdWs<T>(nullptr, M, N, false).bytes;
}

template <typename T>
cudaError_t infonce_rows_fwd(const T* queries, int64_t ldq, const T* keys, int64_t ldk,
                             const acc_t<T>* logit_scale, acc_t<T>* part, acc_t<T>* lse, int64_t M,
                             int64_t N, int64_t D, int64_t offset, bool normalize, void* workspace,
                             cudaStream_t stream) {
  using A = acc_t<T>;
  if (M < 0 || D < 0 || ldq < 0 || ldk < 0 || offset < 0 || offset > N - M)
    return cudaErrorInvalidValue;
  if (M == 0) {  // a sum over no query rows
    const cudaError_t e = infonce_detail::zero_fill(part, sizeof(A), stream);
    return e != cudaSuccess ? e : cudaGetLastError();
  }
  if (workspace == nullptr || queries == nullptr || keys == nullptr || logit_scale == nullptr ||
      part == nullptr || lse == nullptr)
    return cudaErrorInvalidValue;
  return infonce_detail::forward<T>(queries, ldq, keys, ldk, logit_scale, part, lse, nullptr, M, N,
                                    offset, D, 1.0, static_cast<double>(N), normalize, workspace,
                                    stream);
}

#define LK_INFONCE_INSTANTIATE(T)                                                                  \
  template size_t infonce_fwd_workspace<T>(int64_t, int64_t);                                      \
  template cudaError_t infonce_fwd<T>(const T*, int64_t, const T*, int64_t, const acc_t<T>*,       \
                                      acc_t<T>*, acc_t<T>*, acc_t<T>*, int64_t, int64_t, double,   \
                                      bool, void*, cudaStream_t);                                  \
  template size_t infonce_rows_fwd_workspace<T>(int64_t, int64_t, int64_t);                        \
  template cudaError_t infonce_rows_fwd<T>(const T*, int64_t, const T*, int64_t, const acc_t<T>*,  \
                                           acc_t<T>*, acc_t<T>*, int64_t, int64_t, int64_t,        \
                                           int64_t, bool, void*, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INFONCE_INSTANTIATE)
#undef LK_INFONCE_INSTANTIATE

}  // namespace lk
