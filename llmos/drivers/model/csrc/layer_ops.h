// The layer's small fused ops (layer_ops.cpp), registered into the one extension module.
#pragma once
#include <torch/extension.h>

void register_layer_ops(pybind11::module& m);
