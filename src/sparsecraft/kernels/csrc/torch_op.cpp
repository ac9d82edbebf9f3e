// sparsecraft::one_token, a torch operator for compiled graphs: one token through a sparse layer.
//
// torch.compile turns each sparse layer into a call of a registered operator. The Python one
// (custom_op.py) costs about 17 us a call, 210 times per token in a 30-block decoder; this one,
// registered from C++ through torch's stable ABI (header-only: it compiles in about 3 seconds and
// does not tie the build to torch's C++ ABI), costs about 6. It builds the layer's plan (plan.h) from
// the arrays it is given on every call, so a graph never holds an address that could go stale.
// Built at first use by sparsecraft.kernels.build.torch_op, linked against the kernel library.

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <vector>

#include "plan.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// arrays: the format's arrays in the order of its sc_ function (ops.one_token_arrays), values last;
// vdtype: the values' storage (formats.VALUE_DTYPES).
Tensor one_token(Tensor x, std::vector<Tensor> arrays, std::optional<Tensor> bias, int64_t kind, int64_t vdtype,
                 int64_t out, int64_t nnz, int64_t min_work, int64_t row_bytes, int64_t bh, int64_t bw) {
    const int64_t in = x.size(x.dim() - 1);
    STD_TORCH_CHECK(x.is_cpu() && x.scalar_type() == ScalarType::Float && x.is_contiguous() && x.numel() == in,
                    "sparsecraft::one_token takes one contiguous float32 CPU token");
    STD_TORCH_CHECK(arrays.size() == 3 || arrays.size() == 4, "sparsecraft::one_token: 3 or 4 arrays, values last");
    STD_TORCH_CHECK(!bias || (bias->scalar_type() == ScalarType::Float && bias->is_contiguous() && bias->numel() == out),
                    "sparsecraft::one_token: the bias must be a contiguous float32 vector of the output size");
    const Tensor& values = arrays.back();
    ScPlan plan{static_cast<int32_t>(kind), static_cast<int32_t>(vdtype), out, in, nnz, min_work, row_bytes,
                arrays[0].data_ptr(), arrays[1].data_ptr(), arrays.size() > 3 ? arrays[2].data_ptr() : nullptr,
                values.data_ptr(), static_cast<int32_t>(bh), static_cast<int32_t>(bw)};
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = out;
    Tensor y = torch::stable::new_empty(x, shape);
    const int rc = sc_run_one(&plan, static_cast<const float*>(x.data_ptr()), static_cast<float*>(y.data_ptr()),
                              bias ? static_cast<const float*>(bias->data_ptr()) : nullptr);
    STD_TORCH_CHECK(rc == 0, "sparsecraft::one_token: kernel failed with code ", rc);
    return y;
}

}  // namespace

// The schema is defined on the Python side (custom_op.py), with the shape function compiled graphs need.
STABLE_TORCH_LIBRARY_IMPL(sparsecraft, CPU, m) { m.impl("one_token", TORCH_BOX(&one_token)); }
