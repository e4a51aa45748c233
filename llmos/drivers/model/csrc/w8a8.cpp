// Linears in int8 arithmetic (--dtype int8): the products of steps with many tokens.
//
// oneDNN's int8 GEMM (VNNI, through torch._int_mm) runs smollm2's shapes ~1.4x faster than its
// packed bf16 one at 128 rows and ~1.9x at 1,024 (AMD EPYC, docs/model-driver.md). The
// weights are int8 per output row (w = s_n q), the activations are quantized per row (token)
// as they arrive, symmetric, to +-127: y = (x_q . w_q) s_m s_n + b. This file holds the two
// passes around the GEMM, vectorized (a torch op each would cost more than the GEMM saves at
// 64 rows): the activations' quantization and the epilogue back to bf16.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "decode_vec.h"
#include "w8a8.h"

using namespace llmos_decode;

namespace {

typedef int8_t b16v __attribute__((vector_size(16)));
constexpr int64_t ROW_WORK = 1 << 13;   // elements a thread takes at least: tiny steps run on one

// The codes, scales and int32 sums live in buffers kept between calls, seen as tensors through
// from_blob: fresh tensors of a few hundred KB came from mmap (page faults as costly as the GEMM
// at 32 rows), and slicing a kept tensor is dispatched ops, ~15 a call at ~1 us each.
template <typename T>
T* workspace(std::vector<T>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Each row of x [M, K] bf16 as int8 codes and a scale, code = round(x / scale), scale = max|x| / 127.
void quantize_rows(const c10::BFloat16* x, int64_t M, int64_t K, int8_t* q, float* scale) {
  at::parallel_for(0, M, std::max<int64_t>(1, ROW_WORK / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const c10::BFloat16* row = x + m * K;
      f16v vmax = {};
      int64_t k = 0;
      for (; k + LANES <= K; k += LANES) {
        const f16v v = load16(row + k);
        vmax = vmax > -v ? (vmax > v ? vmax : v) : -v;   // max(vmax, |v|)
      }
      float amax = lane_max(vmax);
      for (; k < K; ++k) amax = std::max(amax, std::fabs(static_cast<float>(row[k])));
      const float s = amax > 0.f ? amax / 127.f : 1.f, inv = 1.f / s;
      scale[m] = s;
      int8_t* out = q + m * K;
      for (k = 0; k + LANES <= K; k += LANES) {
        const f16v v = load16(row + k) * inv;
        const f16v half = v < 0.f ? f16v{} - 0.5f : f16v{} + 0.5f;   // round half away from zero
        i16v c = __builtin_convertvector(v + half, i16v);
        c = c < -127 ? i16v{} - 127 : (c > 127 ? i16v{} + 127 : c);   // |v| <= 127.5 already; NaN, inf too
        const b16v narrow = __builtin_convertvector(c, b16v);
        std::memcpy(out + k, &narrow, sizeof narrow);
      }
      for (; k < K; ++k) out[k] = static_cast<int8_t>(std::clamp<long>(std::lround(static_cast<float>(row[k]) * inv), -127L, 127L));
    }
  });
}

}  // namespace

// x [M, K] bf16; wq [K, N] int8 (the transpose of a contiguous [N, K]: oneDNN's preferred
// layout); w_scale [N] float; bias [N] float or none. Returns [M, N] bf16.
torch::Tensor w8a8_linear(torch::Tensor x, torch::Tensor wq, torch::Tensor w_scale, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "x: bf16 [M, K]");
  TORCH_CHECK(wq.dim() == 2 && wq.scalar_type() == at::kChar && wq.size(0) == x.size(1), "wq: int8 [K, N]");
  const int64_t M = x.size(0), K = x.size(1), N = wq.size(1);
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.numel() == N && w_scale.is_contiguous(), "w_scale: float [N]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous()), "bias: float [N]");
  auto xc = x.contiguous();
  thread_local std::vector<int8_t> codes;
  thread_local std::vector<float> row_scales;
  thread_local std::vector<int32_t> sums;
  int8_t* xq = workspace(codes, M * K);
  const float* sm = workspace(row_scales, M);
  quantize_rows(xc.data_ptr<c10::BFloat16>(), M, K, xq, workspace(row_scales, M));
  auto acc = torch::from_blob(workspace(sums, M * N), {M, N}, torch::dtype(at::kInt));
  at::_int_mm_out(acc, torch::from_blob(xq, {M, K}, torch::dtype(at::kChar)), wq);   // [M, N] int32, exact
  auto out = torch::empty({M, N}, x.options());
  const int32_t* a = acc.data_ptr<int32_t>();
  const float *sn = w_scale.data_ptr<float>(), *b = bias ? bias->data_ptr<float>() : nullptr;
  c10::BFloat16* y = out.data_ptr<c10::BFloat16>();
  at::parallel_for(0, M, std::max<int64_t>(1, ROW_WORK / N), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int32_t* row = a + m * N;
      int64_t n = 0;
      for (; n + LANES <= N; n += LANES) {
        i16v c;
        std::memcpy(&c, row + n, sizeof c);
        f16v v = __builtin_convertvector(c, f16v) * sm[m] * load16(sn + n);
        if (b != nullptr) v += load16(b + n);
        store16(y + m * N + n, v);
      }
      for (; n < N; ++n)
        y[m * N + n] = static_cast<c10::BFloat16>(static_cast<float>(row[n]) * sm[m] * sn[n] + (b ? b[n] : 0.f));
    }
  });
  return out;
}

void register_w8a8(pybind11::module& m) {
  m.def("w8a8_linear", &w8a8_linear, "y = x W^T + b in int8 arithmetic: x quantized per row, W per output row",
        py::arg("x"), py::arg("wq"), py::arg("w_scale"), py::arg("bias"));
}
