// Promethean's kernels for AVX2 with FMA (every x86-64 CPU of the last ten years). Compiled with
// -mavx2 -mfma -mf16c; they give the AVX-512 kernels' results bit for bit (see vec.h).
#define PROMETHEAN_ISA promethean_avx2
#define PROMETHEAN_ISA_AVX2 1
#include "impl.h"

namespace promethean_kernels {
const Kernels avx2_kernels = PROMETHEAN_ISA::make_kernels();
}
