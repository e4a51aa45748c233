// Decode attention read in place from the kernel's paged KV pool (CPU).
//
// One query token per sequence. For each (sequence, kv head) pair the G query heads that
// share the kv head are scored against the context rows straight from their blocks: no
// gather into a padded copy, no mask, each k/v row read once for the G heads. Float
// accumulation whatever the pool dtype (float32, bfloat16, float16).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

// Row conversion to float. bfloat16 by hand (its upper 16 bits): the generic cast goes
// through c10's helpers, which the compiler does not vectorize.
template <int DT, typename T>
inline void load_row(const T* src, float* dst, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < (DT ? DT : D); ++d) dst[d] = static_cast<float>(src[d]);
}

template <int DT>
inline void load_row(const c10::BFloat16* src, float* dst, int64_t D) {
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
#pragma omp simd
  for (int64_t d = 0; d < (DT ? DT : D); ++d) out[d] = static_cast<uint32_t>(bits[d]) << 16;
}

// DT: the head dim when known at compile time (64, 128: unrolled into whole vectors), else 0.
template <typename T, int DT>
void decode(const float* q, const T* k, const T* v, const int64_t* tables, const int64_t* ctx,
            float* out, int64_t Nd, int64_t H, int64_t KVH, int64_t Drt, int64_t bs, int64_t MB,
            float scale) {
  const int64_t D = DT ? DT : Drt, G = H / KVH;
  at::parallel_for(0, Nd * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, row(D), rows(4 * D, 0.f), acc(G * D), qs(G * D), top(G), sum(G);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / KVH, h = w % KVH, L = ctx[i];
      const int64_t* table = tables + i * MB;
      for (int64_t x = 0; x < G * D; ++x) qs[x] = q[(i * H + h * G) * D + x] * scale;
      if (static_cast<int64_t>(scores.size()) < G * L) scores.resize(G * L);
      std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
      // Scores four context rows at a time: independent sums keep the vector units busy
      // instead of waiting on one horizontal reduction after another.
      constexpr int64_t R = 4;
      for (int64_t t0 = 0; t0 < L; t0 += R) {
        const int64_t n = std::min(R, L - t0);
        for (int64_t r = 0; r < n; ++r) {
          const int64_t t = t0 + r;
          load_row<DT>(k + ((table[t / bs] * bs + t % bs) * KVH + h) * D, rows.data() + r * D, D);
        }
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qs.data() + g * D;
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
          const float *r0 = rows.data(), *r1 = r0 + D, *r2 = r1 + D, *r3 = r2 + D;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
          for (int64_t d = 0; d < D; ++d) {
            s0 += qg[d] * r0[d];
            s1 += qg[d] * r1[d];
            s2 += qg[d] * r2[d];
            s3 += qg[d] * r3[d];
          }
          const float got[R] = {s0, s1, s2, s3};
          for (int64_t r = 0; r < n; ++r) {
            scores[g * L + t0 + r] = got[r];
            top[g] = std::max(top[g], got[r]);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float total = 0.f;
        for (int64_t t = 0; t < L; ++t) total += (scores[g * L + t] = std::exp(scores[g * L + t] - top[g]));
        sum[g] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        float* r = row.data();
        load_row<DT>(v + ((table[t / bs] * bs + t % bs) * KVH + h) * D, r, D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = scores[g * L + t];
          float* a = acc.data() + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * r[d];
        }
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < D; ++d) out[(i * H + h * G + g) * D + d] = acc[g * D + d] / sum[g];
    }
  });
}

}  // namespace

// q [Nd, H, D]; k_blocks, v_blocks [num_blocks, block_size, KVH, D] (one layer of the pool);
// block_tables [Nd, MB] int64 (valid where t < ctx_lens[i]); ctx_lens [Nd] int64 in 1..MB*bs.
// Returns [Nd, H, D] float32. The caller checked the plan: ids are in range.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor k_blocks, torch::Tensor v_blocks,
                           torch::Tensor block_tables, torch::Tensor ctx_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_blocks.dim() == 4 && v_blocks.sizes() == k_blocks.sizes(), "bad shapes");
  TORCH_CHECK(k_blocks.is_contiguous() && v_blocks.is_contiguous(), "pool layers must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && ctx_lens.scalar_type() == at::kLong, "int64 tables");
  const int64_t Nd = q.size(0), H = q.size(1), D = q.size(2), bs = k_blocks.size(1), KVH = k_blocks.size(2);
  TORCH_CHECK(k_blocks.size(3) == D && H % KVH == 0, "head geometry");
  TORCH_CHECK(block_tables.size(0) == Nd && ctx_lens.size(0) == Nd, "one table per sequence");
  auto qf = q.to(at::kFloat).contiguous();
  auto tables = block_tables.contiguous();
  auto ctx = ctx_lens.contiguous();
  const int64_t MB = tables.size(1);
  TORCH_CHECK(Nd == 0 || (ctx.min().item<int64_t>() >= 1 && ctx.max().item<int64_t>() <= MB * bs), "context length");
  auto out = torch::empty({Nd, H, D}, q.options().dtype(at::kFloat));
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", &paged_decode, "decode attention over a paged KV pool (CPU)");
}
