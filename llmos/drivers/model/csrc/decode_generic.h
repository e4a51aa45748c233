// The generic decode kernel: any head dim, any number of query heads per kv head, any
// pool dtype. Runs where the vector kernel (decode_vec.h) has no instance for the geometry.
// One pass over the context with an online softmax (running max and sum, rescaled once per
// chunk of rows), the inner loops left to gcc's vectorizer (`omp simd`).
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "exp_poly.h"

namespace llmos_decode {

constexpr int64_t CHUNK = 32;   // rows scored before their softmax and values: fits L1

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

// exp(x) for x <= 0 (scores minus their running max), to ~1 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial, 2^n put into the exponent bits.
// Plain arithmetic, so a `omp simd` loop over it becomes vector code (std::exp does not,
// without -ffast-math).
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);                       // exp(-87) ~ 1.6e-38: still a normal float
  const float n = std::nearbyint(x * LOG2E);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return exp_reduced((x - n * LN2_HI) - n * LN2_LO) * scale;
}

template <int DT>
inline float dot(const float* a, const float* b, int64_t D) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < (DT ? DT : D); ++d) s += a[d] * b[d];
  return s;
}

template <int DT>
inline void axpy(float p, const float* x, float* acc, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < (DT ? DT : D); ++d) acc[d] += p * x[d];
}

// DT: the head dim when known at compile time (64, 128: unrolled into whole vectors), else 0.
template <typename T, int DT>
void decode(const float* q, const T* k, const T* v, const int64_t* tables, const int64_t* ctx,
            float* out, int64_t Nd, int64_t H, int64_t KVH, int64_t Drt, int64_t bs, int64_t MB,
            float scale) {
  const int64_t D = DT ? DT : Drt, G = H / KVH, stride = KVH * D;   // between rows of one head
  at::parallel_for(0, Nd * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qs(G * D), acc(G * D), rows(CHUNK * D), s(G * CHUNK), top(G), sum(G);
    for (int64_t w = begin; w < end; ++w) {
      const int64_t i = w / KVH, h = w % KVH, L = ctx[i];
      const int64_t* table = tables + i * MB;
      for (int64_t x = 0; x < G * D; ++x) qs[x] = q[(i * H + h * G) * D + x] * scale;
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(sum.begin(), sum.end(), 0.f);
      std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
      for (int64_t b = 0; b * bs < L; ++b) {
        const int64_t first = table[b] * bs * KVH + h;           // row 0 of this head in block b
        const int64_t in_block = std::min(bs, L - b * bs);
        for (int64_t r0 = 0; r0 < in_block; r0 += CHUNK) {
          const int64_t n = std::min(CHUNK, in_block - r0);
          const T* kr = k + (first + r0 * KVH) * D;
          const T* vr = v + (first + r0 * KVH) * D;
          for (int64_t r = 0; r < n; ++r) load_row<DT>(kr + r * stride, rows.data() + r * D, D);
          for (int64_t g = 0; g < G; ++g) {
            float* sg = s.data() + g * CHUNK;
            float m = top[g];
            for (int64_t r = 0; r < n; ++r) m = std::max(m, sg[r] = dot<DT>(qs.data() + g * D, rows.data() + r * D, D));
            if (m > top[g]) {                                     // a new max: rescale what is summed so far
              const float c = exp_nonpositive(top[g] - m);
              sum[g] *= c;
              float* a = acc.data() + g * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) a[d] *= c;
              top[g] = m;
            }
            float total = 0.f;
#pragma omp simd reduction(+ : total)
            for (int64_t r = 0; r < n; ++r) total += (sg[r] = exp_nonpositive(sg[r] - m));
            sum[g] += total;
          }
          for (int64_t r = 0; r < n; ++r) load_row<DT>(vr + r * stride, rows.data() + r * D, D);
          for (int64_t g = 0; g < G; ++g) {
            const float* sg = s.data() + g * CHUNK;
            float* a = acc.data() + g * D;
            for (int64_t r = 0; r < n; ++r) axpy<DT>(sg[r], rows.data() + r * D, a, D);
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const float inv = 1.f / sum[g];
        for (int64_t d = 0; d < D; ++d) out[(i * H + h * G + g) * D + d] = acc[g * D + d] * inv;
      }
    }
  });
}

}  // namespace llmos_decode
