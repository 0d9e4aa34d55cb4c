// Promethean's CPU matrix-vector kernels for inference: y = x W^T (* scale) (+ bias) with W held
// in bf16 or in int8 (one scale per output row), for the few rows of a decode step.
//
// Why our own: at batch 1 a decode step is a stream of weight reads, and PyTorch's CPU kernels
// for these shapes read well under the machine's bandwidth (oneDNN's packed bf16 about 60%,
// torch._weight_int8pack_mm about 40%: docs/BENCHMARKS.md). Here each thread walks its own rows
// of W front to back, several rows at a time, and prefetches the next rows while it multiplies.
//
// Every (row of x, row of W) product is computed by the same sequence of instructions whatever
// the number of rows of x, the tile a row falls in or the thread that computes it, so a row's
// result does not depend on what it is batched with: greedy decoding of one sequence gives the
// same tokens alone or in a batch.
//
// Two instruction sets: AVX-512 with its bf16 and VNNI dot products (recent Xeons, Zen 4), and
// AVX2 with FMA, which every x86-64 laptop of the last ten years has. Only the kernels need them:
// they carry target attributes, the rest of the library is plain x86-64, and the best set the CPU
// has is picked when the library loads (`instruction_set()`; `supported()` is false without AVX2).
// The two sets round differently (bf16 x bf16 dot products against fp32 FMAs); each is
// batch-invariant on its own.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

namespace {

#define PROMETHEAN_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni")))
#define PROMETHEAN_AVX2 __attribute__((target("avx2,fma,f16c")))

// bf16 weights: vdpbf16ps multiplies pairs of bf16 and accumulates in fp32; x is in bf16.
template <int NR, int MR>
PROMETHEAN_AVX512 inline void tile_bf16(const uint16_t* x, int64_t K, const uint16_t* w,
                                        float* out) {
  __m512 acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      // One cache line per row and step: fetch the same columns of the next tile's rows.
      _mm_prefetch(reinterpret_cast<const char*>(w + (r + NR) * K + k), _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_loadu_si512(w + r * K + k);
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32(1) << (K - k)) - 1;
    __m512bh wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + r * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv, wv[r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) out[m * NR + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// int8 weights against x quantized to int16 with one scale per row of x (finer than bf16 for
// every element within 1/128 of its row's largest): the weights are sign-extended to int16 and
// vpdpwssd sums exact products in int32 lanes, so the sum is exact; fp32 only at the end.
template <int NR, int MR>
PROMETHEAN_AVX512 inline void tile_int8(const int16_t* x, int64_t K, const int8_t* w, float* out) {
  __m512i acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_si512();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i wv[NR];
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      if ((k & 63) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + NR) * K + k), _MM_HINT_T0);
      wv[r] = _mm512_cvtepi8_epi16(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * K + k)));
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = _mm512_loadu_si512(x + m * K + k);
#pragma GCC unroll 8
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], xv, wv[r]);
    }
  }
  if (k < K) {
    const __mmask32 mask = (__mmask32(1) << (K - k)) - 1;
    __m512i wv[NR];
    for (int r = 0; r < NR; ++r)
      wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w + r * K + k));
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], xv, wv[r]);
    }
  }
  // Each lane holds at most 2 * ceil(K / 32) products (bounded by int16_limit below); their
  // total may not fit in int32, so the lanes are added in int64.
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      const __m512i low = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[m][r]));
      const __m512i high = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[m][r], 1));
      out[m * NR + r] = float(_mm512_reduce_add_epi64(_mm512_add_epi64(low, high)));
    }
}

// The largest |x| quantized value for which no int32 lane can overflow: each lane adds two
// products of at most 127 * limit per `span` columns (32 with AVX-512, 16 with AVX2).
inline float int16_limit(int64_t K, int64_t span) {
  const double products = 2.0 * double((K + span - 1) / span);
  return float(std::min(32767.0, std::floor(2147483647.0 / (127.0 * products))));
}

inline float bf16_to_float(uint16_t value) {
  const uint32_t bits = uint32_t(value) << 16;
  float result;
  std::memcpy(&result, &bits, sizeof(result));
  return result;
}

// ---- AVX2 + FMA: bf16 weights widened to fp32 and multiplied by x in fp32 (x converted once);
// int8 weights widened to int16 against x quantized to int16, vpmaddwd summing exact pairs.
// 16 vector registers: the tiles loop over weight rows outside and rows of x inside, so that
// only the accumulators stay live (x is re-read from L1).
PROMETHEAN_AVX2 inline __m256 bf16x8_to_floats(const uint16_t* values) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(values));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}

PROMETHEAN_AVX2 inline float sum_lanes(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int NR, int MR>
PROMETHEAN_AVX2 inline void tile_bf16_avx2(const float* x, int64_t K, const uint16_t* w,
                                           float* out) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      if ((k & 31) == 0)  // one cache line of the next tile's rows per 64 bytes read
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + NR) * K + k), _MM_HINT_T0);
      const __m256 wv = bf16x8_to_floats(w + r * K + k);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m)
        acc[m][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + m * K + k), wv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      float total = sum_lanes(acc[m][r]);
      for (int64_t j = k; j < K; ++j) total += x[m * K + j] * bf16_to_float(w[r * K + j]);
      out[m * NR + r] = total;
    }
}

template <int NR, int MR>
PROMETHEAN_AVX2 inline void tile_int8_avx2(const int16_t* x, int64_t K, const int8_t* w,
                                           float* out) {
  __m256i acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_si256();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 8
    for (int r = 0; r < NR; ++r) {
      if ((k & 63) == 0)
        _mm_prefetch(reinterpret_cast<const char*>(w + (r + NR) * K + k), _MM_HINT_T0);
      const __m256i wv = _mm256_cvtepi8_epi16(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * K + k)));
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + m * K + k));
        acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(xv, wv));
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) {
      // The lanes are added in int64, as in the AVX-512 kernel.
      alignas(32) int64_t lanes[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                         _mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc[m][r])));
      _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 4),
                         _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc[m][r], 1)));
      int64_t total = 0;
      for (int lane = 0; lane < 8; ++lane) total += lanes[lane];
      for (int64_t j = k; j < K; ++j) total += int64_t(x[m * K + j]) * w[r * K + j];
      out[m * NR + r] = float(total);
    }
}

// Each kernel: what x it takes, its tiles (rows of W at a time for a single row of x; rows of W
// and of x for several, as many accumulators as its registers hold) and the int8 lane span.
struct Avx512Bf16 {
  using X = uint16_t;
  using W = uint16_t;
  static constexpr int kRowsSingle = 8, kRowsBatched = 4, kInputRows = 6;
  template <int NR, int MR>
  PROMETHEAN_AVX512 static void tile(const X* x, int64_t K, const W* w, float* out) {
    tile_bf16<NR, MR>(x, K, w, out);
  }
};
struct Avx512Int8 {
  using X = int16_t;
  using W = int8_t;
  static constexpr int kRowsSingle = 8, kRowsBatched = 4, kInputRows = 6;
  template <int NR, int MR>
  PROMETHEAN_AVX512 static void tile(const X* x, int64_t K, const W* w, float* out) {
    tile_int8<NR, MR>(x, K, w, out);
  }
};
struct Avx2Bf16 {
  using X = float;
  using W = uint16_t;
  static constexpr int kRowsSingle = 8, kRowsBatched = 4, kInputRows = 3;
  template <int NR, int MR>
  PROMETHEAN_AVX2 static void tile(const X* x, int64_t K, const W* w, float* out) {
    tile_bf16_avx2<NR, MR>(x, K, w, out);
  }
};
struct Avx2Int8 {
  using X = int16_t;
  using W = int8_t;
  static constexpr int kRowsSingle = 8, kRowsBatched = 4, kInputRows = 3;
  template <int NR, int MR>
  PROMETHEAN_AVX2 static void tile(const X* x, int64_t K, const W* w, float* out) {
    tile_int8_avx2<NR, MR>(x, K, w, out);
  }
};

inline uint16_t round_to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);  // NaN stays NaN
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return uint16_t(bits >> 16);
}

// x (bf16 or fp32) as 16 fp32 lanes, the first `count` of them (the rest zero).
PROMETHEAN_AVX512 inline __m512 load_floats(const float* x, int64_t count) {
  return _mm512_maskz_loadu_ps(__mmask16((1u << count) - 1u), x);
}
PROMETHEAN_AVX512 inline __m512 load_floats(const uint16_t* x, int64_t count) {
  const __m256i bits = _mm256_maskz_loadu_epi16(__mmask16((1u << count) - 1u), x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// One row of x to int16 with one scale (its largest |value| maps to `limit`); returns the scale.
// NaNs are left out of the largest value, and an all-zero or non-finite row gets scale 1.
template <typename X>
PROMETHEAN_AVX512 float quantize_row(const X* row, int64_t K, float limit, int16_t* out) {
  __m512 peak = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    // max(value, peak) returns peak when value is NaN.
    peak = _mm512_max_ps(_mm512_abs_ps(load_floats(row + k, std::min<int64_t>(16, K - k))), peak);
  }
  const float largest = _mm512_reduce_max_ps(peak);
  const float scale = largest > 0.f && std::isfinite(largest) ? largest / limit : 1.f;
  const __m512 divisor = _mm512_set1_ps(scale);
  for (int64_t k = 0; k < K; k += 16) {
    const int64_t count = std::min<int64_t>(16, K - k);
    // Division, not a reciprocal multiply: round(x / scale) exactly as the scalar form; the
    // conversion rounds to nearest even, as std::nearbyint does.
    const __m512i rounded = _mm512_cvtps_epi32(_mm512_div_ps(load_floats(row + k, count), divisor));
    _mm256_mask_storeu_epi16(out + k, __mmask16((1u << count) - 1u),
                             _mm512_cvtepi32_epi16(rounded));
  }
  return scale;
}

PROMETHEAN_AVX2 inline __m256 load8_floats(const float* x) { return _mm256_loadu_ps(x); }
PROMETHEAN_AVX2 inline __m256 load8_floats(const uint16_t* x) { return bf16x8_to_floats(x); }
inline float as_float(float value) { return value; }
inline float as_float(uint16_t value) { return bf16_to_float(value); }

// quantize_row with AVX2: the same scale and the same rounding.
template <typename X>
PROMETHEAN_AVX2 float quantize_row_avx2(const X* row, int64_t K, float limit, int16_t* out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 peak = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8)  // max(value, peak) returns peak when value is NaN
    peak = _mm256_max_ps(_mm256_andnot_ps(sign, load8_floats(row + k)), peak);
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, peak);
  float largest = 0.f;
  for (float lane : lanes) largest = std::max(largest, lane);
  for (; k < K; ++k) largest = std::max(largest, std::abs(as_float(row[k])));  // NaN: kept out
  const float scale = largest > 0.f && std::isfinite(largest) ? largest / limit : 1.f;
  const __m256 divisor = _mm256_set1_ps(scale);
  for (k = 0; k + 8 <= K; k += 8) {
    const __m256i rounded = _mm256_cvtps_epi32(_mm256_div_ps(load8_floats(row + k), divisor));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k),
                     _mm_packs_epi32(_mm256_castsi256_si128(rounded),
                                     _mm256_extracti128_si256(rounded, 1)));
  }
  for (; k < K; ++k) out[k] = int16_t(std::nearbyint(as_float(row[k]) / scale));
  return scale;
}

struct Epilogue {
  const float* scales;  // per output row, or null
  const float* bias;    // per output row, or null
  void* y;              // (M, N), bf16 or fp32
  bool y_is_bf16;
  int64_t N;
  const float* row_scales;  // per row of x (int8: x's int16 scale), or null

  inline void store(int64_t m, int64_t n, float value) const {
    if (row_scales) value *= row_scales[m];
    if (scales) value *= scales[n];
    if (bias) value += bias[n];
    if (y_is_bf16) {
      static_cast<uint16_t*>(y)[m * N + n] = round_to_bf16(value);
    } else {
      static_cast<float*>(y)[m * N + n] = value;
    }
  }
};

// Rows n .. n+NR-1 of W against every row of x, MR rows of x at a time.
template <typename Kernel, int NR, int MR>
void weight_rows(const typename Kernel::X* x, int64_t M, int64_t K, const typename Kernel::W* w,
                 int64_t n, const Epilogue& epilogue) {
  float out[MR * NR];
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int64_t rows = std::min<int64_t>(MR, M - m0);
    const auto* xm = x + m0 * K;
    const auto* wn = w + n * K;
    switch (rows) {
      case 1: Kernel::template tile<NR, 1>(xm, K, wn, out); break;
      case 2: if constexpr (MR >= 2) Kernel::template tile<NR, 2>(xm, K, wn, out); break;
      case 3: if constexpr (MR >= 3) Kernel::template tile<NR, 3>(xm, K, wn, out); break;
      case 4: if constexpr (MR >= 4) Kernel::template tile<NR, 4>(xm, K, wn, out); break;
      case 5: if constexpr (MR >= 5) Kernel::template tile<NR, 5>(xm, K, wn, out); break;
      default: if constexpr (MR >= 6) Kernel::template tile<NR, 6>(xm, K, wn, out); break;
    }
    for (int64_t m = 0; m < rows; ++m)
      for (int r = 0; r < NR; ++r) epilogue.store(m0 + m, n + r, out[m * NR + r]);
  }
}

template <typename Kernel, int NR, int MR>
void matmul(const typename Kernel::X* x, int64_t M, int64_t K, const typename Kernel::W* w,
            int64_t N, const Epilogue& epilogue) {
  const int64_t tiles = (N + NR - 1) / NR;
  at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t * NR;
      if (n + NR <= N) {
        weight_rows<Kernel, NR, MR>(x, M, K, w, n, epilogue);
      } else {
        for (int64_t row = n; row < N; ++row)
          weight_rows<Kernel, 1, MR>(x, M, K, w, row, epilogue);
      }
    }
  });
}

template <typename Kernel>
void dispatch(const typename Kernel::X* x, int64_t M, int64_t K, const typename Kernel::W* w,
              int64_t N, const Epilogue& epilogue) {
  if (M == 1) {
    matmul<Kernel, Kernel::kRowsSingle, 1>(x, M, K, w, N, epilogue);
  } else {
    matmul<Kernel, Kernel::kRowsBatched, Kernel::kInputRows>(x, M, K, w, N, epilogue);
  }
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni");
}

bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}

// The instruction set the kernels run: the best this CPU has, or the one select_instruction_set
// chose (to compare them, or to run the AVX2 kernels where AVX-512 is also there).
bool use_avx512 = cpu_has_avx512();

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight,
                  const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(weight.dim() == 2 && weight.is_contiguous(), "weight must be a contiguous matrix");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "x must be bf16 or fp32");
  const bool int8 = weight.scalar_type() == at::kChar;
  TORCH_CHECK(int8 || weight.scalar_type() == at::kBFloat16, "weight must be bf16 or int8");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(x.size(-1) == K, "x has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(!int8 || scales.has_value(), "int8 weights need their scales");
  for (const auto* vector : {&scales, &bias}) {
    if (vector->has_value()) {
      TORCH_CHECK((*vector)->scalar_type() == at::kFloat && (*vector)->is_contiguous() &&
                      (*vector)->numel() == N,
                  "scales and bias must be contiguous fp32 vectors of the output size");
    }
  }
  const auto rows = x.reshape({-1, K});
  const int64_t M = rows.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = at::empty(sizes, x.options());
  if (M == 0 || N == 0) return y;
  Epilogue epilogue{scales ? scales->data_ptr<float>() : nullptr,
                    bias ? bias->data_ptr<float>() : nullptr, y.data_ptr(),
                    x.scalar_type() == at::kBFloat16, N, nullptr};
  if (int8) {
    const auto x_rows = rows.contiguous();
    // Reused from call to call: a decode step makes ~50 of these, each for a few microseconds.
    thread_local std::vector<int16_t> quantized;
    thread_local std::vector<float> row_scales;
    quantized.resize(M * K);
    row_scales.resize(M);
    const float limit = int16_limit(K, use_avx512 ? 32 : 16);
    for (int64_t m = 0; m < M; ++m) {
      int16_t* out = quantized.data() + m * K;
      if (x_rows.scalar_type() == at::kBFloat16) {
        const auto* row = reinterpret_cast<const uint16_t*>(x_rows.data_ptr()) + m * K;
        row_scales[m] = use_avx512 ? quantize_row(row, K, limit, out)
                                   : quantize_row_avx2(row, K, limit, out);
      } else {
        const float* row = x_rows.data_ptr<float>() + m * K;
        row_scales[m] = use_avx512 ? quantize_row(row, K, limit, out)
                                   : quantize_row_avx2(row, K, limit, out);
      }
    }
    epilogue.row_scales = row_scales.data();
    if (use_avx512) {
      dispatch<Avx512Int8>(quantized.data(), M, K, weight.data_ptr<int8_t>(), N, epilogue);
    } else {
      dispatch<Avx2Int8>(quantized.data(), M, K, weight.data_ptr<int8_t>(), N, epilogue);
    }
  } else if (use_avx512) {
    const auto x16 = rows.to(at::kBFloat16).contiguous();
    dispatch<Avx512Bf16>(reinterpret_cast<const uint16_t*>(x16.data_ptr()), M, K,
                         reinterpret_cast<const uint16_t*>(weight.data_ptr()), N, epilogue);
  } else {
    const auto x32 = rows.to(at::kFloat).contiguous();
    dispatch<Avx2Bf16>(x32.data_ptr<float>(), M, K,
                       reinterpret_cast<const uint16_t*>(weight.data_ptr()), N, epilogue);
  }
  return y;
}

// ------------------------------------------------------------------------------ decode step
// Every block of a decode step (one new token per sequence) in one call. At batch 1 the matrix
// products stream about 25 GB/s of weights, and what is left of a step is the time between them:
// from Python, each of a block's ~30 small operations (norm, split, views, cache write, attention,
// residual adds) costs ~10 us of interpreter and module overhead, about 2-3 ms per GPT-2-small
// step whatever the batch. Here the same ATen operations run in the same order on the same shapes
// as promethean.model's Block.forward does for such a step (the attention mask of left-padded rows
// included), so the result is bit-identical to the module path (tests/test_fused_decode.py), only
// without Python in between.

// What each layer contributes to `params`, in this order (absent ones are None). A projection
// takes five: the weight as Promethean's kernels multiply it, its per-row scales and its bias
// (None for a layer PyTorch multiplies), then PyTorch's own copy and its bias: oneDNN-packed
// bf16 for several rows of a Bf16Linear, or the plain weight of an nn.Linear.
enum Param : int64_t {
  kAttnNormWeight, kAttnNormBias,
  kQkv, kQkvScales, kQkvBias, kQkvTorch, kQkvTorchBias,  // q, k and v in one (the kernels)
  kQ, kQScales, kQBias, kQTorch, kQTorchBias,             // or apart (an fp32 model)
  kK, kKScales, kKBias, kKTorch, kKTorchBias,
  kV, kVScales, kVBias, kVTorch, kVTorchBias,
  kQNormWeight, kKNormWeight,
  kOut, kOutScales, kOutBias, kOutTorch, kOutTorchBias,
  kAttnPostNormWeight, kAttnPostNormBias,
  kMlpNormWeight, kMlpNormBias,
  kGate, kGateScales, kGateBias, kGateTorch, kGateTorchBias,
  kUp, kUpScales, kUpBias, kUpTorch, kUpTorchBias,
  kDown, kDownScales, kDownBias, kDownTorch, kDownTorchBias,
  kMlpPostNormWeight, kMlpPostNormBias,
  kParamsPerLayer
};

enum MlpKind : int64_t { kGelu = 0, kSwiGlu = 1, kGeGlu = 2 };

struct StackShape {
  int64_t layers, heads, kv_heads, head_size;
  bool rms_norm, unit_offset;
  int64_t mlp;
  double norm_eps, attention_scale;
};

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

// promethean.model.layers.LayerNorm / RMSNorm, operation for operation.
at::Tensor norm(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                const std::optional<at::Tensor>& bias, const StackShape& shape) {
  if (!shape.rms_norm) return at::layer_norm(x, {x.size(-1)}, weight, bias, shape.norm_eps);
  const auto x32 = x.to(at::kFloat);
  const auto normed = x32 * at::rsqrt(x32.pow(2).mean(-1, true) + shape.norm_eps);
  const auto gain = shape.unit_offset ? weight->to(at::kFloat) + 1.0 : weight->to(at::kFloat);
  return (normed * gain).to(x.scalar_type());
}

// promethean.model.layers.apply_rotary.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const auto rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return (x * cos + rotated * sin).to(x.scalar_type());
}

// promethean.inference.quantize.PackedLinear: oneDNN's linear on a prepacked bf16 weight.
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& packed,
                         const std::optional<at::Tensor>& bias) {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  std::vector<c10::IValue> stack;
  stack.emplace_back(x.to(at::kBFloat16));
  stack.emplace_back(packed);
  stack.emplace_back(bias);
  stack.emplace_back(std::string("none"));
  stack.emplace_back(c10::List<std::optional<c10::Scalar>>());
  stack.emplace_back(std::string(""));
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

// A projection as its layer computes it: nn.Linear's F.linear; the kernel; or, for several rows
// of a bf16 layer that keeps one (as Bf16Linear does), the oneDNN-packed copy.
at::Tensor project(const at::Tensor& x, const OptionalTensors& params, int64_t base, Param which) {
  const auto kernel_weight = params.get(base + which);
  const auto torch_weight = params.get(base + which + 3);
  if (!kernel_weight.has_value()) return at::linear(x, *torch_weight, params.get(base + which + 4));
  if (torch_weight.has_value() && x.numel() != x.size(-1))
    return packed_linear(x, *torch_weight, params.get(base + which + 4));
  return linear(x, *kernel_weight, params.get(base + which + 1), params.get(base + which + 2));
}

at::Tensor decode_blocks(const at::Tensor& input, const OptionalTensors& params,
                         at::TensorList keys, at::TensorList values, const OptionalTensors& rotary,
                         const std::optional<at::Tensor>& mask, int64_t filled,
                         at::IntArrayRef shape_ints, at::ArrayRef<double> reals) {
  TORCH_CHECK(shape_ints.size() == 7 && reals.size() == 2, "decode_blocks: bad stack shape");
  const StackShape shape{shape_ints[0], shape_ints[1], shape_ints[2], shape_ints[3],
                         shape_ints[4] != 0, shape_ints[5] != 0, shape_ints[6],
                         reals[0], reals[1]};
  TORCH_CHECK(input.dim() == 3 && input.size(1) == 1,
              "decode_blocks: one token per sequence, (batch, 1, width)");
  const int64_t batch = input.size(0);
  TORCH_CHECK(int64_t(params.size()) == shape.layers * kParamsPerLayer &&
                  int64_t(keys.size()) == shape.layers && int64_t(values.size()) == shape.layers,
              "decode_blocks: parameters or caches do not match the number of layers");
  TORCH_CHECK(rotary.size() == 0 || int64_t(rotary.size()) == 2 * shape.layers,
              "decode_blocks: rotary tables must be (cos, sin) per layer");
  const int64_t inner = shape.heads * shape.head_size;
  const int64_t kv_inner = shape.kv_heads * shape.head_size;
  at::Tensor x = input;
  for (int64_t layer = 0; layer < shape.layers; ++layer) {
    const int64_t base = layer * kParamsPerLayer;
    const auto& layer_keys = keys[layer];
    const auto& layer_values = values[layer];
    TORCH_CHECK(layer_keys.dim() == 4 && layer_keys.size(0) == batch &&
                    layer_values.sizes() == layer_keys.sizes(),
                "decode_blocks: a cache buffer does not hold this batch");
    TORCH_CHECK(filled < layer_keys.size(2),
                "decode_blocks: a cache buffer has no room for the new token");
    // Attention (promethean.model.attention.Attention.forward with one new token).
    auto h = norm(x, params.get(base + kAttnNormWeight), params.get(base + kAttnNormBias), shape);
    at::Tensor q, k, v;
    if (params.get(base + kQkv).has_value() || params.get(base + kQkvTorch).has_value()) {
      const auto qkv =
          project(h, params, base, kQkv).split_with_sizes({inner, kv_inner, kv_inner}, -1);
      q = qkv[0], k = qkv[1], v = qkv[2];
    } else {
      q = project(h, params, base, kQ);
      k = project(h, params, base, kK);
      v = project(h, params, base, kV);
    }
    q = q.view({batch, 1, shape.heads, shape.head_size}).transpose(1, 2);
    k = k.view({batch, 1, shape.kv_heads, shape.head_size}).transpose(1, 2);
    v = v.view({batch, 1, shape.kv_heads, shape.head_size}).transpose(1, 2);
    if (params.get(base + kQNormWeight).has_value()) {
      StackShape head_norm = shape;
      head_norm.rms_norm = true;
      q = norm(q, params.get(base + kQNormWeight), std::nullopt, head_norm);
      k = norm(k, params.get(base + kKNormWeight), std::nullopt, head_norm);
    }
    if (rotary.size() != 0 && rotary.get(2 * layer).has_value()) {
      const auto cos = *rotary.get(2 * layer);
      const auto sin = *rotary.get(2 * layer + 1);
      q = rotate(q, cos, sin);
      k = rotate(k, cos, sin);
    }
    layer_keys.narrow(2, filled, 1).copy_(k);
    layer_values.narrow(2, filled, 1).copy_(v);
    auto y = at::scaled_dot_product_attention(
        q, layer_keys.narrow(2, 0, filled + 1), layer_values.narrow(2, 0, filled + 1), mask, 0.0,
        false, shape.attention_scale, shape.kv_heads != shape.heads);
    y = y.transpose(1, 2).reshape({batch, 1, inner});
    h = project(y, params, base, kOut);
    if (params.get(base + kAttnPostNormWeight).has_value())
      h = norm(h, params.get(base + kAttnPostNormWeight), params.get(base + kAttnPostNormBias),
               shape);
    x = x + h;
    // MLP (promethean.model.layers.MLP).
    h = norm(x, params.get(base + kMlpNormWeight), params.get(base + kMlpNormBias), shape);
    at::Tensor hidden;
    if (shape.mlp == kGelu) {
      hidden = at::gelu(project(h, params, base, kUp), "tanh");
    } else if (shape.mlp == kSwiGlu) {
      hidden = at::silu(project(h, params, base, kGate)) * project(h, params, base, kUp);
    } else {
      hidden = at::gelu(project(h, params, base, kGate), "tanh") *
               project(h, params, base, kUp);
    }
    h = project(hidden, params, base, kDown);
    if (params.get(base + kMlpPostNormWeight).has_value())
      h = norm(h, params.get(base + kMlpPostNormWeight), params.get(base + kMlpPostNormBias),
               shape);
    x = x + h;
  }
  return x;
}

bool supported() { return cpu_has_avx2(); }

std::string instruction_set() { return use_avx512 ? "avx512" : "avx2"; }

void select_instruction_set(c10::string_view name) {
  TORCH_CHECK(name == "avx512" || name == "avx2",
              "the instruction set must be avx512 or avx2, not '", std::string(name), "'");
  const bool avx512 = name == "avx512";
  TORCH_CHECK(avx512 ? cpu_has_avx512() : cpu_has_avx2(), "this CPU cannot run the ",
              std::string(name), " kernels");
  use_avx512 = avx512;
}

}  // namespace

TORCH_LIBRARY(promethean_kernels, m) {
  m.def("supported() -> bool", &supported);
  m.def("instruction_set() -> str", &instruction_set);
  m.def("select_instruction_set(str name) -> ()", &select_instruction_set);
  m.def("linear(Tensor x, Tensor weight, Tensor? scales, Tensor? bias) -> Tensor");
  m.def(
      "decode_blocks(Tensor x, Tensor?[] params, Tensor(a!)[] keys, Tensor(b!)[] values, "
      "Tensor?[] rotary, Tensor? mask, int filled, int[] shape, float[] reals) -> Tensor");
}

TORCH_LIBRARY_IMPL(promethean_kernels, CPU, m) {
  m.impl("linear", &linear);
  m.impl("decode_blocks", &decode_blocks);
}

// A bf16 model's packed weights are oneDNN tensors, which make the dispatcher pick this backend.
TORCH_LIBRARY_IMPL(promethean_kernels, MkldnnCPU, m) { m.impl("decode_blocks", &decode_blocks); }
