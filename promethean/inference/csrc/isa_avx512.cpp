// Promethean's kernels for AVX-512 with the bf16 and VNNI dot products (Intel Xeon since Cooper
// Lake, AMD Zen 4). Compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16
// -mavx512vnni -mfma; only called when the CPU has them (ops.cpp checks).
#define PROMETHEAN_ISA promethean_avx512
#define PROMETHEAN_ISA_AVX512 1
#include "impl.h"

namespace promethean_kernels {
const Kernels avx512_kernels = PROMETHEAN_ISA::make_kernels();
}
