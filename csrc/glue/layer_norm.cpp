// Torch glue of LayerNorm: checks, outputs, and the launchers of csrc/kernels/layer_norm.cuh.
#include "glue.h"
#include "layer_norm.cuh"

namespace lk_glue {

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

}  // namespace lk_glue
