// Torch glue of the compiled backend: checks every input, allocates the outputs (and the
// kernels' scratch), and calls the plain-CUDA launchers of csrc/kernels/ on the current stream.
// Registered as torch.ops.lora_kernels.<op>_{fwd,bwd}_cuda; lora_kernels/cuda/<op>.py calls them.
// Results follow lora_kernels/reference/<op>.py: saved statistics in the accumulator dtype
// (fp32, fp64 for fp64 inputs), a gradient nobody asked for as a fresh empty tensor.
#include <torch/extension.h>
#include <torch/library.h>

// Not ATen/cuda/CUDAContext.h: it pulls in cuBLAS headers that the kernels never need.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "adapter.cuh"
#include "infonce.cuh"
#include "layer_norm.cuh"
#include "lora.cuh"
#include "rms_norm.cuh"

namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

bool is_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream out;
  out << '[';
  for (size_t i = 0; i < s.size(); ++i) out << (i ? ", " : "") << s[i];
  out << ']';
  return out.str();
}

// The kernels read rows through a row stride but assume neighbouring columns are adjacent;
// outputs, weights and saved statistics they take fully contiguous.
enum class Layout { rows, contiguous };

// Checks for one call: every tensor on the lead tensor's CUDA device, in its dtype unless the
// caller names another (statistics in the accumulator dtype).
struct Inputs {
  const char* op;
  at::Device device;
  at::ScalarType dtype;

  Inputs(const char* op_, const char* name, const Tensor& lead)
      : op(op_), device(lead.defined() ? lead.device() : at::Device(at::kCPU)),
        dtype(lead.defined() ? lead.scalar_type() : at::kFloat) {
    TORCH_CHECK_VALUE(lead.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK_VALUE(lead.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ",
                      lead.device());
    TORCH_CHECK_TYPE(is_float(dtype), op, ": ", name,
                     " must be float16, bfloat16, float32 or float64, got ", dtype);
  }

  void ndim(const Tensor& t, const char* name, int64_t n, const char* meaning) const {
    TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK_VALUE(t.dim() == n, op, ": ", name, " must be ", n, "-D ", meaning, ", got shape ",
                      shape_str(t.sizes()));
  }

  // `meaning` spells the shape symbolically ("[N, K]"); the message adds the numbers.
  void check(const Tensor& t, const char* name, const std::vector<int64_t>& shape, const char* meaning,
             Layout layout, std::optional<at::ScalarType> want = std::nullopt) const {
    TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but the inputs are on ",
                      device, "; all inputs must be on one device");
    const at::ScalarType expected = want.value_or(dtype);
    TORCH_CHECK_TYPE(t.scalar_type() == expected, op, ": ", name, " must have dtype ", expected, ", got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), op, ": ", name, " must have shape ", meaning,
                      " = ", shape_str(shape), ", got ", shape_str(t.sizes()));
    if (layout == Layout::contiguous) {
      TORCH_CHECK_VALUE(t.is_contiguous(), op, ": ", name, " ", meaning,
                        " must be contiguous, got strides ", shape_str(t.strides()));
    } else {
      const int64_t last = t.dim() - 1;
      TORCH_CHECK_VALUE(t.size(last) <= 1 || t.stride(last) == 1, op, ": ", name, " ", meaning,
                        " must have unit stride along its last dim, got strides ", shape_str(t.strides()));
    }
  }

  void check(const OptTensor& t, const char* name, const std::vector<int64_t>& shape, const char* meaning,
             Layout layout) const {
    if (t.has_value()) check(*t, name, shape, meaning, layout);
  }

  // A scalar tensor (logit_scale, the loss gradient): one value on the device, any float dtype.
  void scalar(const Tensor& t, const char* name) const {
    TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor");
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but the inputs are on ",
                      device, "; all inputs must be on one device");
    TORCH_CHECK_TYPE(is_float(t.scalar_type()), op, ": ", name,
                     " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.numel() == 1, op, ": ", name, " must hold one value, got shape ", shape_str(t.sizes()));
  }
};

// The tests set LORA_KERNELS_POISON=1 so that an element a kernel forgets to write reads as NaN
// (the Triton backend does the same); read per call because Python may set it after import.
bool poison() {
  const char* flag = std::getenv("LORA_KERNELS_POISON");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

Tensor output(at::IntArrayRef shape, const at::TensorOptions& options) {
  Tensor t = at::empty(shape, options);
  if (poison()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Custom ops cannot return None: a gradient nobody asked for is a fresh empty tensor (never
// shared between outputs, which must not alias).
Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* data_or_null(const Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

template <typename T> T* ptr(const Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }
template <typename T> const T* cptr(const Tensor& t) { return reinterpret_cast<const T*>(t.const_data_ptr()); }
template <typename T> const T* cptr(const OptTensor& t) { return t.has_value() ? cptr<T>(*t) : nullptr; }
// An output that was not asked for is an empty placeholder: the kernel gets nullptr.
template <typename T> T* ptr_if(bool needed, const Tensor& t) { return needed ? ptr<T>(t) : nullptr; }

template <typename T> struct Tag { using type = T; };

// Calls launch(Tag<T>{}) with T the CUDA element type of dtype (the four the .cu files instantiate).
template <typename Launch>
cudaError_t dispatch(const char* op, at::ScalarType dtype, Launch&& launch) {
  switch (dtype) {
    case at::kHalf: return launch(Tag<__half>{});
    case at::kBFloat16: return launch(Tag<__nv_bfloat16>{});
    case at::kFloat: return launch(Tag<float>{});
    case at::kDouble: return launch(Tag<double>{});
    default: break;
  }
  TORCH_CHECK_TYPE(false, op, ": no kernel for dtype ", dtype);
  return cudaErrorInvalidValue;
}

void launched(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void finite(const char* op, const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", name, " must be finite, got ", v);
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cuda(const Tensor& x, const OptTensor& weight,
                                                       const OptTensor& bias, double eps) {
  const char* op = "layer_norm_fwd_cuda";
  Inputs in(op, "x", x);
  in.ndim(x, "x", 2, "[M, N]");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(N >= 1, op, ": x must have N >= 1 features per row, got shape ", shape_str(x.sizes()));
  in.check(x, "x", {M, N}, "[M, N]", Layout::rows);
  in.check(weight, "weight", {N}, "[N]", Layout::contiguous);
  in.check(bias, "bias", {N}, "[N]", Layout::contiguous);
  finite(op, "eps", eps);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);

  c10::cuda::CUDAGuard guard(x.device());
  const auto stats = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor y = output({M, N}, x.options()), mean = output({M}, stats), rstd = output({M}, stats);
  if (M == 0) return {y, mean, rstd};
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    return lk::layer_norm_fwd<T>(cptr<T>(x), x.stride(0), cptr<T>(weight), cptr<T>(bias), ptr<T>(y),
                                 ptr<A>(mean), ptr<A>(rstd), M, N, eps, stream);
  }));
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(const Tensor& g, const Tensor& x, const OptTensor& weight,
                                                       const Tensor& mean, const Tensor& rstd, bool need_dx,
                                                       bool need_dw, bool need_db) {
  const char* op = "layer_norm_bwd_cuda";
  Inputs in(op, "x", x);
  in.ndim(x, "x", 2, "[M, N]");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(N >= 1, op, ": x must have N >= 1 features per row, got shape ", shape_str(x.sizes()));
  const at::ScalarType acc = acc_dtype(x.scalar_type());
  in.check(x, "x", {M, N}, "[M, N]", Layout::rows);
  in.check(g, "g", {M, N}, "[M, N] (like x)", Layout::contiguous);
  in.check(weight, "weight", {N}, "[N]", Layout::contiguous);
  in.check(mean, "mean", {M}, "[M]", Layout::contiguous, acc);
  in.check(rstd, "rstd", {M}, "[M]", Layout::contiguous, acc);

  c10::cuda::CUDAGuard guard(x.device());
  // γ, β and x share one dtype, so dγ and dβ come back in x's dtype (as the reference).
  Tensor dx = need_dx ? output({M, N}, x.options()) : empty_grad(x);
  Tensor dw = need_dw ? output({N}, x.options()) : empty_grad(x);
  Tensor db = need_db ? output({N}, x.options()) : empty_grad(x);
  if (M == 0) {  // sums over no rows
    dw.zero_();
    db.zero_();
    return {dx, dw, db};
  }
  if (!(need_dx || need_dw || need_db)) return {dx, dw, db};
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    Tensor ws = workspace(lk::layer_norm_bwd_workspace<T>(M, N), x);
    return lk::layer_norm_bwd<T>(cptr<T>(g), cptr<T>(x), x.stride(0), cptr<T>(weight), cptr<A>(mean),
                                 cptr<A>(rstd), ptr_if<T>(need_dx, dx), ptr_if<T>(need_dw, dw),
                                 ptr_if<T>(need_db, db), data_or_null(ws), M, N, stream);
  }));
  return {dx, dw, db};
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

// stats=false (inference): rstd is not kept and comes back as an empty tensor.
std::tuple<Tensor, Tensor> rms_norm_fwd_cuda(const Tensor& x, const OptTensor& weight, double eps, double offset,
                                             bool stats) {
  const char* op = "rms_norm_fwd_cuda";
  Inputs in(op, "x", x);
  in.ndim(x, "x", 2, "[M, N]");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(N >= 1, op, ": x must have N >= 1 features per row, got shape ", shape_str(x.sizes()));
  in.check(x, "x", {M, N}, "[M, N]", Layout::rows);
  in.check(weight, "weight", {N}, "[N]", Layout::contiguous);
  finite(op, "eps", eps);
  finite(op, "offset", offset);
  TORCH_CHECK_VALUE(eps >= 0, op, ": eps must be >= 0, got ", eps);

  c10::cuda::CUDAGuard guard(x.device());
  const auto acc = x.options().dtype(acc_dtype(x.scalar_type()));
  Tensor y = output({M, N}, x.options()), rstd = stats ? output({M}, acc) : at::empty({0}, acc);
  if (M == 0) return {y, rstd};
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    return lk::rms_norm_fwd<T>(cptr<T>(x), x.stride(0), cptr<T>(weight), ptr<T>(y), ptr_if<A>(stats, rstd), M, N,
                               eps, offset, stream);
  }));
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_norm_bwd_cuda(const Tensor& g, const Tensor& x, const OptTensor& weight,
                                             const Tensor& rstd, double offset, bool need_dx, bool need_dw) {
  const char* op = "rms_norm_bwd_cuda";
  Inputs in(op, "x", x);
  in.ndim(x, "x", 2, "[M, N]");
  const int64_t M = x.size(0), N = x.size(1);
  TORCH_CHECK_VALUE(N >= 1, op, ": x must have N >= 1 features per row, got shape ", shape_str(x.sizes()));
  in.check(x, "x", {M, N}, "[M, N]", Layout::rows);
  in.check(g, "g", {M, N}, "[M, N] (like x)", Layout::contiguous);
  in.check(weight, "weight", {N}, "[N]", Layout::contiguous);
  in.check(rstd, "rstd", {M}, "[M]", Layout::contiguous, acc_dtype(x.scalar_type()));
  finite(op, "offset", offset);
  TORCH_CHECK_VALUE(!need_dw || weight.has_value(), op, ": need_dw is set but weight is None");

  c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = need_dx ? output({M, N}, x.options()) : empty_grad(x);
  Tensor dw = need_dw ? output({N}, x.options()) : empty_grad(x);
  if (M == 0) {  // a sum over no rows
    dw.zero_();
    return {dx, dw};
  }
  if (!(need_dx || need_dw)) return {dx, dw};
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    Tensor ws = workspace(need_dw ? lk::rms_norm_bwd_workspace<T>(M, N) : 0, x);
    return lk::rms_norm_bwd<T>(cptr<T>(g), cptr<T>(x), x.stride(0), cptr<T>(weight), cptr<A>(rstd),
                               ptr_if<T>(need_dx, dx), ptr_if<T>(need_dw, dw), data_or_null(ws), M, N, offset,
                               stream);
  }));
  return {dx, dw};
}

// ---------------------------------------------------------------------------------------------
// Adapter bottleneck

lk::Activation activation_of(const char* op, c10::string_view name) {
  // Index i is lk::Activation(i): the enum follows lora_kernels.reference.adapter.ACTIVATIONS.
  static const char* const names[] = {"gelu", "gelu_tanh", "relu", "silu"};
  for (int i = 0; i < 4; ++i) {
    if (name == c10::string_view(names[i])) return static_cast<lk::Activation>(i);
  }
  TORCH_CHECK_VALUE(false, op, ": activation must be one of gelu, gelu_tanh, relu, silu, got '",
                    std::string(name.data(), name.size()), "'");
  return lk::Activation::gelu;
}

struct AdapterSizes { int64_t M, K, R; };

AdapterSizes adapter_sizes(const Inputs& in, const Tensor& x, const Tensor& w_down, const Tensor& w_up) {
  in.ndim(x, "x", 2, "[M, K]");
  in.ndim(w_down, "w_down", 2, "[r, K]");
  const int64_t M = x.size(0), K = x.size(1), R = w_down.size(0);
  TORCH_CHECK_VALUE(K >= 1, in.op, ": x must have K >= 1 features, got shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(R >= 1, in.op, ": the bottleneck r must be >= 1, got w_down of shape ",
                    shape_str(w_down.sizes()));
  in.check(x, "x", {M, K}, "[M, K]", Layout::rows);
  in.check(w_down, "w_down", {R, K}, "[r, K]", Layout::contiguous);
  in.check(w_up, "w_up", {K, R}, "[K, r]", Layout::contiguous);
  return {M, K, R};
}

std::tuple<Tensor, Tensor> adapter_fwd_cuda(const Tensor& x, const Tensor& w_down, const OptTensor& b_down,
                                            const Tensor& w_up, const OptTensor& b_up, c10::string_view activation,
                                            double scale) {
  const char* op = "adapter_fwd_cuda";
  Inputs in(op, "x", x);
  const AdapterSizes s = adapter_sizes(in, x, w_down, w_up);
  const int64_t M = s.M, K = s.K, R = s.R;  // named: lambdas cannot capture structured bindings in C++17
  in.check(b_down, "b_down", {R}, "[r]", Layout::contiguous);
  in.check(b_up, "b_up", {K}, "[K]", Layout::contiguous);
  const lk::Activation act = activation_of(op, activation);
  finite(op, "scale", scale);

  c10::cuda::CUDAGuard guard(x.device());
  Tensor y = output({M, K}, x.options());
  Tensor h = output({M, R}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (M == 0) return {y, h};
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    return lk::adapter_fwd<T>(cptr<T>(x), x.stride(0), cptr<T>(w_down), cptr<T>(b_down), cptr<T>(w_up),
                              cptr<T>(b_up), ptr<T>(y), ptr<A>(h), M, K, R, act, scale, stream);
  }));
  return {y, h};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_bwd_cuda(
    const Tensor& g, const Tensor& x, const Tensor& w_down, const Tensor& w_up, const Tensor& h,
    c10::string_view activation, double scale, bool need_dx, bool need_dbd, bool need_dbu) {
  const char* op = "adapter_bwd_cuda";
  Inputs in(op, "x", x);
  const AdapterSizes s = adapter_sizes(in, x, w_down, w_up);
  const int64_t M = s.M, K = s.K, R = s.R;
  in.check(g, "g", {M, K}, "[M, K] (like x)", Layout::contiguous);
  in.check(h, "h", {M, R}, "[M, r]", Layout::contiguous, acc_dtype(x.scalar_type()));
  const lk::Activation act = activation_of(op, activation);
  finite(op, "scale", scale);

  c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = need_dx ? output({M, K}, x.options()) : empty_grad(x);
  Tensor dwd = output({R, K}, w_down.options());
  Tensor dbd = need_dbd ? output({R}, w_down.options()) : empty_grad(w_down);
  Tensor dwu = output({K, R}, w_up.options());
  Tensor dbu = need_dbu ? output({K}, w_up.options()) : empty_grad(w_up);
  if (M == 0) {  // sums over no rows
    for (Tensor* t : {&dwd, &dbd, &dwu, &dbu}) t->zero_();
    return {dx, dwd, dbd, dwu, dbu};
  }
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    Tensor ws = workspace(lk::adapter_bwd_workspace<T>(M, K, R), x);
    return lk::adapter_bwd<T>(cptr<T>(g), cptr<T>(x), x.stride(0), cptr<T>(w_down), cptr<T>(w_up), cptr<A>(h),
                              ptr_if<T>(need_dx, dx), ptr<T>(dwd), ptr_if<T>(need_dbd, dbd), ptr<T>(dwu),
                              ptr_if<T>(need_dbu, dbu), data_or_null(ws), M, K, R, act, scale, stream);
  }));
  return {dx, dwd, dbd, dwu, dbu};
}

// ---------------------------------------------------------------------------------------------
// LoRA linear

struct LoraSizes { int64_t M, N, K, R; };

LoraSizes lora_sizes(const Inputs& in, const Tensor& x, const Tensor& weight, const Tensor& lora_A,
                     const Tensor& lora_B) {
  in.ndim(x, "x", 2, "[M, K]");
  in.ndim(weight, "weight", 2, "[N, K]");
  in.ndim(lora_A, "lora_A", 2, "[r, K]");
  const LoraSizes s{x.size(0), weight.size(0), x.size(1), lora_A.size(0)};
  TORCH_CHECK_VALUE(s.K >= 1, in.op, ": x must have K >= 1 features, got shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(s.R >= 1, in.op, ": LoRA rank r must be >= 1, got lora_A of shape ",
                    shape_str(lora_A.sizes()));
  in.check(x, "x", {s.M, s.K}, "[M, K]", Layout::rows);
  in.check(weight, "weight", {s.N, s.K}, "[N, K]", Layout::rows);
  in.check(lora_A, "lora_A", {s.R, s.K}, "[r, K]", Layout::contiguous);
  in.check(lora_B, "lora_B", {s.N, s.R}, "[N, r]", Layout::contiguous);
  return s;
}

void check_lora_scalars(const char* op, double scaling, double dropout_p) {
  finite(op, "scaling", scaling);
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ", dropout_p);
}

// The seed is a Python int (ops/lora.py reads the CPU seed tensor on the host); the generator
// keys on its 64 bits, so the sign is irrelevant.
std::tuple<Tensor, Tensor> lora_linear_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                                double dropout_p, int64_t seed) {
  const char* op = "lora_linear_fwd_cuda";
  Inputs in(op, "x", x);
  const LoraSizes s = lora_sizes(in, x, weight, lora_A, lora_B);
  in.check(bias, "bias", {s.N}, "[N]", Layout::contiguous);
  check_lora_scalars(op, scaling, dropout_p);

  c10::cuda::CUDAGuard guard(x.device());
  Tensor y = output({s.M, s.N}, x.options());
  Tensor u = output({s.M, s.R}, x.options().dtype(acc_dtype(x.scalar_type())));
  if (s.M == 0) return {y, u};
  if (s.N == 0) {
    // Nothing reads u when N == 0: dB = s·gᵀu is empty and v = s·gB is zero, so dA = dx = 0.
    u.zero_();
    return {y, u};
  }
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    Tensor ws = workspace(lk::lora_fwd_workspace<T>(s.M, s.N, s.K, s.R, dropout_p), x);
    return lk::lora_fwd<T>(cptr<T>(x), x.stride(0), cptr<T>(weight), weight.stride(0), cptr<T>(bias),
                           cptr<T>(lora_A), cptr<T>(lora_B), ptr<T>(y), ptr<A>(u), s.M, s.N, s.K, s.R, scaling,
                           dropout_p, static_cast<uint64_t>(seed), data_or_null(ws), stream);
  }));
  return {y, u};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_bwd_cuda(
    const Tensor& g, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, double dropout_p, int64_t seed, bool need_dx, bool need_dW, bool need_db) {
  const char* op = "lora_linear_bwd_cuda";
  Inputs in(op, "x", x);
  const LoraSizes s = lora_sizes(in, x, weight, lora_A, lora_B);
  in.check(g, "g", {s.M, s.N}, "[M, N]", Layout::contiguous);
  in.check(u, "u", {s.M, s.R}, "[M, r]", Layout::contiguous, acc_dtype(x.scalar_type()));
  check_lora_scalars(op, scaling, dropout_p);

  c10::cuda::CUDAGuard guard(x.device());
  Tensor dx = need_dx ? output({s.M, s.K}, x.options()) : empty_grad(x);
  Tensor dA = output({s.R, s.K}, lora_A.options());
  Tensor dB = output({s.N, s.R}, lora_B.options());
  Tensor dW = need_dW ? output({s.N, s.K}, weight.options()) : empty_grad(weight);
  Tensor db = need_db ? output({s.N}, weight.options()) : empty_grad(weight);
  if (s.M == 0 || s.N == 0) {  // every gradient is a sum over no terms
    for (Tensor* t : {&dx, &dA, &dB, &dW, &db}) t->zero_();
    return {dx, dA, dB, dW, db};
  }
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    Tensor ws = workspace(lk::lora_bwd_workspace<T>(s.M, s.N, s.K, s.R), x);
    return lk::lora_bwd<T>(cptr<T>(g), cptr<T>(x), x.stride(0), cptr<T>(weight), weight.stride(0),
                           cptr<T>(lora_A), cptr<T>(lora_B), cptr<A>(u), ptr_if<T>(need_dx, dx), ptr<T>(dA),
                           ptr<T>(dB), ptr_if<T>(need_dW, dW), ptr_if<T>(need_db, db), data_or_null(ws), s.M, s.N,
                           s.K, s.R, scaling, dropout_p, static_cast<uint64_t>(seed), stream);
  }));
  return {dx, dA, dB, dW, db};
}

// ---------------------------------------------------------------------------------------------
// InfoNCE

// Returns N; D is image.size(1).
int64_t infonce_rows(const Inputs& in, const Tensor& image, const Tensor& text) {
  in.ndim(image, "image", 2, "[N, D]");
  const int64_t N = image.size(0), D = image.size(1);
  TORCH_CHECK_VALUE(D >= 1, in.op, ": image and text need D >= 1 features, got shape ",
                    shape_str(image.sizes()));
  in.check(image, "image", {N, D}, "[N, D]", Layout::rows);
  in.check(text, "text", {N, D}, "[N, D] (like image)", Layout::rows);
  return N;
}

void check_lambda(const char* op, double lambda) {
  TORCH_CHECK_VALUE(lambda >= 0.0 && lambda <= 1.0, op, ": lambda_ must be in [0, 1], got ", lambda);
}

// The kernels read scalars from device memory in the accumulator dtype (no host sync).
Tensor device_scalar(const Tensor& t, at::ScalarType acc) { return t.reshape({}).to(acc).contiguous(); }

std::tuple<Tensor, Tensor, Tensor> infonce_fwd_cuda(const Tensor& image, const Tensor& text,
                                                    const Tensor& logit_scale, double lambda, bool normalize) {
  const char* op = "infonce_fwd_cuda";
  Inputs in(op, "image", image);
  const int64_t N = infonce_rows(in, image, text), D = image.size(1);
  in.scalar(logit_scale, "logit_scale");
  check_lambda(op, lambda);

  c10::cuda::CUDAGuard guard(image.device());
  const at::ScalarType acc = acc_dtype(image.scalar_type());
  const auto acc_options = image.options().dtype(acc);
  Tensor loss = output({}, acc_options), lse_row = output({N}, acc_options), lse_col = output({N}, acc_options);
  if (N == 0) return {loss.zero_(), lse_row, lse_col};
  const Tensor scale = device_scalar(logit_scale, acc);
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    Tensor ws = workspace(lk::infonce_fwd_workspace<T>(N, D), image);
    return lk::infonce_fwd<T>(cptr<T>(image), image.stride(0), cptr<T>(text), text.stride(0), cptr<A>(scale),
                              ptr<A>(loss), ptr<A>(lse_row), ptr<A>(lse_col), N, D, lambda, normalize,
                              data_or_null(ws), stream);
  }));
  return {loss, lse_row, lse_col};
}

std::tuple<Tensor, Tensor, Tensor> infonce_bwd_cuda(const Tensor& gloss, const Tensor& image, const Tensor& text,
                                                    const Tensor& logit_scale, const Tensor& lse_row,
                                                    const Tensor& lse_col, double lambda, bool normalize,
                                                    bool need_dimage, bool need_dtext, bool need_dscale) {
  const char* op = "infonce_bwd_cuda";
  Inputs in(op, "image", image);
  const int64_t N = infonce_rows(in, image, text), D = image.size(1);
  const at::ScalarType acc = acc_dtype(image.scalar_type());
  in.scalar(gloss, "gloss");
  in.scalar(logit_scale, "logit_scale");
  in.check(lse_row, "lse_row", {N}, "[N]", Layout::contiguous, acc);
  in.check(lse_col, "lse_col", {N}, "[N]", Layout::contiguous, acc);
  check_lambda(op, lambda);

  c10::cuda::CUDAGuard guard(image.device());
  Tensor di = need_dimage ? output({N, D}, image.options()) : empty_grad(image);
  Tensor dt = need_dtext ? output({N, D}, text.options()) : empty_grad(text);
  // The kernel writes d logit_scale as one accumulator value; the caller gets logit_scale's dtype and shape.
  Tensor dc = need_dscale ? output({}, image.options().dtype(acc)) : empty_grad(logit_scale);
  const auto finish = [&]() -> std::tuple<Tensor, Tensor, Tensor> {
    if (!need_dscale) return {di, dt, dc};
    return {di, dt, dc.to(logit_scale.scalar_type()).reshape(logit_scale.sizes())};
  };
  if (N == 0) {
    if (need_dscale) dc.zero_();
    return finish();
  }
  if (!(need_dimage || need_dtext || need_dscale)) return finish();
  const Tensor scale = device_scalar(logit_scale, acc), g = device_scalar(gloss, acc);
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    Tensor ws = workspace(lk::infonce_bwd_workspace<T>(N, D), image);
    return lk::infonce_bwd<T>(cptr<A>(g), cptr<T>(image), image.stride(0), cptr<T>(text), text.stride(0),
                              cptr<A>(scale), cptr<A>(lse_row), cptr<A>(lse_col), ptr_if<T>(need_dimage, di),
                              ptr_if<T>(need_dtext, dt), ptr_if<A>(need_dscale, dc), N, D, lambda, normalize,
                              data_or_null(ws), stream);
  }));
  return finish();
}

// One direction on a rectangular block (the distributed loss): local queries against gathered keys.
std::tuple<Tensor, Tensor> infonce_rows_fwd_cuda(const Tensor& queries, const Tensor& keys, const Tensor& logit_scale,
                                                 int64_t offset, bool normalize) {
  const char* op = "infonce_rows_fwd_cuda";
  Inputs in(op, "queries", queries);
  in.ndim(queries, "queries", 2, "[m, D]");
  in.ndim(keys, "keys", 2, "[n, D]");
  const int64_t M = queries.size(0), N = keys.size(0), D = queries.size(1);
  TORCH_CHECK_VALUE(D >= 1, op, ": queries and keys need D >= 1 features, got shape ", shape_str(queries.sizes()));
  in.check(queries, "queries", {M, D}, "[m, D]", Layout::rows);
  in.check(keys, "keys", {N, D}, "[n, D] (D like queries)", Layout::rows);
  in.scalar(logit_scale, "logit_scale");
  TORCH_CHECK_VALUE(offset >= 0 && offset <= N - M, op, ": offset must be in [0, n - m] = [0, ", N - M, "], got ",
                    offset);

  c10::cuda::CUDAGuard guard(queries.device());
  const at::ScalarType acc = acc_dtype(queries.scalar_type());
  const auto acc_options = queries.options().dtype(acc);
  Tensor part = output({}, acc_options), lse = output({M}, acc_options);
  const Tensor scale = device_scalar(logit_scale, acc);
  const cudaStream_t stream = current_stream();
  launched(op, dispatch(op, in.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = lk::acc_t<T>;
    Tensor ws = workspace(lk::infonce_rows_fwd_workspace<T>(M, N, D), queries);
    return lk::infonce_rows_fwd<T>(cptr<T>(queries), queries.stride(0), cptr<T>(keys), keys.stride(0), cptr<A>(scale),
                                   ptr<A>(part), M > 0 ? ptr<A>(lse) : nullptr, M, N, D, offset, normalize,
                                   data_or_null(ws), stream);
  }));
  return {part, lse};
}

std::tuple<Tensor, Tensor, Tensor> infonce_rows_bwd_cuda(const Tensor& gpart, const Tensor& queries, const Tensor& keys,
                                                         const Tensor& logit_scale, const Tensor& lse, int64_t offset,
                                                         bool normalize, bool need_dqueries, bool need_dkeys,
                                                         bool need_dscale) {
  const char* op = "infonce_rows_bwd_cuda";
  Inputs in(op, "queries", queries);
  in.ndim(queries, "queries", 2, "[m, D]");
  in.ndim(keys, "keys", 2, "[n, D]");
  const int64_t M = queries.size(0), N = keys.size(0), D = queries.size(1);
  TORCH_CHECK_VALUE(D >= 1, op, ": queries and keys need D >= 1 features, got shape ", shape_str(queries.sizes()));
  const at::ScalarType acc = acc_dtype(queries.scalar_type());
  in.check(queries, "queries", {M, D}, "[m, D]", Layout::rows);
  in.check(keys, "keys", {N, D}, "[n, D] (D like queries)", Layout::rows);
  in.scalar(gpart, "gpart");
  in.scalar(logit_scale, "logit_scale");
  in.check(lse, "lse", {M}, "[m]", Layout::contiguous, acc);
  TORCH_CHECK_VALUE(offset >= 0 && offset <= N - M, op, ": offset must be in [0, n - m] = [0, ", N - M, "], got ",
                    offset);

  c10::cuda::CUDAGuard guard(queries.device());
  Tensor dq = need_dqueries ? output({M, D}, queries.options()) : empty_grad(queries);
  Tensor dk = need_dkeys ? output({N, D}, keys.options()) : empty_grad(keys);
  Tensor dc = need_dscale ? output({}, queries.options().dtype(acc)) : empty_grad(logit_scale);
  if (need_dqueries || need_dkeys || need_dscale) {
    const Tensor scale = device_scalar(logit_scale, acc), g = device_scalar(gpart, acc);
    const cudaStream_t stream = current_stream();
    launched(op, dispatch(op, in.dtype, [&](auto tag) {
      using T = typename decltype(tag)::type;
      using A = lk::acc_t<T>;
      Tensor ws = workspace(lk::infonce_rows_bwd_workspace<T>(M, N, D), queries);
      return lk::infonce_rows_bwd<T>(cptr<A>(g), cptr<T>(queries), queries.stride(0), cptr<T>(keys), keys.stride(0),
                                     cptr<A>(scale), M > 0 ? cptr<A>(lse) : nullptr,
                                     need_dqueries && M > 0 ? ptr<T>(dq) : nullptr, ptr_if<T>(need_dkeys, dk),
                                     ptr_if<A>(need_dscale, dc), M, N, D, offset, normalize, data_or_null(ws), stream);
    }));
  }
  if (!need_dscale) return {dq, dk, dc};
  return {dq, dk, dc.to(logit_scale.scalar_type()).reshape(logit_scale.sizes())};
}

}  // namespace

// Names end in _cuda: the Python custom ops lora_kernels::<op>_{fwd,bwd} (a FRAGMENT of the same
// namespace) dispatch to these through the `cuda` backend.
TORCH_LIBRARY(lora_kernels, m) {
  m.def("layer_norm_fwd_cuda(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd_cuda(Tensor g, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, bool need_dx, "
        "bool need_dw, bool need_db) -> (Tensor, Tensor, Tensor)");
  m.def("rms_norm_fwd_cuda(Tensor x, Tensor? weight, float eps, float offset, bool stats) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd_cuda(Tensor g, Tensor x, Tensor? weight, Tensor rstd, float offset, bool need_dx, "
        "bool need_dw) -> (Tensor, Tensor)");
  m.def("adapter_fwd_cuda(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, str activation, "
        "float scale) -> (Tensor, Tensor)");
  m.def("adapter_bwd_cuda(Tensor g, Tensor x, Tensor w_down, Tensor w_up, Tensor h, str activation, float scale, "
        "bool need_dx, bool need_dbd, bool need_dbu) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lora_linear_fwd_cuda(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  m.def("lora_linear_bwd_cuda(Tensor g, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
        "float scaling, float dropout_p, int seed, bool need_dx, bool need_dW, bool need_db) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("infonce_fwd_cuda(Tensor image, Tensor text, Tensor logit_scale, float lambda_, bool normalize) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("infonce_bwd_cuda(Tensor gloss, Tensor image, Tensor text, Tensor logit_scale, Tensor lse_row, "
        "Tensor lse_col, float lambda_, bool normalize, bool need_dimage, bool need_dtext, bool need_dscale) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("infonce_rows_fwd_cuda(Tensor queries, Tensor keys, Tensor logit_scale, int offset, bool normalize) "
        "-> (Tensor, Tensor)");
  m.def("infonce_rows_bwd_cuda(Tensor gpart, Tensor queries, Tensor keys, Tensor logit_scale, Tensor lse, "
        "int offset, bool normalize, bool need_dqueries, bool need_dkeys, bool need_dscale) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(lora_kernels, CUDA, m) {
  m.impl("layer_norm_fwd_cuda", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd_cuda", &layer_norm_bwd_cuda);
  m.impl("rms_norm_fwd_cuda", &rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd_cuda", &rms_norm_bwd_cuda);
  m.impl("adapter_fwd_cuda", &adapter_fwd_cuda);
  m.impl("adapter_bwd_cuda", &adapter_bwd_cuda);
  m.impl("lora_linear_fwd_cuda", &lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd_cuda", &lora_linear_bwd_cuda);
  m.impl("infonce_fwd_cuda", &infonce_fwd_cuda);
  m.impl("infonce_bwd_cuda", &infonce_bwd_cuda);
  m.impl("infonce_rows_fwd_cuda", &infonce_rows_fwd_cuda);
  m.impl("infonce_rows_bwd_cuda", &infonce_rows_bwd_cuda);
}

// Importing lora_kernels._C runs the registrations above; the module itself exports nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_kernels CUDA kernels, registered as torch.ops.lora_kernels.*_cuda";
}
