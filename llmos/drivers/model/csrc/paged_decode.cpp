// Decode attention read in place from the kernel's paged KV pool (CPU).
//
// One query token per sequence. For each (sequence, kv head) pair the G query heads that
// share the kv head walk the context once, block by block, straight from the pool: no
// gather into a padded copy, no mask, each k/v row read once for the G heads. The softmax
// is online (flash-decoding's running max and sum, rescaled once per chunk of rows), so
// k and v of a chunk are read while they are still in cache and nothing of length L is
// stored. Float accumulation whatever the pool dtype (float32, bfloat16, float16).
//
// Two kernels: decode_vec.h for bfloat16/float32 pools with head dims 64 or 128 and 1-8
// query heads per kv head (queries and sums in registers), decode_generic.h for the rest.
#include <torch/extension.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "decode_generic.h"
#include "decode_stack.h"
#include "decode_vec.h"
#include "layer_ops.h"
#include "paged_prefill.h"
#include "quant_gemv.h"
#include "w8a8.h"

using namespace llmos_decode;

// q [Nd, H, D]; k_blocks, v_blocks [num_blocks, block_size, KVH, D] (one layer of the pool);
// block_tables [Nd, MB] int64 (valid where t < ctx_lens[i]); ctx_lens [Nd] int64 in 1..MB*bs.
// Returns [Nd, H, D]: bfloat16 for bf16 queries on a bf16 pool of the vector kernel's geometry,
// else float32. The caller checked the plan: ids are in range. parts: ranges
// each (sequence, kv head) pair's context is split into (decode_vec.h); 0 chooses.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_blocks, torch::Tensor v_blocks,
                           torch::Tensor block_tables, torch::Tensor ctx_lens, double scale, int64_t parts) {
  TORCH_CHECK(q.dim() == 3 && k_blocks.dim() == 4 && v_blocks.sizes() == k_blocks.sizes(), "bad shapes");
  TORCH_CHECK(k_blocks.is_contiguous() && v_blocks.is_contiguous(), "pool layers must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong, "int64 tables");
  const int64_t Nd = q.size(0), H = q.size(1), D = q.size(2), bs = k_blocks.size(1), KVH = k_blocks.size(2);
  TORCH_CHECK(k_blocks.size(3) == D && H % KVH == 0, "head geometry");
  TORCH_CHECK(block_tables.size(0) == Nd && ctx_lens.size(0) == Nd, "one table per sequence");
  auto tables = block_tables.contiguous();
  auto ctx = ctx_lens.contiguous();
  const int64_t MB = tables.size(1);
  // bounds by hand: per layer, min()/max()/item() would be six tensor ops for a few numbers
  const int64_t* lens = ctx.data_ptr<int64_t>();
  int64_t shortest = Nd == 0 ? 1 : lens[0], longest_len = Nd == 0 ? 0 : lens[0];
  for (int64_t i = 1; i < Nd; ++i) {
    shortest = std::min(shortest, lens[i]);
    longest_len = std::max(longest_len, lens[i]);
  }
  TORCH_CHECK(shortest >= 1 && longest_len <= MB * bs, "context length");
  torch::Tensor out;
  const int64_t G = H / KVH;
  TORCH_CHECK(parts >= 0, "parts must be >= 0");
  if (parts == 0) {   // two ranges a thread when there are too few pairs, of 8 blocks at least
    const int64_t pairs = std::max<int64_t>(1, Nd * KVH), threads = at::get_num_threads();
    const int64_t longest = (longest_len + bs - 1) / bs;
    parts = pairs >= 2 * threads ? 1 : std::clamp<int64_t>(longest / 8, 1, (2 * threads + pairs - 1) / pairs);
  }
  auto fast = [&](auto* elem, auto* query) -> bool {   // the vector kernel where it fits this geometry
    using T = std::remove_pointer_t<decltype(elem)>;
    using Q = std::remove_pointer_t<decltype(query)>;
    auto fn = D == 64 ? pick_vec<T, Q, 4>(G) : D == 128 ? pick_vec<T, Q, 8>(G) : nullptr;
    if (fn == nullptr) return false;
    // bf16 queries are read in place (any row stride) and the output is bf16: the casts
    // around the kernel were two more ops a layer. Otherwise float, as the generic kernel.
    const bool as_is = std::is_same_v<Q, c10::BFloat16>;
    auto qq = as_is ? q : q.to(at::kFloat);
    if (qq.stride(2) != 1 || qq.stride(1) != D) qq = qq.contiguous();
    out = torch::empty({Nd, H, D}, q.options().dtype(as_is ? at::kBFloat16 : at::kFloat));
    torch::Tensor scratch;
    if (parts > 1) scratch = torch::empty({Nd * KVH * parts, G * (D + 2)}, q.options().dtype(at::kFloat));
    fn(qq.data_ptr<Q>(), qq.stride(0), k_blocks.data_ptr<T>(), v_blocks.data_ptr<T>(), tables.data_ptr<int64_t>(),
       ctx.data_ptr<int64_t>(), out.data_ptr<Q>(), Nd, KVH, bs, MB, static_cast<float>(scale), parts,
       parts > 1 ? scratch.data_ptr<float>() : nullptr);
    return true;
  };
  using BF = c10::BFloat16;
  if (k_blocks.scalar_type() == at::kBFloat16 && q.scalar_type() == at::kBFloat16 &&
      fast(static_cast<BF*>(nullptr), static_cast<BF*>(nullptr))) return out;
  if (k_blocks.scalar_type() == at::kBFloat16 && fast(static_cast<BF*>(nullptr), static_cast<float*>(nullptr))) return out;
  if (k_blocks.scalar_type() == at::kFloat && fast(static_cast<float*>(nullptr), static_cast<float*>(nullptr))) return out;
  auto qf = q.to(at::kFloat).contiguous();   // the generic kernel: float queries and output
  out = torch::empty({Nd, H, D}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, k_blocks.scalar_type(), "paged_decode", [&] {
    auto run = [&](auto fn) {
      fn(qf.data_ptr<float>(), k_blocks.data_ptr<scalar_t>(), v_blocks.data_ptr<scalar_t>(),
         tables.data_ptr<int64_t>(), ctx.data_ptr<int64_t>(), out.data_ptr<float>(), Nd, H, KVH, D, bs, MB,
         static_cast<float>(scale));
    };
    if (D == 64) run(decode<scalar_t, 64>);
    else if (D == 128) run(decode<scalar_t, 128>);
    else run(decode<scalar_t, 0>);
  });
  return out;
}

// How many threads at::parallel_for runs here: torch's intra-op count when this module
// shares torch's OpenMP runtime (built without -fopenmp it silently ran on one).
int64_t parallel_threads(int64_t work) {
  std::vector<int> used(at::get_num_threads(), 0);
  at::parallel_for(0, work, 1, [&](int64_t, int64_t) { used.at(at::get_thread_num()) = 1; });
  return std::count(used.begin(), used.end(), 1);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV pool (CPU)", py::arg("q"),
        py::arg("k_blocks"), py::arg("v_blocks"), py::arg("block_tables"), py::arg("ctx_lens"), py::arg("scale"),
        py::arg("parts") = 0);
  m.def("parallel_threads", &parallel_threads, "threads that at::parallel_for uses for this much work");
  register_layer_ops(m);
  register_quant_gemv(m);
  register_decode_stack(m);
  register_paged_prefill(m);
  register_w8a8(m);
}
