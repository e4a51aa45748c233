// The small ops between a decoder layer's matmuls, for bfloat16 activations (CPU).
//
// At one stream each of these is a chain of 6-8 aten ops in torch (an RMSNorm upcasts,
// squares, sums, divides, adds, takes rsqrt, multiplies and casts back: ~30 us for 576
// numbers), and a step of smollm2 runs 61 norms and 30 rotary embeddings. Here each is one
// pass, and bit-identical to torch's ops: they round where transformers' modules round (every
// bf16 op result), and the norm sums its squares in the order of torch's own reduction (below).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

#include "layer_ops.h"

namespace {

inline float f32(uint16_t b) {   // bfloat16 is the upper half of a float
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint16_t bf16(float f) {  // round to nearest even, NaN to 0x7fc0, as c10::BFloat16 does
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline const uint16_t* bits(const torch::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }
inline uint16_t* bits_mut(torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr()); }

// sum(x^2) of one row, in the order of ATen's cascade_sum for a contiguous float row
// (SumKernel.cpp: vectorized_inner_sum -> row_sum -> multi_row_sum) with L-float vectors:
// four interleaved vector accumulators with a cascade every 16 steps, folded in order, then
// the scalar tail and the lanes one by one. Any other order moves the norm's rounding. L is
// the width torch's sum kernel really uses, which the caller finds by probing (8 with torch
// 2.13 on an AVX-512 CPU, although torch reports its capability as AVX512).
typedef float f8v __attribute__((vector_size(32)));
typedef float f16v __attribute__((vector_size(64)));

template <typename vec, int L>
float torch_sum_of_squares(const uint16_t* x, int64_t n) {
  auto sq = [&](int64_t v) {                   // the v-th vector of squares
    vec r;
    for (int l = 0; l < L; ++l) r[l] = f32(x[v * L + l]) * f32(x[v * L + l]);
    return r;
  };
  const int64_t vecs = n / L, rows = vecs / 4;
  constexpr int64_t LEVELS = 4, POWER = 4, STEP = 1 << POWER, MASK = STEP - 1;  // POWER: rows < 2^20
  vec acc[LEVELS][4] = {};
  int64_t i = 0;
  for (; i + STEP <= rows;) {
    for (int64_t j = 0; j < STEP; ++j, ++i)
      for (int k = 0; k < 4; ++k) acc[0][k] += sq(i * 4 + k);
    for (int64_t j = 1; j < LEVELS; ++j) {
      for (int k = 0; k < 4; ++k) {
        acc[j][k] += acc[j - 1][k];
        acc[j - 1][k] = vec{};
      }
      if ((i & (MASK << (j * POWER))) != 0) break;
    }
  }
  for (; i < rows; ++i)
    for (int k = 0; k < 4; ++k) acc[0][k] += sq(i * 4 + k);
  for (int64_t j = 1; j < LEVELS; ++j)
    for (int k = 0; k < 4; ++k) acc[0][k] += acc[j][k];
  vec part = acc[0][0];
  for (int64_t v = rows * 4; v < vecs; ++v) part += sq(v);
  for (int k = 1; k < 4; ++k) part += acc[0][k];
  float total = 0.f;
  for (int64_t k = vecs * L; k < n; ++k) total += f32(x[k]) * f32(x[k]);
  for (int l = 0; l < L; ++l) total += part[l];
  return total;
}

void check_rows(const torch::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.dim() == 2 && t.size(1) == n && t.stride(1) == 1,
              what, " must be bfloat16 rows [T, ", n, "] with unit stride");
}

}  // namespace

// h = w * bf16(x * rsqrt(mean(x^2) + eps)) per row, as transformers' LlamaRMSNorm in bf16.
// With a residual, x += residual first (in place: the caller's running hidden state). lanes:
// the vector width of torch's sum kernel (16 or 8), whose summation order this keeps.
torch::Tensor rms_norm_bf16(torch::Tensor x, c10::optional<torch::Tensor> residual, torch::Tensor w, double eps,
                            int64_t lanes) {
  const int64_t N = w.numel(), T = x.size(0);
  TORCH_CHECK(lanes == 16 || lanes == 8, "lanes must be 16 or 8");
  TORCH_CHECK(w.scalar_type() == at::kBFloat16 && w.is_contiguous(), "weight must be contiguous bfloat16");
  check_rows(x, N, "x");
  if (residual) {
    check_rows(*residual, N, "residual");
    TORCH_CHECK(residual->size(0) == T, "residual rows");
  }
  auto h = torch::empty({T, N}, x.options());
  uint16_t* xs = bits_mut(x);
  const uint16_t* rs = residual ? bits(*residual) : nullptr;
  const uint16_t* ws = bits(w);
  uint16_t* hs = bits_mut(h);
  const int64_t xst = x.stride(0), rst = residual ? residual->stride(0) : 0;
  const float epsf = static_cast<float>(eps);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint16_t* xr = xs + t * xst;
      if (rs != nullptr) {
        const uint16_t* rr = rs + t * rst;
        for (int64_t j = 0; j < N; ++j) xr[j] = bf16(f32(xr[j]) + f32(rr[j]));
      }
      const float ss = lanes == 16 ? torch_sum_of_squares<f16v, 16>(xr, N) : torch_sum_of_squares<f8v, 8>(xr, N);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(N) + epsf);
      uint16_t* hr = hs + t * N;
      for (int64_t k = 0; k < N; ++k) hr[k] = bf16(f32(ws[k]) * f32(bf16(f32(xr[k]) * inv)));
    }
  });
  return h;
}

// In place on qk [T, heads, D] (any row and head strides, unit last stride), with cos/sin
// [T, D] bf16: x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1], each product and
// the sum rounded to bf16 as torch's three ops round them.
void rotary_bf16_(torch::Tensor qk, torch::Tensor cos, torch::Tensor sin) {
  TORCH_CHECK(qk.scalar_type() == at::kBFloat16 && qk.dim() == 3 && qk.stride(2) == 1, "qk must be bf16 [T, heads, D]");
  const int64_t T = qk.size(0), heads = qk.size(1), D = qk.size(2), half = D / 2;
  TORCH_CHECK(D % 2 == 0, "head dim must be even");
  check_rows(cos, D, "cos");
  check_rows(sin, D, "sin");
  TORCH_CHECK(cos.size(0) == T && sin.size(0) == T, "cos/sin rows");
  uint16_t* q = bits_mut(qk);
  const uint16_t *cs = bits(cos), *sn = bits(sin);
  const int64_t st = qk.stride(0), sh = qk.stride(1), cst = cos.stride(0), snt = sin.stride(0);
  at::parallel_for(0, T * heads, 64, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t t = w / heads;
      uint16_t* x = q + t * st + (w % heads) * sh;
      const uint16_t *c = cs + t * cst, *s = sn + t * snt;
      for (int64_t d = 0; d < half; ++d) {
        const float x1 = f32(x[d]), x2 = f32(x[d + half]);
        const uint16_t lo = bf16(f32(bf16(x1 * f32(c[d]))) + f32(bf16(-x2 * f32(s[d]))));
        const uint16_t hi = bf16(f32(bf16(x2 * f32(c[d + half]))) + f32(bf16(x1 * f32(s[d + half]))));
        x[d] = lo;
        x[d + half] = hi;
      }
    }
  });
}

// sum(x^2) per bf16 row [T, N] in torch's order for L = lanes: the probe that finds L.
torch::Tensor sum_of_squares_bf16(torch::Tensor x, int64_t lanes) {
  TORCH_CHECK(lanes == 16 || lanes == 8, "lanes must be 16 or 8");
  TORCH_CHECK(x.dim() == 2, "x must be [T, N]");
  check_rows(x, x.size(1), "x");
  auto out = torch::empty({x.size(0)}, x.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  for (int64_t t = 0; t < x.size(0); ++t) {
    const uint16_t* xr = bits(x) + t * x.stride(0);
    o[t] = lanes == 16 ? torch_sum_of_squares<f16v, 16>(xr, x.size(1)) : torch_sum_of_squares<f8v, 8>(xr, x.size(1));
  }
  return out;
}

void register_layer_ops(pybind11::module& m) {
  m.def("sum_of_squares_bf16", &sum_of_squares_bf16, "per-row sum of squares in torch's summation order",
        py::arg("x"), py::arg("lanes"));
  m.def("rms_norm_bf16", &rms_norm_bf16, "RMSNorm of bf16 rows, residual added in place first if given",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"), py::arg("lanes"));
  m.def("rotary_bf16_", &rotary_bf16_, "rotary embedding of bf16 q/k heads, in place", py::arg("qk"),
        py::arg("cos"), py::arg("sin"));
}
