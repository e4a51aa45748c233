// Matrix-vector products over 4- and 8-bit weight groups (quant_gemv.cpp), registered into
// the one extension module.
#pragma once
#include <torch/extension.h>

void register_quant_gemv(pybind11::module& m);
