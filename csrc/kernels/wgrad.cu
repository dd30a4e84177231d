// Host side of the weight-gradient GEMMs (cutlass_wgrad.cuh): the split over M, the workspace,
// the operand kernel (fp32 → T, ones column, column sums) and the in-order finish.
#include "adapter_detail.cuh"
#include "cutlass_wgrad.cuh"

#include <algorithm>
#include <climits>
#include <type_traits>

namespace lk {
namespace wgrad {
namespace {

constexpr int64_t kBW = 128, kBK = 64;  // cutlass_wgrad_sm80.cuh's tile along w and m

// ------------------------------------------------------------------------------ split over M

// Split count S and rows per split, from the shapes only (never the device), so the order in which
// the partials are added, and the result's bits, are the same on every GPU:
//   S0 = ⌈264 / tiles⌉         264 = 2 blocks on each of an H100's 132 SMs (a fixed target)
//   S <= ⌊kt / 4⌋              at least 4 k-tiles of 64 rows per split (kt = ⌈M/64⌉)
//   S <= ⌊M / (16·RB)⌋         the partials' write + read (8·S·W·NC bytes) stay within a quarter of
//                              the bytes of A (2·M·W) that the GEMM must read anyway
//   S <= 64, S >= 1
// then whole k-tiles per split: chunk = 64·⌈kt/S⌉ rows, S = ⌈kt / (chunk/64)⌉ (no empty split; only
// the last one may hold a partial k-tile). tests/test_wgrad_split.py replays this rule in Python.
struct Split {
  int64_t S, chunk;
};

int64_t rank_tile(int64_t RB) { return RB <= 16 ? 16 : RB <= 32 ? 32 : 64; }
int64_t padded(int64_t R, bool ones) { return (R + (ones ? 1 : 0) + 7) / 8 * 8; }

Split split_m(int64_t M, int64_t W, int64_t RB) {
  constexpr int64_t kTarget = 264, kMinKTiles = 4, kMaxSplits = 64;
  const int64_t tiles = ceil_div(W, kBW) * ceil_div(RB, rank_tile(RB));
  const int64_t kt = std::max<int64_t>(1, ceil_div(M, kBK));
  int64_t S = ceil_div(kTarget, std::max<int64_t>(tiles, 1));
  S = std::min(S, std::max<int64_t>(1, kt / kMinKTiles));
  S = std::min(S, std::max<int64_t>(1, M / (16 * RB)));
  S = std::max<int64_t>(1, std::min(S, kMaxSplits));
  const int64_t per = ceil_div(kt, S);
  return {ceil_div(kt, per), per * kBK};
}

// Rows per block of the operand kernel: at least 128, at most 256 blocks down M (the column-sum
// finish then adds at most 256 partials per column).
int64_t prep_rows(int64_t M) { return std::max<int64_t>(128, (ceil_div(M, 256) + 7) / 8 * 8); }

struct Layout {
  Split split;
  int64_t RB, NC, prep_blocks;
  size_t off_part, off_colsum, bytes;  // B at offset 0
};

template <typename T>
Layout layout(int64_t M, int64_t W, int64_t R, bool ones, bool colsum) {
  Layout l{};
  l.RB = padded(R, ones);
  l.NC = R + (ones ? 1 : 0);
  l.split = split_m(M, W, l.RB);
  l.prep_blocks = ceil_div(M, prep_rows(M));
  l.off_part = round_up_256(sizeof(T) * static_cast<size_t>(M * l.RB));
  l.off_colsum = l.off_part + (l.split.S > 1 ? round_up_256(sizeof(float) * static_cast<size_t>(l.split.S * W * l.NC)) : 0);
  l.bytes = l.off_colsum + (colsum ? round_up_256(sizeof(float) * static_cast<size_t>(l.prep_blocks * R)) : 0);
  return l;
}

// ------------------------------------------------------------------------------ kernels

// b[m, c] = T(f(src[m, c])) for c < R, 1 at c = R when ones, 0 up to RB; 32 columns × `rows` rows a
// block (8 row lanes). colsum: part[blockIdx.y, c] = Σ of the block's src[m, c], the 8 lanes' sums
// added in lane order (fixed), for the in-order finish.
template <typename T>
__global__ void __launch_bounds__(256) operand_kernel(const float* __restrict__ src, int act, int64_t M, int64_t R,
                                                      int64_t RB, bool ones, int64_t rows, T* __restrict__ b,
                                                      float* __restrict__ part) {
  __shared__ float sums[8][32];
  const int tx = threadIdx.x % 32, ty = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * 32 + tx;
  const int64_t m_begin = static_cast<int64_t>(blockIdx.y) * rows, m_end = m_begin + rows < M ? m_begin + rows : M;
  float sum = 0.0f;
  if (c < RB) {
    for (int64_t m = m_begin + ty; m < m_end; m += 8) {
      float v = 0.0f;
      if (c < R) {
        const float s = src[m * R + c];
        sum += s;
        v = act == kNoAct ? s : adapter_detail::act_fwd(s, static_cast<Activation>(act));
      } else if (c == R && ones) {
        v = 1.0f;
      }
      b[m * RB + c] = from_acc<T>(v);
    }
  }
  if (part == nullptr) return;
  sums[ty][tx] = sum;
  __syncthreads();
  if (ty == 0 && c < R) {
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < 8; ++k) total += sums[k][tx];
    part[static_cast<int64_t>(blockIdx.y) * R + c] = total;
  }
}

// e = w·NC + r of part [S, W, NC]: v = Σ_{z=0..S-1} part[z, e] in that order; r < R: out[w·osw + r·osr] =
// T(scale·v), r = R: ones_out[w] = T(ones_scale·v).
template <typename T>
__global__ void __launch_bounds__(256) finish_kernel(const float* __restrict__ part, int64_t S, int64_t W, int64_t NC,
                                                     int64_t R, float scale, T* out, int64_t osw, int64_t osr,
                                                     float ones_scale, T* ones_out) {
  const int64_t n = W * NC;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float v = 0.0f;
    for (int64_t z = 0; z < S; ++z) v += part[z * n + e];
    const int64_t w = e / NC, r = e % NC;
    if (r < R)
      out[w * osw + r * osr] = from_acc<T>(scale * v);
    else
      ones_out[w] = from_acc<T>(ones_scale * v);
  }
}

template <typename T>
cudaError_t launch_finish(const float* part, int64_t S, int64_t W, int64_t NC, int64_t R, double scale, T* out,
                          int64_t osw, int64_t osr, double ones_scale, T* ones_out, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(ceil_div(W * NC, 256), 4096);
  finish_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(part, S, W, NC, R, static_cast<float>(scale),
                                                                      out, osw, osr, static_cast<float>(ones_scale),
                                                                      ones_out);
  return cudaGetLastError();
}

enum class Path { none, sm80, sm90a };

template <typename T, int RT>
Path path_for(int device, int major, int minor, bool tma) {
  (void)minor;
  (void)tma;
#if defined(LK_BUILT_SM90A)
  // a 9.0 device loads the sm_90a cubins, where only the wgmma kernel has a body
  if (major == 9 && minor == 0) return tma && wgrad_sm90_ready<T, RT>(device) ? Path::sm90a : Path::none;
#endif
  return major >= 8 && wgrad_sm80_ready<T, RT>(device) ? Path::sm80 : Path::none;
}

// The kernel the current device runs for B's padded width RB. TMA wants rows that do not overlap
// (lda >= W): x.expand's lda = 0 takes the cp.async kernel, or on sm_90a the old path.
template <typename T>
Path device_path(int64_t RB, int64_t lda, int64_t W) {
  const bool tma = lda >= W;
  int device = 0, major = 0, minor = 0;
  if (!lora_detail::current_capability(device, major, minor)) return Path::none;
  const int64_t rt = rank_tile(RB);
  return rt == 16   ? path_for<T, 16>(device, major, minor, tma)
         : rt == 32 ? path_for<T, 32>(device, major, minor, tma)
                    : path_for<T, 64>(device, major, minor, tma);
}

template <typename T, int RT>
cudaError_t launch_gemm(Path path, const WgradGemm<T>& p, int64_t splits, cudaStream_t stream) {
  if (path == Path::sm90a) return wgrad_sm90_launch<T, RT>(p, splits, stream);
  return wgrad_sm80_launch<T, RT>(p, splits, stream);
}

}  // namespace

template <typename T>
size_t wgrad_workspace(int64_t M, int64_t W, int64_t R, bool ones, bool colsum) {
  if (!is_16bit<T> || M < 1 || W < 1 || R < 1) return 0;
  return layout<T>(M, W, R, ones, colsum).bytes;
}

template <typename T>
bool wgrad_applies(const T* a, int64_t lda, int64_t M, int64_t W, int64_t R, bool ones, const void* workspace) {
  if constexpr (!is_16bit<T>) {
    return false;
  } else {
    // CuTe shapes are int; RB <= R + 8 must fit one too. ldx may be 0 (x.expand: rows overlap, only read).
    if (a == nullptr || workspace == nullptr || M < 1 || W < 1 || R < 1 || M > INT_MAX || W > INT_MAX ||
        R > INT_MAX - 16 || W % 8 != 0 || lda % 8 != 0 || lda < 0 || !aligned16(a) || !aligned16(workspace))
      return false;
    return device_path<T>(padded(R, ones), lda, W) != Path::none;
  }
}

template <typename T>
cudaError_t wgrad(const T* a, int64_t lda, const acc_t<T>* src, int act, int64_t M, int64_t W, int64_t R,
                  double scale, T* out, int64_t osw, int64_t osr, T* ones_out, double ones_scale, T* colsum_out,
                  void* workspace, cudaStream_t stream) {
  if constexpr (!is_16bit<T>) {
    return cudaErrorNotSupported;
  } else {
    const Layout l = layout<T>(M, W, R, ones_out != nullptr, colsum_out != nullptr);
    const Path path = device_path<T>(l.RB, lda, W);
    if (path == Path::none) return cudaErrorNotSupported;  // wgrad_applies said no: nothing launched
    unsigned char* ws = static_cast<unsigned char*>(workspace);
    T* b = reinterpret_cast<T*>(ws);
    float* part = l.split.S > 1 ? reinterpret_cast<float*>(ws + l.off_part) : nullptr;
    float* colsum = colsum_out != nullptr ? reinterpret_cast<float*>(ws + l.off_colsum) : nullptr;
    if (l.prep_blocks > 65535) return cudaErrorInvalidValue;
    const dim3 prep_grid(static_cast<unsigned>(ceil_div(l.RB, 32)), static_cast<unsigned>(l.prep_blocks));
    operand_kernel<T><<<prep_grid, 256, 0, stream>>>(src, act, M, R, l.RB, ones_out != nullptr, prep_rows(M), b,
                                                     colsum);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    if (colsum_out != nullptr) {  // Σ over the operand blocks, in block order
      err = launch_finish<T>(colsum, l.prep_blocks, 1, R, R, 1.0, colsum_out, 0, 1, 0.0, nullptr, stream);
      if (err != cudaSuccess) return err;
    }

    const WgradGemm<T> p{a, lda, b, M, W, l.RB, R, l.NC, l.split.chunk, static_cast<float>(scale), out, osw, osr,
                         static_cast<float>(ones_scale), ones_out, part};
    const int64_t rt = rank_tile(l.RB);
    err = rt == 16   ? launch_gemm<T, 16>(path, p, l.split.S, stream)
          : rt == 32 ? launch_gemm<T, 32>(path, p, l.split.S, stream)
                     : launch_gemm<T, 64>(path, p, l.split.S, stream);
    if (err != cudaSuccess || part == nullptr) return err;
    return launch_finish<T>(part, l.split.S, W, l.NC, R, scale, out, osw, osr, ones_scale, ones_out, stream);
  }
}

#define LK_INSTANTIATE_WGRAD(T)                                                                                \
  template size_t wgrad_workspace<T>(int64_t, int64_t, int64_t, bool, bool);                                   \
  template bool wgrad_applies<T>(const T*, int64_t, int64_t, int64_t, int64_t, bool, const void*);            \
  template cudaError_t wgrad<T>(const T*, int64_t, const acc_t<T>*, int, int64_t, int64_t, int64_t, double, T*,  \
                                int64_t, int64_t, T*, double, T*, void*, cudaStream_t);
LK_FOR_EACH_TYPE(LK_INSTANTIATE_WGRAD)
#undef LK_INSTANTIATE_WGRAD

}  // namespace wgrad
}  // namespace lk
