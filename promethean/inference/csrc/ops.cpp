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

template <typename F>
void split(int64_t items, int64_t work, const F& body) {
  if (items <= 1 || work < kSerialWork) {
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
at::Tensor packed_rows(const at::Tensor& packed, const at::Tensor& ids, int64_t K) {
  const int32_t format = format_of(packed);
  TORCH_CHECK(packed.is_contiguous(), "packed_rows: the packed weight must be contiguous");
  const int64_t panels = packed.size(0);
  const int64_t pairs = (K + 1) / 2;
  const auto flat = ids.reshape({-1}).to(at::kLong).contiguous();
  const int64_t count = flat.numel();
  auto sizes = ids.sizes().vec();
  sizes.push_back(K);
  at::Tensor rows = at::empty(sizes, packed.options());
  const int64_t element = packed.element_size();
  const char* source = static_cast<const char*>(packed.data_ptr());
  char* target = static_cast<char*>(rows.data_ptr());
  const int64_t* index = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i) {
    const int64_t r = index[i];
    TORCH_CHECK(r >= 0 && r < panels * kPanel, "packed_rows: id ", r, " is out of range");
    const int64_t panel = r / kPanel, lane = r % kPanel;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t at = format == kFp32 ? (panel * K + k) * kPanel + lane
                                         : ((panel * pairs + k / 2) * kPanel + lane) * 2 + k % 2;
      std::memcpy(target + (i * K + k) * element, source + at * element, element);
    }
  }
  return rows;
}

// --------------------------------------------------------------------------------- products
void check_vector(const std::optional<at::Tensor>& vector, int64_t size, const char* what) {
  if (!vector.has_value()) return;
  TORCH_CHECK(vector->scalar_type() == at::kFloat && vector->is_contiguous() &&
                  vector->numel() == size,
              "linear: ", what, " must be a contiguous fp32 vector of ", size, " values");
}

// x (..., K) @ the packed weight, (* scales) (+ bias), then the activation; in x's dtype (bf16
// or fp32). `outputs` is N (gated: the hidden size).
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t outputs,
                  const std::optional<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                  int64_t activation) {
  const Kernels& k = kernels();
  TORCH_CHECK(x.device().is_cpu() && packed.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "linear: x must be bf16 or fp32");
  TORCH_CHECK(activation >= kNone && activation <= kGeluTanhMul, "linear: unknown activation");
  TORCH_CHECK(packed.is_contiguous(), "linear: the packed weight must be contiguous");
  const int32_t format = format_of(packed);
  const bool gated = is_gated(int32_t(activation));
  const int64_t K = x.size(-1);
  const int64_t pairs = (K + 1) / 2;
  const int64_t panels = packed.size(0);
  if (format == kFp32) {
    TORCH_CHECK(packed.dim() == 3 && packed.size(1) == K, "linear: x has ", K,
                " features, the packed weight ", packed.size(1));
  } else {
    TORCH_CHECK(packed.dim() == 4 && packed.size(1) == pairs, "linear: x has ", K,
                " features, the packed weight ", 2 * packed.size(1));
  }
  const int64_t capacity = panels * (gated ? kGatedPanel : kPanel);
  TORCH_CHECK(outputs > 0 && outputs <= capacity && outputs > capacity - (gated ? kGatedPanel : kPanel),
              "linear: ", outputs, " outputs do not match the packed weight");
  const int64_t weight_rows = gated ? 2 * outputs : outputs;
  TORCH_CHECK(format != kInt8 || scales.has_value(), "linear: int8 weights need their scales");
  check_vector(scales, weight_rows, "scales");
  check_vector(bias, weight_rows, "bias");

  const auto rows = x.reshape({-1, K});
  const int64_t M = rows.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = outputs;
  at::Tensor y = at::empty(sizes, x.options());
  if (M == 0) return y;

  LinearArgs args{};
  args.format = format;
  args.activation = int32_t(activation);
  args.M = M;
  args.K = K;
  args.N = outputs;
  args.packed = packed.data_ptr();
  args.pairs = pairs;
  args.scales = scales.has_value() ? scales->data_ptr<float>() : nullptr;
  args.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  args.y = y.data_ptr();
  args.y_stride = outputs;
  args.y_bf16 = x.scalar_type() == at::kBFloat16;

  // x as the kernels read it: fp32 rows for fp32 weights (and for bf16 weights on AVX2), bf16
  // rows for bf16 weights on AVX-512, int16 rows with one scale each for int8 weights; bf16 and
  // int16 rows padded to an even length (a zero after an odd K's last input).
  at::Tensor operand, row_scales;
  const bool avx512 = active == &avx512_kernels;
  if (format == kInt8) {
    const auto source = rows.contiguous();
    operand = at::zeros({M, 2 * pairs}, x.options().dtype(at::kShort));
    row_scales = at::empty({M}, x.options().dtype(at::kFloat));
    const bool bf16 = source.scalar_type() == at::kBFloat16;
    const char* base = static_cast<const char*>(source.data_ptr());
    int16_t* out = operand.data_ptr<int16_t>();
    float* scale = row_scales.data_ptr<float>();
    split(M, M * K, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m)
        scale[m] = k.quantize_row(base + m * K * source.element_size(), bf16, K, out + m * 2 * pairs);
    });
    args.x_scales = scale;
    args.x_stride = 2 * pairs;
  } else {
    const auto want = format == kBf16 && avx512 ? at::kBFloat16 : at::kFloat;
    const bool pad = format == kBf16 && K % 2 == 1;
    if (pad) {
      operand = at::zeros({M, K + 1}, x.options().dtype(want));
      operand.narrow(1, 0, K).copy_(rows);
      args.x_stride = K + 1;
    } else {
      operand = rows.to(want);
      if (operand.stride(1) != 1 || (M > 1 && operand.stride(0) < K)) operand = operand.contiguous();
      args.x_stride = M > 1 ? operand.stride(0) : K;
    }
  }
  args.x = operand.data_ptr();

  // Work items: (panel, block of rows), rows inner, so that one thread's panels stay in its cache
  // while it runs through the rows.
  const int64_t block = M <= 48 ? M : 48;
  const int64_t row_blocks = (M + block - 1) / block;
  const int64_t items = panels * row_blocks;
  split(items, M * K * outputs, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t panel = item / row_blocks;
      const int64_t first = (item % row_blocks) * block;
      k.linear(args, panel, panel + 1, first, std::min(M, first + block));
    }
  });
  return y;
}

// ----------------------------------------------------------------------------------- norms
at::Tensor norm(const at::Tensor& x_in, const at::Tensor& weight,
                const std::optional<at::Tensor>& bias, double eps, bool rms, bool unit_offset) {
  const Kernels& k = kernels();
  TORCH_CHECK(x_in.scalar_type() == at::kBFloat16 || x_in.scalar_type() == at::kFloat,
              "norm: x must be bf16 or fp32");
  const int64_t C = x_in.size(-1);
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.numel() == C,
              "norm: the weight must be a contiguous fp32 vector of ", C, " values");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == C,
                "norm: the bias must be a contiguous fp32 vector of ", C, " values");
  const auto x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  const int64_t M = x.numel() / std::max<int64_t>(C, 1);
  NormArgs args{x.data_ptr(), x.scalar_type() == at::kBFloat16, C, C, weight.data_ptr<float>(),
                bias.has_value() ? bias->data_ptr<float>() : nullptr, float(eps), rms,
                unit_offset, y.data_ptr(), y.scalar_type() == at::kBFloat16, C};
  split(M, M * C * 8, [&](int64_t begin, int64_t end) { k.norm(args, begin, end); });
  return y;
}

// ------------------------------------------------------------------------------- attention
// q (B, H, Tq, D) at slots query_slot0.., keys/values (B, Hkv, S, D) whose index 0 is slot
// key_slot0 and of which `held` are valid; returns (B, Tq, H * D) in q's dtype.
at::Tensor attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                     int64_t query_slot0, int64_t key_slot0, int64_t held,
                     const std::optional<at::Tensor>& left_padding, int64_t window, double scale) {
  const Kernels& k = kernels();
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
  AttentionArgs args{};
  args.bf16 = q.scalar_type() == at::kBFloat16;
  args.q = q.data_ptr();
  args.q_stride_b = q.stride(0);
  args.q_stride_h = q.stride(1);
  args.q_stride_t = q.stride(2);
  args.k = keys.data_ptr();
  args.v = values.data_ptr();
  args.kv_stride_b = keys.stride(0);
  args.kv_stride_h = keys.stride(1);
  args.kv_stride_s = keys.stride(2);
  args.out = out.data_ptr();
  args.out_stride_b = Tq * H * D;
  args.out_stride_t = H * D;
  args.B = B;
  args.H = H;
  args.Hkv = Hkv;
  args.Tq = Tq;
  args.D = D;
  args.query_slot0 = query_slot0;
  args.key_slot0 = key_slot0;
  args.keys = held;
  args.left_padding = left_padding.has_value() ? padding.data_ptr<int64_t>() : nullptr;
  args.window = window;
  args.scale = float(scale);
  args.query_block = 32;
  const int64_t blocks = (Tq + args.query_block - 1) / args.query_block;
  const int64_t items = B * Hkv * blocks;
  const int64_t scratch_floats = 2 * held * D + held + D + 16;
  split(items, B * H * Tq * std::max<int64_t>(held, 1) * D, [&](int64_t begin, int64_t end) {
    // Grown once per thread, never zeroed: every value the kernel reads it wrote first.
    thread_local std::vector<float> scratch;
    if (int64_t(scratch.size()) < scratch_floats) scratch.resize(scratch_floats);
    k.attention(args, begin, end, scratch.data());
  });
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
// GPT-2-small step whatever the batch. Here the operators above and the same ATen operations run
// in the same order on the same shapes as promethean.inference.kernel_layers' modules do for such
// a step, so the result is bit-identical to them (tests/test_fused_decode.py).

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

struct StackShape {
  int64_t layers, heads, kv_heads, head_size, width, hidden, up_activation;
  bool rms_norm;
  double norm_eps, attention_scale;
};

using OptionalTensors = c10::List<std::optional<at::Tensor>>;

at::Tensor layer_norm_of(const at::Tensor& x, const OptionalTensors& params, int64_t base,
                         Param weight, const StackShape& shape) {
  return norm(x, *params.get(base + weight), params.get(base + weight + 1), shape.norm_eps,
              shape.rms_norm, false);
}

at::Tensor project(const at::Tensor& x, const OptionalTensors& params, int64_t base, Param which,
                   int64_t outputs, int64_t activation) {
  return linear(x, *params.get(base + which), outputs, params.get(base + which + 1),
                params.get(base + which + 2), activation);
}

// promethean.model.layers.apply_rotary, operation for operation.
at::Tensor rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  const int64_t half = x.size(-1) / 2;
  const auto rotated = at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
  return (x * cos + rotated * sin).to(x.scalar_type());
}

at::Tensor decode_blocks(const at::Tensor& input, const OptionalTensors& params,
                         at::TensorList keys, at::TensorList values, at::IntArrayRef first_slots,
                         at::IntArrayRef filled, at::IntArrayRef windows,
                         const OptionalTensors& rotary, const std::optional<at::Tensor>& left_padding,
                         int64_t query_slot, at::IntArrayRef shape_ints, at::ArrayRef<double> reals) {
  TORCH_CHECK(shape_ints.size() == 8 && reals.size() == 2, "decode_blocks: bad stack shape");
  const StackShape shape{shape_ints[0], shape_ints[1], shape_ints[2], shape_ints[3],
                         shape_ints[4], shape_ints[5], shape_ints[6], shape_ints[7] != 0,
                         reals[0],       reals[1]};
  TORCH_CHECK(input.dim() == 3 && input.size(1) == 1 && input.size(2) == shape.width,
              "decode_blocks: one token per sequence, (batch, 1, width)");
  const int64_t batch = input.size(0);
  const int64_t layers = shape.layers;
  TORCH_CHECK(int64_t(params.size()) == layers * kParamsPerLayer && int64_t(keys.size()) == layers &&
                  int64_t(values.size()) == layers && int64_t(first_slots.size()) == layers &&
                  int64_t(filled.size()) == layers && int64_t(windows.size()) == layers,
              "decode_blocks: parameters or caches do not match the number of layers");
  TORCH_CHECK(rotary.size() == 0 || int64_t(rotary.size()) == 2 * layers,
              "decode_blocks: rotary tables must be (cos, sin) per layer");
  const int64_t inner = shape.heads * shape.head_size;
  const int64_t kv_inner = shape.kv_heads * shape.head_size;
  at::Tensor x = input;
  for (int64_t layer = 0; layer < layers; ++layer) {
    const int64_t base = layer * kParamsPerLayer;
    const auto& layer_keys = keys[layer];
    const auto& layer_values = values[layer];
    TORCH_CHECK(layer_keys.dim() == 4 && layer_keys.size(0) == batch &&
                    layer_values.sizes() == layer_keys.sizes(),
                "decode_blocks: a cache buffer does not hold this batch");
    TORCH_CHECK(filled[layer] < layer_keys.size(2),
                "decode_blocks: a cache buffer has no room for the new token");
    // promethean.inference.kernel_layers.KernelAttention.forward with one new token.
    auto h = layer_norm_of(x, params, base, kAttnNormWeight, shape);
    const auto qkv = project(h, params, base, kQkv, inner + 2 * kv_inner, kNone)
                         .split_with_sizes({inner, kv_inner, kv_inner}, -1);
    auto q = qkv[0].view({batch, 1, shape.heads, shape.head_size}).transpose(1, 2);
    auto k = qkv[1].view({batch, 1, shape.kv_heads, shape.head_size}).transpose(1, 2);
    const auto v = qkv[2].view({batch, 1, shape.kv_heads, shape.head_size}).transpose(1, 2);
    if (params.get(base + kQNormWeight).has_value()) {
      q = norm(q, *params.get(base + kQNormWeight), std::nullopt, shape.norm_eps, true, false);
      k = norm(k, *params.get(base + kKNormWeight), std::nullopt, shape.norm_eps, true, false);
    }
    if (rotary.size() != 0 && rotary.get(2 * layer).has_value()) {
      const auto cos = *rotary.get(2 * layer);
      const auto sin = *rotary.get(2 * layer + 1);
      q = rotate(q, cos, sin);
      k = rotate(k, cos, sin);
    }
    layer_keys.narrow(2, filled[layer], 1).copy_(k);
    layer_values.narrow(2, filled[layer], 1).copy_(v);
    const auto y = attention(q, layer_keys, layer_values, query_slot, first_slots[layer],
                             filled[layer] + 1, left_padding, windows[layer],
                             shape.attention_scale);
    h = project(y, params, base, kOut, shape.width, kNone);
    if (params.get(base + kAttnPostNormWeight).has_value())
      h = layer_norm_of(h, params, base, kAttnPostNormWeight, shape);
    x = x + h;
    // promethean.inference.kernel_layers.KernelMLP.
    h = layer_norm_of(x, params, base, kMlpNormWeight, shape);
    h = project(project(h, params, base, kUp, shape.hidden, shape.up_activation), params, base,
                kDown, shape.width, kNone);
    if (params.get(base + kMlpPostNormWeight).has_value())
      h = layer_norm_of(h, params, base, kMlpPostNormWeight, shape);
    x = x + h;
  }
  return x;
}

}  // namespace
}  // namespace promethean_kernels

TORCH_LIBRARY(promethean_kernels, m) {
  m.def("supported() -> bool", &promethean_kernels::supported);
  m.def("instruction_set() -> str", &promethean_kernels::instruction_set);
  m.def("select_instruction_set(str name) -> ()", &promethean_kernels::select_instruction_set);
  m.def("pack_linear(Tensor weight, bool gated) -> Tensor");
  m.def("packed_rows(Tensor packed, Tensor ids, int K) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, int outputs, Tensor? scales, Tensor? bias, int activation) -> Tensor");
  m.def("norm(Tensor x, Tensor weight, Tensor? bias, float eps, bool rms, bool unit_offset) -> Tensor");
  m.def("attention(Tensor q, Tensor keys, Tensor values, int query_slot0, int key_slot0, int held, "
        "Tensor? left_padding, int window, float scale) -> Tensor");
  m.def("ssm_scan(Tensor x, Tensor z, Tensor delta, Tensor bc, Tensor A, Tensor Dskip, "
        "Tensor(a!) state, float threshold) -> Tensor");
  m.def("activate(Tensor x, int activation) -> Tensor");
  m.def("decode_blocks(Tensor x, Tensor?[] params, Tensor(a!)[] keys, Tensor(b!)[] values, "
        "int[] first_slots, int[] filled, int[] windows, Tensor?[] rotary, Tensor? left_padding, "
        "int query_slot, int[] shape, float[] reals) -> Tensor");
  m.def("stream_read(Tensor buffer) -> float");
}

TORCH_LIBRARY_IMPL(promethean_kernels, CPU, m) {
  m.impl("pack_linear", &promethean_kernels::pack_linear);
  m.impl("packed_rows", &promethean_kernels::packed_rows);
  m.impl("linear", &promethean_kernels::linear);
  m.impl("norm", &promethean_kernels::norm);
  m.impl("attention", &promethean_kernels::attention);
  m.impl("ssm_scan", &promethean_kernels::ssm_scan);
  m.impl("activate", &promethean_kernels::activate);
  m.impl("decode_blocks", &promethean_kernels::decode_blocks);
  m.impl("stream_read", &promethean_kernels::stream_read);
}
