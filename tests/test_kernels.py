"""Promethean's CPU inference kernels (`promethean/inference/csrc/`): each operator against an
independent float64 computation, and the guarantee the serving stack builds on: an output
element never depends on what else is computed with it (other rows, padding, chunking, threads)
nor on the instruction set (AVX2 and AVX-512 give the same bits)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promethean.errors import PrometheanError
from promethean.inference import kernels
from promethean.inference.kernel_layers import quantize_rows

REPO = Path(__file__).resolve().parent.parent
AVAILABLE = kernels.available()
needs_kernels = pytest.mark.skipif(
    not AVAILABLE, reason=f"Promethean's kernels cannot run here: {kernels.unavailable_reason()}")
HAS_AVX512 = AVAILABLE and kernels.instruction_set() == "avx512"
needs_both_sets = pytest.mark.skipif(
    not HAS_AVX512, reason="this CPU lacks AVX-512 with bf16 and VNNI, so only the AVX2 kernels "
    "run here and there is no second instruction set to compare with")
FAST = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

# (rows of x, out features, in features): decode and batched shapes with tails in every
# dimension: a partial panel of 64 outputs, an odd K (a bf16 or int8 pair half empty), several
# tiles of 6 (AVX-512) or 2-3 (AVX2) rows.
SHAPES = [(1, 64, 64), (1, 37, 45), (2, 96, 100), (7, 8, 31), (13, 130, 301), (1, 2304, 768)]
ACTIVATIONS = {
    "none": lambda v: v,
    "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"),
    "silu": F.silu,
    "softplus": F.softplus,
}


@pytest.fixture(params=["avx512", "avx2"])
def instruction_set(request):
    """Run the test with each instruction set's kernels this CPU can run (AVX2 is what most
    laptops have; an AVX-512 machine runs both)."""
    if not AVAILABLE:
        pytest.skip(f"Promethean's kernels cannot run here: {kernels.unavailable_reason()}")
    if request.param == "avx512" and not HAS_AVX512:
        pytest.skip("this CPU lacks AVX-512 with bf16 and VNNI: only the AVX2 kernels run here")
    before = kernels.instruction_set()
    kernels.use_instruction_set(request.param)
    yield request.param
    kernels.use_instruction_set(before)


def on_each_set(compute):
    """compute() on the AVX-512 kernels, then on the AVX2 ones."""
    before = kernels.instruction_set()
    try:
        kernels.use_instruction_set("avx512")
        wide = compute()
        kernels.use_instruction_set("avx2")
        narrow = compute()
    finally:
        kernels.use_instruction_set(before)
    return wide, narrow


def weights_as(fmt: str, weight: torch.Tensor):
    """(the weight as the kernels get it, its scales, what it is worth in float64)."""
    if fmt == "int8":
        quantized, scales = quantize_rows(weight)
        return quantized, scales, quantized.double() * scales.double()[:, None]
    if fmt == "bf16":
        return weight.bfloat16(), None, weight.bfloat16().double()
    return weight, None, weight.double()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


# ---------------------------------------------------------------------------------- products
@needs_kernels
@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_products_equal_a_float64_reference_to_their_rounding(
    rows, out_features, in_features, fmt, instruction_set
):
    generator = torch.Generator().manual_seed(rows * out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator)
    if fmt != "fp32":
        x = x.bfloat16()
    given_weight, scales, exact = weights_as(fmt, weight)
    got = kernels.linear(x, kernels.pack_linear(given_weight), out_features, scales, bias)
    assert got.dtype == x.dtype and got.shape == (rows, out_features)
    want = x.double() @ exact.t() + bias.double()
    # fp32: the fp32 sums; bf16: the output's rounding (2^-9); int8 also quantizes x to int16.
    assert relative_error(got, want) < (1e-6 if fmt == "fp32" else 4e-3)


@needs_kernels
@pytest.mark.parametrize("activation", ["gelu_tanh", "silu", "softplus", "silu_mul",
                                        "gelu_tanh_mul"])
@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_activations_in_the_epilogue_equal_torchs(activation, fmt, instruction_set):
    generator = torch.Generator().manual_seed(3)
    gated = activation.endswith("_mul")
    hidden, in_features = 100, 70
    weight = torch.randn(2 * hidden if gated else hidden, in_features, generator=generator) * 0.3
    bias = torch.randn(weight.shape[0], generator=generator)
    x = torch.randn(5, in_features, generator=generator) * 3
    given_weight, _, exact = weights_as(fmt, weight)
    if fmt == "bf16":
        x = x.bfloat16()
    got = kernels.linear(x, kernels.pack_linear(given_weight, gated), hidden, None, bias,
                         activation)
    pre = x.double() @ exact.t() + bias.double()
    if gated:
        act = F.silu if activation == "silu_mul" else ACTIVATIONS["gelu_tanh"]
        want = act(pre[:, :hidden]) * pre[:, hidden:]
    else:
        want = ACTIVATIONS[activation](pre)
    # Our exp is within ~2 ulp of the true one; the rest is the sums' fp32 rounding, which a
    # gated product multiplies by the other factor (up to ~20 here).
    tolerance = (5e-5 if gated else 2e-6) if fmt == "fp32" else 6e-3
    assert float(((got.double() - want).abs() / (want.abs() + 1)).max()) < tolerance


@needs_kernels
@FAST
@given(rows=st.integers(1, 20), out_features=st.integers(1, 200), in_features=st.integers(1, 160),
       fmt=st.sampled_from(["fp32", "bf16", "int8"]), seed=st.integers(0, 2**16),
       activation=st.sampled_from(["none", "gelu_tanh", "silu_mul"]))
def test_a_rows_product_never_depends_on_the_rows_computed_with_it(
    rows, out_features, in_features, fmt, seed, activation
):
    generator = torch.Generator().manual_seed(seed)
    gated = activation == "silu_mul"
    weight = torch.randn(out_features * (2 if gated else 1), in_features, generator=generator)
    bias = torch.randn(weight.shape[0], generator=generator)
    x = torch.randn(rows, in_features, generator=generator) * 4
    if fmt != "fp32":
        x = x.bfloat16()
    given_weight, scales, _ = weights_as(fmt, weight)
    packed = kernels.pack_linear(given_weight, gated)
    together = kernels.linear(x, packed, out_features, scales, bias, activation)
    row = int(torch.randint(0, rows, (1,), generator=generator))
    alone = kernels.linear(x[row : row + 1], packed, out_features, scales, bias, activation)
    assert torch.equal(alone[0], together[row])
    # A strided view of the same rows (a prompt's last positions) reads them in place.
    spaced = torch.zeros(rows, 3, in_features, dtype=x.dtype)
    spaced[:, 1] = x
    assert torch.equal(kernels.linear(spaced[:, 1], packed, out_features, scales, bias,
                                      activation), together)


@needs_kernels
def test_a_product_does_not_depend_on_how_many_threads_share_it():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(700, 300, generator=generator)
    x = torch.randn(40, 300, generator=generator).bfloat16()
    packed = kernels.pack_linear(weight.bfloat16())
    together = kernels.linear(x, packed, 700)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(kernels.linear(x, packed, 700), together)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_work_split_among_threads_gives_what_one_row_at_a_time_gives(instruction_set):
    """Large enough work runs on PyTorch's threads (each with its own buffers); the results must
    be those of the small, single-threaded calls, row for row."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(300, 600, generator=generator)
    weight = torch.randn(130, 600, generator=generator)
    bias = torch.randn(130, generator=generator)
    for fmt in ("fp32", "bf16", "int8"):
        rows = x if fmt == "fp32" else x.bfloat16()
        given_weight, scales, _ = weights_as(fmt, weight)
        packed = kernels.pack_linear(given_weight)
        together = kernels.linear(rows, packed, 130, scales, bias, "gelu_tanh")
        for row in (0, 157, 299):
            alone = kernels.linear(rows[row : row + 1], packed, 130, scales, bias, "gelu_tanh")
            assert torch.equal(alone[0], together[row]), fmt
    wide = torch.randn(400, 700, generator=generator).bfloat16()
    gain = torch.rand(700, generator=generator) + 0.5
    normed = kernels.norm(wide, gain, None, 1e-6, True)
    assert torch.equal(kernels.norm(wide[123:124], gain, None, 1e-6, True)[0], normed[123])
    many = torch.randn(50000, generator=generator)
    assert torch.equal(kernels.silu(many)[31000:31100], kernels.silu(many[31000:31100]))


@needs_kernels
def test_int8_sums_are_exact_where_an_int32_sum_would_overflow(instruction_set):
    # 20000 products of 127 * 32767 would overflow int32 lanes (8e10); they move to int64.
    in_features = 20000
    weight = torch.full((3, in_features), 127, dtype=torch.int8)
    weight[1] = -127
    scales = torch.tensor([1.0, 1.0, 0.5])
    got = kernels.linear(torch.ones(1, in_features), kernels.pack_linear(weight), 3, scales)
    assert got.tolist() == [[127.0 * in_features, -127.0 * in_features, 63.5 * in_features]]


@needs_kernels
def test_packed_rows_are_the_weights_rows():
    generator = torch.Generator().manual_seed(0)
    for weight in (torch.randn(130, 77, generator=generator),
                   torch.randn(130, 77, generator=generator).bfloat16(),
                   quantize_rows(torch.randn(130, 77, generator=generator))[0]):
        ids = torch.tensor([[0, 129], [64, 63]])
        assert torch.equal(kernels.packed_rows(kernels.pack_linear(weight), ids, 77), weight[ids])


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_packed_rows_come_dequantized_as_pytorch_would(dtype):
    generator = torch.Generator().manual_seed(0)
    quantized, scales = quantize_rows(torch.randn(130, 77, generator=generator) * 3)
    ids = torch.tensor([[0, 129, 5], [64, 63, 64]])
    want = (quantized[ids].float() * scales[ids].unsqueeze(-1)).to(dtype)
    got = kernels.packed_rows(kernels.pack_linear(quantized), ids, 77, scales, dtype)
    assert got.dtype == dtype and torch.equal(got, want)
    with pytest.raises(RuntimeError, match="scales go with int8 panels"):
        kernels.packed_rows(kernels.pack_linear(quantized.float()), ids, 77, scales, dtype)


# ------------------------------------------------------------------------- norms, attention
@needs_kernels
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norms_equal_a_float64_reference(rms, dtype, instruction_set):
    generator = torch.Generator().manual_seed(1)
    width = 77
    x = (torch.randn(6, width, generator=generator) * 3 + 1).to(dtype)
    weight = 1 + 0.1 * torch.randn(width, generator=generator)
    bias = None if rms else 0.1 * torch.randn(width, generator=generator)
    got = kernels.norm(x, weight, bias, 1e-5, rms)
    x64 = x.double()
    if rms:
        want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    else:
        want = F.layer_norm(x64, (width,), weight.double(), bias.double(), 1e-5)
    assert got.dtype == dtype
    assert float((got.double() - want).abs().max()) < (2e-6 if dtype == torch.float32 else 4e-2)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embeddings_equal_apply_rotary_in_float64(dtype, instruction_set):
    from promethean.model.layers import apply_rotary, rotary_cos_sin, rotary_inverse_frequencies

    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 5, 40, generator=generator).to(dtype)
    positions = torch.tensor([[3, 4, 5, 6, 7], [0, 1, 2, 3, 4]])
    cos, sin = rotary_cos_sin(positions, rotary_inverse_frequencies(40, 10000.0))
    cos, sin = cos.to(dtype)[:, None], sin.to(dtype)[:, None]  # (B, 1, T, D), as the model's
    got = kernels.rotary(x, cos, sin)
    want = apply_rotary(x.double(), cos.double(), sin.double())
    assert got.dtype == dtype
    assert float((got.double() - want).abs().max()) < (1e-6 if dtype == torch.float32 else 3e-2)


def reference_attention(q, keys, values, visible):
    """float64 softmax attention of q (H, D) against the keys (S, Hkv, D) in `visible`."""
    group = q.shape[0] // keys.shape[1]
    out = []
    for head in range(q.shape[0]):
        k = keys[visible, head // group].double()
        v = values[visible, head // group].double()
        weights = torch.softmax(k @ q[head].double() / q.shape[1] ** 0.5, dim=0)
        out.append(weights @ v)
    return torch.stack(out)


@needs_kernels
@FAST
@given(queries=st.integers(1, 6), held=st.integers(0, 40), padding=st.integers(0, 5),
       heads=st.sampled_from([(1, 1), (4, 2), (4, 1)]), head_size=st.sampled_from([8, 16, 40]),
       window=st.sampled_from([None, 1, 3, 16]), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_attention_equals_a_float64_softmax_over_the_keys_each_query_sees(
    queries, held, padding, heads, head_size, window, bf16, seed
):
    generator = torch.Generator().manual_seed(seed)
    n_head, n_kv = heads
    dtype = torch.bfloat16 if bf16 else torch.float32
    total = padding + held + queries  # every slot, the new queries' keys already written
    q = torch.randn(1, n_head, queries, head_size, generator=generator).to(dtype)
    keys = torch.randn(1, n_kv, total + 3, head_size, generator=generator).to(dtype)
    values = torch.randn(1, n_kv, total + 3, head_size, generator=generator).to(dtype)
    first_query = padding + held
    got = kernels.attention(q, keys, values, first_query, 0, total, torch.tensor([padding]),
                            window, head_size ** -0.5)
    for t in range(queries):
        slot = first_query + t
        start = max(padding, slot - window + 1) if window else padding
        want = reference_attention(q[0, :, t], keys[0].transpose(0, 1), values[0].transpose(0, 1),
                                   slice(start, slot + 1))
        error = (got[0, t].double().view(n_head, head_size) - want).abs().max()
        assert float(error) < (2e-2 if bf16 else 1e-5)


@needs_kernels
@FAST
@given(held=st.integers(1, 30), pad_alone=st.integers(0, 6), pad_batched=st.integers(0, 6),
       window=st.sampled_from([None, 2, 5]), bf16=st.booleans(), seed=st.integers(0, 2**16),
       split=st.integers(1, 4))
def test_attention_never_depends_on_padding_neighbours_or_how_the_queries_were_split(
    held, pad_alone, pad_batched, window, bf16, seed, split
):
    """A row's queries give the same bits behind any left padding, in a batch with another row,
    against a buffer that starts at any slot it no longer needs, and in one call or several."""
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    queries, d, length = 4, 16, held + 4  # the row's real slots: its history, then the queries

    def rand(*shape):
        return (torch.randn(*shape, generator=generator) * 3).to(dtype)

    keys, values, q = rand(2, length, d), rand(2, length, d), rand(4, queries, d)

    def behind(padding, tensor):  # the row's slots after `padding` slots of garbage
        return torch.cat([rand(2, padding, d) * 100, tensor], dim=1)

    size = pad_alone + length
    alone = kernels.attention(q[None], behind(pad_alone, keys)[None],
                              behind(pad_alone, values)[None], size - queries, 0, size,
                              torch.tensor([pad_alone]), window, 0.25)
    # In a batch after a longer row, behind another padding.
    pair_size = pad_batched + length + 3
    pair_keys = torch.stack([rand(2, pair_size, d), behind(pad_batched + 3, keys)])
    pair_values = torch.stack([rand(2, pair_size, d), behind(pad_batched + 3, values)])
    batched = kernels.attention(torch.stack([rand(4, queries, d), q]), pair_keys, pair_values,
                                pair_size - queries, 0, pair_size,
                                torch.tensor([0, pad_batched + 3]), window, 0.25)
    assert torch.equal(batched[1], alone[0])
    # The same queries in `split` calls, each seeing the keys written so far.
    parts, start = [], 0
    for end in sorted({queries * (i + 1) // split for i in range(split)}):
        parts.append(kernels.attention(q[None, :, start:end], behind(pad_alone, keys)[None],
                                       behind(pad_alone, values)[None], size - queries + start,
                                       0, size - queries + end, torch.tensor([pad_alone]),
                                       window, 0.25))
        start = end
    assert torch.equal(torch.cat(parts, dim=1), alone)
    if window is not None:  # a windowed layer's buffer starts at the first slot still seen
        first = max(0, size - queries - window + 1)
        later = kernels.attention(q[None], behind(pad_alone, keys)[None, :, first:],
                                  behind(pad_alone, values)[None, :, first:], size - queries,
                                  first, size - first, torch.tensor([pad_alone]), window, 0.25)
        assert torch.equal(later, alone)


@needs_both_sets
@FAST
@given(seed=st.integers(0, 2**16), bf16=st.booleans(), width=st.integers(1, 90))
def test_every_operator_gives_the_same_bits_on_avx2_as_on_avx512(seed, bf16, width):
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x = (torch.randn(3, width, generator=generator) * 3).to(dtype)
    weight = torch.randn(2 * 70, width, generator=generator) * 0.2
    bias = torch.randn(2 * 70, generator=generator)
    fmt = "bf16" if bf16 else "fp32"
    plain = kernels.pack_linear(weights_as(fmt, weight)[0])
    gated = kernels.pack_linear(weights_as(fmt, weight)[0], gated=True)
    int8, scales = quantize_rows(weight)
    int8 = kernels.pack_linear(int8)
    q = torch.randn(1, 4, 3, 16, generator=generator).to(dtype)
    keys = torch.randn(1, 2, 9, 16, generator=generator).to(dtype)

    def compute():
        return [kernels.linear(x, plain, 140, None, bias, "gelu_tanh"),
                kernels.linear(x, gated, 70, None, bias, "silu_mul"),
                kernels.linear(x, int8, 140, scales, bias, "softplus"),
                kernels.norm(x, weight[0].abs(), bias[:width], 1e-5, False),
                kernels.norm(x, weight[0].abs(), None, 1e-6, True),
                kernels.silu(x),
                kernels.rotary(q, keys[:, :1, :3], keys[:, 1:, 3:6]),
                kernels.attention(q, keys, keys * 2, 6, 0, 9, torch.tensor([1]), None, 0.25)]

    wide, narrow = on_each_set(compute)
    for a, b in zip(wide, narrow):
        assert torch.equal(a, b)


@needs_kernels
def test_the_scan_equals_a_float64_recurrence(instruction_set):
    generator = torch.Generator().manual_seed(0)
    B, T, D, N = 2, 7, 20, 16
    x = torch.randn(B, T, D, generator=generator)
    z = torch.randn(B, T, D, generator=generator)
    delta = torch.rand(B, T, D, generator=generator) * 0.5
    bc = torch.randn(B, T, 2 * N, generator=generator)
    A = -torch.rand(D, N, generator=generator) * 2
    skip = torch.randn(D, generator=generator)
    state = torch.randn(B, D, N, generator=generator)
    h = state.double().clone()
    got = kernels.ssm_scan(x, z, delta, bc, A, skip, state, 0.3)
    want = torch.empty(B, T, D, dtype=torch.float64)
    for t in range(T):
        update = (delta[:, t] * x[:, t]).double()[..., None] * bc[:, t, None, :N].double()
        scale = update.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()
        update = torch.where(update.abs() >= 0.3 * scale, update, 0.0)
        h = torch.exp(delta[:, t, :, None].double() * A.double()) * h + update
        y = (h * bc[:, t, None, N:].double()).sum(-1) + skip.double() * x[:, t].double()
        want[:, t] = y * F.silu(z[:, t].double())
    assert float((got.double() - want).abs().max()) < 1e-4
    assert float((state.double() - h).abs().max()) < 1e-4


# ---------------------------------------------------------------------------- bad arguments
@needs_kernels
def test_an_unknown_instruction_set_is_refused_in_a_sentence():
    with pytest.raises(PrometheanError, match="^the instruction set must be avx512 or avx2, "
                       "not 'sse'.$"):
        kernels.use_instruction_set("sse")


@needs_kernels
def test_bad_arguments_are_refused_by_the_kernels():
    packed = kernels.pack_linear(torch.ones(3, 4).bfloat16())
    with pytest.raises(RuntimeError, match="x has 5 features, the packed weight 4"):
        kernels.linear(torch.ones(1, 5).bfloat16(), packed, 3)
    with pytest.raises(RuntimeError, match="int8 weights need their scales"):
        kernels.linear(torch.ones(1, 4).bfloat16(),
                       kernels.pack_linear(torch.ones(3, 4, dtype=torch.int8)), 3)
    with pytest.raises(RuntimeError, match="100 outputs do not match the packed weight"):
        kernels.linear(torch.ones(1, 4).bfloat16(), packed, 100)
    with pytest.raises(RuntimeError, match="q, keys and values must all be bf16 or all fp32"):
        kernels.attention(torch.ones(1, 1, 1, 4), torch.ones(1, 1, 2, 4).bfloat16(),
                          torch.ones(1, 1, 2, 4).bfloat16(), 1, 0, 2, None, None, 0.5)


# ---------------------------------------------------------------------------------- the build
def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=REPO, env={**os.environ, **env})


CHECK = """
from promethean.inference import kernels
from promethean.inference.quantize import prepare_for_inference
from promethean.config import load_preset
from promethean.model import Transformer
print(kernels.unavailable_reason())
model = prepare_for_inference(Transformer(load_preset("tiny-gpt2").model), "bf16")
print(type(model.blocks[0].mlp.up_proj).__name__, type(model.fused_decode).__name__)
"""


def test_the_variable_chooses_the_avx2_kernels_or_is_refused_in_a_sentence():
    code = "from promethean.inference import kernels; print(kernels.unavailable_reason())"
    if AVAILABLE:
        chosen = run_python(code + "; print(kernels.instruction_set())",
                            PROMETHEAN_CPU_KERNELS="avx2")
        assert chosen.returncode == 0, chosen.stderr
        assert chosen.stdout.splitlines() == ["None", "avx2"]
    refused = run_python(code, PROMETHEAN_CPU_KERNELS="sse")
    assert refused.stdout.strip() == "PROMETHEAN_CPU_KERNELS=sse is not 0, 1, avx2 or avx512"


def test_turned_off_the_kernels_give_way_to_pytorchs():
    done = run_python(CHECK, PROMETHEAN_CPU_KERNELS="0")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["PROMETHEAN_CPU_KERNELS=0 turns them off",
                                      "PackedLinear NoneType"]


def test_a_failed_build_falls_back_and_says_why_in_one_line(tmp_path):
    failing = tmp_path / "failing-compiler"
    failing.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo 'fake 1.0' && exit 0\n"
                       "echo 'ops.cpp:1: error: no' >&2\nexit 1\n")
    failing.chmod(0o755)
    cache = tmp_path / "kernels"
    done = run_python(CHECK, CXX=str(failing), PROMETHEAN_KERNEL_CACHE=str(cache))
    if kernels.unavailable_reason() is not None and "compiler" not in kernels.unavailable_reason():
        pytest.skip(f"the kernels cannot run here anyway: {kernels.unavailable_reason()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"building them failed ({failing} exited with 1: ops.cpp:1: error: no)",
        "PackedLinear NoneType",
    ]
    # Nothing half-built is left where the next process would load it.
    assert list(cache.glob("*/*.so")) == []


@needs_kernels
def test_the_built_library_is_reused_from_the_cache(tmp_path):
    cache = tmp_path / "kernels"
    first = run_python(CHECK, PROMETHEAN_KERNEL_CACHE=str(cache))
    assert first.returncode == 0, first.stderr
    assert "building the CPU inference kernels" in first.stderr
    assert first.stdout.splitlines() == ["None", "KernelLinear FusedDecode"]
    assert len(list(cache.glob("*/promethean_kernels.so"))) == 1
    second = run_python(CHECK, PROMETHEAN_KERNEL_CACHE=str(cache))
    assert second.returncode == 0 and second.stderr == ""
    assert second.stdout == first.stdout


# --------------------------------------------------------------------------------- argmax
@needs_kernels
@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.sampled_from([0.0, 1.5, -1.5, 3.0, -3.0, 2.0**-130, -0.0,
                                        float("inf"), float("-inf"), float("nan")]),
                       min_size=1, max_size=70),
       rows=st.integers(1, 3), bf16=st.booleans())
def test_argmax_rows_chooses_as_torch_argmax_ties_infinities_and_nans_included(values, rows, bf16):
    x = torch.tensor([values[r:] + values[:r] for r in range(rows)])  # rows rotated: other orders
    if bf16:
        x = x.bfloat16()
    want = x.float().argmax(dim=-1)
    assert torch.equal(kernels.argmax_rows(x), want)
    assert torch.equal(kernels.argmax_rows(x[:, None]), want[:, None])  # (B, 1, V) logits too


@needs_kernels
def test_argmax_rows_of_a_vocabulary_and_a_strided_view():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50257, generator=generator)
    assert torch.equal(kernels.argmax_rows(logits), logits.argmax(dim=-1))
    wide = torch.randn(3, 2, 500, generator=generator)
    assert torch.equal(kernels.argmax_rows(wide[:, 1]), wide[:, 1].argmax(dim=-1))
    with pytest.raises(RuntimeError, match="argmax_rows: x must be fp32 or bf16"):
        kernels.argmax_rows(torch.zeros(2, 3, dtype=torch.int32))
