// Promethean's CPU inference kernels as torch operators (`torch.ops.promethean_kernels.*`): the
// torch-facing side, compiled for the baseline x86-64. It checks arguments, lays tensors out for
// the kernels, splits the work among PyTorch's threads and calls the kernels of the instruction
// set this CPU has (isa_avx512.cpp or isa_avx2.cpp, through api.h).
//
// The guarantee every operator here keeps: each output element is computed by the same
// instructions in the same order whatever else is computed with it — the other rows of a batch,
// a row's left padding, how a sequence was split into calls, the number of threads, and the
// instruction set (AVX2 and AVX-512 give the same bits). A row's logits therefore never depend on
// what it is batched with (tests/test_batch_invariance.py).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "api.h"

namespace promethean_kernels {
namespace {

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

// The kernels that run: the best set this CPU has, or the one select_instruction_set chose.
const Kernels* active = cpu_has_avx512() ? &avx512_kernels : (cpu_has_avx2() ? &avx2_kernels : nullptr);

const Kernels& kernels() {
  TORCH_CHECK(active != nullptr, "Promethean's kernels need AVX2 and FMA, which this CPU lacks");
  return *active;
}

bool supported() { return cpu_has_avx2(); }

std::string instruction_set() { return active == &avx512_kernels ? "avx512" : "avx2"; }

void select_instruction_set(c10::string_view name) {
  TORCH_CHECK(name == "avx512" || name == "avx2",
              "the instruction set must be avx512 or avx2, not '", std::string(name), "'");
  const bool avx512 = name == "avx512";
  TORCH_CHECK(avx512 ? cpu_has_avx512() : cpu_has_avx2(), "this CPU cannot run the ",
              std::string(name), " kernels");
  active = avx512 ? &avx512_kernels : &avx2_kernels;
}

// Work below this many multiply-adds runs on the calling thread: starting the pool costs more.
constexpr int64_t kSerialWork = int64_t(1) << 17;

// Attention reads each key and value once from memory (a decode step's cache is not in any
// cache), so it gains from a second thread's memory bandwidth at far less work than a product.
constexpr int64_t kSerialAttentionWork = int64_t(1) << 13;

template <typename F>
void split(int64_t items, int64_t work, const F& body, int64_t serial_work = kSerialWork) {
  if (items <= 1 || work < serial_work) {
    body(0, items);
    return;
  }
  at::parallel_for(0, items, 1, body);
}

int32_t format_of(const at::Tensor& packed) {
  switch (packed.scalar_type()) {
    case at::kFloat: return kFp32;
    case at::kBFloat16: return kBf16;
    case at::kChar: return kInt8;
    default: TORCH_CHECK(false, "a packed weight is fp32, bf16 or int8, not ", packed.scalar_type());
  }
}

// ----------------------------------------------------------------------------------- packing
// weight (rows, K) -> panels (see api.h); gated: rows = 2N, gate rows then up rows.
at::Tensor pack_linear(const at::Tensor& weight_in, bool gated) {
  TORCH_CHECK(weight_in.dim() == 2, "pack_linear: the weight must be a matrix");
  const auto weight = weight_in.contiguous();
  const int32_t format = format_of(weight);
  const int64_t rows = weight.size(0), K = weight.size(1);
  TORCH_CHECK(!gated || rows % 2 == 0, "pack_linear: a gated weight stacks gate and up rows");
  const int64_t outputs = gated ? rows / 2 : rows;
  const int64_t panels = gated ? (outputs + kGatedPanel - 1) / kGatedPanel
                               : (outputs + kPanel - 1) / kPanel;
  const int64_t pairs = (K + 1) / 2;
  at::Tensor packed = format == kFp32
                          ? at::zeros({panels, K, kPanel}, weight.options())
                          : at::zeros({panels, pairs, kPanel, 2}, weight.options());
  const int64_t element = weight.element_size();
  const char* source = static_cast<const char*>(weight.data_ptr());
  char* target = static_cast<char*>(packed.data_ptr());
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      int64_t panel, lane;
      if (gated) {
        const bool up = r >= outputs;
        const int64_t o = up ? r - outputs : r;
        panel = o / kGatedPanel;
        const int64_t q = o % kGatedPanel;
        lane = ((q / kChunk) * 2 + (up ? 1 : 0)) * kChunk + q % kChunk;
      } else {
        panel = r / kPanel;
        lane = r % kPanel;
      }
      for (int64_t k = 0; k < K; ++k) {
        const int64_t index = format == kFp32
                                  ? (panel * K + k) * kPanel + lane
                                  : ((panel * pairs + k / 2) * kPanel + lane) * 2 + k % 2;
        std::memcpy(target + index * element, source + (r * K + k) * element, element);
      }
    }
  });
  return packed;
}

// Rows `ids` of a packed (non-gated) weight, as a (..., K) tensor of its dtype: the lookup of an
// embedding tied to the head.
inline uint16_t bf16_bits(float value);

at::Tensor packed_rows(const at::Tensor& packed, const at::Tensor& ids, int64_t K,
                       const std::optional<at::Tensor>& scales, bool bf16_out) {
  const int32_t format = format_of(packed);
  TORCH_CHECK(packed.is_contiguous(), "packed_rows: the packed weight must be contiguous");
  const int64_t panels = packed.size(0);
  const int64_t pairs = (K + 1) / 2;
  const auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t count = flat.numel();
  auto sizes = ids.sizes().vec();
  sizes.push_back(K);
  at::Tensor rows = at::empty(sizes, packed.options());
  const int64_t* index = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(index[i] >= 0 && index[i] < panels * kPanel, "packed_rows: id ", index[i],
                " is out of range");
  // Typed copies: element k of row r sits kPanel (fp32) or 2 kPanel (pairs) elements after k-1.
  const auto gather = [&](auto* source, auto* target) {
    at::parallel_for(0, count, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t panel = index[i] / kPanel, lane = index[i] % kPanel;
        auto* out = target + i * K;
        if (format == kFp32) {
          const auto* in = source + panel * K * kPanel + lane;
          for (int64_t k = 0; k < K; ++k) out[k] = in[k * kPanel];
        } else {
          const auto* in = source + (panel * pairs * kPanel + lane) * 2;
          for (int64_t k = 0; k < K; ++k) out[k] = in[(k / 2) * 2 * kPanel + k % 2];
        }
      }
    });
  };
  if (format == kFp32) {
    gather(packed.data_ptr<float>(), rows.data_ptr<float>());
  } else if (format == kBf16) {
    gather(static_cast<const uint16_t*>(packed.data_ptr()), static_cast<uint16_t*>(rows.data_ptr()));
  } else {
    gather(packed.data_ptr<int8_t>(), rows.data_ptr<int8_t>());
  }
  if (!scales.has_value()) return rows;
  // int8 rows times their scales, as PyTorch computes (rows.float() * scales[ids]).to(dtype):
  // one fp32 multiplication, then (for bf16) one rounding to nearest even.
  TORCH_CHECK(format == kInt8, "packed_rows: scales go with int8 panels");
  TORCH_CHECK(scales->scalar_type() == at::kFloat && scales->is_contiguous() && scales->dim() == 1,
              "packed_rows: the scales must be a contiguous fp32 vector");
  const float* row_scales = scales->data_ptr<float>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(index[i] < scales->numel(), "packed_rows: id ", index[i], " has no scale");
  at::Tensor values = at::empty(sizes, packed.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  const int8_t* quantized = rows.data_ptr<int8_t>();
  for (int64_t i = 0; i < count; ++i) {
    const float scale = row_scales[index[i]];
    for (int64_t k = 0; k < K; ++k) {
      const float value = float(quantized[i * K + k]) * scale;
      if (bf16_out) {
        static_cast<uint16_t*>(values.data_ptr())[i * K + k] = bf16_bits(value);
      } else {
        values.data_ptr<float>()[i * K + k] = value;
      }
    }
  }
  return values;
}

// --------------------------------------------------------------------------------- products
void check_vector(const std::optional<at::Tensor>& vector, int64_t size, const char* what) {
  if (!vector.has_value()) return;
  TORCH_CHECK(vector->scalar_type() == at::kFloat && vector->is_contiguous() &&
                  vector->numel() == size,
              "linear: ", what, " must be a contiguous fp32 vector of ", size, " values");
}

// A packed weight as the products need it (checked once: the fused step reuses it every step).
struct Projection {
  int32_t format;
  const void* packed;
  int64_t panels, K, outputs;
  const float* scales;
  const float* bias;
  int32_t activation;
  // LoRA adapters in slots (LoraArgs) and each row's slot, or null: none for any row.
  const void* lora_down = nullptr;
  const void* lora_up = nullptr;
  bool lora_bf16 = false;
  int64_t lora_rank = 0;
  const int64_t* row_slot = nullptr;
};

// Adds the adapters of `down` (slots, K, R) and `up` (slots, R, weight rows) to a projection,
// for M rows whose slots are `row_slots` (M int64 values, -1: no adapter).
void add_lora(Projection& w, const std::optional<at::Tensor>& down,
              const std::optional<at::Tensor>& up, const at::Tensor& row_slots, int64_t M) {
  if (!down.has_value()) return;
  TORCH_CHECK(up.has_value(), "linear: a LoRA needs its down and up matrices");
  const int64_t weight_rows = is_gated(w.activation) ? 2 * w.outputs : w.outputs;
  TORCH_CHECK((down->scalar_type() == at::kFloat || down->scalar_type() == at::kBFloat16) &&
                  up->scalar_type() == down->scalar_type() && down->is_contiguous() && up->is_contiguous() && down->dim() == 3 &&
                  up->dim() == 3 && down->size(0) == up->size(0) && down->size(1) == w.K &&
                  up->size(1) == down->size(2) && up->size(2) == weight_rows,
              "linear: the LoRA slots must be contiguous fp32 or bf16 (slots, ", w.K, ", R) and (slots, R, ",
              weight_rows, ")");
  TORCH_CHECK(row_slots.scalar_type() == at::kLong && row_slots.is_contiguous() &&
                  row_slots.numel() == M,
              "linear: one LoRA slot per row of x");
  const int64_t slots = down->size(0);
  const int64_t* slot = row_slots.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m)
    TORCH_CHECK(slot[m] >= -1 && slot[m] < slots, "linear: a row's LoRA slot is out of range");
  w.lora_down = down->data_ptr();
  w.lora_up = up->data_ptr();
  w.lora_bf16 = down->scalar_type() == at::kBFloat16;
  w.lora_rank = down->size(2);
  w.row_slot = slot;
}

Projection projection_of(const at::Tensor& packed, int64_t K, int64_t outputs,
                         const std::optional<at::Tensor>& scales,
                         const std::optional<at::Tensor>& bias, int64_t activation) {
  TORCH_CHECK(packed.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(activation >= kNone && activation <= kGeluTanhMul, "linear: unknown activation");
  TORCH_CHECK(packed.is_contiguous(), "linear: the packed weight must be contiguous");
  const int32_t format = format_of(packed);
  const bool gated = is_gated(int32_t(activation));
  const int64_t pairs = (K + 1) / 2;
  const int64_t panels = packed.size(0);
  if (format == kFp32) {
    TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K, "linear: x has ", K,
                " features, the packed weight ", packed.size(1));
  } else {
    TORCH_CHECK(packed.dim() == 4 && packed.size(1) == pairs, "linear: x has ", K,
                " features, the packed weight ", 2 * packed.size(1));
  }
  const int64_t width = gated ? kGatedPanel : kPanel;
  TORCH_CHECK(outputs > 0 && outputs <= panels * width && outputs > (panels - 1) * width,
              "linear: ", outputs, " outputs do not match the packed weight");
  const int64_t weight_rows = gated ? 2 * outputs : outputs;
  TORCH_CHECK(format != kInt8 || scales.has_value(), "linear: int8 weights need their scales");
  check_vector(scales, weight_rows, "scales");
  check_vector(bias, weight_rows, "bias");
  return Projection{format, packed.data_ptr(), panels, K, outputs,
                    scales.has_value() ? scales->data_ptr<float>() : nullptr,
                    bias.has_value() ? bias->data_ptr<float>() : nullptr, int32_t(activation)};
}

inline float bf16_value(uint16_t bits) {
  const uint32_t wide = uint32_t(bits) << 16;
  float value;
  std::memcpy(&value, &wide, sizeof(value));
  return value;
}

inline uint16_t bf16_bits(float value) {  // round to nearest even, as torch's conversion
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return uint16_t(bits >> 16);
}

// y (M rows of `outputs`, row stride y_stride) = the rows of x (M rows of K values, bf16 or fp32,
// row stride x_stride) times the projection. x is laid out for the kernels first, in buffers of
// this thread reused from call to call: fp32 rows for fp32 weights (and bf16 weights on AVX2),
// bf16 rows for bf16 weights on AVX-512, int16 rows with one scale each for int8 weights; bf16
// and int16 rows padded to an even length (a zero after an odd K's last input).
void linear_rows(const Projection& w, const void* x, bool x_bf16, int64_t M, int64_t x_stride,
                 void* y, bool y_bf16, int64_t y_stride) {
  const Kernels& k = kernels();
  if (M == 0) return;
  const int64_t K = w.K, pairs = (K + 1) / 2;
  LinearArgs args{};
  args.format = w.format;
  args.activation = w.activation;
  args.M = M;
  args.K = K;
  args.N = w.outputs;
  args.packed = w.packed;
  args.pairs = pairs;
  args.scales = w.scales;
  args.bias = w.bias;
  args.y = y;
  args.y_stride = y_stride;
  args.y_bf16 = y_bf16;
  // The adapters' updates first, from x as given (the epilogue adds them).
  thread_local std::vector<float> lora_out, lora_t;
  thread_local std::vector<int64_t> lora_rows;
  if (w.lora_down != nullptr) {
    const int64_t weight_rows = is_gated(w.activation) ? 2 * w.outputs : w.outputs;
    lora_rows.resize(M);
    bool any = false;
    for (int64_t m = 0; m < M; ++m) {
      lora_rows[m] = w.row_slot[m] >= 0 ? m : -1;
      any = any || w.row_slot[m] >= 0;
    }
    if (any) {
      lora_out.resize(M * weight_rows);
      lora_t.resize(M * std::max<int64_t>(w.lora_rank, 1));
      const LoraArgs update{x,           x_bf16,      x_stride,   K,
                            w.lora_rank, weight_rows, w.lora_down, w.lora_up,
                            w.lora_bf16, w.row_slot,  lora_t.data(), lora_out.data()};
      split(M, M * w.lora_rank * (K + weight_rows),
            [&](int64_t begin, int64_t end) { k.lora(update, begin, end); });
      args.addend = lora_out.data();
      args.addend_row = lora_rows.data();
      args.addend_stride = weight_rows;
    }
  }
  thread_local std::vector<int16_t> quantized;
  thread_local std::vector<float> row_scales, widened;
  thread_local std::vector<uint16_t> narrowed;
  const bool avx512 = active == &avx512_kernels;
  const int64_t x_size = x_bf16 ? 2 : 4;
  if (w.format == kInt8) {
    quantized.resize(M * 2 * pairs);
    row_scales.resize(M);
    // Pointers, not the thread_local vectors: a worker thread naming those would get its own.
    int16_t* rows = quantized.data();
    float* scales = row_scales.data();
    split(M, M * K, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        int16_t* out = rows + m * 2 * pairs;
        scales[m] = k.quantize_row(static_cast<const char*>(x) + m * x_stride * x_size, x_bf16,
                                   K, out);
        if (K % 2) out[K] = 0;
      }
    });
    args.x = rows;
    args.x_scales = scales;
    args.x_stride = 2 * pairs;
  } else {
    const bool want_bf16 = w.format == kBf16 && avx512;
    const int64_t length = w.format == kBf16 ? 2 * pairs : K;
    if (want_bf16 == x_bf16 && length == K) {
      args.x = x;  // already as the kernels read it
      args.x_stride = x_stride;
    } else if (want_bf16) {
      narrowed.resize(M * length);
      for (int64_t m = 0; m < M; ++m) {
        uint16_t* out = narrowed.data() + m * length;
        for (int64_t i = 0; i < K; ++i) {
          out[i] = x_bf16 ? static_cast<const uint16_t*>(x)[m * x_stride + i]
                          : bf16_bits(static_cast<const float*>(x)[m * x_stride + i]);
        }
        if (length > K) out[K] = 0;
      }
      args.x = narrowed.data();
      args.x_stride = length;
    } else {
      widened.resize(M * length);
      for (int64_t m = 0; m < M; ++m) {
        float* out = widened.data() + m * length;
        for (int64_t i = 0; i < K; ++i) {
          out[i] = x_bf16 ? bf16_value(static_cast<const uint16_t*>(x)[m * x_stride + i])
                          : static_cast<const float*>(x)[m * x_stride + i];
        }
        if (length > K) out[K] = 0.f;
      }
      args.x = widened.data();
      args.x_stride = length;
    }
  }
  // Work items: (panel, block of rows), rows inner, so that one thread's panels stay in its cache
  // while it runs through the rows.
  const int64_t block = M <= 48 ? M : 48;
  const int64_t row_blocks = (M + block - 1) / block;
  const int64_t items = w.panels * row_blocks;
  split(items, M * K * w.outputs, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t panel = item / row_blocks;
      const int64_t first = (item % row_blocks) * block;
      k.linear(args, panel, panel + 1, first, std::min(M, first + block));
    }
  });
}

// x (..., K) @ the packed weight, (* scales) (+ bias), then the activation; in x's dtype (bf16
// or fp32). `outputs` is N (gated: the hidden size).
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t outputs,
                  const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                  int64_t activation, const std::optional<at::Tensor>& lora_down,
                  const std::optional<at::Tensor>& lora_up,
                  const std::optional<at::Tensor>& lora_slots) {
  kernels();
  TORCH_CHECK(x.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "linear: x must be bf16 or fp32");
  const int64_t K = x.size(-1);
  Projection w = projection_of(packed, K, outputs, scales, bias, activation);
  auto rows = x.reshape({-1, K});
  const int64_t M = rows.size(0);
  if (lora_down.has_value()) {
    TORCH_CHECK(lora_slots.has_value(), "linear: a LoRA needs each row's slot");
    add_lora(w, lora_down, lora_up, *lora_slots, M);
  }
  if (rows.stride(1) != 1 || (M > 1 && rows.stride(0) < K)) rows = rows.contiguous();
  auto sizes = x.sizes().vec();
  sizes.back() = outputs;
  at::Tensor y = at::empty(sizes, x.options());
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  linear_rows(w, rows.data_ptr(), bf16, M, M > 1 ? rows.stride(0) : K, y.data_ptr(), bf16, outputs);
  return y;
}

// ----------------------------------------------------------------------------------- norms
void norm_rows(const void* x, bool bf16, int64_t M, int64_t C, int64_t x_stride,
               const float* weight, const float* bias, double eps, bool rms, void* y,
               int64_t y_stride) {
  const Kernels& k = kernels();
  NormArgs args{x, bf16, x_stride, C, weight, bias, float(eps), rms, false, y, bf16, y_stride};
  split(M, M * C * 8, [&](int64_t begin, int64_t end) { k.norm(args, begin, end); });
}

at::Tensor norm(const at::Tensor& x_in, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, double eps, bool rms, bool unit_offset) {
  kernels();
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat,
              "norm: x must be bf16 or fp32");
  TORCH_CHECK(!unit_offset, "norm: give the gain with its unit offset added");
  const int64_t C = x_in.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == C,
              "norm: the weight must be a contiguous fp32 vector of ", C, " values");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == C,
                "norm: the bias must be a contiguous fp32 vector of ", C, " values");
  const auto x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t M = x.numel() / std::max<int64_t>(C, 1);
  norm_rows(x.data_ptr(), x.scalar_type() == at::kBFloat16, M, C, C, weight.data_ptr<float>(),
            bias.has_value() ? bias->data_ptr<float>() : nullptr, eps, rms, y.data_ptr(), C);
  return y;
}

// ---------------------------------------------------------------------------------- rotary
// x (B, H, T, D) rotated by tables (B or 1, 1, T, D) of x's dtype; a new (B, H, T, D).
at::Tensor rotary(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in) {
  const Kernels& k = kernels();
  TORCH_CHECK(x_in.dim() == 4 && cos_in.dim() == 4 && sin_in.sizes() == cos_in.sizes(),
              "rotary: x is (B, H, T, D), the tables (B or 1, 1, T, D)");
  TORCH_CHECK(x_in.scalar_type() == cos_in.scalar_type() &&
                  x_in.scalar_type() == sin_in.scalar_type() &&
                  (x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat),
              "rotary: x and its tables must all be bf16 or all fp32");
  const int64_t B = x_in.size(0), H = x_in.size(1), T = x_in.size(2), D = x_in.size(3);
  const int64_t tables = cos_in.size(0);
  TORCH_CHECK((tables == 1 || tables == B) && cos_in.size(1) == 1 && cos_in.size(2) == T &&
                  cos_in.size(3) == D && D % 2 == 0,
              "rotary: the tables do not match x");
  const auto x = x_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t size = x.element_size();
  const char* source = static_cast<const char*>(x.data_ptr());
  const char* c = static_cast<const char*>(cos.data_ptr());
  const char* sn = static_cast<const char*>(sin.data_ptr());
  char* target = static_cast<char*>(y.data_ptr());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t t = 0; t < T; ++t) {
        const int64_t row = ((b * H + h) * T + t) * D * size;
        const int64_t table = ((tables == 1 ? 0 : b) * T + t) * D * size;
        k.rotary(source + row, bf16, D, c + table, sn + table, target + row);
      }
  return y;
}

// ------------------------------------------------------------------------------- attention
// Attention of H query heads, Tq queries each from slot query_slot0, over `held` keys of a
// cache's buffers (B, Hkv, S, D) whose index 0 is slot key_slot0; the caller sets where the
// queries are read and the outputs written (q, out and their strides).
AttentionArgs cache_attention(const at::Tensor& keys, const at::Tensor& values, int64_t H,
                              int64_t Tq, int64_t query_slot0, int64_t key_slot0, int64_t held,
                              const int64_t* left_padding, int64_t window, double scale) {
  AttentionArgs args{};
  args.bf16 = keys.scalar_type() == at::kBFloat16;
  args.k = keys.data_ptr();
  args.v = values.data_ptr();
  args.kv_stride_b = keys.stride(0);
  args.kv_stride_h = keys.stride(1);
  args.kv_stride_s = keys.stride(2);
  args.B = keys.size(0);
  args.H = H;
  args.Hkv = keys.size(1);
  args.Tq = Tq;
  args.D = keys.size(3);
  args.query_slot0 = query_slot0;
  args.key_slot0 = key_slot0;
  args.keys = held;
  args.left_padding = left_padding;
  args.window = window;
  args.scale = float(scale);
  args.query_block = 32;
  return args;
}

void attention_raw(AttentionArgs& args) {
  const Kernels& k = kernels();
  const int64_t blocks = (args.Tq + args.query_block - 1) / args.query_block;
  const int64_t items = args.B * args.Hkv * blocks;
  TORCH_CHECK(args.query_block >= 1 && args.query_block <= 64, "attention: bad query block");
  const int64_t scratch_floats =
      2 * args.keys * args.D + args.query_block * args.keys + args.D + 16;
  split(items, args.B * args.H * args.Tq * std::max<int64_t>(args.keys, 1) * args.D,
        [&](int64_t begin, int64_t end) {
          // Grown once per thread, never zeroed: every value the kernel reads it wrote first.
          thread_local std::vector<float> scratch;
          if (int64_t(scratch.size()) < scratch_floats) scratch.resize(scratch_floats);
          k.attention(args, begin, end, scratch.data());
        },
        kSerialAttentionWork);
}

// q (B, H, Tq, D) at slots query_slot0.., keys/values (B, Hkv, S, D) whose index 0 is slot
// key_slot0 and of which `held` are valid; returns (B, Tq, H * D) in q's dtype.
at::Tensor attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                     int64_t query_slot0, int64_t key_slot0, int64_t held,
                     const std::optional<at::Tensor>& left_padding, int64_t window, double scale) {
  kernels();
  TORCH_CHECK(q.dim() == 4 && keys.dim() == 4 && values.sizes() == keys.sizes(),
              "attention: q is (B, H, T, D), keys and values (B, Hkv, S, D)");
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && q.scalar_type() == values.scalar_type() &&
                  (q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat),
              "attention: q, keys and values must all be bf16 or all fp32");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), D = q.size(3);
  const int64_t Hkv = keys.size(1);
  TORCH_CHECK(keys.size(0) == B && keys.size(3) == D && Hkv > 0 && H % Hkv == 0,
              "attention: keys do not match the queries");
  TORCH_CHECK(held >= 0 && held <= keys.size(2), "attention: more keys held than the buffer has");
  TORCH_CHECK(q.stride(3) == 1 && keys.stride(3) == 1 && values.stride(3) == 1 &&
                  keys.strides() == values.strides(),
              "attention: each head's values must be contiguous");
  at::Tensor padding;
  if (left_padding.has_value()) {
    padding = left_padding->to(at::kLong).contiguous();
    TORCH_CHECK(padding.numel() == B, "attention: one left padding per row");
  }
  at::Tensor out = at::empty({B, Tq, H * D}, q.options());
  if (B == 0 || Tq == 0) return out;
  AttentionArgs args = cache_attention(keys, values, H, Tq, query_slot0, key_slot0, held,
                                       left_padding.has_value() ? padding.data_ptr<int64_t>()
                                                                : nullptr,
                                       window, scale);
  args.q = q.data_ptr();
  args.q_stride_b = q.stride(0);
  args.q_stride_h = q.stride(1);
  args.q_stride_t = q.stride(2);
  args.out = out.data_ptr();
  args.out_stride_b = Tq * H * D;
  args.out_stride_t = H * D;
  attention_raw(args);
  return out;
}

// ------------------------------------------------------------------------------------- SSM
// The selective scan of promethean.model.ssm for inference; returns out (B, T, D) in x's dtype and
// updates `state` (B, D, N) fp32 in place.
at::Tensor ssm_scan(const at::Tensor& x, const at::Tensor& z, const at::Tensor& delta_in,
                    const at::Tensor& bc_in, const at::Tensor& A_in, const at::Tensor& Dskip_in,
                    at::Tensor& state, double threshold) {
  const Kernels& k = kernels();
  TORCH_CHECK(x.dim() == 3 && z.sizes() == x.sizes() && delta_in.sizes() == x.sizes(),
              "ssm_scan: x, z and delta are (B, T, D)");
  TORCH_CHECK(x.scalar_type() == z.scalar_type() &&
                  (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "ssm_scan: x and z must both be bf16 or fp32");
  TORCH_CHECK(x.stride(2) == 1 && z.stride(2) == 1, "ssm_scan: channels must be contiguous");
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), N = A_in.size(1);
  TORCH_CHECK(N <= 64, "ssm_scan: at most 64 states per channel");
  TORCH_CHECK(bc_in.size(0) == B && bc_in.size(1) == T && bc_in.size(2) == 2 * N,
              "ssm_scan: B and C are (B, T, 2N)");
  TORCH_CHECK(state.scalar_type() == at::kFloat && state.is_contiguous() && state.size(0) == B &&
                  state.size(1) == D && state.size(2) == N,
              "ssm_scan: the state is a contiguous fp32 (B, D, N)");
  const auto delta = delta_in.to(at::kFloat).contiguous();
  const auto bc = bc_in.to(at::kFloat).contiguous();
  const auto A = A_in.to(at::kFloat).contiguous();
  const auto Dskip = Dskip_in.to(at::kFloat).contiguous();
  at::Tensor out = at::empty({B, T, D}, x.options());
  at::Tensor thresholds = at::empty({B * T}, x.options().dtype(at::kFloat));
  ScanArgs args{};
  args.bf16 = x.scalar_type() == at::kBFloat16;
  args.x = x.data_ptr();
  args.z = z.data_ptr();
  args.x_stride_b = x.stride(0);
  args.x_stride_t = x.stride(1);
  args.z_stride_b = z.stride(0);
  args.z_stride_t = z.stride(1);
  args.delta = delta.data_ptr<float>();
  args.bc = bc.data_ptr<float>();
  args.A = A.data_ptr<float>();
  args.Dskip = Dskip.data_ptr<float>();
  args.thresholds = thresholds.data_ptr<float>();
  args.state = state.data_ptr<float>();
  args.out = out.data_ptr();
  args.B = B;
  args.T = T;
  args.D = D;
  args.N = N;
  float* limits = thresholds.data_ptr<float>();
  split(B * T, B * T * D * N, [&](int64_t begin, int64_t end) {
    k.spike_thresholds(args, float(threshold), begin, end, limits);
  });
  const int64_t blocks = (D + 15) / 16;
  split(B * blocks, B * T * D * N * 4, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks, c0 = (item % blocks) * 16;
      k.scan(args, b, c0, std::min(D, c0 + 16));
    }
  });
  return out;
}

// ----------------------------------------------------------------------------- elementwise
at::Tensor activate(const at::Tensor& x_in, int64_t activation) {
  const Kernels& k = kernels();
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat,
              "activate: x must be bf16 or fp32");
  TORCH_CHECK(activation >= kNone && activation <= kSoftplus, "activate: unknown activation");
  const auto x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t count = x.numel();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  const int64_t size = x.element_size();
  // Split at multiples of 16 elements: every element is computed in the same lane pattern.
  const int64_t blocks = (count + 4095) / 4096;
  split(blocks, count * 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * 4096, n = std::min<int64_t>(4096, count - first);
      k.activate(static_cast<const char*>(x.data_ptr()) + first * size, bf16, n, int32_t(activation),
                 static_cast<char*>(y.data_ptr()) + first * size);
    }
  });
  return y;
}

// --------------------------------------------------------------------------------- argmax
// Index of each row's largest value, as torch.argmax(dim=-1) of the rows in fp32: the first
// such index, or where a row holds a NaN, its first NaN's. ~10x torch's scalar loop over a
// 50k vocabulary, and no fp32 copy of bf16 logits.
template <typename T, typename Value>
int64_t row_argmax(const T* row, int64_t V, const Value& value) {
  float best = -__builtin_inff();
  bool nan = false;
  for (int64_t i = 0; i < V; ++i) {  // both reductions vectorize
    const float v = value(row[i]);
    nan |= v != v;
    best = v > best ? v : best;
  }
  for (int64_t i = 0; i < V; ++i) {
    const float v = value(row[i]);
    if (nan ? v != v : v == best) return i;
  }
  return 0;
}

at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "argmax_rows: x must be fp32 or bf16");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0, "argmax_rows: rows of at least one value");
  const int64_t V = x.size(-1);
  auto rows = x.reshape({-1, V});
  if (rows.stride(1) != 1) rows = rows.contiguous();
  const int64_t count = rows.size(0), stride = rows.stride(0);
  auto sizes = x.sizes().vec();
  sizes.pop_back();
  at::Tensor out = at::empty(sizes, x.options().dtype(at::kLong));
  int64_t* index = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < count; ++r) {
    if (x.scalar_type() == at::kFloat) {
      index[r] = row_argmax(rows.data_ptr<float>() + r * stride, V, [](float v) { return v; });
    } else {
      index[r] = row_argmax(static_cast<const uint16_t*>(rows.data_ptr()) + r * stride, V,
                            [](uint16_t v) { return bf16_value(v); });
    }
  }
  return out;
}

// ------------------------------------------------------------------------------- bandwidth
double stream_read(const at::Tensor& buffer) {
  const Kernels& k = kernels();
  TORCH_CHECK(buffer.scalar_type() == at::kFloat && buffer.is_contiguous(),
              "stream_read: a contiguous fp32 buffer");
  const float* data = buffer.data_ptr<float>();
  const int64_t count = buffer.numel();
  const int threads = at::get_num_threads();
  std::vector<double> partial(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t first = count * t / threads, last = count * (t + 1) / threads;
      partial[t] = k.stream_sum(data + first, last - first);
    }
  });
  double total = 0;
  for (double value : partial) total += value;
  return total;
}

// ------------------------------------------------------------------------------ decode step
// Every block of a decode step (one new token per sequence) in one call. From Python, each of a
// block's ~20 small operations (norms, the q/k/v split and views, rotary, the cache write,
// attention, residual adds) costs ~10 us of interpreter and module overhead, about 2 ms per
// GPT-2-small step whatever the batch; as ATen operations from C++ still ~60 us per layer. Here
// the kernels run on this thread's buffers, row by row exactly as the operators above run them
// for promethean.inference.kernel_layers' modules (the same kernel on the same values of each
// row), so the result is bit-identical to them (tests/test_fused_decode.py).

// What each layer contributes to `params`, in this order (absent ones are None): a projection is
// (packed weight, scales, bias).
enum Param : int64_t {
  kAttnNormWeight, kAttnNormBias,
  kQkv, kQkvScales, kQkvBias,
  kQNormWeight, kKNormWeight,
  kOut, kOutScales, kOutBias,
  kAttnPostNormWeight, kAttnPostNormBias,
  kMlpNormWeight, kMlpNormBias,
  kUp, kUpScales, kUpBias,
  kDown, kDownScales, kDownBias,
  kMlpPostNormWeight, kMlpPostNormBias,
  kParamsPerLayer
};
// After the layers' params, when the step ends with the head: the final norm and the head.
enum HeadParam : int64_t { kFinalNormWeight, kFinalNormBias, kHead, kHeadScales, kHeadBias,
                           kHeadParams };

// The projections of a layer that may carry LoRA adapters, in the order of decode_blocks' `lora`.
constexpr int64_t kLoraProjections = 4;
inline int64_t lora_projection(Param which) {
  return which == kQkv ? 0 : which == kOut ? 1 : which == kUp ? 2 : 3;
}

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

const float* float_data(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->data_ptr<float>() : nullptr;
}

// A byte buffer of this thread, grown as needed and reused from step to step.
template <int Slot>
char* scratch_bytes(int64_t bytes) {
  thread_local std::vector<char> buffer;
  if (int64_t(buffer.size()) < bytes) buffer.resize(bytes);
  return buffer.data();
}

at::Tensor decode_blocks(const at::Tensor& input, const OptionalTensors& params,
                         at::TensorList keys, at::TensorList values, at::IntArrayRef first_slots,
                         at::IntArrayRef filled, at::IntArrayRef windows,
                         const OptionalTensors& rotary, const std::optional<at::Tensor>& left_padding,
                         int64_t query_slot, at::IntArrayRef shape_ints, at::ArrayRef<double> reals,
                         const OptionalTensors& lora, const std::optional<at::Tensor>& lora_slots) {
  const Kernels& k = kernels();
  // With the final norm and the head (5 more params, shape + [vocab, final rms], reals + [final
  // eps]) the step returns the logits (batch, 1, vocab) instead of the last block's output.
  const bool with_head = shape_ints.size() == 10;
  TORCH_CHECK((shape_ints.size() == 8 && reals.size() == 2) ||
                  (with_head && reals.size() == 3),
              "decode_blocks: bad stack shape");
  const int64_t layers = shape_ints[0], H = shape_ints[1], Hkv = shape_ints[2];
  const int64_t D = shape_ints[3], C = shape_ints[4], hidden = shape_ints[5];
  const int64_t up_activation = shape_ints[6];
  const bool rms = shape_ints[7] != 0;
  const double eps = reals[0], scale = reals[1];
  TORCH_CHECK(input.dim() == 3 && input.size(1) == 1 && input.size(2) == C,
              "decode_blocks: one token per sequence, (batch, 1, width)");
  TORCH_CHECK(input.scalar_type() == at::kBFloat16 || input.scalar_type() == at::kFloat,
              "decode_blocks: x must be bf16 or fp32");
  const int64_t B = input.size(0);
  TORCH_CHECK(int64_t(params.size()) == layers * kParamsPerLayer + (with_head ? kHeadParams : 0) &&
                  int64_t(keys.size()) == layers &&
                  int64_t(values.size()) == layers && int64_t(first_slots.size()) == layers &&
                  int64_t(filled.size()) == layers && int64_t(windows.size()) == layers,
              "decode_blocks: parameters or caches do not match the number of layers");
  TORCH_CHECK(rotary.size() == 0 || int64_t(rotary.size()) == 2 * layers,
              "decode_blocks: rotary tables must be (cos, sin) per layer");
  // LoRA adapters (see add_lora): (down, up) per projection of each layer in kLoraProjections'
  // order, then the head's where the step ends with it; none where `lora` is empty.
  const int64_t lora_count = layers * 2 * kLoraProjections + (with_head ? 2 : 0);
  TORCH_CHECK(lora.size() == 0 || (int64_t(lora.size()) == lora_count && lora_slots.has_value()),
              "decode_blocks: the LoRA slots do not match the layers");
  const bool bf16 = input.scalar_type() == at::kBFloat16;
  const int64_t size = input.element_size();
  const int64_t inner = H * D, kv_inner = Hkv * D, qkv_width = inner + 2 * kv_inner;
  at::Tensor padding;
  if (left_padding.has_value()) {
    padding = left_padding->to(at::kLong).contiguous();
    TORCH_CHECK(padding.numel() == B, "decode_blocks: one left padding per row");
  }
  at::Tensor x = input.contiguous().clone();  // the residual stream, updated in place
  char* residual = static_cast<char*>(x.data_ptr());
  char* h = scratch_bytes<0>(B * std::max(C, inner) * size);
  char* qkv = scratch_bytes<1>(B * qkv_width * size);
  char* q = scratch_bytes<2>(B * inner * size);
  char* key = scratch_bytes<3>(B * kv_inner * size);
  char* attended = scratch_bytes<4>(B * inner * size);
  char* wide = scratch_bytes<5>(B * hidden * size);
  char* out = scratch_bytes<6>(B * C * size);
  // x = x + h, as Block.forward's ATen add computes it: in fp32, then (bf16) rounded to nearest
  // even; a loop, not an ATen call, which after the weights have streamed through runs cold.
  const auto add_to_residual = [&](const char* from) {
    const int64_t count = B * C;
    if (bf16) {
      uint16_t* to = reinterpret_cast<uint16_t*>(residual);
      const uint16_t* add = reinterpret_cast<const uint16_t*>(from);
      for (int64_t i = 0; i < count; ++i) to[i] = bf16_bits(bf16_value(to[i]) + bf16_value(add[i]));
    } else {
      float* to = reinterpret_cast<float*>(residual);
      const float* add = reinterpret_cast<const float*>(from);
      for (int64_t i = 0; i < count; ++i) to[i] += add[i];
    }
  };
  const auto norm_of = [&](const char* from, char* to, int64_t base, Param weight) {
    norm_rows(from, bf16, B, C, C, params.get(base + weight)->data_ptr<float>(),
              float_data(params.get(base + weight + 1)), eps, rms, to, C);
  };
  const auto with_lora = [&](Projection& w, int64_t index) {
    if (lora.size() != 0) add_lora(w, lora.get(2 * index), lora.get(2 * index + 1), *lora_slots, B);
  };
  const auto project = [&](const char* from, int64_t K, char* to, int64_t base, Param which,
                           int64_t outputs, int64_t activation) {
    Projection w = projection_of(*params.get(base + which), K, outputs,
                                 params.get(base + which + 1), params.get(base + which + 2),
                                 activation);
    const int64_t layer = base / kParamsPerLayer;
    with_lora(w, layer * kLoraProjections + lora_projection(which));
    linear_rows(w, from, bf16, B, K, to, bf16, outputs);
  };
  for (int64_t layer = 0; layer < layers; ++layer) {
    const int64_t base = layer * kParamsPerLayer;
    const auto& layer_keys = keys[layer];
    const auto& layer_values = values[layer];
    TORCH_CHECK(layer_keys.dim() == 4 && layer_keys.size(0) == B && layer_keys.size(1) == Hkv &&
                    layer_keys.size(3) == D && layer_values.sizes() == layer_keys.sizes() &&
                    layer_values.strides() == layer_keys.strides() && layer_keys.stride(3) == 1 &&
                    layer_keys.scalar_type() == input.scalar_type(),
                "decode_blocks: a cache buffer does not hold this batch");
    TORCH_CHECK(filled[layer] < layer_keys.size(2),
                "decode_blocks: a cache buffer has no room for the new token");
    // promethean.inference.kernel_layers.KernelAttention.forward with one new token.
    norm_of(residual, h, base, kAttnNormWeight);
    project(h, C, qkv, base, kQkv, qkv_width, kNone);
    const auto q_norm = params.get(base + kQNormWeight);
    for (int64_t b = 0; b < B; ++b) {
      const char* row = qkv + b * qkv_width * size;
      if (q_norm.has_value()) {  // QK-norm: an RMSNorm of every head's D values
        norm_rows(row, bf16, H, D, D, q_norm->data_ptr<float>(), nullptr, eps, true,
                  q + b * inner * size, D);
        norm_rows(row + inner * size, bf16, Hkv, D, D,
                  params.get(base + kKNormWeight)->data_ptr<float>(), nullptr, eps, true,
                  key + b * kv_inner * size, D);
      } else {
        std::memcpy(q + b * inner * size, row, inner * size);
        std::memcpy(key + b * kv_inner * size, row + inner * size, kv_inner * size);
      }
    }
    if (rotary.size() != 0 && rotary.get(2 * layer).has_value()) {
      const at::Tensor cos = rotary.get(2 * layer)->contiguous();
      const at::Tensor sin = rotary.get(2 * layer + 1)->contiguous();
      TORCH_CHECK(cos.scalar_type() == input.scalar_type() && cos.numel() % D == 0 &&
                      (cos.numel() == D || cos.numel() == B * D) && sin.sizes() == cos.sizes(),
                  "decode_blocks: a rotary table does not match the batch");
      const char* c = static_cast<const char*>(cos.data_ptr());
      const char* sn = static_cast<const char*>(sin.data_ptr());
      for (int64_t b = 0; b < B; ++b) {
        const int64_t table = (cos.numel() == D ? 0 : b) * D * size;
        for (int64_t head = 0; head < H; ++head) {
          char* row = q + (b * H + head) * D * size;
          k.rotary(row, bf16, D, c + table, sn + table, row);
        }
        for (int64_t head = 0; head < Hkv; ++head) {
          char* row = key + (b * Hkv + head) * D * size;
          k.rotary(row, bf16, D, c + table, sn + table, row);
        }
      }
    }
    // The new key and value at index filled[layer] of the cache buffers.
    char* key_base = static_cast<char*>(layer_keys.data_ptr());
    char* value_base = static_cast<char*>(layer_values.data_ptr());
    for (int64_t b = 0; b < B; ++b)
      for (int64_t head = 0; head < Hkv; ++head) {
        const int64_t at = (b * layer_keys.stride(0) + head * layer_keys.stride(1) +
                            filled[layer] * layer_keys.stride(2)) * size;
        std::memcpy(key_base + at, key + (b * Hkv + head) * D * size, D * size);
        std::memcpy(value_base + at, qkv + (b * qkv_width + inner + kv_inner + head * D) * size,
                    D * size);
      }
    AttentionArgs args = cache_attention(
        layer_keys, layer_values, H, 1, query_slot, first_slots[layer], filled[layer] + 1,
        left_padding.has_value() ? padding.data_ptr<int64_t>() : nullptr, windows[layer], scale);
    args.q = q;
    args.q_stride_b = inner;
    args.q_stride_h = D;
    args.q_stride_t = D;
    args.out = attended;
    args.out_stride_b = inner;
    args.out_stride_t = inner;
    attention_raw(args);
    project(attended, inner, out, base, kOut, C, kNone);
    if (params.get(base + kAttnPostNormWeight).has_value()) {
      norm_of(out, h, base, kAttnPostNormWeight);
      add_to_residual(h);
    } else {
      add_to_residual(out);
    }
    // promethean.inference.kernel_layers.KernelMLP.
    norm_of(residual, h, base, kMlpNormWeight);
    project(h, C, wide, base, kUp, hidden, up_activation);
    project(wide, hidden, out, base, kDown, C, kNone);
    if (params.get(base + kMlpPostNormWeight).has_value()) {
      norm_of(out, h, base, kMlpPostNormWeight);
      add_to_residual(h);
    } else {
      add_to_residual(out);
    }
  }
  if (!with_head) return x;
  // Transformer.forward after the blocks: final_norm, then lm_head (KernelNorm, KernelLinear).
  const int64_t base = layers * kParamsPerLayer, vocab = shape_ints[8];
  norm_rows(residual, bf16, B, C, C, params.get(base + kFinalNormWeight)->data_ptr<float>(),
            float_data(params.get(base + kFinalNormBias)), reals[2], shape_ints[9] != 0, h, C);
  Projection head = projection_of(*params.get(base + kHead), C, vocab,
                                  params.get(base + kHeadScales), params.get(base + kHeadBias),
                                  kNone);
  with_lora(head, layers * kLoraProjections);
  at::Tensor logits = at::empty({B, 1, vocab}, x.options());
  linear_rows(head, h, bf16, B, C, logits.data_ptr(), bf16, vocab);
  return logits;
}

}  // namespace
}  // namespace promethean_kernels

TORCH_LIBRARY(promethean_kernels, m) {
  m.def("supported() -> bool", &promethean_kernels::supported);
  m.def("instruction_set() -> str", &promethean_kernels::instruction_set);
  m.def("select_instruction_set(str name) -> ()", &promethean_kernels::select_instruction_set);
  m.def("pack_linear(Tensor weight, bool gated) -> Tensor");
  m.def("packed_rows(Tensor packed, Tensor ids, int K, Tensor? scales, bool bf16_out) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int outputs, Tensor? scales, Tensor? bias, int activation, "
        "Tensor? lora_down=None, Tensor? lora_up=None, Tensor? lora_slots=None) -> Tensor");
  m.def("norm(Tensor x, Tensor weight, Tensor? bias, float eps, bool rms, bool unit_offset) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("attention(Tensor q, Tensor keys, Tensor values, int query_slot0, int key_slot0, int held, "
        "Tensor? left_padding, int window, float scale) -> Tensor");
  m.def("ssm_scan(Tensor x, Tensor z, Tensor delta, Tensor bc, Tensor A, Tensor Dskip, "
        "Tensor(a!) state, float threshold) -> Tensor");
  m.def("activate(Tensor x, int activation) -> Tensor");
  m.def("decode_blocks(Tensor x, Tensor?[] params, Tensor(a!)[] keys, Tensor(b!)[] values, "
        "int[] first_slots, int[] filled, int[] windows, Tensor?[] rotary, Tensor? left_padding, "
        "int query_slot, int[] shape, float[] reals, Tensor?[] lora, Tensor? lora_slots) -> Tensor");
  m.def("stream_read(Tensor buffer) -> float");
  m.def("argmax_rows(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(promethean_kernels, CPU, m) {
  m.impl("pack_linear", &promethean_kernels::pack_linear);
  m.impl("packed_rows", &promethean_kernels::packed_rows);
  m.impl("linear", &promethean_kernels::linear);
  m.impl("norm", &promethean_kernels::norm);
  m.impl("rotary", &promethean_kernels::rotary);
  m.impl("attention", &promethean_kernels::attention);
  m.impl("ssm_scan", &promethean_kernels::ssm_scan);
  m.impl("activate", &promethean_kernels::activate);
  m.impl("decode_blocks", &promethean_kernels::decode_blocks);
  m.impl("stream_read", &promethean_kernels::stream_read);
  m.impl("argmax_rows", &promethean_kernels::argmax_rows);
}
