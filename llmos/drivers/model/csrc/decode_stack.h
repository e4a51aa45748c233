// A whole decode step of the decoder's layers in one call (decode_stack.cpp), registered into
// the one extension module.
#pragma once
#include <torch/extension.h>

void register_decode_stack(pybind11::module& m);
