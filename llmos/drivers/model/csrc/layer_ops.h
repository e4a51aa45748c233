// The layer's small fused ops (layer_ops.cpp), registered into the one extension module.
#pragma once
#include <torch/extension.h>

void register_layer_ops(pybind11::module& m);

// Called by decode_stack.cpp as well as from Python (layer_ops.cpp).
torch::Tensor rms_norm_bf16(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor w, double eps,
                            int64_t lanes);
void rotary_bf16_(torch::Tensor qk, torch::Tensor cos, torch::Tensor sin);
