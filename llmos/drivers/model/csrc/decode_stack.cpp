// The decoder layers of one decode step in a single call: what lean.py's loop does for a step
// of decoding tokens with the native norms, rotary and paged attention, and either the 4-bit
// products (steps of up to four tokens) or the packed bf16 ones (oneDNN's prepacked linears,
// as PackedLinear calls them: bigger steps of 4-bit models, and every step of bf16 ones),
// with the same functions called in the same order on the same tensors (so the same bits),
// but without the ~15 Python-level calls a layer, each with its argument
// parsing, tensor views and dispatch: ~30 layers x 15 of them were a third of a one-stream
// step (docs/model-driver.md). Only the loop moved here; every number is computed by the
// kernels lean.py calls (q4_linear or mkldnn::_linear_pointwise, rms_norm_bf16, rotary_bf16_,
// paged_decode, and ATen's index_copy_, silu and mul). decode_stack.py decides when a step may come here.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <torch/extension.h>

#include <vector>

#include "decode_stack.h"
#include "layer_ops.h"
#include "paged_decode.h"
#include "quant_gemv.h"
#include "w8a8.h"

namespace {

constexpr int64_t PRODUCTS = 4;   // per layer: qkv, o, gate_up, down
constexpr int64_t POOL_VIEWS = 4; // per layer: k and v by slot, k and v by block rows

using OptT = c10::optional<torch::Tensor>;

// y = x W^T + b through oneDNN with W prepacked: the very op PackedLinear.forward calls, with
// the same arguments, through the dispatcher (boxed: no C++ signature of ours to drift from it).
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& w, const OptT& b) {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack{x, w, b, std::string("none"), c10::List<c10::optional<c10::Scalar>>(),
                          c10::optional<std::string>(std::string(""))};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// x: the embedded tokens [T, hidden] (bf16, contiguous); returns the hidden state after the
// last layer (before the final norm). cos/sin [T, D]. Per layer i: norms[2i], norms[2i + 1]
// (input and post-attention), products[4i + j] = (codes, scales, mins) at 3 (4i + j), biases
// likewise; with `dense`, packed[4i + j] and packed_biases[4i + j] instead (oneDNN's layout),
// or where packed_scales is given, int8 weights [K, N] with their row scales and float biases
// (w8a8_linear, --dtype int8);
// pool[4i..4i+3] = k slots, v slots, k block rows, v block rows.
torch::Tensor decode_stack(torch::Tensor x, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> norms,
                           std::vector<torch::Tensor> products, std::vector<OptT> biases, std::vector<torch::Tensor> packed,
                           std::vector<OptT> packed_biases, std::vector<torch::Tensor> packed_scales, bool dense, std::vector<torch::Tensor> pool,
                           torch::Tensor slots, torch::Tensor tables, torch::Tensor ctx, int64_t H, int64_t KVH, int64_t D,
                           double eps, int64_t lanes, double scale) {
  const int64_t L = static_cast<int64_t>(norms.size()) / 2, T = x.size(0);
  TORCH_CHECK(L > 0 && static_cast<int64_t>(norms.size()) == 2 * L, "two norms a layer");
  if (dense) {
    TORCH_CHECK(static_cast<int64_t>(packed.size()) == PRODUCTS * L &&
                static_cast<int64_t>(packed_biases.size()) == PRODUCTS * L, "four packed products a layer, and biases");
    TORCH_CHECK(packed_scales.empty() || static_cast<int64_t>(packed_scales.size()) == PRODUCTS * L,
                "int8 products: one row-scale vector each");
  } else {
    TORCH_CHECK(static_cast<int64_t>(products.size()) == 3 * PRODUCTS * L &&
                static_cast<int64_t>(biases.size()) == PRODUCTS * L, "four products a layer: (codes, scales, mins), bias");
  }
  TORCH_CHECK(static_cast<int64_t>(pool.size()) == POOL_VIEWS * L, "four pool views a layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kBFloat16, "x: contiguous bf16 [T, hidden]");
  TORCH_CHECK(slots.numel() == T && ctx.numel() == T && tables.size(0) == T, "one slot, context and table a token");
  auto product = [&](const torch::Tensor& in, int64_t i, int64_t j) {
    const int64_t p = PRODUCTS * i + j;
    if (dense && !packed_scales.empty()) return w8a8_linear(in, packed[p], packed_scales[p], packed_biases[p]);
    if (dense) return packed_linear(in, packed[p], packed_biases[p]);
    return q4_linear(in, products[3 * p], products[3 * p + 1], products[3 * p + 2], biases[p]);
  };
  torch::Tensor h = rms_norm_bf16(x, c10::nullopt, norms[0], eps, lanes);
  for (int64_t i = 0; i < L; ++i) {
    auto qkv = product(h, i, 0).view({T, H + 2 * KVH, D});
    auto qk = qkv.slice(1, 0, H + KVH), v = qkv.slice(1, H + KVH);
    rotary_bf16_(qk, cos, sin);
    auto& k_slots = pool[POOL_VIEWS * i];
    k_slots.index_copy_(0, slots, qk.slice(1, H).to(k_slots.scalar_type()));
    pool[POOL_VIEWS * i + 1].index_copy_(0, slots, v.to(k_slots.scalar_type()));
    auto o = paged_decode(qk.slice(1, 0, H), pool[POOL_VIEWS * i + 2], pool[POOL_VIEWS * i + 3], tables, ctx, scale, 0);
    if (o.scalar_type() != x.scalar_type()) o = o.to(x.scalar_type());
    h = rms_norm_bf16(x, product(o.reshape({T, H * D}), i, 1), norms[2 * i + 1], eps, lanes);   // x += o first
    auto gu = product(h, i, 2);
    const int64_t inter = gu.size(1) / 2;
    h = at::silu(gu.slice(1, 0, inter)) * gu.slice(1, inter);
    auto down = product(h, i, 3);
    if (i + 1 < L) h = rms_norm_bf16(x, down, norms[2 * (i + 1)], eps, lanes);
    else x = x + down;
  }
  return x;
}

}  // namespace

void register_decode_stack(pybind11::module& m) {
  m.def("decode_stack", &decode_stack, "the decoder layers of a decode step (bf16; 4-bit, packed or int8 products)",
        py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("norms"), py::arg("products"), py::arg("biases"),
        py::arg("packed"), py::arg("packed_biases"), py::arg("packed_scales"), py::arg("dense"), py::arg("pool"), py::arg("slots"),
        py::arg("tables"), py::arg("ctx"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("eps"), py::arg("lanes"), py::arg("scale"));
}
