// The vector decode kernel: the geometries most models have, at memory speed.
#pragma once
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "exp_poly.h"

namespace llmos_decode {

// The fast path: bfloat16 or float32 pools, head dims of whole 16-float vectors (64, 128),
// 1-8 query heads per kv head, all known at compile time so that the queries and the
// accumulators live in registers. Written with gcc's vector types, which become AVX-512
// registers where -march=native has them and pairs of AVX2 registers where not. Per chunk
// of 16 rows (never across a block): score the rows, one softmax update for the chunk,
// then add the weighted values. The next block's rows are prefetched while this one is
// worked on, since blocks lie anywhere in the pool and no hardware prefetcher follows them.
typedef float f16v __attribute__((vector_size(64)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef uint32_t u16v __attribute__((vector_size(64)));
typedef uint16_t h16v __attribute__((vector_size(32)));
constexpr int64_t LANES = 16;

inline f16v load16(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline f16v load16(const c10::BFloat16* p) {   // bfloat16 is the upper half of a float
  h16v h;
  std::memcpy(&h, p, sizeof h);
  const u16v w = __builtin_convertvector(h, u16v) << 16;
  f16v v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

inline void store16(float* p, f16v r) { std::memcpy(p, &r, sizeof r); }

inline void store16(c10::BFloat16* p, f16v r) {   // round to nearest even, NaN to 0x7fc0, as c10 does
  u16v u;
  std::memcpy(&u, &r, sizeof u);
  const u16v rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const u16v nan = reinterpret_cast<u16v>((u & 0x7fffffffu) > 0x7f800000u);
  const h16v h = __builtin_convertvector((nan & 0x7fc0u) | (~nan & rounded), h16v);
  std::memcpy(p, &h, sizeof h);
}

// Sums of 16 vectors at once: four levels of folding halves together, 15 adds in all
// instead of a horizontal reduction per vector. Lane l of the result is the sum of
// t[l] when the partial sums were stored at t[bitrev4(row)] (the folds reverse the order).
constexpr int BITREV4[LANES] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};

inline f16v sum16(const f16v* t) {
  f16v c[8], e[4], f[2];
  for (int i = 0; i < 8; ++i)
    c[i] = __builtin_shufflevector(t[2 * i], t[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(t[2 * i], t[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)
    e[i] = __builtin_shufflevector(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27) +
           __builtin_shufflevector(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    f[i] = __builtin_shufflevector(e[2 * i], e[2 * i + 1], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29) +
           __builtin_shufflevector(e[2 * i], e[2 * i + 1], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31);
  return __builtin_shufflevector(f[0], f[1], 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30) +
         __builtin_shufflevector(f[0], f[1], 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31);
}

inline float lane_max(f16v v) {
  float lanes[LANES];
  std::memcpy(lanes, &v, sizeof lanes);
  float m = lanes[0];
  for (int i = 1; i < LANES; ++i) m = std::max(m, lanes[i]);
  return m;
}

inline f16v exp_nonpositive(f16v x) {            // decode_generic.h's exp_nonpositive, 16 lanes at a time
  x = x < -87.0f ? f16v{} - 87.0f : x;
  const f16v shifter = f16v{} + 12582912.0f;      // 1.5 * 2^23: adding it rounds to an integer
  const f16v n = (x * LOG2E + shifter) - shifter;
  const i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  f16v scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return exp_reduced((x - n * LN2_HI) - n * LN2_LO) * scale;
}

template <typename T>
inline void prefetch_rows(const T* first, int64_t rows, int64_t stride, int64_t row_bytes) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < row_bytes; b += 64) __builtin_prefetch(reinterpret_cast<const char*>(first + r * stride) + b);
}

// Parts: with fewer (sequence, kv head) pairs than threads can share (one long chat), each
// pair's blocks are split into `parts` ranges worked on apart, flash-decoding style; every
// range leaves its running max, sum and unnormalized values in `scratch`, and a second pass
// merges them. parts == 1 writes the output directly.
// Q: the queries' and the output's type (float, or bfloat16 read and written as is); q_row:
// the queries' row stride (they may be a view into the fused q/k/v projection).
template <typename T, typename Q, int NV, int G>   // NV: the head dim in vectors of 16; G: query heads per kv head
void decode_vec(const Q* q, int64_t q_row, const T* k, const T* v, const int64_t* tables, const int64_t* ctx,
                Q* out, int64_t Nd, int64_t KVH, int64_t bs, int64_t MB, float scale, int64_t parts,
                float* scratch) {
  constexpr int64_t D = NV * LANES, H_PER = G, SLOT = G * (D + 2);   // one range's partial: acc, top, sum
  const int64_t H = KVH * G, stride = KVH * D;
  const f16v iota = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  at::parallel_for(0, Nd * KVH * parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t pair = w / parts, part = w % parts, i = pair / KVH, h = pair % KVH, L = ctx[i];
      const int64_t* table = tables + i * MB;
      const Q* qi = q + i * q_row + h * H_PER * D;
      f16v qv[G][NV], acc[G][NV] = {}, partial[G][LANES];
      float top[G], sum[G] = {}, p[G][LANES];
      for (int g = 0; g < G; ++g) {
        top[g] = -std::numeric_limits<float>::infinity();
        for (int j = 0; j < NV; ++j) qv[g][j] = load16(qi + (g * NV + j) * LANES) * scale;
      }
      const int64_t blocks = (L + bs - 1) / bs;
      const int64_t b_end = blocks * (part + 1) / parts;
      for (int64_t b = blocks * part / parts; b < b_end; ++b) {
        const int64_t first = table[b] * bs * KVH + h;           // row 0 of this head in block b
        const int64_t in_block = std::min(bs, L - b * bs);
        if (b + 1 < b_end) {
          const int64_t next = table[b + 1] * bs * KVH + h, rows = std::min(bs, L - (b + 1) * bs);
          prefetch_rows(k + next * D, rows, stride, D * sizeof(T));
          prefetch_rows(v + next * D, rows, stride, D * sizeof(T));
        }
        for (int64_t r0 = 0; r0 < in_block; r0 += LANES) {
          const int64_t n = std::min(LANES, in_block - r0);
          const T* kr = k + (first + r0 * KVH) * D;
          const T* vr = v + (first + r0 * KVH) * D;
          for (int64_t r = 0; r < LANES; ++r) {
            if (r >= n) {                                        // a short chunk: nothing to score
              for (int g = 0; g < G; ++g) partial[g][BITREV4[r]] = f16v{};
              continue;
            }
            f16v row[NV];
            for (int j = 0; j < NV; ++j) row[j] = load16(kr + r * stride + j * LANES);
            for (int g = 0; g < G; ++g) {
              f16v t = qv[g][0] * row[0];
              for (int j = 1; j < NV; ++j) t += qv[g][j] * row[j];
              partial[g][BITREV4[r]] = t;
            }
          }
          const f16v live = iota < static_cast<float>(n) ? f16v{} : f16v{} - std::numeric_limits<float>::infinity();
          for (int g = 0; g < G; ++g) {
            const f16v scores = sum16(partial[g]) + live;        // rows past n score -inf
            const float m = std::max(top[g], lane_max(scores));
            if (m > top[g]) {                                     // a new max: rescale what is summed so far
              const float c = top[g] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(top[g] - m);
              sum[g] *= c;
              for (int j = 0; j < NV; ++j) acc[g][j] *= c;
              top[g] = m;
            }
            f16v e = exp_nonpositive(scores - m);
            e = iota < static_cast<float>(n) ? e : f16v{};
            std::memcpy(p[g], &e, sizeof e);
            float total = 0.f;
            for (int r = 0; r < LANES; ++r) total += p[g][r];
            sum[g] += total;
          }
          for (int64_t r = 0; r < n; ++r) {
            f16v row[NV];
            for (int j = 0; j < NV; ++j) row[j] = load16(vr + r * stride + j * LANES);
            for (int g = 0; g < G; ++g)
              for (int j = 0; j < NV; ++j) acc[g][j] += p[g][r] * row[j];
          }
        }
      }
      if (parts > 1) {                                           // leave this range's partial
        float* slot = scratch + w * SLOT;
        for (int g = 0; g < G; ++g) {
          std::memcpy(slot + g * D, acc[g], sizeof acc[g]);
          slot[G * D + g] = top[g];
          slot[G * D + G + g] = sum[g];
        }
        continue;
      }
      Q* o = out + (i * H + h * H_PER) * D;
      for (int g = 0; g < G; ++g) {
        const float inv = 1.f / sum[g];
        for (int j = 0; j < NV; ++j) store16(o + (g * NV + j) * LANES, acc[g][j] * inv);
      }
    }
  });
  if (parts == 1) return;
  at::parallel_for(0, Nd * KVH, 1, [&](int64_t begin, int64_t end) {   // merge each pair's ranges
    for (int64_t pair = begin; pair < end; ++pair) {
      const float* slots = scratch + pair * parts * SLOT;
      Q* o = out + pair * H_PER * D;                          // (pair = i * KVH + h)
      for (int g = 0; g < G; ++g) {
        float m = -std::numeric_limits<float>::infinity(), total = 0.f;
        for (int64_t r = 0; r < parts; ++r) m = std::max(m, slots[r * SLOT + G * D + g]);
        alignas(64) float og[D] = {};
        for (int64_t r = 0; r < parts; ++r) {
          const float t = slots[r * SLOT + G * D + g];
          if (t == -std::numeric_limits<float>::infinity()) continue;   // an empty range
          const float c = std::exp(t - m);
          total += c * slots[r * SLOT + G * D + G + g];
          const float* a = slots + r * SLOT + g * D;
          for (int64_t d = 0; d < D; ++d) og[d] += c * a[d];
        }
        const float inv = 1.f / total;
        for (int j = 0; j < NV; ++j) store16(o + g * D + j * LANES, load16(og + j * LANES) * inv);
      }
    }
  });
}

// decode_vec<T, Q, NV, G> for the G of this model, or nullptr (then the generic kernel runs).
template <typename T, typename Q, int NV>
auto pick_vec(int64_t G) -> void (*)(const Q*, int64_t, const T*, const T*, const int64_t*, const int64_t*, Q*,
                                     int64_t, int64_t, int64_t, int64_t, float, int64_t, float*) {
  switch (G) {
    case 1: return decode_vec<T, Q, NV, 1>;
    case 2: return decode_vec<T, Q, NV, 2>;
    case 3: return decode_vec<T, Q, NV, 3>;
    case 4: return decode_vec<T, Q, NV, 4>;
    case 5: return decode_vec<T, Q, NV, 5>;
    case 6: return decode_vec<T, Q, NV, 6>;
    case 7: return decode_vec<T, Q, NV, 7>;
    case 8: return decode_vec<T, Q, NV, 8>;
    default: return nullptr;
  }
}

}  // namespace llmos_decode
