// Matrix-vector products over the GGUF's own quantized weights, for steps of a few tokens.
//
// One decode token reads every weight once, so at one stream a linear is bound by the bytes
// of its weights and by the instructions it takes to unpack them. Both layouts keep the
// file's groups of 32 weights along the input with its float16 scale (and min) per group,
// in pairs of groups:
//   q4: w = d q + m, q in 0..15; 32 bytes a pair, byte j holding the first group's q[j]
//       (low nibble) and the second's (high);
//   q8: w = d q, q in -127..127 (the file's Q8_0: smollm2's tied embedding and lm_head),
//       stored as q + 128 so that the bytes are unsigned; 64 bytes a pair.
// As llama.cpp does, each token's activations are quantized to 8 bits per group of 32 once
// per call (x ~ dx qx, dx = max|x| / 127), so a group's 32 products are one integer dot
// product: AVX-512 VNNI's vpdpbusd multiplies 64 unsigned weight bytes by 64 signed
// activation bytes into 16 sums, 4 products each. Each pair's sums are scaled by
// dw dx in float and added to the row's running sums; q4's m term uses the exact float sum
// of each group of x. Four weight rows and up to four tokens are worked on together: each
// pair is unpacked once for all the tokens, and the sums are independent chains.
//
// Without AVX-512 VNNI the same arithmetic runs as plain loops (slow, and the same numbers
// up to the order of float additions).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LLMOS_VNNI 1
#include <immintrin.h>
#endif

#include "quant_gemv.h"

namespace {

constexpr int64_t GROUP = 32;
constexpr int ROWS = 4;     // weight rows at a time
constexpr int TOKENS = 4;   // tokens at a time
constexpr int AHEAD = 4;    // tiles ahead to prefetch: the hardware prefetcher alone left half the time in waits

constexpr int64_t MAX_GROUPS = 1024;   // inputs up to 32,768 (a row's scales are staged on the stack)

// One call's activations: T tokens of K (the weights' padded width) quantized per group, in
// buffers of the calling thread that the next call reuses (no allocation a linear).
struct Acts {
  int64_t K, G;
  const int8_t* q;       // [T, K]
  const float* scale;    // [T, G]: dx
  const float* sum;      // [T, G]: the exact float sum of the group (q4's m term)
  const int32_t* bias;   // [T, K / 4]: -128 * the sum of each 4 codes (q8's offset)
};

inline float as_float(float v) { return v; }
inline float as_float(c10::BFloat16 v) { return static_cast<float>(v); }

#ifdef LLMOS_VNNI
inline __m512 load_x(const float* p, __mmask16 live) { return _mm512_maskz_loadu_ps(live, p); }
inline __m512 load_x(const c10::BFloat16* p, __mmask16 live) {   // bfloat16 is the upper half of a float
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}
#endif

// x: T rows of K_in values, `stride` apart, read in place (a cast or a copy first would be one
// more aten op a linear, and a step has ~120 of them). Codes round to nearest even.
template <typename X>
Acts quantize(const X* x, int64_t stride, int64_t T, int64_t K_in, int64_t K) {
  static thread_local std::vector<int8_t> q;
  static thread_local std::vector<float> scale, sum;
  static thread_local std::vector<int32_t> bias;
  const int64_t G = K / GROUP;
  q.resize(T * K), scale.resize(T * G), sum.resize(T * G), bias.resize(T * K / 4);
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t n = std::min<int64_t>(GROUP, std::max<int64_t>(0, K_in - g * GROUP));
      const X* xs = x + t * stride + g * GROUP;
      int8_t* qg = q.data() + t * K + g * GROUP;
#ifdef LLMOS_VNNI
      const __mmask16 lo = n >= 16 ? 0xffff : (1u << n) - 1, hi = n >= 32 ? 0xffff : n > 16 ? (1u << (n - 16)) - 1 : 0;
      const __m512 v0 = load_x(xs, lo), v1 = load_x(xs + 16, hi);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      const __m512 vi = _mm512_set1_ps(inv);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qg), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, vi))));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qg + 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, vi))));
      sum[t * G + g] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
#else
      float v[GROUP] = {}, amax = 0.f, total = 0.f;
      for (int64_t i = 0; i < n; ++i) v[i] = as_float(xs[i]), amax = std::max(amax, std::fabs(v[i])), total += v[i];
      const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
      for (int64_t i = 0; i < GROUP; ++i) qg[i] = static_cast<int8_t>(std::nearbyint(v[i] * inv));
      sum[t * G + g] = total;
#endif
      scale[t * G + g] = d;
    }
    for (int64_t i = 0; i < K / 4; ++i) {
      const int8_t* c = q.data() + t * K + i * 4;
      bias[t * (K / 4) + i] = -128 * (c[0] + c[1] + c[2] + c[3]);
    }
  }
  return Acts{K, G, q.data(), scale.data(), sum.data(), bias.data()};
}

// A row's fp16 scales (or mins) as floats.
inline float half(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

inline void put(float* y, float v) { *y = v; }
inline void put(c10::BFloat16* y, float v) { *y = c10::BFloat16(v); }   // round to nearest even

// The pair's 64 weight codes of row `w` as unsigned bytes, in the order of x.
struct Q4 {
  static constexpr int64_t PAIR_BYTES = 32;
  static constexpr bool OFFSET = false;
#ifdef LLMOS_VNNI
  static inline __m512i unpack(const uint8_t* w) {   // [first group's 32 | second's 32]
    const __m512i both = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
    // the upper half shifted down a nibble (a masked shift: one instruction), then the low nibbles
    return _mm512_and_si512(_mm512_mask_srli_epi16(both, 0xffff0000u, both, 4), _mm512_set1_epi8(15));
  }
#endif
  static inline int code(const uint8_t* w, int64_t i) { return i < 32 ? (w[i] & 15) : (w[i - 32] >> 4); }
};

struct Q8 {
  static constexpr int64_t PAIR_BYTES = 64;
  static constexpr bool OFFSET = true;   // the bytes are q + 128
#ifdef LLMOS_VNNI
  static inline __m512i unpack(const uint8_t* w) { return _mm512_loadu_si512(w); }
#endif
  static inline int code(const uint8_t* w, int64_t i) { return static_cast<int>(w[i]) - 128; }
};

// y[t, n + r] for R rows and T tokens from t0 (both known at compile time).
template <typename Fmt, int R, int T, typename Out>
void tile(const Acts& a, int64_t t0, int64_t n, const uint8_t* w, const uint16_t* d, const uint16_t* m,
          const float* bias, Out* y, int64_t N) {
  const int64_t P = a.G / 2, row_bytes = P * Fmt::PAIR_BYTES;
  float dot[R][T] = {};
#ifdef LLMOS_VNNI
  const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  float ds[R][MAX_GROUPS];   // the rows' scales as floats, 16 at a time
  for (int r = 0; r < R; ++r)
    for (int64_t g = 0; g < a.G; g += 16) {
      const __mmask16 live = a.G - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (a.G - g)) - 1);
      _mm512_mask_storeu_ps(ds[r] + g, live, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, d + (n + r) * a.G + g)));
    }
  for (int64_t p = 0; p < P; ++p) {
    __m512i xq[T], x0[T];
    __m512 xd[T];
    for (int t = 0; t < T; ++t) {
      const int64_t tt = t0 + t;
      xq[t] = _mm512_loadu_si512(a.q + tt * a.K + p * 64);
      x0[t] = Fmt::OFFSET ? _mm512_loadu_si512(a.bias + tt * (a.K / 4) + p * 16) : _mm512_setzero_si512();
      xd[t] = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(
          _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(a.scale + tt * a.G + 2 * p)))));
    }
    for (int r = 0; r < R; ++r) {   // the rows AHEAD tiles on are fetched while these are worked on
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + AHEAD * R + r) * row_bytes + p * Fmt::PAIR_BYTES), _MM_HINT_T0);
      const __m512i wq = Fmt::unpack(w + (n + r) * row_bytes + p * Fmt::PAIR_BYTES);
      const __m512 wd = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(
          _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(ds[r] + 2 * p)))));
      for (int t = 0; t < T; ++t) {
        const __m512 s = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(x0[t], wq, xq[t]));
        acc[r][t] = _mm512_fmadd_ps(s, _mm512_mul_ps(wd, xd[t]), acc[r][t]);
      }
    }
  }
  if (m != nullptr)   // q4's m term, 16 groups at a time, into the same sums
    for (int64_t g = 0; g < a.G; g += 16) {
      const __mmask16 live = a.G - g >= 16 ? __mmask16(0xffff) : __mmask16((1u << (a.G - g)) - 1);
      for (int r = 0; r < R; ++r) {
        const __m512 mr = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, m + (n + r) * a.G + g));
        for (int t = 0; t < T; ++t)
          acc[r][t] = _mm512_fmadd_ps(mr, _mm512_maskz_loadu_ps(live, a.sum + (t0 + t) * a.G + g), acc[r][t]);
      }
    }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) dot[r][t] = _mm512_reduce_add_ps(acc[r][t]);
  m = nullptr;   // added
#else
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t)
      for (int64_t g = 0; g < a.G; ++g) {
        const uint8_t* pair = w + (n + r) * row_bytes + (g / 2) * Fmt::PAIR_BYTES;
        const int8_t* xq = a.q + (t0 + t) * a.K + g * GROUP;
        int32_t s = 0;
        for (int64_t i = 0; i < GROUP; ++i) s += Fmt::code(pair, (g % 2) * GROUP + i) * xq[i];
        dot[r][t] += static_cast<float>(s) * (half(d[(n + r) * a.G + g]) * a.scale[(t0 + t) * a.G + g]);
      }
#endif
  for (int r = 0; r < R; ++r) {
    for (int t = 0; t < T; ++t) {
      float v = dot[r][t];
      if (m != nullptr)
        for (int64_t g = 0; g < a.G; ++g) v += half(m[(n + r) * a.G + g]) * a.sum[(t0 + t) * a.G + g];
      if (bias != nullptr) v += bias[n + r];
      put(y + (t0 + t) * N + n + r, v);
    }
  }
}

template <typename Fmt, int R, typename Out>
void rows(const Acts& a, int64_t M, int64_t n, const uint8_t* w, const uint16_t* d, const uint16_t* m,
          const float* bias, Out* y, int64_t N) {
  int64_t t = 0;
  for (; t + TOKENS <= M; t += TOKENS) tile<Fmt, R, TOKENS>(a, t, n, w, d, m, bias, y, N);
  switch (M - t) {
    case 3: tile<Fmt, R, 3>(a, t, n, w, d, m, bias, y, N); break;
    case 2: tile<Fmt, R, 2>(a, t, n, w, d, m, bias, y, N); break;
    case 1: tile<Fmt, R, 1>(a, t, n, w, d, m, bias, y, N); break;
    default: break;
  }
}

template <typename Fmt>
torch::Tensor linear(const torch::Tensor& x_in, const torch::Tensor& w, const torch::Tensor& d,
                     const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& bias_in) {
  TORCH_CHECK(x_in.dim() == 2 && w.dim() == 2 && d.dim() == 2, "x [M, K], codes [N, bytes], scales [N, groups]");
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, "x: float or bfloat16");
  const int64_t M = x_in.size(0), K_in = x_in.size(1), N = w.size(0), G = d.size(1), K = G * GROUP;
  TORCH_CHECK(G % 2 == 0 && G > 0 && K_in > K - 2 * GROUP && K_in <= K,
              "scales: an even number of groups (padded) covering x's ", K_in, " inputs");
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) == G / 2 * Fmt::PAIR_BYTES,
              "codes: contiguous uint8 [N, groups / 2 * ", Fmt::PAIR_BYTES, "]");
  TORCH_CHECK(G <= MAX_GROUPS, "at most ", MAX_GROUPS * GROUP, " inputs");
  TORCH_CHECK(d.scalar_type() == at::kHalf && d.is_contiguous() && d.size(0) == N, "scales: contiguous float16 [N, groups]");
  const uint16_t* m = nullptr;
  if (mins.has_value()) {
    TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->sizes() == d.sizes(),
                "mins: contiguous float16, the scales' shape");
    m = reinterpret_cast<const uint16_t*>(mins->data_ptr());
  }
  torch::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, "bias: [N]");
    bias = bias_in->scalar_type() == at::kFloat ? bias_in->contiguous() : bias_in->to(at::kFloat).contiguous();
  }
  const auto x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const Acts acts = x.scalar_type() == at::kFloat
                        ? quantize(x.data_ptr<float>(), x.stride(0), M, K_in, K)
                        : quantize(x.data_ptr<c10::BFloat16>(), x.stride(0), M, K_in, K);
  auto y = torch::empty({M, N}, x_in.options());
  const auto* dp = reinterpret_cast<const uint16_t*>(d.data_ptr());
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const auto* wp = w.data_ptr<uint8_t>();
  const int64_t blocks = (N + ROWS - 1) / ROWS;
  auto run = [&](auto* out) {
    at::parallel_for(0, blocks, 8, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n = b * ROWS;
        if (n + ROWS <= N) rows<Fmt, ROWS>(acts, M, n, wp, dp, m, bp, out, N);
        else
          for (int64_t r = n; r < N; ++r) rows<Fmt, 1>(acts, M, r, wp, dp, m, bp, out, N);
      }
    });
  };
  if (x_in.scalar_type() == at::kBFloat16) run(y.data_ptr<c10::BFloat16>());
  else run(y.data_ptr<float>());
  return y;
}

}  // namespace

torch::Tensor q4_linear(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& scales,
                        const c10::optional<torch::Tensor>& mins, const c10::optional<torch::Tensor>& bias) {
  return linear<Q4>(x, codes, scales, mins, bias);
}

void register_quant_gemv(pybind11::module& m) {
  m.def("q4_linear", &q4_linear, "x @ w.T + bias over 4-bit groups (w = d q + m), in x's dtype",
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("mins"), py::arg("bias"));
  m.def("q8_linear", &linear<Q8>, "x @ w.T + bias over 8-bit groups (w = d q), in x's dtype",
        py::arg("x"), py::arg("codes"), py::arg("scales"), py::arg("mins"), py::arg("bias"));
  m.def("quant_vnni", []() {
#ifdef LLMOS_VNNI
    return true;
#else
    return false;
#endif
  }, "whether the quantized products use AVX-512 VNNI here");
}
