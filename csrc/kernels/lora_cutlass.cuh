// The LoRA GEMMs on CUTLASS 3.x / CuTe, called by lora_fwd and lora_bwd (lora.cu); half/bf16,
// no dropout. No CUTLASS header here: only cutlass_sm80.cuh and cutlass_sm90.cuh include CUTLASS
// (the kernels, shared with the adapter's forward through an epilogue policy), so lora.cu and
// lora_cutlass.cu compile as before.
//
// forward  1. u = x Aᵀ (fp32, saved for the backward): lora.cu's rowdot, as on the other paths.
//          2. lowrank_operands_kernel (lora_cutlass.cu): h = T(s·u) [M, RP] and a copy of lora_B
//             [N, RP], zero past R (RP = R rounded up to 16), in the forward's workspace: whole
//             16-byte rows whatever R is, as cp.async and TMA need.
//          3. one GEMM kernel per output tile: CUTLASS's mainloop over (x, W0) for ⌈K/64⌉ k-tiles,
//             then the same mainloop over (h, B) for ⌈RP/64⌉ more into the same accumulators,
//             then bias, one rounding and one write of y. Few tiles (small M): split-K
//             (splitk_rule.h), S blocks per tile each over a range of k-tiles, fp32 partials in
//             the workspace, then a finish kernel sums them in a fixed order and adds the bias.
// dx       the same with v = s·g B (lora.cu's rowdot, fp32): dx = g W0 + T(v) A, W0 and A read
//          along their rows (B operand N-major), A copied to [RP, K] with zero rows past R.
// dW       (asked for only when the base weight trains) gᵀ x: g transposed into the workspace
//          as the K-major A, x the N-major B, one phase (K2 = 0); M is the reduction.
// Rows that overlap (a row stride below the row: x.expand) keep the older kernels: TMA cannot
// describe them.
// sm_90a (H100/H200, in a build with sm_90a code): cutlass_sm90.cuh, TMA + wgmma; any other sm_80+
// GPU: cutlass_sm80.cuh, cp.async + ldmatrix + mma.sync.
#pragma once
#include "lora.cuh"

namespace lk {
namespace lora_detail {

// acc = a bᵀ + a2 b2ᵀ in fp32: the operands the GEMM kernels read, and Epi, what they do with each
// finished element of acc (the epilogue policy below; adapter_cutlass.cuh has the adapter's). The
// caller has checked the alignment rules of lora_cutlass.cu's cutlass_path. B(n, k) is
// b[n·ldb + k] (K-major) or, for the kernels instantiated with kBMN, b[k·ldb + n] (N-major); b2
// likewise. K2 = 0: no second phase (the kernels skip it; nothing of a2, b2 is read).
template <class Epi>
struct CutlassGemm {
  using T = typename Epi::Elem;
  const T* a;     // [M, K], row stride lda
  int64_t lda;
  const T* b;     // B(n, k), reduction K
  int64_t ldb;
  const T* a2;    // [M, K2], row stride lda2
  int64_t lda2;
  const T* b2;    // B2(n, k), reduction K2
  int64_t ldb2;
  Epi epi;
  int64_t M, N, K, K2;
};

// Split-K (splitk_rule.h, cutlass_splitk.cuh): `splits` blocks along K per output tile (grid z),
// each writing its fp32 tile to partials [splits, M, N]; then one finish kernel sums the planes in
// order and applies the epilogue. splits = 1 (the default): the one-split kernel, epilogue inside.
// Kept out of CutlassGemm: the one-split kernel's parameters, and so its code, stay as they were.
struct SplitK {
  float* partials = nullptr;
  int splits = 1;
};

// Epilogue policies. The kernels call epi.dispatch(visit) once: dispatch hands visit a functor f
// (itself, or a form with its runtime choices made constant), and visit calls f(i, j, acc) for
// every in-bounds element of the tile, unrolled over the thread's accumulators.
// LoRA's (forward and dx): y = T(acc + bias).
template <typename T>
struct EpilogueBias {
  using Elem = T;
  const T* bias;  // [N] or nullptr
  T* y;           // [M, N], row stride ldy
  int64_t ldy;
  template <class Visit>
  __device__ __forceinline__ void dispatch(Visit&& visit) const { visit(*this); }
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, float v) const {
    if (bias != nullptr) v += to_acc<float>(bias[j]);
    y[i * ldy + j] = from_acc<T>(v);
  }
};

// Whether `kernel` has an image the device can load and its dynamic shared memory fits the
// device's opt-in limit; clears the error a missing image leaves (not an error of the op).
template <typename Kernel>
inline bool kernel_runs_on(int device, Kernel kernel, int smem_bytes) {
  int optin = 0;
  cudaFuncAttributes attr{};
  const bool ok = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
                  optin >= smem_bytes && cudaFuncGetAttributes(&attr, kernel) == cudaSuccess;
  if (!ok) (void)cudaGetLastError();
  return ok;
}

// The current device and its compute capability; false (the error cleared) where there is none.
inline bool current_capability(int& device, int& major, int& minor) {
  const bool ok = cudaGetDevice(&device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
                  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) == cudaSuccess;
  if (!ok) (void)cudaGetLastError();
  return ok;
}

enum class CutlassPath { none, sm80, sm90a };

// The forward's CUTLASS kernel, or none (lora_fwd then keeps its other paths): T half/bf16,
// M >= 1 (M < 128 was only a grid-filling heuristic, now split-K's job; the collectives handle
// rows past M: predicated cp.async, TMA zero fill), K, ldx and ldw multiples of 8 elements, x, weight and workspace 16-byte aligned,
// sizes below 2^31, a device of capability >= 8.0 whose image of the kernel is loadable and
// whose shared memory per block fits it. sm90a only on capability 9.0 in a build with sm_90a code.
template <typename T>
CutlassPath lora_cutlass_path(const T* x, int64_t ldx, const T* weight, int64_t ldw, int64_t M, int64_t N,
                              int64_t K, int64_t R, const void* workspace);

// Steps 2 and 3 of the forward, after u has been written.
template <typename T>
cudaError_t lora_fwd_cutlass(CutlassPath path, const T* x, int64_t ldx, const T* weight, int64_t ldw,
                             const T* bias, const T* lora_B, T* y, const acc_t<T>* u, int64_t M, int64_t N,
                             int64_t K, int64_t R, double scaling, void* workspace, cudaStream_t stream);

// dx = g W0 + T(v) A without dropout (g [M, N] contiguous, v = s·g B [M, R] fp32): its workspace
// (lora_bwd adds it after its own), the kernel that applies (as above, with N and K multiples of
// 8, ldw too), and the launches.
template <typename T>
size_t lora_dx_cutlass_workspace(int64_t M, int64_t N, int64_t K, int64_t R);
template <typename T>
CutlassPath lora_dx_cutlass_path(const T* g, const T* weight, int64_t ldw, int64_t M, int64_t N, int64_t K,
                                 int64_t R, const void* workspace);
template <typename T>
cudaError_t lora_dx_cutlass(CutlassPath path, const T* g, const T* weight, int64_t ldw, const T* lora_A,
                            const acc_t<T>* v, T* dx, int64_t M, int64_t N, int64_t K, int64_t R, void* workspace,
                            cudaStream_t stream);

// dW [N, K] = gᵀ x (the frozen weight's gradient, when asked for): workspace bytes (0 where the
// path cannot apply: 16-bit only, M, K and ldx multiples of 8), and the launches (cudaErrorNotSupported
// where the path does not apply, launching nothing).
template <typename T>
size_t lora_dw_cutlass_workspace(int64_t M, int64_t N, int64_t K);
template <typename T>
cudaError_t lora_dw_cutlass(const T* g, const T* x, int64_t ldx, T* dW, int64_t M, int64_t N, int64_t K,
                            void* workspace, cudaStream_t stream);

// cutlass_sm80.cuh / cutlass_sm90.cuh (instantiated per epilogue: LoRA's in lora_sm80.cu and
// lora_sm90.cu, the adapter's in adapter_sm80.cu and adapter_sm90.cu): whether the current device
// can run the kernel (image loadable, shared memory), and its launch. Epi::Elem is __half or
// __nv_bfloat16; kBMN: B and B2 N-major.
template <class Epi, bool kBMN> bool cutlass_sm80_ready(int device);
template <class Epi, bool kBMN>
cudaError_t cutlass_sm80_launch(const CutlassGemm<Epi>& p, cudaStream_t stream, SplitK split = {});
template <class Epi, bool kBMN> bool cutlass_sm90_ready(int device);
template <class Epi, bool kBMN>
cudaError_t cutlass_sm90_launch(const CutlassGemm<Epi>& p, cudaStream_t stream, SplitK split = {});

// The kernel the current device runs for epilogue Epi, once the operands have passed the alignment
// rules: sm90a only on capability 9.0 in a build with sm_90a code (setup.py defines LK_BUILT_SM90A
// when the arch list has 9.0a and no plain 9.0: on a 9.0 device the driver can then only have
// loaded the sm_90a cubins, where cutlass_sm90_kernel has its body and cutlass_sm80_kernel none,
// so sm80 is never an option there); sm80 on other devices of capability >= 8.0.
template <class Epi, bool kBMN>
CutlassPath cutlass_device_path() {
  int device = 0, major = 0, minor = 0;
  if (!current_capability(device, major, minor)) return CutlassPath::none;
#if defined(LK_BUILT_SM90A)
  if (major == 9 && minor == 0)
    return cutlass_sm90_ready<Epi, kBMN>(device) ? CutlassPath::sm90a : CutlassPath::none;
#endif
  if (major >= 8 && cutlass_sm80_ready<Epi, kBMN>(device)) return CutlassPath::sm80;
  return CutlassPath::none;
}

template <class Epi, bool kBMN>
cudaError_t cutlass_launch(CutlassPath path, const CutlassGemm<Epi>& p, cudaStream_t stream, SplitK split = {}) {
  if (path == CutlassPath::sm90a) return cutlass_sm90_launch<Epi, kBMN>(p, stream, split);
  if (path == CutlassPath::sm80) return cutlass_sm80_launch<Epi, kBMN>(p, stream, split);
  return cudaErrorNotSupported;
}

}  // namespace lora_detail
}  // namespace lk
