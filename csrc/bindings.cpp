// Registers the compiled backend's ops as torch.ops.lora_kernels.<op>_{fwd,bwd}_cuda;
// lora_kernels/cuda/<op>.py calls them. Their glue (input checks, outputs, the launch of
// csrc/kernels/) lives in csrc/glue/<op>.cpp, one file per op.
#include <torch/extension.h>
#include <torch/library.h>

#include "glue/glue.h"

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
  m.impl("layer_norm_fwd_cuda", &lk_glue::layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd_cuda", &lk_glue::layer_norm_bwd_cuda);
  m.impl("rms_norm_fwd_cuda", &lk_glue::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd_cuda", &lk_glue::rms_norm_bwd_cuda);
  m.impl("adapter_fwd_cuda", &lk_glue::adapter_fwd_cuda);
  m.impl("adapter_bwd_cuda", &lk_glue::adapter_bwd_cuda);
  m.impl("lora_linear_fwd_cuda", &lk_glue::lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd_cuda", &lk_glue::lora_linear_bwd_cuda);
  m.impl("infonce_fwd_cuda", &lk_glue::infonce_fwd_cuda);
  m.impl("infonce_bwd_cuda", &lk_glue::infonce_bwd_cuda);
  m.impl("infonce_rows_fwd_cuda", &lk_glue::infonce_rows_fwd_cuda);
  m.impl("infonce_rows_bwd_cuda", &lk_glue::infonce_rows_bwd_cuda);
}

// Importing lora_kernels._C runs the registrations above; the module itself exports nothing.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lora_kernels CUDA kernels, registered as torch.ops.lora_kernels.*_cuda";
}
