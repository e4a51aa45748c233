// Linears in int8 arithmetic (w8a8.cpp), for decode_stack.cpp as well as from Python.
#pragma once
#include <torch/extension.h>

torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor w_scale, c10::optional<torch::Tensor> bias);
void register_w8a8(pybind11::module& m);
