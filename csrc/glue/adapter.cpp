// Torch glue of the adapter bottleneck: checks, outputs, and the launchers of
// csrc/kernels/adapter.cuh.
#include "glue.h"
#include "adapter.cuh"

namespace lk_glue {

namespace {

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

}  // namespace

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
    Tensor ws = workspace(lk::adapter_fwd_workspace<T>(M, K, R), x);
    return lk::adapter_fwd<T>(cptr<T>(x), x.stride(0), cptr<T>(w_down), cptr<T>(b_down), cptr<T>(w_up),
                              cptr<T>(b_up), ptr<T>(y), ptr<A>(h), data_or_null(ws), M, K, R, act, scale, stream);
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

}  // namespace lk_glue
