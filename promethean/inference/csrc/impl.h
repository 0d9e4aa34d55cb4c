// The kernels of one instruction set (see api.h for what they compute and vec.h for why they give
// the same bits on every instruction set). Included by isa_avx512.cpp and isa_avx2.cpp, which
// define PROMETHEAN_ISA (the namespace) and PROMETHEAN_ISA_AVX512 or PROMETHEAN_ISA_AVX2.
//
// No standard-library templates here: an inline template instantiated in this translation unit
// (compiled with -mavx512f) and in the baseline one could be merged by the linker into a single
// AVX-512 copy, which a CPU without AVX-512 would then run.
#pragma once

#include "api.h"
#include "vec.h"

namespace PROMETHEAN_ISA {

using namespace promethean_kernels;

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

inline uint32_t load_pair(const void* p) {
  uint32_t pair;
  std::memcpy(&pair, p, sizeof(pair));
  return pair;
}

// ------------------------------------------------------------------------------ epilogue
inline F16 activate(int32_t activation, F16 v) {
  switch (activation) {
    case kGeluTanh: return f16_gelu_tanh(v);
    case kSilu: return f16_silu(v);
    case kSoftplus: return f16_softplus(v);
    default: return v;
  }
}

inline void store_outputs(const LinearArgs& a, int64_t m, int64_t n0, F16 v, int count) {
  if (a.y_bf16) {
    uint16_t* y = static_cast<uint16_t*>(a.y) + m * a.y_stride + n0;
    if (count == 16) f16_store_bf16(y, v); else f16_store_bf16_n(y, v, count);
  } else {
    float* y = static_cast<float*>(a.y) + m * a.y_stride + n0;
    if (count == 16) f16_store(y, v); else f16_store_n(y, v, count);
  }
}

// value (* x's row scale * the weight row's scale) (+ bias): the same operations for every
// element, in this order.
inline F16 scale_and_bias(const LinearArgs& a, int64_t m, int64_t row0, F16 v, int count) {
  if (a.format == kInt8) {
    v = v * f16_set1(a.x_scales[m]);
    v = v * f16_load_n(a.scales + row0, count);
  }
  if (a.bias != nullptr) v = v + f16_load_n(a.bias + row0, count);
  if (a.addend != nullptr && a.addend_row[m] >= 0)
    v = v + f16_load_n(a.addend + a.addend_row[m] * a.addend_stride + row0, count);
  return v;
}

// Chunk c (16 outputs) of panel p, for row m.
inline void finish_plain(const LinearArgs& a, int64_t m, int64_t p, int c, F16 v) {
  const int64_t n0 = p * kPanel + c * kChunk;
  const int count = int(min64(kChunk, a.N - n0));
  if (count <= 0) return;
  v = activate(a.activation, scale_and_bias(a, m, n0, v, count));
  store_outputs(a, m, n0, v, count);
}

// Chunks 2h (gate) and 2h + 1 (up) of panel p: 16 hidden outputs.
inline void finish_gated(const LinearArgs& a, int64_t m, int64_t p, int h, F16 gate, F16 up) {
  const int64_t o0 = p * kGatedPanel + h * kChunk;
  const int count = int(min64(kChunk, a.N - o0));
  if (count <= 0) return;
  gate = scale_and_bias(a, m, o0, gate, count);
  up = scale_and_bias(a, m, a.N + o0, up, count);
  const F16 hidden = (a.activation == kSiluMul ? f16_silu(gate) : f16_gelu_tanh(gate)) * up;
  store_outputs(a, m, o0, hidden, count);
}

// Chunks [c0, c0 + chunks) of panel p for `rows` rows from m0; acc[m * 4 + c] holds chunk c0 + c.
inline void finish_tile(const LinearArgs& a, int64_t m0, int rows, int64_t p, int c0, int chunks,
                        const F16* acc) {
  for (int m = 0; m < rows; ++m) {
    if (is_gated(a.activation)) {
      for (int c = 0; c < chunks; c += 2)
        finish_gated(a, m0 + m, p, (c0 + c) / 2, acc[m * 4 + c], acc[m * 4 + c + 1]);
    } else {
      for (int c = 0; c < chunks; ++c) finish_plain(a, m0 + m, p, c0 + c, acc[m * 4 + c]);
    }
  }
}

// int64 lane totals (16 per chunk) to fp32 lanes, rounding to nearest even.
inline F16 totals_to_floats(const int64_t* totals) {
  alignas(64) float lanes[16];
  for (int i = 0; i < 16; ++i) lanes[i] = float(totals[i]);
  return f16_load(lanes);
}

// ---------------------------------------------------------------------------- products
// Bytes of weight to prefetch ahead of the one being multiplied (a batch-1 product streams the
// panels; 2-4 KB ahead measured best on a Zen 4).
constexpr int64_t kPrefetchBytes = 4096;

#if defined(PROMETHEAN_ISA_AVX512)

constexpr int kRowsFp32 = 6, kRowsBf16 = 6, kRowsInt8 = 6;

template <int MR>
inline void tile_fp32(const LinearArgs& a, const float* panel, int64_t m0, F16* out) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
  const float* x = static_cast<const float*>(a.x) + m0 * a.x_stride;
  for (int64_t k = 0; k < a.K; ++k) {
    const float* w = panel + k * kPanel;
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 128, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 192, _MM_HINT_T0);
    const __m512 w0 = _mm512_loadu_ps(w), w1 = _mm512_loadu_ps(w + 16);
    const __m512 w2 = _mm512_loadu_ps(w + 32), w3 = _mm512_loadu_ps(w + 48);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * a.x_stride + k]);
      acc[m][0] = _mm512_fmadd_ps(xb, w0, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(xb, w1, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(xb, w2, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(xb, w3, acc[m][3]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c) out[m * 4 + c] = {acc[m][c]};
}

// vdpbf16ps: each fp32 lane adds x[2j+1] w[2j+1], then x[2j] w[2j], each product exact and each
// addition rounded (denormals flushed): the AVX2 kernel below does exactly this with FMAs.
template <int MR>
inline void tile_bf16(const LinearArgs& a, const uint16_t* panel, int64_t m0, F16* out) {
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_ps();
  const uint16_t* x = static_cast<const uint16_t*>(a.x) + m0 * a.x_stride;
  for (int64_t j = 0; j < a.pairs; ++j) {
    const uint16_t* w = panel + j * 2 * kPanel;
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 128, _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 192, _MM_HINT_T0);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(w + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(w + 96);
#pragma GCC unroll 6
    for (int m = 0; m < MR; ++m) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(load_pair(x + m * a.x_stride + 2 * j)));
      acc[m][0] = _mm512_dpbf16_ps(acc[m][0], xb, w0);
      acc[m][1] = _mm512_dpbf16_ps(acc[m][1], xb, w1);
      acc[m][2] = _mm512_dpbf16_ps(acc[m][2], xb, w2);
      acc[m][3] = _mm512_dpbf16_ps(acc[m][3], xb, w3);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c) out[m * 4 + c] = {acc[m][c]};
}

// int8 weights widened to int16 against x quantized to int16: vpdpwssd adds the two exact
// products of a pair to an int32 lane; every kInt8FlushPairs pairs (before any lane could
// overflow: 256 * 2 * 127 * 32767 < 2^31) the lanes move to int64 totals. The total is exact, so
// it is the same whatever the order.
template <int MR>
inline void tile_int8(const LinearArgs& a, const int8_t* panel, int64_t m0, F16* out) {
  int64_t totals[MR][4][16];
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c)
      for (int i = 0; i < 16; ++i) totals[m][c][i] = 0;
  const int16_t* x = static_cast<const int16_t*>(a.x) + m0 * a.x_stride;
  for (int64_t j0 = 0; j0 < a.pairs; j0 += kInt8FlushPairs) {
    __m512i acc[MR][4];
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < 4; ++c) acc[m][c] = _mm512_setzero_si512();
    const int64_t j1 = min64(a.pairs, j0 + kInt8FlushPairs);
    for (int64_t j = j0; j < j1; ++j) {
      const int8_t* w = panel + j * 2 * kPanel;
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64, _MM_HINT_T0);
      const __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
      const __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32)));
      const __m512i w2 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64)));
      const __m512i w3 = _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 96)));
#pragma GCC unroll 6
      for (int m = 0; m < MR; ++m) {
        const __m512i xb = _mm512_set1_epi32(int(load_pair(x + m * a.x_stride + 2 * j)));
        acc[m][0] = _mm512_dpwssd_epi32(acc[m][0], xb, w0);
        acc[m][1] = _mm512_dpwssd_epi32(acc[m][1], xb, w1);
        acc[m][2] = _mm512_dpwssd_epi32(acc[m][2], xb, w2);
        acc[m][3] = _mm512_dpwssd_epi32(acc[m][3], xb, w3);
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int c = 0; c < 4; ++c) {
        alignas(64) int64_t lanes[16];
        _mm512_store_si512(lanes, _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[m][c])));
        _mm512_store_si512(lanes + 8, _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[m][c], 1)));
        for (int i = 0; i < 16; ++i) totals[m][c][i] += lanes[i];
      }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < 4; ++c) out[m * 4 + c] = totals_to_floats(totals[m][c]);
}

template <int MR>
inline void tile(const LinearArgs& a, int64_t p, int64_t m0, F16* acc) {
  if (a.format == kFp32) {
    tile_fp32<MR>(a, static_cast<const float*>(a.packed) + p * a.K * kPanel, m0, acc);
  } else if (a.format == kBf16) {
    tile_bf16<MR>(a, static_cast<const uint16_t*>(a.packed) + p * a.pairs * 2 * kPanel, m0, acc);
  } else {
    tile_int8<MR>(a, static_cast<const int8_t*>(a.packed) + p * a.pairs * 2 * kPanel, m0, acc);
  }
}

inline void linear(const LinearArgs& a, int64_t p0, int64_t p1, int64_t r0, int64_t r1) {
  F16 acc[6 * 4];
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t m = r0; m < r1; m += 6) {
      const int rows = int(min64(6, r1 - m));
      switch (rows) {
        case 1: tile<1>(a, p, m, acc); break;
        case 2: tile<2>(a, p, m, acc); break;
        case 3: tile<3>(a, p, m, acc); break;
        case 4: tile<4>(a, p, m, acc); break;
        case 5: tile<5>(a, p, m, acc); break;
        default: tile<6>(a, p, m, acc); break;
      }
      finish_tile(a, m, rows, p, 0, 4, acc);
    }
  }
}

#else  // AVX2: 16 registers of 8 lanes; a tile covers half a panel (NC = 2 chunks) or, for one
       // row, all of it (NC = 4).

// MXCSR with denormals flushed to zero and read as zero, as vdpbf16ps treats them, for as long
// as this object lives (on this thread).
class FlushDenormals {
 public:
  explicit FlushDenormals(bool flush) : saved_(_mm_getcsr()) {
    if (flush) _mm_setcsr(saved_ | 0x8040u);
  }
  ~FlushDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
};

template <int MR, int NC>
inline void tile_fp32(const LinearArgs& a, const float* panel, int c0, int64_t m0, F16* out) {
  __m256 acc[MR][2 * NC];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 2 * NC; ++i) acc[m][i] = _mm256_setzero_ps();
  const float* x = static_cast<const float*>(a.x) + m0 * a.x_stride;
  for (int64_t k = 0; k < a.K; ++k) {
    const float* w = panel + k * kPanel + c0 * kChunk;
    for (int line = 0; line < NC; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64 * line, _MM_HINT_T0);
#pragma GCC unroll 8
    for (int i = 0; i < 2 * NC; ++i) {
      const __m256 wv = _mm256_loadu_ps(w + 8 * i);
#pragma GCC unroll 3
      for (int m = 0; m < MR; ++m)
        acc[m][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + m * a.x_stride + k), wv, acc[m][i]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c) out[m * 4 + c] = {acc[m][2 * c], acc[m][2 * c + 1]};
}

// The AVX-512 kernel's vdpbf16ps, lane for lane: the odd element's product, then the even one's,
// each added with one rounding and denormals flushed. x is fp32 here (converted from bf16 once).
template <int MR, int NC>
inline void tile_bf16(const LinearArgs& a, const uint16_t* panel, int c0, int64_t m0, F16* out) {
  const FlushDenormals flush(true);  // the products only, not the epilogue
  __m256 acc[MR][2 * NC];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 2 * NC; ++i) acc[m][i] = _mm256_setzero_ps();
  const float* x = static_cast<const float*>(a.x) + m0 * a.x_stride;
  const __m256i high = _mm256_set1_epi32(int(0xffff0000u));
  for (int64_t j = 0; j < a.pairs; ++j) {
    const uint16_t* w = panel + j * 2 * kPanel + c0 * kChunk * 2;
    for (int line = 0; line < NC; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 64 * line, _MM_HINT_T0);
#pragma GCC unroll 8
    for (int i = 0; i < 2 * NC; ++i) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 16 * i));
      const __m256 even = _mm256_castsi256_ps(_mm256_slli_epi32(wv, 16));
      const __m256 odd = _mm256_castsi256_ps(_mm256_and_si256(wv, high));
#pragma GCC unroll 2
      for (int m = 0; m < MR; ++m) {
        const float* xm = x + m * a.x_stride + 2 * j;
        acc[m][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(xm + 1), odd, acc[m][i]);
        acc[m][i] = _mm256_fmadd_ps(_mm256_broadcast_ss(xm), even, acc[m][i]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c) out[m * 4 + c] = {acc[m][2 * c], acc[m][2 * c + 1]};
}

template <int MR, int NC>
inline void tile_int8(const LinearArgs& a, const int8_t* panel, int c0, int64_t m0, F16* out) {
  int64_t totals[MR][2 * NC][8];
  for (int m = 0; m < MR; ++m)
    for (int i = 0; i < 2 * NC; ++i)
      for (int l = 0; l < 8; ++l) totals[m][i][l] = 0;
  const int16_t* x = static_cast<const int16_t*>(a.x) + m0 * a.x_stride;
  for (int64_t j0 = 0; j0 < a.pairs; j0 += kInt8FlushPairs) {
    __m256i acc[MR][2 * NC];
    for (int m = 0; m < MR; ++m)
      for (int i = 0; i < 2 * NC; ++i) acc[m][i] = _mm256_setzero_si256();
    const int64_t j1 = min64(a.pairs, j0 + kInt8FlushPairs);
    for (int64_t j = j0; j < j1; ++j) {
      const int8_t* w = panel + j * 2 * kPanel + c0 * kChunk * 2;
      for (int line = 0; line < NC; line += 2)
        _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchBytes + 32 * line, _MM_HINT_T0);
#pragma GCC unroll 8
      for (int i = 0; i < 2 * NC; ++i) {
        const __m256i wv =
            _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16 * i)));
#pragma GCC unroll 3
        for (int m = 0; m < MR; ++m) {
          const __m256i xb = _mm256_set1_epi32(int(load_pair(x + m * a.x_stride + 2 * j)));
          acc[m][i] = _mm256_add_epi32(acc[m][i], _mm256_madd_epi16(wv, xb));
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int i = 0; i < 2 * NC; ++i) {
        alignas(32) int64_t lanes[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes),
                           _mm256_cvtepi32_epi64(_mm256_castsi256_si128(acc[m][i])));
        _mm256_store_si256(reinterpret_cast<__m256i*>(lanes + 4),
                           _mm256_cvtepi32_epi64(_mm256_extracti128_si256(acc[m][i], 1)));
        for (int l = 0; l < 8; ++l) totals[m][i][l] += lanes[l];
      }
  }
  for (int m = 0; m < MR; ++m)
    for (int c = 0; c < NC; ++c) {
      int64_t chunk[16];
      for (int l = 0; l < 8; ++l) {
        chunk[l] = totals[m][2 * c][l];
        chunk[8 + l] = totals[m][2 * c + 1][l];
      }
      out[m * 4 + c] = totals_to_floats(chunk);
    }
}

template <int MR, int NC>
inline void tile(const LinearArgs& a, int64_t p, int c0, int64_t m0, F16* acc) {
  if (a.format == kFp32) {
    tile_fp32<MR, NC>(a, static_cast<const float*>(a.packed) + p * a.K * kPanel, c0, m0, acc);
  } else if (a.format == kBf16) {
    tile_bf16<MR, NC>(a, static_cast<const uint16_t*>(a.packed) + p * a.pairs * 2 * kPanel, c0,
                      m0, acc);
  } else {
    tile_int8<MR, NC>(a, static_cast<const int8_t*>(a.packed) + p * a.pairs * 2 * kPanel, c0,
                      m0, acc);
  }
}

inline void linear(const LinearArgs& a, int64_t p0, int64_t p1, int64_t r0, int64_t r1) {
  F16 acc[3 * 4];
  if (r1 - r0 <= 2) {
    // A decode step's few rows: a whole panel per pass (one sequential read of it), one row at
    // a time (8 accumulators). Each output is the same sum of products as in the tiles below.
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t m = r0; m < r1; ++m) {
        tile<1, 4>(a, p, 0, m, acc);
        finish_tile(a, m, 1, p, 0, 4, acc);
      }
    return;
  }
  const int most = a.format == kBf16 ? 2 : 3;
  for (int64_t p = p0; p < p1; ++p) {
    for (int c0 = 0; c0 < 4; c0 += 2) {
      for (int64_t m = r0; m < r1; m += most) {
        const int rows = int(min64(most, r1 - m));
        if (rows == 1) tile<1, 2>(a, p, c0, m, acc);
        else if (rows == 2) tile<2, 2>(a, p, c0, m, acc);
        else tile<3, 2>(a, p, c0, m, acc);
        // The tile's chunks sit at acc[m * 4 + 0 .. 1]; finish_tile reads chunks c0, c0 + 1.
        finish_tile(a, m, rows, p, c0, 2, acc);
      }
    }
  }
}

#endif

// --------------------------------------------------------------------------- quantize x
// One row of x to int16 with one scale (its largest |value| maps to 32767); returns the scale.
// NaNs are left out of the largest value, and an all-zero or non-finite row gets scale 1.
// ------------------------------------------------------------------------- LoRA updates
// Vectors run over R (then N), each lane adding its terms in a fixed order: no reduction across
// lanes, so a lane's sum is that of a scalar loop with fused multiply-adds, on either set.
// x A^T: four partial sums per lane (inputs k = 0, 4, 8, ... in the first, 1, 5, ... in the
// second, ...) added as (s0 + s1) + (s2 + s3); four chains hide the multiply-add's latency.
// t B^T: ranks in order 0..R-1, two output chunks of each row at a time.
inline float lora_input(const LoraArgs& a, int64_t m, int64_t k) {
  return a.x_bf16 ? bf16_to_float(static_cast<const uint16_t*>(a.x)[m * a.x_stride + k])
                  : static_cast<const float*>(a.x)[m * a.x_stride + k];
}

// count values of an adapter matrix from element `offset` (fp32, or bf16 widened exactly).
inline F16 lora_load(const void* base, bool bf16, int64_t offset, int count) {
  if (bf16) {
    const uint16_t* p = static_cast<const uint16_t*>(base) + offset;
    return count == kChunk ? f16_load_bf16(p) : f16_load_bf16_n(p, count);
  }
  const float* p = static_cast<const float*>(base) + offset;
  return count == kChunk ? f16_load(p) : f16_load_n(p, count);
}

// ROWS consecutive rows m0.. of one slot: each vector of the adapter's matrices is loaded once
// for all of them (a prompt's tokens are consecutive rows of one request), while every row's
// sums run exactly as they would alone.
template <int ROWS>
inline void lora_rows(const LoraArgs& a, int64_t m0, int64_t slot) {
  const bool bf16 = a.weights_bf16;
  const int64_t down = slot * a.K * a.R, up = slot * a.R * a.N;  // element offsets
  for (int64_t j = 0; j < a.R; j += kChunk) {
    const int count = int(min64(kChunk, a.R - j));
    F16 s[ROWS][4];
    for (int r = 0; r < ROWS; ++r) s[r][0] = s[r][1] = s[r][2] = s[r][3] = f16_zero();
    for (int64_t k = 0; k < a.K; ++k) {
      const F16 w = lora_load(a.down, bf16, down + k * a.R + j, count);
      for (int r = 0; r < ROWS; ++r)
        s[r][k & 3] = fma(f16_set1(lora_input(a, m0 + r, k)), w, s[r][k & 3]);
    }
    for (int r = 0; r < ROWS; ++r)
      f16_store_n(a.t + (m0 + r) * a.R + j, (s[r][0] + s[r][1]) + (s[r][2] + s[r][3]), count);
  }
  int64_t n = 0;
  for (; n + 2 * kChunk <= a.N; n += 2 * kChunk) {
    F16 c[ROWS][2];
    for (int r = 0; r < ROWS; ++r) c[r][0] = c[r][1] = f16_zero();
    for (int64_t j = 0; j < a.R; ++j) {
      const int64_t row = up + j * a.N + n;
      const F16 w0 = lora_load(a.up, bf16, row, kChunk);
      const F16 w1 = lora_load(a.up, bf16, row + kChunk, kChunk);
      for (int r = 0; r < ROWS; ++r) {
        const F16 scale = f16_set1(a.t[(m0 + r) * a.R + j]);
        c[r][0] = fma(scale, w0, c[r][0]);
        c[r][1] = fma(scale, w1, c[r][1]);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      f16_store(a.out + (m0 + r) * a.N + n, c[r][0]);
      f16_store(a.out + (m0 + r) * a.N + n + kChunk, c[r][1]);
    }
  }
  for (; n < a.N; n += kChunk) {
    const int count = int(min64(kChunk, a.N - n));
    F16 c[ROWS];
    for (int r = 0; r < ROWS; ++r) c[r] = f16_zero();
    for (int64_t j = 0; j < a.R; ++j) {
      const F16 w = lora_load(a.up, bf16, up + j * a.N + n, count);
      for (int r = 0; r < ROWS; ++r) c[r] = fma(f16_set1(a.t[(m0 + r) * a.R + j]), w, c[r]);
    }
    for (int r = 0; r < ROWS; ++r) f16_store_n(a.out + (m0 + r) * a.N + n, c[r], count);
  }
}

inline void lora(const LoraArgs& a, int64_t r0, int64_t r1) {
  for (int64_t m = r0; m < r1;) {
    const int64_t slot = a.row_slot[m];
    if (slot < 0) {
      ++m;
      continue;
    }
    int rows = 1;
    while (rows < 4 && m + rows < r1 && a.row_slot[m + rows] == slot) ++rows;
    switch (rows) {
      case 4: lora_rows<4>(a, m, slot); break;
      case 3: lora_rows<3>(a, m, slot); break;
      case 2: lora_rows<2>(a, m, slot); break;
      default: lora_rows<1>(a, m, slot); break;
    }
    m += rows;
  }
}

inline float quantize_row(const void* row, bool bf16, int64_t K, int16_t* out) {
  F16 peak = f16_zero();
  for (int64_t k = 0; k < K; k += 16) {
    const int count = int(min64(16, K - k));
    const F16 v = bf16 ? f16_load_bf16_n(static_cast<const uint16_t*>(row) + k, count)
                       : f16_load_n(static_cast<const float*>(row) + k, count);
    peak = f16_max(f16_abs(v), peak);  // max(NaN, peak) is peak
  }
  const float largest = reduce_max(peak);
  const float scale = largest > 0.f && largest <= 3.402823466e38f ? largest / 32767.f : 1.f;
  const F16 divisor = f16_set1(scale);
  for (int64_t k = 0; k < K; k += 16) {
    const int count = int(min64(16, K - k));
    const F16 v = bf16 ? f16_load_bf16_n(static_cast<const uint16_t*>(row) + k, count)
                       : f16_load_n(static_cast<const float*>(row) + k, count);
    const F16 q = f16_round(v / divisor);
    alignas(64) float lanes[16];
    f16_store(lanes, q);
    for (int i = 0; i < count; ++i) {
      const float value = lanes[i];
      // Saturating (|x / scale| can round to 32767.5); a NaN becomes -32768 on every set.
      out[k + i] = value != value ? int16_t(-32768)
                   : value >= 32767.f ? int16_t(32767)
                   : value <= -32768.f ? int16_t(-32768) : int16_t(int32_t(value));
    }
  }
  return scale;
}

// ---------------------------------------------------------------------------------- norms
inline F16 load_row_chunk(const void* row, bool bf16, int64_t k, int count) {
  if (bf16) {
    const uint16_t* p = static_cast<const uint16_t*>(row) + k;
    return count == 16 ? f16_load_bf16(p) : f16_load_bf16_n(p, count);
  }
  const float* p = static_cast<const float*>(row) + k;
  return count == 16 ? f16_load(p) : f16_load_n(p, count);
}

inline void store_row_chunk(void* row, bool bf16, int64_t k, F16 v, int count) {
  if (bf16) {
    uint16_t* p = static_cast<uint16_t*>(row) + k;
    if (count == 16) f16_store_bf16(p, v); else f16_store_bf16_n(p, v, count);
  } else {
    float* p = static_cast<float*>(row) + k;
    if (count == 16) f16_store(p, v); else f16_store_n(p, v, count);
  }
}

inline void norm(const NormArgs& a, int64_t r0, int64_t r1) {
  const int64_t x_size = a.x_bf16 ? 2 : 4, y_size = a.y_bf16 ? 2 : 4;
  for (int64_t r = r0; r < r1; ++r) {
    const void* x = static_cast<const char*>(a.x) + r * a.x_stride * x_size;
    void* y = static_cast<char*>(a.y) + r * a.y_stride * y_size;
    if (a.rms) {
      F16 squares = f16_zero();
      for (int64_t k = 0; k < a.C; k += 16) {
        const F16 v = load_row_chunk(x, a.x_bf16, k, int(min64(16, a.C - k)));
        squares = fma(v, v, squares);
      }
      const float mean_square = reduce_add(squares) / float(a.C);
      const F16 inverse = f16_set1(1.0f / __builtin_sqrtf(mean_square + a.eps));
      for (int64_t k = 0; k < a.C; k += 16) {
        const int count = int(min64(16, a.C - k));
        F16 gain = f16_load_n(a.weight + k, count);
        if (a.unit_offset) gain = gain + f16_set1(1.0f);
        store_row_chunk(y, a.y_bf16, k, load_row_chunk(x, a.x_bf16, k, count) * inverse * gain,
                        count);
      }
      continue;
    }
    F16 sum = f16_zero();
    for (int64_t k = 0; k < a.C; k += 16) sum = sum + load_row_chunk(x, a.x_bf16, k, int(min64(16, a.C - k)));
    const float mean = reduce_add(sum) / float(a.C);
    const F16 centre = f16_set1(mean);
    F16 squares = f16_zero();
    for (int64_t k = 0; k < a.C; k += 16) {
      const int count = int(min64(16, a.C - k));
      // The missing lanes of a last chunk are 0 - mean: keep them out of the sum.
      const F16 d = f16_keep_first(load_row_chunk(x, a.x_bf16, k, count) - centre, count);
      squares = fma(d, d, squares);
    }
    const float variance = reduce_add(squares) / float(a.C);
    const F16 inverse = f16_set1(1.0f / __builtin_sqrtf(variance + a.eps));
    for (int64_t k = 0; k < a.C; k += 16) {
      const int count = int(min64(16, a.C - k));
      const F16 d = (load_row_chunk(x, a.x_bf16, k, count) - centre) * inverse;
      const F16 shift = a.bias != nullptr ? f16_load_n(a.bias + k, count) : f16_zero();
      store_row_chunk(y, a.y_bf16, k, fma(d, f16_load_n(a.weight + k, count), shift), count);
    }
  }
}

// ------------------------------------------------------------------------------ attention
inline F16 load_head_chunk(const void* base, bool bf16, int64_t offset, int64_t d, int64_t D) {
  const int count = int(min64(16, D - d));
  if (bf16) {
    const uint16_t* p = static_cast<const uint16_t*>(base) + offset + d;
    return count == 16 ? f16_load_bf16(p) : f16_load_bf16_n(p, count);
  }
  const float* p = static_cast<const float*>(base) + offset + d;
  return count == 16 ? f16_load(p) : f16_load_n(p, count);
}

// 16 (or `count`) values of a key or value row as fp32: from fp32, or widened from bf16 (exact,
// so either way a score is computed from the same numbers).
inline F16 load_chunk(const float* p, int count) {
  return count == 16 ? f16_load(p) : f16_load_n(p, count);
}
inline F16 load_chunk(const uint16_t* p, int count) {
  return count == 16 ? f16_load_bf16(p) : f16_load_bf16_n(p, count);
}

// The keys a query at `slot` of a row with `padding` sees: [*lo, *hi] as cache indices.
inline void visible_keys(const AttentionArgs& a, int64_t slot, int64_t padding, int64_t* lo,
                         int64_t* hi) {
  int64_t first = max64(a.key_slot0, padding);
  if (a.window > 0) first = max64(first, slot - a.window + 1);
  if (slot < padding) first = slot;  // a padding query sees itself (its output is never used)
  *lo = first - a.key_slot0;
  *hi = min64(slot, a.key_slot0 + a.keys - 1) - a.key_slot0;
}

// Scores of keys [j0, j0 + n) against `query` (D fp32 values): each key's dot product in 16
// lanes, chunk after chunk of D, its lanes then summed along reduce_add's tree, times scale.
#if defined(PROMETHEAN_ISA_AVX512)
constexpr int kScoreKeys = 16;  // keys per block: 16 accumulators, one transposed reduction
constexpr int kValueQueries = 4;  // queries sharing each value's loads in the weighted sum

// out lane i = reduce_add(acc[i]) for 16 vectors at once: each level adds the same pairs of
// lanes as reduce_add does for one vector ((i, i+8), (i, i+4), (i, i+2), (i, i+1)), only for
// several keys per instruction.
inline __m512 reduce_add_16(const __m512* acc) {
  __m512 b[8], c[4], d[2];
  for (int k = 0; k < 8; ++k)
    b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(acc[2 * k], acc[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int k = 0; k < 4; ++k)
    c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(b[2 * k], b[2 * k + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int k = 0; k < 2; ++k)
    d[k] = _mm512_add_ps(_mm512_shuffle_ps(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(c[2 * k], c[2 * k + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 e = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(d[0], d[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // Lane l of e holds key {0, 4, 8, 12, 1, 5, 9, 13, 2, ...}[l]: back to key order.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, e);
}

template <typename T>  // T: float or uint16_t (bf16) keys
inline void key_scores(const float* query, const T* keys, int64_t row, int64_t j0, int n,
                       int64_t D, float scale, float* out) {
  __m512 acc[16];
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 16) {
    const int count = int(min64(16, D - d));
    const __mmask16 mask = first_lanes(count);
    const __m512 q = _mm512_maskz_loadu_ps(mask, query + d);
#pragma GCC unroll 16
    for (int i = 0; i < 16; ++i) {  // keys past n repeat key j0: computed, never stored
      const T* key = keys + (j0 + (i < n ? i : 0)) * row + d;
      acc[i] = _mm512_fmadd_ps(q, load_chunk(key, count).v, acc[i]);
    }
  }
  const __m512 scores = _mm512_mul_ps(reduce_add_16(acc), _mm512_set1_ps(scale));
  _mm512_mask_storeu_ps(out, first_lanes(n), scores);
}
#else
constexpr int kScoreKeys = 4;
constexpr int kValueQueries = 1;

template <typename T>  // T: float or uint16_t (bf16) keys
inline void key_scores(const float* query, const T* keys, int64_t row, int64_t j0, int n,
                       int64_t D, float scale, float* out) {
  F16 acc[4] = {f16_zero(), f16_zero(), f16_zero(), f16_zero()};
  for (int64_t d = 0; d < D; d += 16) {
    const int count = int(min64(16, D - d));
    const F16 q = f16_load_n(query + d, count);
    for (int i = 0; i < n; ++i) acc[i] = fma(q, load_chunk(keys + (j0 + i) * row + d, count), acc[i]);
  }
  for (int i = 0; i < n; ++i) out[i] = reduce_add(acc[i]) * scale;
}
#endif

// Asks for the cache lines of rows [first, first + count) of a head's keys and values (rows of
// `bytes`, `stride` bytes apart) before they are read. A decode step reads a few KB per head from
// memory, in streams too short for the hardware prefetcher to ramp up on: without this each
// line's latency is paid nearly one at a time (measured on a Zen 4: 3-4 us per head at 17 keys).
inline void prefetch_head_rows(const void* k, const void* v, int64_t first, int64_t count,
                               int64_t stride, int64_t bytes) {
  constexpr int64_t kMaxLines = 1024;  // 64 KB of each: past that the hardware prefetcher has it
  int64_t lines = 0;
  for (int64_t j = first; j < first + count && lines < kMaxLines; ++j) {
    const char* key = static_cast<const char*>(k) + j * stride;
    const char* value = static_cast<const char*>(v) + j * stride;
    for (int64_t b = 0; b < bytes; b += 64, ++lines) {
      _mm_prefetch(key + b, _MM_HINT_T1);
      _mm_prefetch(value + b, _MM_HINT_T1);
    }
  }
}

// scratch: (keys D) + (keys D) floats for fp32 copies of bf16 keys and values, then
// query_block x keys scores and D floats of the query.
inline void attention(const AttentionArgs& a, int64_t item0, int64_t item1, float* scratch) {
  const int64_t group = a.H / a.Hkv;
  const int64_t blocks = (a.Tq + a.query_block - 1) / a.query_block;
  const int64_t D = a.D;
  const int64_t chunks = (D + 15) / 16;
  for (int64_t item = item0; item < item1; ++item) {
    const int64_t b = item / (a.Hkv * blocks);
    const int64_t hk = (item / blocks) % a.Hkv;
    const int64_t t0 = (item % blocks) * a.query_block;
    const int64_t t1 = min64(a.Tq, t0 + a.query_block);
    const int64_t padding = a.left_padding != nullptr ? a.left_padding[b] : 0;
    int64_t lo[64], hi[64];  // query_block <= 64
    int64_t lo_all = a.keys, hi_all = -1;
    for (int64_t t = t0; t < t1; ++t) {
      visible_keys(a, a.query_slot0 + t, padding, &lo[t - t0], &hi[t - t0]);
      lo_all = min64(lo_all, lo[t - t0]);
      hi_all = max64(hi_all, hi[t - t0]);
    }
    if (hi_all < lo_all) continue;
    const int64_t span = hi_all - lo_all + 1;
    const int64_t kv_offset = b * a.kv_stride_b + hk * a.kv_stride_h;
    {
      const int64_t element = a.bf16 ? 2 : 4;
      const char* k0 = static_cast<const char*>(a.k) + kv_offset * element;
      const char* v0 = static_cast<const char*>(a.v) + kv_offset * element;
      prefetch_head_rows(k0, v0, lo_all, span, a.kv_stride_s * element, D * element);
    }
    float* scores = scratch + 2 * a.keys * D;  // one row of `span` per query of the block
    float* query = scores + a.query_block * a.keys;
    float norms[64];
    // The queries of the item against keys and values of `row` elements each (fp32, or bf16
    // widened as they are read: exact, so the results are the same bits either way).
    const auto attend = [&](const auto* keys, const auto* values, int64_t row) {
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        // Each query's softmax weights, at scores[(t - t0) * span + (j - lo_all)].
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t first = lo[t - t0], last = hi[t - t0];
          if (last < first) continue;
          const int64_t q_offset = b * a.q_stride_b + h * a.q_stride_h + t * a.q_stride_t;
          for (int64_t d = 0; d < D; d += 16)
            f16_store_n(query + d, load_head_chunk(a.q, a.bf16, q_offset, d, D), int(min64(16, D - d)));
          float* weights = scores + (t - t0) * span + (first - lo_all);
          for (int64_t j = first; j <= last; j += kScoreKeys)
            key_scores(query, keys, row, j, int(min64(kScoreKeys, last - j + 1)), D, a.scale,
                       weights + (j - first));
          const int64_t seen = last - first + 1;
          // The largest score (the order of a max does not matter): 16 at a time, then the rest.
          F16 bests = f16_set1(-__builtin_inff());
          int64_t j = 0;
          for (; j + 16 <= seen; j += 16) bests = f16_max(f16_load(weights + j), bests);
          float best = reduce_max(bests);
          for (; j < seen; ++j) best = weights[j] > best ? weights[j] : best;
          // Softmax weights; their sum in 16 lanes anchored at the first key seen.
          F16 total = f16_zero();
          const F16 shift = f16_set1(best);
          for (int64_t j = 0; j < seen; j += 16) {
            const int count = int(min64(16, seen - j));
            const F16 weight = f16_keep_first(f16_exp(f16_load_n(weights + j, count) - shift), count);
            f16_store_n(weights + j, weight, count);
            total = total + weight;
          }
          norms[t - t0] = reduce_add(total);
        }
        // The weighted sums of values, key after key for each query, kValueQueries queries and 4
        // chunks of D at a time (each value's chunks loaded once for all of them).
        for (int64_t tq = t0; tq < t1; tq += kValueQueries) {
          const int64_t nq = min64(kValueQueries, t1 - tq);
          int64_t from = a.keys, to = -1;
          for (int64_t i = 0; i < nq; ++i) {
            if (hi[tq - t0 + i] < lo[tq - t0 + i]) continue;
            from = min64(from, lo[tq - t0 + i]);
            to = max64(to, hi[tq - t0 + i]);
          }
          for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
            const int64_t cn = min64(4, chunks - c0);
            F16 acc[kValueQueries][4];
            for (int64_t i = 0; i < kValueQueries; ++i)
              for (int c = 0; c < 4; ++c) acc[i][c] = f16_zero();
            for (int64_t j = from; j <= to; ++j) {
              const auto* value = values + j * row;
              F16 v[4];
              for (int64_t c = 0; c < cn; ++c) {
                const int64_t d = (c0 + c) * 16;
                v[c] = load_chunk(value + d, int(min64(16, D - d)));
              }
              for (int64_t i = 0; i < nq; ++i) {
                const int64_t t = tq + i;
                if (j < lo[t - t0] || j > hi[t - t0]) continue;
                const F16 weight = f16_set1(scores[(t - t0) * span + (j - lo_all)]);
                for (int64_t c = 0; c < cn; ++c) acc[i][c] = fma(weight, v[c], acc[i][c]);
              }
            }
            for (int64_t i = 0; i < nq; ++i) {
              const int64_t t = tq + i;
              if (hi[t - t0] < lo[t - t0]) continue;
              const F16 norm = f16_set1(norms[t - t0]);
              for (int64_t c = 0; c < cn; ++c) {
                const int64_t d = (c0 + c) * 16;
                const int count = int(min64(16, D - d));
                const int64_t o = b * a.out_stride_b + t * a.out_stride_t + h * D + d;
                if (a.bf16) {
                  f16_store_bf16_n(static_cast<uint16_t*>(a.out) + o, acc[i][c] / norm, count);
                } else {
                  f16_store_n(static_cast<float*>(a.out) + o, acc[i][c] / norm, count);
                }
              }
            }
          }
        }
      }
    };
    if (!a.bf16) {
      attend(static_cast<const float*>(a.k) + kv_offset, static_cast<const float*>(a.v) + kv_offset,
             a.kv_stride_s);
    } else if (t1 - t0 <= kValueQueries) {  // a decode step: each key is read once, as it is
      attend(static_cast<const uint16_t*>(a.k) + kv_offset,
             static_cast<const uint16_t*>(a.v) + kv_offset, a.kv_stride_s);
    } else {  // a prompt's block of queries: each key widened to fp32 once for all of them
      float* key_copy = scratch;
      float* value_copy = scratch + a.keys * D;
      for (int64_t j = 0; j < span; ++j) {
        const int64_t source = kv_offset + (lo_all + j) * a.kv_stride_s;
        for (int64_t d = 0; d < D; d += 16) {
          const int count = int(min64(16, D - d));
          f16_store_n(key_copy + j * D + d, load_head_chunk(a.k, true, source, d, D), count);
          f16_store_n(value_copy + j * D + d, load_head_chunk(a.v, true, source, d, D), count);
        }
      }
      attend(static_cast<const float*>(key_copy) - lo_all * D,
             static_cast<const float*>(value_copy) - lo_all * D, D);
    }
  }
}

// ------------------------------------------------------------------------------------ SSM
inline F16 load_activation(const void* base, bool bf16, int64_t offset, int count) {
  if (bf16) return f16_load_bf16_n(static_cast<const uint16_t*>(base) + offset, count);
  return f16_load_n(static_cast<const float*>(base) + offset, count);
}

inline void spike_thresholds(const ScanArgs& a, float threshold, int64_t t0, int64_t t1,
                             float* out) {
  for (int64_t token = t0; token < t1; ++token) {
    if (threshold == 0.f) {
      out[token] = 0.f;
      continue;
    }
    const int64_t b = token / a.T, t = token % a.T;
    const float* delta = a.delta + token * a.D;
    const float* bc = a.bc + token * 2 * a.N;
    const int64_t x_offset = b * a.x_stride_b + t * a.x_stride_t;
    F16 squares = f16_zero();
    for (int64_t d = 0; d < a.D; ++d) {
      const float x = lane(load_activation(a.x, a.bf16, x_offset + d, 1), 0);
      const F16 dx = f16_set1(delta[d] * x);
      for (int64_t n = 0; n < a.N; n += 16) {
        const F16 u = dx * f16_load_n(bc + n, int(min64(16, a.N - n)));
        squares = fma(u, u, squares);
      }
    }
    const float mean = reduce_add(squares) / float(a.D * a.N);
    out[token] = threshold * __builtin_sqrtf(mean);
  }
}

// Channels [c0, c1) of row b, token after token; N <= 64 (the state of a channel in registers).
inline void scan(const ScanArgs& a, int64_t b, int64_t c0, int64_t c1) {
  const int64_t states = (a.N + 15) / 16;
  for (int64_t d = c0; d < c1; ++d) {
    F16 h[4], A[4];
    float* state = a.state + (b * a.D + d) * a.N;
    for (int64_t s = 0; s < states; ++s) {
      const int count = int(min64(16, a.N - 16 * s));
      h[s] = f16_load_n(state + 16 * s, count);
      A[s] = f16_load_n(a.A + d * a.N + 16 * s, count);
    }
    for (int64_t t = 0; t < a.T; ++t) {
      const int64_t token = b * a.T + t;
      const float delta = a.delta[token * a.D + d];
      const float x = lane(load_activation(a.x, a.bf16, b * a.x_stride_b + t * a.x_stride_t + d, 1), 0);
      const float threshold = a.thresholds[token];
      const float* bc = a.bc + token * 2 * a.N;
      const F16 dx = f16_set1(delta * x), step = f16_set1(delta), limit = f16_set1(threshold);
      F16 y = f16_zero();
      for (int64_t s = 0; s < states; ++s) {
        const int count = int(min64(16, a.N - 16 * s));
        const F16 u = dx * f16_load_n(bc + 16 * s, count);
        const F16 fired = f16_select(f16_greater_equal(f16_abs(u), limit), u, f16_zero());
        h[s] = f16_keep_first(fma(f16_exp(step * A[s]), h[s], fired), count);  // lanes past N: 0
        y = fma(h[s], f16_load_n(bc + a.N + 16 * s, count), y);
      }
      const float out = reduce_add(y) + a.Dskip[d] * x;
      const int64_t z_offset = b * a.z_stride_b + t * a.z_stride_t + d;
      const F16 gate = f16_silu(load_activation(a.z, a.bf16, z_offset, 1));
      const int64_t o = token * a.D + d;
      if (a.bf16) {
        // As the module: y rounded to bf16, times silu(z) rounded to bf16, rounded again.
        const float y16 = bf16_to_float(float_to_bf16(out));
        const float g16 = bf16_to_float(float_to_bf16(lane(gate, 0)));
        static_cast<uint16_t*>(a.out)[o] = float_to_bf16(y16 * g16);
      } else {
        static_cast<float*>(a.out)[o] = out * lane(gate, 0);
      }
    }
    for (int64_t s = 0; s < states; ++s)
      f16_store_n(state + 16 * s, h[s], int(min64(16, a.N - 16 * s)));
  }
}

// ---------------------------------------------------------------------------- elementwise
inline void activate_elements(const void* x, bool bf16, int64_t count, int32_t activation,
                              void* y) {
  for (int64_t i = 0; i < count; i += 16) {
    const int n = int(min64(16, count - i));
    store_row_chunk(y, bf16, i, activate(activation, load_row_chunk(x, bf16, i, n)), n);
  }
}

inline void rotary_row(const void* x, bool bf16, int64_t D, const void* cos, const void* sin,
                       void* y) {
  const int64_t half = D / 2;
  for (int64_t j = 0; j < half; j += 16) {
    const int n = int(min64(16, half - j));
    const F16 first = load_row_chunk(x, bf16, j, n), second = load_row_chunk(x, bf16, half + j, n);
    const F16 low = first * load_row_chunk(cos, bf16, j, n) -
                    second * load_row_chunk(sin, bf16, j, n);
    const F16 high = second * load_row_chunk(cos, bf16, half + j, n) +
                     first * load_row_chunk(sin, bf16, half + j, n);
    store_row_chunk(y, bf16, j, low, n);
    store_row_chunk(y, bf16, half + j, high, n);
  }
}

// ----------------------------------------------------------------------------- bandwidth
inline float stream_sum(const float* data, int64_t count) {
  F16 a0 = f16_zero(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= count; i += 64) {
    a0 = a0 + f16_load(data + i);
    a1 = a1 + f16_load(data + i + 16);
    a2 = a2 + f16_load(data + i + 32);
    a3 = a3 + f16_load(data + i + 48);
  }
  float total = reduce_add((a0 + a1) + (a2 + a3));
  for (; i < count; ++i) total += data[i];
  return total;
}

inline const Kernels make_kernels() {
  return Kernels{&linear,           &lora,         &quantize_row, &norm,
                 &attention,        &spike_thresholds, &scan,
                 &activate_elements, &rotary_row,       &stream_sum};
}

}  // namespace PROMETHEAN_ISA
