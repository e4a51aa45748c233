// Causal prefill attention over the paged KV pool (paged_prefill.cpp), registered into the one
// extension module.
#pragma once
#include <torch/extension.h>

void register_paged_prefill(pybind11::module& m);
