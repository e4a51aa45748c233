// exp for the decode kernels' softmax, shared by the scalar and the vector code.
#pragma once

namespace llmos_decode {

constexpr float LOG2E = 1.44269504088896341f;
constexpr float LN2_HI = 0.693359375f, LN2_LO = -2.12194440e-4f;   // ln 2 = LN2_HI + LN2_LO

// exp(r) for |r| <= ln2 / 2, to ~1 ulp: Cephes' degree-6 polynomial. F is float or one of
// gcc's float vectors (scalar constants broadcast), so one formula serves both kernels.
template <typename F>
inline F exp_reduced(F r) {
  F p = r * 0.f + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

}  // namespace llmos_decode
