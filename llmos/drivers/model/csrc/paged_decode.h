// Decode attention over the paged KV pool (paged_decode.cpp), for decode_stack.cpp.
#pragma once
#include <torch/extension.h>

torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_blocks, torch::Tensor v_blocks,
                           torch::Tensor block_tables, torch::Tensor ctx_lens, double scale, int64_t parts);
