// Torch glue of RMSNorm: checks, outputs, and the launchers of csrc/kernels/rms_norm.cuh.
#include "glue.h"
#include "rms_norm.cuh"

namespace lk_glue {

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

}  // namespace lk_glue
