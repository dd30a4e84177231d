// Shared by the torch glue of csrc/glue/<op>.cpp (one file per op, each checking its inputs,
// allocating its outputs and calling csrc/kernels/ on the current stream) and by csrc/bindings.cpp,
// which registers the entry points declared at the end. Results follow
// lora_kernels/reference/<op>.py: saved statistics in the accumulator dtype (fp32, fp64 for fp64
// inputs), a gradient nobody asked for as a fresh empty tensor.
#pragma once
#include <ATen/ATen.h>

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

#include "common.cuh"  // lk::acc_t, the kernels' element types

namespace lk_glue {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

inline bool is_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline std::string shape_str(at::IntArrayRef s) {
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
inline bool poison() {
  const char* flag = std::getenv("LORA_KERNELS_POISON");
  return flag != nullptr && std::strcmp(flag, "1") == 0;
}

inline Tensor output(at::IntArrayRef shape, const at::TensorOptions& options) {
  Tensor t = at::empty(shape, options);
  if (poison()) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

// Custom ops cannot return None: a gradient nobody asked for is a fresh empty tensor (never
// shared between outputs, which must not alias).
inline Tensor empty_grad(const Tensor& like) { return at::empty({0}, like.options()); }

inline Tensor workspace(size_t bytes, const Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

inline void* data_or_null(const Tensor& t) { return t.numel() > 0 ? t.data_ptr() : nullptr; }

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

inline void launched(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error ", cudaGetErrorName(err), ": ", cudaGetErrorString(err));
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

inline void finite(const char* op, const char* name, double v) {
  TORCH_CHECK_VALUE(std::isfinite(v), op, ": ", name, " must be finite, got ", v);
}

// ---------------------------------------------------------------------------------------------
// The ops: torch.ops.lora_kernels.<op>_{fwd,bwd}_cuda, registered by csrc/bindings.cpp.

// LayerNorm (csrc/glue/layer_norm.cpp)
std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_cuda(const Tensor& x, const OptTensor& weight,
                                                       const OptTensor& bias, double eps);
std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd_cuda(const Tensor& g, const Tensor& x, const OptTensor& weight,
                                                       const Tensor& mean, const Tensor& rstd, bool need_dx,
                                                       bool need_dw, bool need_db);

// RMSNorm (csrc/glue/rms_norm.cpp)
std::tuple<Tensor, Tensor> rms_norm_fwd_cuda(const Tensor& x, const OptTensor& weight, double eps, double offset,
                                             bool stats);
std::tuple<Tensor, Tensor> rms_norm_bwd_cuda(const Tensor& g, const Tensor& x, const OptTensor& weight,
                                             const Tensor& rstd, double offset, bool need_dx, bool need_dw);

// Adapter bottleneck (csrc/glue/adapter.cpp)
std::tuple<Tensor, Tensor> adapter_fwd_cuda(const Tensor& x, const Tensor& w_down, const OptTensor& b_down,
                                            const Tensor& w_up, const OptTensor& b_up, c10::string_view activation,
                                            double scale);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> adapter_bwd_cuda(
    const Tensor& g, const Tensor& x, const Tensor& w_down, const Tensor& w_up, const Tensor& h,
    c10::string_view activation, double scale, bool need_dx, bool need_dbd, bool need_dbu);

// LoRA linear (csrc/glue/lora.cpp)
std::tuple<Tensor, Tensor> lora_linear_fwd_cuda(const Tensor& x, const Tensor& weight, const OptTensor& bias,
                                                const Tensor& lora_A, const Tensor& lora_B, double scaling,
                                                double dropout_p, int64_t seed);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lora_linear_bwd_cuda(
    const Tensor& g, const Tensor& x, const Tensor& weight, const Tensor& lora_A, const Tensor& lora_B,
    const Tensor& u, double scaling, double dropout_p, int64_t seed, bool need_dx, bool need_dW, bool need_db);

// InfoNCE (csrc/glue/infonce.cpp)
std::tuple<Tensor, Tensor, Tensor> infonce_fwd_cuda(const Tensor& image, const Tensor& text,
                                                    const Tensor& logit_scale, double lambda, bool normalize);
std::tuple<Tensor, Tensor, Tensor> infonce_bwd_cuda(const Tensor& gloss, const Tensor& image, const Tensor& text,
                                                    const Tensor& logit_scale, const Tensor& lse_row,
                                                    const Tensor& lse_col, double lambda, bool normalize,
                                                    bool need_dimage, bool need_dtext, bool need_dscale);
std::tuple<Tensor, Tensor> infonce_rows_fwd_cuda(const Tensor& queries, const Tensor& keys, const Tensor& logit_scale,
                                                 int64_t offset, bool normalize);
std::tuple<Tensor, Tensor, Tensor> infonce_rows_bwd_cuda(const Tensor& gpart, const Tensor& queries, const Tensor& keys,
                                                         const Tensor& logit_scale, const Tensor& lse, int64_t offset,
                                                         bool normalize, bool need_dqueries, bool need_dkeys,
                                                         bool need_dscale);

}  // namespace lk_glue
