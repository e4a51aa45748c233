// Prefill attention read in place from the kernel's paged KV pool (CPU, bfloat16).
//
// torch's CPU SDPA runs a 1,024-token causal prefill at ~110 GFLOP/s on these cores, a third
// of a step. This kernel is a blocked flash attention in AVX-512 BF16 (vdpbf16ps: 32 bf16
// products a cycle into 16 float sums): a tile of 16 queries, one per lane, against chunks
// of 32 keys. Per chunk: the scores as 32 vectors of 16 rows (the keys broadcast from a
// staged copy, so no transpose of k), the online softmax down the lanes (vertical max and
// sum, no horizontal reductions), then the weighted values with the weights and v both in
// vdpbf16ps's pair layout. The G query heads that share a kv head use the same staged chunk.
// Float scores, sums and outputs; the weights are rounded to bf16 for the value products, as
// SDPA's bf16 path does. Chunked prefill comes free: the context of earlier chunks is read
// from the pool through the block table like the new tokens.
//
// Built only where the compiler targets AVX-512 BF16 (-march=native); elsewhere
// paged_prefill_bf16 answers false and the caller uses SDPA.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include "paged_prefill.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

#include "exp_poly.h"

namespace {

constexpr int64_t QT = 16;   // queries of a tile, one per lane
constexpr int64_t KC = 32;   // keys of a chunk
using BF = c10::BFloat16;

// Lanes (a0, b0, a1, b1, ...): two rows of 16 bf16 as the pairs vdpbf16ps multiplies.
inline __m512i interleave(__m256i a, __m256i b) {
  alignas(64) static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
  return _mm512_permutexvar_epi16(_mm512_load_si512(order), both);
}

inline __m256i to_bf16(__m512 x) { return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x)); }

// 2^x for x <= 0 (clamped at -126, where the result is below every weight that counts).
inline __m512 exp2_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-126.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = (x - n) * _mm512_set1_ps(1.f / llmos_decode::LOG2E);
  return _mm512_scalef_ps(llmos_decode::exp_reduced(r), n);
}

struct Geometry {
  const BF* q; int64_t q_row;            // q [T, H, D] with rows q_row apart, heads D apart
  const BF* k; const BF* v;              // one pool layer [num_blocks, bs, KVH, D]
  const int64_t* tables; int64_t MB;     // [P, MB]
  const int64_t *q0, *len, *start;       // [P] each
  BF* out; int64_t out_row;              // [T, H, D]
  int64_t H, KVH, bs;
  float scale_log2;                      // softmax scale * log2(e): scores are exponentiated as 2^x
};

// One task: queries [t0, t0 + QT) of sequence p, for the G heads of kv head kvh.
template <int64_t D, int64_t G>
void tile(const Geometry& g, int64_t p, int64_t kvh, int64_t t0) {
  constexpr int64_t DV = D / 16, PAIRS = D / 2, RB = DV == 4 ? 4 : 2;   // RB rows of accumulators at once
  const int64_t n = std::min(QT, g.len[p] - t0), first = g.start[p] + t0, kend = first + n;
  alignas(64) int32_t qp[G][PAIRS][QT];            // the queries as pairs, one row per lane
  alignas(64) float o[G][QT][D] = {};
  alignas(64) float m[G][QT], l[G][QT] = {};
  alignas(64) BF kc[KC][D];                        // the chunk's keys, staged contiguously
  alignas(64) int32_t vp[KC / 2][DV][16];          // its values as pairs of keys
  alignas(64) int32_t pp[KC / 2][QT];              // the weights as pairs of keys
  alignas(64) float alpha[QT];
  for (int64_t h = 0; h < G; ++h) {
    std::fill(m[h], m[h] + QT, -std::numeric_limits<float>::infinity());
    for (int64_t r = 0; r < QT; ++r) {   // rows past the sequence repeat its last query, unused
      const auto* row = reinterpret_cast<const int32_t*>(g.q + (g.q0[p] + t0 + std::min(r, n - 1)) * g.q_row +
                                                         (kvh * G + h) * D);
      for (int64_t i = 0; i < PAIRS; ++i) qp[h][i][r] = row[i];
    }
  }
  alignas(64) int32_t lane_pos[QT];
  for (int64_t r = 0; r < QT; ++r) lane_pos[r] = static_cast<int32_t>(first + std::min(r, n - 1));
  const __m512i qpos = _mm512_load_si512(lane_pos);
  const int64_t* table = g.tables + p * g.MB;
  const int64_t kv_row = g.KVH * D;
  for (int64_t c0 = 0; c0 < kend; c0 += KC) {
    const int64_t nk = std::min(KC, kend - c0);
    const BF* vrow[KC];
    for (int64_t j = 0; j < KC; ++j) {   // keys past the context repeat the chunk's first, weight 0
      const int64_t t = c0 + (j < nk ? j : 0);
      const int64_t off = (table[t / g.bs] * g.bs + t % g.bs) * kv_row + kvh * D;
      std::memcpy(kc[j], g.k + off, D * sizeof(BF));
      vrow[j] = g.v + off;
    }
    for (int64_t t = 0; t < KC / 2; ++t)
      for (int64_t d = 0; d < DV; ++d)
        _mm512_store_si512(vp[t][d], interleave(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow[2 * t] + 16 * d)),
                                                _mm256_loadu_si256(reinterpret_cast<const __m256i*>(vrow[2 * t + 1] + 16 * d))));
    const bool masked = c0 + KC - 1 > first;   // some key of the chunk lies past some query
    for (int64_t h = 0; h < G; ++h) {
      __m512 s[KC];
      for (int64_t half = 0; half < KC; half += 16) {
#pragma GCC unroll 16
        for (int64_t j = 0; j < 16; ++j) s[half + j] = _mm512_setzero_ps();
        for (int64_t i = 0; i < PAIRS; ++i) {
          const __m512bh qv = reinterpret_cast<__m512bh>(_mm512_load_si512(qp[h][i]));
#pragma GCC unroll 16
          for (int64_t j = 0; j < 16; ++j) {
            int32_t pair;
            std::memcpy(&pair, &kc[half + j][2 * i], sizeof pair);
            s[half + j] = _mm512_dpbf16_ps(s[half + j], qv, reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair)));
          }
        }
      }
      const __m512 old_m = _mm512_load_ps(m[h]);
      __m512 new_m = old_m;
#pragma GCC unroll 32
      for (int64_t j = 0; j < KC; ++j) {
        s[j] = s[j] * _mm512_set1_ps(g.scale_log2);
        if (masked) {   // key c0 + j is seen by the lanes whose query sits at or after it
          const __mmask16 sees = j < nk ? _mm512_cmpge_epi32_mask(qpos, _mm512_set1_epi32(static_cast<int32_t>(c0 + j))) : 0;
          s[j] = _mm512_mask_mov_ps(_mm512_set1_ps(-std::numeric_limits<float>::infinity()), sees, s[j]);
        }
        new_m = _mm512_max_ps(new_m, s[j]);
      }
      const __m512 a = exp2_neg(old_m - new_m);
      __m512 sum = _mm512_setzero_ps();
#pragma GCC unroll 32
      for (int64_t j = 0; j < KC; ++j) {
        const __mmask16 finite = _mm512_cmp_ps_mask(s[j], _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
        s[j] = _mm512_maskz_mov_ps(finite, exp2_neg(s[j] - new_m));
        sum = sum + s[j];
      }
      _mm512_store_ps(m[h], new_m);
      _mm512_store_ps(l[h], _mm512_load_ps(l[h]) * a + sum);
      _mm512_store_ps(alpha, a);
      for (int64_t t = 0; t < KC / 2; ++t) _mm512_store_si512(pp[t], interleave(to_bf16(s[2 * t]), to_bf16(s[2 * t + 1])));
      for (int64_t r0 = 0; r0 < QT; r0 += RB) {
        __m512 acc[RB][DV];
#pragma GCC unroll 8
        for (int64_t r = 0; r < RB; ++r)
#pragma GCC unroll 8
          for (int64_t d = 0; d < DV; ++d) acc[r][d] = _mm512_load_ps(o[h][r0 + r] + 16 * d) * _mm512_set1_ps(alpha[r0 + r]);
        for (int64_t t = 0; t < KC / 2; ++t) {
          __m512bh vv[DV];
#pragma GCC unroll 8
          for (int64_t d = 0; d < DV; ++d) vv[d] = reinterpret_cast<__m512bh>(_mm512_load_si512(vp[t][d]));
#pragma GCC unroll 8
          for (int64_t r = 0; r < RB; ++r) {
            const __m512bh w = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pp[t][r0 + r]));
#pragma GCC unroll 8
            for (int64_t d = 0; d < DV; ++d) acc[r][d] = _mm512_dpbf16_ps(acc[r][d], w, vv[d]);
          }
        }
#pragma GCC unroll 8
        for (int64_t r = 0; r < RB; ++r)
#pragma GCC unroll 8
          for (int64_t d = 0; d < DV; ++d) _mm512_store_ps(o[h][r0 + r] + 16 * d, acc[r][d]);
      }
    }
  }
  for (int64_t h = 0; h < G; ++h)
    for (int64_t r = 0; r < n; ++r) {
      BF* dst = g.out + (g.q0[p] + t0 + r) * g.out_row + (kvh * G + h) * D;
      const __m512 inv = _mm512_set1_ps(1.f / l[h][r]);
      for (int64_t d = 0; d < DV; ++d)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 16 * d), to_bf16(_mm512_load_ps(o[h][r] + 16 * d) * inv));
    }
}

template <int64_t D, int64_t G>
void run(const Geometry& g, int64_t P) {
  std::vector<int64_t> tasks;   // (sequence, kv head, tile) flattened, the longest contexts first
  for (int64_t p = 0; p < P; ++p)
    for (int64_t t0 = 0; t0 < g.len[p]; t0 += QT)
      for (int64_t h = 0; h < g.KVH; ++h) tasks.push_back((p * g.MB * g.bs + t0) * g.KVH + h);
  std::sort(tasks.begin(), tasks.end(), [&](int64_t a, int64_t b) {
    auto cost = [&](int64_t x) { const int64_t pt = x / g.KVH; const int64_t span = g.MB * g.bs;
                                 return g.start[pt / span] + pt % span; };
    return cost(a) > cost(b);
  });
  // Tasks differ in cost (a tile sees the context before it): handed out one at a time.
  const int64_t num = static_cast<int64_t>(tasks.size());
#pragma omp parallel for schedule(dynamic, 1) num_threads(at::get_num_threads())
  for (int64_t i = 0; i < num; ++i) {
    const int64_t x = tasks[i], pt = x / g.KVH, span = g.MB * g.bs;
    tile<D, G>(g, pt / span, x % g.KVH, pt % span);
  }
}

template <int64_t D>
bool pick_g(const Geometry& g, int64_t G, int64_t P) {
  switch (G) {
    case 1: run<D, 1>(g, P); return true;
    case 2: run<D, 2>(g, P); return true;
    case 3: run<D, 3>(g, P); return true;
    case 4: run<D, 4>(g, P); return true;
    case 5: run<D, 5>(g, P); return true;
    case 6: run<D, 6>(g, P); return true;
    case 7: run<D, 7>(g, P); return true;
    case 8: run<D, 8>(g, P); return true;
    default: return false;
  }
}

}  // namespace
#endif

// q [T, H, D] bf16 (rows any stride, heads contiguous); k_blocks, v_blocks [num_blocks, bs, KVH, D]
// bf16 (one pool layer, the new tokens already written); tables [P, MB] int64; q0, lens, starts [P]
// int64: sequence p's new tokens are rows q0..q0+len of q at positions start..start+len, its
// context the first start+len slots of its table. Writes those rows of out [T, H, D] bf16.
// False (nothing written) where this build or geometry has no kernel: the caller uses SDPA.
bool paged_prefill_bf16(torch::Tensor q, torch::Tensor k_blocks, torch::Tensor v_blocks, torch::Tensor tables,
                        torch::Tensor q0, torch::Tensor lens, torch::Tensor starts, torch::Tensor out, double scale) {
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
  TORCH_CHECK(q.dim() == 3 && out.sizes() == q.sizes() && k_blocks.dim() == 4 && v_blocks.sizes() == k_blocks.sizes(),
              "bad shapes");
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
              k_blocks.scalar_type() == at::kBFloat16 && v_blocks.scalar_type() == at::kBFloat16, "bfloat16 only");
  TORCH_CHECK(k_blocks.is_contiguous() && v_blocks.is_contiguous() && q.stride(2) == 1 && out.stride(2) == 1 &&
              q.stride(1) == q.size(2) && out.stride(1) == out.size(2), "layouts");
  for (auto* t : {&tables, &q0, &lens, &starts}) TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "int64");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), NB = k_blocks.size(0), bs = k_blocks.size(1),
                KVH = k_blocks.size(2), P = q0.size(0), MB = tables.size(1);
  TORCH_CHECK(k_blocks.size(3) == D && KVH > 0 && H % KVH == 0 && tables.size(0) == P && lens.size(0) == P &&
              starts.size(0) == P, "geometry");
  if (D != 64 && D != 128) return false;
  const int64_t *qa = q0.data_ptr<int64_t>(), *la = lens.data_ptr<int64_t>(), *sa = starts.data_ptr<int64_t>(),
                *ta = tables.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p) {   // the plan was checked; a wrong one must still not read outside the pool
    TORCH_CHECK(la[p] >= 1 && qa[p] >= 0 && qa[p] + la[p] <= T && sa[p] >= 0 && sa[p] + la[p] <= MB * bs, "rows");
    for (int64_t b = 0; b < (sa[p] + la[p] + bs - 1) / bs; ++b) TORCH_CHECK(ta[p * MB + b] >= 0 && ta[p * MB + b] < NB, "block");
  }
  const Geometry g{q.data_ptr<BF>(), q.stride(0), k_blocks.data_ptr<BF>(), v_blocks.data_ptr<BF>(), ta, MB, qa, la, sa,
                   out.data_ptr<BF>(), out.stride(0), H, KVH, bs, static_cast<float>(scale) * llmos_decode::LOG2E};
  return D == 64 ? pick_g<64>(g, H / KVH, P) : pick_g<128>(g, H / KVH, P);
#else
  return false;
#endif
}

void register_paged_prefill(pybind11::module& m) {
  m.def("paged_prefill_bf16", &paged_prefill_bf16, "causal prefill attention over a paged bf16 KV pool (AVX-512 BF16)",
        py::arg("q"), py::arg("k_blocks"), py::arg("v_blocks"), py::arg("tables"), py::arg("q0"), py::arg("lens"),
        py::arg("starts"), py::arg("out"), py::arg("scale"));
}
