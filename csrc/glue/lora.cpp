// Torch glue of LoRA linear: checks, outputs, and the launchers of csrc/kernels/lora.cuh.
#include "glue.h"
#include "lora.cuh"

namespace lk_glue {

namespace {

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

}  // namespace

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
    Tensor ws = workspace(lk::lora_bwd_workspace<T>(s.M, s.N, s.K, s.R) +
                              (need_dW ? lk::lora_dw_workspace<T>(s.M, s.N, s.K) : 0), x);
    return lk::lora_bwd<T>(cptr<T>(g), cptr<T>(x), x.stride(0), cptr<T>(weight), weight.stride(0),
                           cptr<T>(lora_A), cptr<T>(lora_B), cptr<A>(u), ptr_if<T>(need_dx, dx), ptr<T>(dA),
                           ptr<T>(dB), ptr_if<T>(need_dW, dW), ptr_if<T>(need_db, db), data_or_null(ws), s.M, s.N,
                           s.K, s.R, scaling, dropout_p, static_cast<uint64_t>(seed), stream);
  }));
  return {dx, dA, dB, dW, db};
}

}  // namespace lk_glue
