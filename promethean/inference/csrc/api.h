// What the torch-facing code (ops.cpp, compiled for the baseline x86-64) hands to the kernels of
// one instruction set (isa_avx512.cpp, isa_avx2.cpp): plain pointers and sizes, no ATen types, so
// that no inline function is compiled with AVX-512 and shared with baseline code.
//
// Packed weights. A weight (N outputs, K inputs) is stored as panels of 64 outputs, and within a
// panel input by input, so that a product streams the weight front to back, one sequential read
// per thread (a row-major weight read 8 rows at a time reaches ~20 GB/s on a Zen 4, the panels
// 31-33 GB/s). fp32: panel, then k, then the 64 outputs. bf16 and int8: panel, then pairs of
// inputs (2j, 2j+1), then the 64 outputs, each holding its pair side by side (the layout of
// vdpbf16ps and vpdpwssd). Missing outputs and an odd K's last input are zeros.
// A gated MLP's gate and up projections are packed together: a panel holds 32 hidden outputs as
// [gate 0-15 | up 0-15 | gate 16-31 | up 16-31], so that one product gives act(gate) * up.
//
// Every output element is computed by the same instructions in the same order (inputs in order
// 0..K-1, the same epilogue), whatever the number of rows, the tile it falls in or the thread that
// computes it: a row's result never depends on what it is batched with.
#pragma once

#include <cstdint>

namespace promethean_kernels {

constexpr int64_t kPanel = 64;         // outputs per panel
constexpr int64_t kGatedPanel = 32;    // hidden outputs per panel of a packed gate | up pair
constexpr int64_t kChunk = 16;         // outputs per vector of a panel
constexpr int64_t kInt8FlushPairs = 256;  // int32 lanes are moved to int64 this often

enum Format : int32_t { kFp32 = 0, kBf16 = 1, kInt8 = 2 };
enum Activation : int32_t {
  kNone = 0,
  kGeluTanh = 1,
  kSilu = 2,
  kSoftplus = 3,
  kSiluMul = 4,      // gated: silu(gate) * up
  kGeluTanhMul = 5,  // gated: gelu_tanh(gate) * up
};
inline bool is_gated(int32_t activation) {
  return activation == kSiluMul || activation == kGeluTanhMul;
}

struct LinearArgs {
  int32_t format;
  int32_t activation;
  int64_t M, K, N;         // N: outputs (gated: hidden outputs; the panels hold 2N rows)
  const void* x;           // rows of x: fp32 for fp32 weights; bf16 (AVX-512) or fp32 (AVX2)
                           // for bf16 weights; int16 for int8 weights
  int64_t x_stride;        // elements from one row of x to the next
  const float* x_scales;   // int8: the scale of each row of x
  const void* packed;
  int64_t pairs;           // bf16 / int8: (K + 1) / 2
  const float* scales;     // int8: per weight row (gated: gate rows, then up rows)
  const float* bias;       // per weight row (gated: gate rows, then up rows), or null
  // Added to each output after the bias, before the activation: row addend_row[m] of `addend`
  // (weight rows as the bias, addend_stride apart) for row m of x, or nothing where it is -1 or
  // `addend` is null. A LoRA adapter's update of that row (see LoraArgs).
  const float* addend;
  const int64_t* addend_row;
  int64_t addend_stride;
  void* y;
  int64_t y_stride;
  bool y_bf16;
};

struct NormArgs {
  const void* x;
  bool x_bf16;
  int64_t x_stride;
  int64_t C;
  const float* weight;
  const float* bias;  // LayerNorm only, or null
  float eps;
  bool rms;           // RMSNorm: x * rsqrt(mean(x^2) + eps) * gain
  bool unit_offset;   // RMSNorm's gain is 1 + weight
  void* y;
  bool y_bf16;
  int64_t y_stride;
};

// Causal attention of Tq queries at consecutive slots against a layer's cached keys and values.
// A query at slot s of row b sees the keys at slots max(first real slot of b, s - window + 1)
// .. s, in that order; scores, softmax and the weighted sum are fp32, sums run over the keys in
// slot order from the first one seen, so the result depends only on the query and those keys.
struct AttentionArgs {
  bool bf16;  // q, k, v and out are bf16 (else fp32)
  const void* q;
  int64_t q_stride_b, q_stride_h, q_stride_t;  // elements; each head's D values contiguous
  const void* k;
  const void* v;
  int64_t kv_stride_b, kv_stride_h, kv_stride_s;
  void* out;  // (B, Tq, H, D) with the given batch and token strides
  int64_t out_stride_b, out_stride_t;
  int64_t B, H, Hkv, Tq, D;
  int64_t query_slot0;  // slot of query 0
  int64_t key_slot0;    // slot of cached key 0
  int64_t keys;         // cached keys held: indices 0 .. keys - 1
  const int64_t* left_padding;  // per row, or null
  int64_t window;       // 0: every earlier key
  float scale;
  int64_t query_block;  // queries per work item
};

// The selective SSM mixer's recurrence for inference (promethean.model.ssm), one token after
// another per channel: h = exp(delta A) h + spike(delta B x), y = C.h + D x, out = y * silu(z).
struct ScanArgs {
  bool bf16;             // x, z and out (else fp32)
  const void* x;         // (B, T, D) the convolution's output
  const void* z;         // (B, T, D) the gate branch
  int64_t x_stride_b, x_stride_t, z_stride_b, z_stride_t;
  const float* delta;    // (B, T, D) fp32, contiguous
  const float* bc;       // (B, T, 2N) fp32: B then C, contiguous
  const float* A;        // (D, N) fp32, negative
  const float* Dskip;    // (D,)
  const float* thresholds;  // (B, T) fp32: each token's spike threshold (0: every update)
  float* state;          // (B, D, N) fp32, read and written
  void* out;             // (B, T, D) contiguous
  int64_t B, T, D, N;
};

// The low-rank updates of a linear layer's rows for several adapters held side by side in slots
// (S-LoRA / punica's "gather"): row m of x uses slot row_slot[m] (-1: none) and gets
// out[m] = (x_m A^T) B^T with A^T = down[slot] (K, R) and B^T = up[slot] (R, N), the adapter's
// scaling folded into up. fp32, one fused multiply-add per term, each sum in a fixed order
// (impl.h): a row's update depends on its values and its slot alone. An adapter of rank r < R
// holds zeros in the rest, which add nothing.
struct LoraArgs {
  const void* x;
  bool x_bf16;
  int64_t x_stride;
  int64_t K, R, N;        // N: weight rows (gated: gate rows, then up rows)
  const void* down;       // (slots, K, R)
  const void* up;         // (slots, R, N)
  bool weights_bf16;      // down and up are bf16 (else fp32); the sums are fp32 either way
  const int64_t* row_slot;
  float* t;               // (M, R) scratch
  float* out;             // (M, N), row m's update at row m
};

// Each instruction set's kernels, over a part of the work (the caller splits it among threads).
struct Kernels {
  void (*linear)(const LinearArgs&, int64_t panel_begin, int64_t panel_end, int64_t row_begin,
                 int64_t row_end);
  // Rows [begin, end) of LoraArgs (those whose slot is -1 are left alone).
  void (*lora)(const LoraArgs&, int64_t row_begin, int64_t row_end);
  float (*quantize_row)(const void* row, bool bf16, int64_t K, int16_t* out);
  void (*norm)(const NormArgs&, int64_t row_begin, int64_t row_end);
  void (*attention)(const AttentionArgs&, int64_t item_begin, int64_t item_end, float* scratch);
  // The spike threshold of tokens [begin, end): threshold * sqrt(mean over (d, n) of u^2),
  // u = (delta x)_d B_n, or 0 when the threshold is 0.
  void (*spike_thresholds)(const ScanArgs&, float threshold, int64_t token_begin,
                           int64_t token_end, float* out);
  // Channels [begin, end) of every row, in blocks of 16 (begin, end multiples of 16 or D).
  void (*scan)(const ScanArgs&, int64_t row, int64_t channel_begin, int64_t channel_end);
  // y = activation(x) for `count` elements (bf16 or fp32, y in x's dtype).
  void (*activate)(const void* x, bool bf16, int64_t count, int32_t activation, void* y);
  // One row of D values (D even) rotated by rotary tables of the same dtype, "rotate half"
  // (pairs d, d + D/2, as promethean.model.layers.apply_rotary): y = x cos + rotated(x) sin,
  // in fp32, rounded once. y may be x.
  void (*rotary)(const void* x, bool bf16, int64_t D, const void* cos, const void* sin, void* y);
  // Sum of a float buffer: reading memory as fast as this instruction set can.
  float (*stream_sum)(const float* data, int64_t count);
};

extern const Kernels avx512_kernels;
extern const Kernels avx2_kernels;

}  // namespace promethean_kernels
