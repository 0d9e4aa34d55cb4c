// Sixteen fp32 lanes, the unit every kernel here computes in, written once for each instruction
// set: one __m512 with AVX-512, two __m256 with AVX2. Both implement every operation with the same
// IEEE operations in the same order (add, mul, div, sqrt, fused multiply-add, round to nearest even)
// and reduce lanes along the same tree, so a kernel written on F16 gives bit-identical results on
// an AVX2 laptop, an AMD Zen 4 and an Intel Xeon. Included by one translation unit per instruction
// set (isa_avx512.cpp, isa_avx2.cpp), each compiled with its own -m flags; nothing here may be
// used by code compiled for the baseline x86-64 (see build notes in kernels/__init__.py).
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace PROMETHEAN_ISA {

inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

inline float bf16_to_float(uint16_t value) { return bits_to_float(uint32_t(value) << 16); }

// Round to nearest, ties to even (as torch's bfloat16 conversion); a NaN stays a quiet NaN.
inline uint16_t float_to_bf16(float value) {
  uint32_t bits = float_to_bits(value);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

#if defined(PROMETHEAN_ISA_AVX512)

struct F16 {
  __m512 v;
};
using Mask16 = __mmask16;

inline __mmask16 first_lanes(int count) { return __mmask16((1u << count) - 1u); }
inline F16 f16_zero() { return {_mm512_setzero_ps()}; }
inline F16 f16_set1(float value) { return {_mm512_set1_ps(value)}; }
inline F16 f16_load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline F16 f16_load_n(const float* p, int count) {
  return {_mm512_maskz_loadu_ps(first_lanes(count), p)};
}
inline void f16_store(float* p, F16 a) { _mm512_storeu_ps(p, a.v); }
inline void f16_store_n(float* p, F16 a, int count) {
  _mm512_mask_storeu_ps(p, first_lanes(count), a.v);
}
inline F16 widen_bf16(__m256i bits) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))};
}
inline F16 f16_load_bf16(const uint16_t* p) {
  return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline F16 f16_load_bf16_n(const uint16_t* p, int count) {
  return widen_bf16(_mm256_maskz_loadu_epi16(first_lanes(count), p));
}
inline __m256i narrow_bf16(F16 a) {
  const __m512i bits = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, nan,
                                  _mm512_or_si512(bits, _mm512_set1_epi32(0x400000)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
inline void f16_store_bf16(uint16_t* p, F16 a) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow_bf16(a));
}
inline void f16_store_bf16_n(uint16_t* p, F16 a, int count) {
  _mm256_mask_storeu_epi16(p, first_lanes(count), narrow_bf16(a));
}
inline F16 operator+(F16 a, F16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F16 operator-(F16 a, F16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F16 operator*(F16 a, F16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F16 operator/(F16 a, F16 b) { return {_mm512_div_ps(a.v, b.v)}; }
// a * b + c with one rounding.
inline F16 fma(F16 a, F16 b, F16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F16 f16_max(F16 a, F16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F16 f16_min(F16 a, F16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline F16 f16_sqrt(F16 a) { return {_mm512_sqrt_ps(a.v)}; }
inline F16 f16_abs(F16 a) {
  return {_mm512_castsi512_ps(
      _mm512_and_si512(_mm512_castps_si512(a.v), _mm512_set1_epi32(0x7fffffff)))};
}
inline Mask16 f16_greater_equal(F16 a, F16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GE_OQ); }
inline Mask16 f16_less(F16 a, F16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_LT_OQ); }
inline Mask16 f16_greater(F16 a, F16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_GT_OQ); }
// Lanes of `yes` where the mask is set, of `no` elsewhere.
inline F16 f16_select(Mask16 mask, F16 yes, F16 no) { return {_mm512_mask_blend_ps(mask, no.v, yes.v)}; }
// Lanes from `count` on set to +0.
inline F16 f16_keep_first(F16 a, int count) { return {_mm512_maskz_mov_ps(first_lanes(count), a.v)}; }
inline F16 f16_round(F16 a) {
  return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// 2^n for whole-number lanes n in [-127, 128]: the exponent field built directly.
inline F16 f16_exp2_int(F16 n) {
  const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
}
// (mantissa in [0.5, 1), exponent) of positive normal lanes, as frexp.
inline void f16_frexp(F16 a, F16& mantissa, F16& exponent) {
  const __m512i bits = _mm512_castps_si512(a.v);
  const __m512i e = _mm512_sub_epi32(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(126));
  exponent = {_mm512_cvtepi32_ps(e)};
  mantissa = {_mm512_castsi512_ps(_mm512_or_si512(
      _mm512_and_si512(bits, _mm512_set1_epi32(0x007fffff)), _mm512_set1_epi32(0x3f000000)))};
}
// The lanes' sum along the tree (i, i+8), (i, i+4), (i, i+2), (i, i+1).
inline float reduce_add(F16 a) {
  const __m256 eight = _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm512_extractf32x8_ps(a.v, 1));
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
inline float reduce_max(F16 a) { return _mm512_reduce_max_ps(a.v); }
inline float lane(F16 a, int i) {
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, a.v);
  return lanes[i];
}

#elif defined(PROMETHEAN_ISA_AVX2)

struct F16 {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
struct Mask16 {
  __m256 lo, hi;
};

inline __m256i first_lanes_mask(int count) {
  const __m256i index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), index);
}
inline int clamp8(int count) { return count < 0 ? 0 : (count > 8 ? 8 : count); }
inline F16 f16_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F16 f16_set1(float value) { return {_mm256_set1_ps(value), _mm256_set1_ps(value)}; }
inline F16 f16_load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline F16 f16_load_n(const float* p, int count) {
  return {_mm256_maskload_ps(p, first_lanes_mask(clamp8(count))),
          _mm256_maskload_ps(p + 8, first_lanes_mask(clamp8(count - 8)))};
}
inline void f16_store(float* p, F16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline void f16_store_n(float* p, F16 a, int count) {
  _mm256_maskstore_ps(p, first_lanes_mask(clamp8(count)), a.lo);
  _mm256_maskstore_ps(p + 8, first_lanes_mask(clamp8(count - 8)), a.hi);
}
inline __m256 widen_bf16_8(__m128i bits) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
inline F16 f16_load_bf16(const uint16_t* p) {
  return {widen_bf16_8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          widen_bf16_8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline F16 f16_load_bf16_n(const uint16_t* p, int count) {
  alignas(32) uint16_t lanes[16] = {0};
  for (int i = 0; i < count; ++i) lanes[i] = p[i];
  return f16_load_bf16(lanes);
}
inline __m128i narrow_bf16_8(__m256 a) {
  const __m256i bits = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan);
  const __m256i shifted = _mm256_srli_epi32(rounded, 16);  // 0..65535: packus keeps it exact
  return _mm_packus_epi32(_mm256_castsi256_si128(shifted), _mm256_extracti128_si256(shifted, 1));
}
inline void f16_store_bf16(uint16_t* p, F16 a) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow_bf16_8(a.lo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), narrow_bf16_8(a.hi));
}
inline void f16_store_bf16_n(uint16_t* p, F16 a, int count) {
  alignas(32) uint16_t lanes[16];
  f16_store_bf16(lanes, a);
  for (int i = 0; i < count; ++i) p[i] = lanes[i];
}
inline F16 operator+(F16 a, F16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F16 operator-(F16 a, F16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline F16 operator*(F16 a, F16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F16 operator/(F16 a, F16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline F16 fma(F16 a, F16 b, F16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F16 f16_max(F16 a, F16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline F16 f16_min(F16 a, F16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline F16 f16_sqrt(F16 a) { return {_mm256_sqrt_ps(a.lo), _mm256_sqrt_ps(a.hi)}; }
inline F16 f16_abs(F16 a) {
  const __m256 mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return {_mm256_and_ps(a.lo, mask), _mm256_and_ps(a.hi, mask)};
}
inline Mask16 f16_greater_equal(F16 a, F16 b) {
  return {_mm256_cmp_ps(a.lo, b.lo, _CMP_GE_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GE_OQ)};
}
inline Mask16 f16_less(F16 a, F16 b) {
  return {_mm256_cmp_ps(a.lo, b.lo, _CMP_LT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_LT_OQ)};
}
inline Mask16 f16_greater(F16 a, F16 b) {
  return {_mm256_cmp_ps(a.lo, b.lo, _CMP_GT_OQ), _mm256_cmp_ps(a.hi, b.hi, _CMP_GT_OQ)};
}
inline F16 f16_select(Mask16 mask, F16 yes, F16 no) {
  return {_mm256_blendv_ps(no.lo, yes.lo, mask.lo), _mm256_blendv_ps(no.hi, yes.hi, mask.hi)};
}
inline F16 f16_keep_first(F16 a, int count) {
  return {_mm256_and_ps(a.lo, _mm256_castsi256_ps(first_lanes_mask(clamp8(count)))),
          _mm256_and_ps(a.hi, _mm256_castsi256_ps(first_lanes_mask(clamp8(count - 8))))};
}
inline F16 f16_round(F16 a) {
  return {_mm256_round_ps(a.lo, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
          _mm256_round_ps(a.hi, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
inline __m256 exp2_int_8(__m256 n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline F16 f16_exp2_int(F16 n) { return {exp2_int_8(n.lo), exp2_int_8(n.hi)}; }
inline void frexp_8(__m256 a, __m256& mantissa, __m256& exponent) {
  const __m256i bits = _mm256_castps_si256(a);
  const __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126));
  exponent = _mm256_cvtepi32_ps(e);
  mantissa = _mm256_castsi256_ps(_mm256_or_si256(
      _mm256_and_si256(bits, _mm256_set1_epi32(0x007fffff)), _mm256_set1_epi32(0x3f000000)));
}
inline void f16_frexp(F16 a, F16& mantissa, F16& exponent) {
  frexp_8(a.lo, mantissa.lo, exponent.lo);
  frexp_8(a.hi, mantissa.hi, exponent.hi);
}
inline float reduce_add(F16 a) {
  const __m256 eight = _mm256_add_ps(a.lo, a.hi);
  const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
inline float reduce_max(F16 a) {
  const __m256 eight = _mm256_max_ps(a.lo, a.hi);
  const __m128 four = _mm_max_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
  const __m128 two = _mm_max_ps(four, _mm_movehl_ps(four, four));
  return _mm_cvtss_f32(_mm_max_ss(two, _mm_movehdup_ps(two)));
}
inline float lane(F16 a, int i) {
  alignas(32) float lanes[16];
  _mm256_store_ps(lanes, a.lo);
  _mm256_store_ps(lanes + 8, a.hi);
  return lanes[i];
}

#else
#error "define PROMETHEAN_ISA_AVX512 or PROMETHEAN_ISA_AVX2"
#endif

// ---------------------------------------------------------------------------- functions
// Written once on F16, so both instruction sets compute them alike.

// e^x (Cephes' expf: a degree-5 polynomial on the reduced argument, about 1 ulp); 0 below
// -87.3 (where the result leaves the normal range), +inf above 88.7.
inline F16 f16_exp(F16 x) {
  const F16 clamped = f16_min(f16_max(x, f16_set1(-87.3f)), f16_set1(88.7f));
  const F16 n = f16_round(clamped * f16_set1(1.44269504088896341f));
  F16 r = fma(n, f16_set1(-0.693359375f), clamped);
  r = fma(n, f16_set1(2.12194440e-4f), r);
  F16 p = f16_set1(1.9875691500e-4f);
  p = fma(p, r, f16_set1(1.3981999507e-3f));
  p = fma(p, r, f16_set1(8.3334519073e-3f));
  p = fma(p, r, f16_set1(4.1665795894e-2f));
  p = fma(p, r, f16_set1(1.6666665459e-1f));
  p = fma(p, r, f16_set1(5.0000001201e-1f));
  const F16 y = fma(p, r * r, r) + f16_set1(1.0f);
  F16 result = y * f16_exp2_int(n);
  result = f16_select(f16_less(x, f16_set1(-87.3f)), f16_zero(), result);
  result = f16_select(f16_greater(x, f16_set1(88.7f)), f16_set1(__builtin_inff()), result);
  return f16_select(f16_greater_equal(x, x), result, x);  // a NaN stays NaN
}

// ln(x) for positive normal x (Cephes' logf, about 1 ulp).
inline F16 f16_log(F16 x) {
  F16 m, e;
  f16_frexp(x, m, e);
  const Mask16 small = f16_less(m, f16_set1(0.707106781186547524f));
  e = f16_select(small, e - f16_set1(1.0f), e);
  m = f16_select(small, m + m, m) - f16_set1(1.0f);
  const F16 z = m * m;
  F16 y = f16_set1(7.0376836292e-2f);
  y = fma(y, m, f16_set1(-1.1514610310e-1f));
  y = fma(y, m, f16_set1(1.1676998740e-1f));
  y = fma(y, m, f16_set1(-1.2420140846e-1f));
  y = fma(y, m, f16_set1(1.4249322787e-1f));
  y = fma(y, m, f16_set1(-1.6668057665e-1f));
  y = fma(y, m, f16_set1(2.0000714765e-1f));
  y = fma(y, m, f16_set1(-2.4999993993e-1f));
  y = fma(y, m, f16_set1(3.3333331174e-1f));
  y = y * m * z;
  y = fma(e, f16_set1(-2.12194440e-4f), y);
  y = fma(z, f16_set1(-0.5f), y);
  return fma(e, f16_set1(0.693359375f), m + y);
}

// x * sigmoid(x), as x / (1 + e^-x).
inline F16 f16_silu(F16 x) {
  return x / (f16_set1(1.0f) + f16_exp(f16_zero() - x));
}

// GELU with the tanh approximation (GPT-2's): 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)),
// u = sqrt(2/pi) (x + 0.044715 x^3): one exponential, no cancellation near zero.
inline F16 f16_gelu_tanh(F16 x) {
  const F16 inner = fma(f16_set1(0.044715f), x * x * x, x);
  return x / (f16_set1(1.0f) + f16_exp(inner * f16_set1(-1.5957691216057308f)));
}

// ln(1 + e^x), as torch's softplus: x itself above 20, e^x below -15 (where ln(1 + y) = y to
// fp32's precision).
inline F16 f16_softplus(F16 x) {
  const F16 e = f16_exp(x);
  F16 result = f16_log(f16_set1(1.0f) + e);
  result = f16_select(f16_less(x, f16_set1(-15.0f)), e, result);
  return f16_select(f16_greater(x, f16_set1(20.0f)), x, result);
}

}  // namespace PROMETHEAN_ISA
