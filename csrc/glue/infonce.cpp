// Torch glue of InfoNCE (the square loss and the distributed rows op): checks, outputs, and
// the launchers of csrc/kernels/infonce.cuh.
#include "glue.h"
#include "infonce.cuh"

namespace lk_glue {

namespace {

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

}  // namespace

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

}  // namespace lk_glue
