// Matrix-vector products over 4- and 8-bit weight groups (quant_gemv.cpp), registered into
// the one extension module.
#pragma once
#include <torch/extension.h>

void register_quant_gemv(pybind11::module& m);

// x @ w.T + bias over 4-bit groups, as the Python binding q4_linear (decode_stack.cpp calls it).
torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& bias);
