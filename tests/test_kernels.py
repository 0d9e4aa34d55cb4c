"""Promethean's CPU inference kernels (`promethean/inference/kernels.cpp`)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promethean.config import load_preset
from promethean.errors import PrometheanError
from promethean.inference import kernels
from promethean.inference.quantize import prepare_for_inference, quantize_rows
from promethean.model import Transformer

REPO = Path(__file__).resolve().parent.parent

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"Promethean's kernels cannot run here: "
    f"{kernels.unavailable_reason()}"
)

# (rows of x, out features, in features): decode and batched shapes, with tails in every
# dimension (a partial tile of weight rows, columns past the last full 32, several passes of 6
# rows of x).
SHAPES = [(1, 64, 64), (1, 37, 45), (2, 96, 100), (7, 8, 31), (13, 33, 300), (1, 3072, 768)]


@pytest.fixture(params=["avx512", "avx2"])
def instruction_set(request):
    """Run the test with each instruction set's kernels this CPU can run (AVX2 is what most
    laptops have; an AVX-512 machine runs both)."""
    if not kernels.available():
        pytest.skip(f"Promethean's kernels cannot run here: {kernels.unavailable_reason()}")
    before = kernels.instruction_set()
    try:
        kernels.use_instruction_set(request.param)
    except PrometheanError as error:
        pytest.skip(str(error))
    yield request.param
    kernels.use_instruction_set(before)


def reference(x: torch.Tensor, weight: torch.Tensor, scales=None, bias=None) -> torch.Tensor:
    w = weight.float() * scales[:, None] if scales is not None else weight.float()
    y = x.float() @ w.t()
    return y + bias if bias is not None else y


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


@needs_kernels
@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
def test_bf16_and_int8_products_equal_the_float_reference_to_the_output_rounding(
    rows, out_features, in_features, instruction_set
):
    generator = torch.Generator().manual_seed(rows * out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    bias = torch.randn(out_features, generator=generator)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    bf16 = weight.bfloat16()
    quantized, scales = quantize_rows(weight)
    # The only rounding that matters is the output's to bf16 (2^-9 relative); int8 also quantizes
    # x to int16, 2^-15 of its row's largest value.
    assert relative_error(kernels.linear(x, bf16, None, bias), reference(x, bf16, None, bias)) < 4e-3
    got = kernels.linear(x, quantized, scales, bias)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, out_features)
    assert relative_error(got, reference(x, quantized, scales, bias)) < 4e-3
    # fp32 activations give an fp32 output, with no rounding to bf16 at the end.
    x32 = x.float()
    exact = kernels.linear(x32, bf16)
    assert exact.dtype == torch.float32
    assert relative_error(exact, reference(x32, bf16)) < 1e-5


@needs_kernels
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_rows_result_does_not_depend_on_the_rows_computed_with_it(dtype, instruction_set):
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(203, 150, generator=generator)
    x = torch.randn(11, 150, generator=generator).bfloat16()
    args = (weight.bfloat16(), None) if dtype == "bf16" else quantize_rows(weight)
    together = kernels.linear(x, *args)
    for row in range(x.shape[0]):
        assert torch.equal(kernels.linear(x[row : row + 1], *args)[0], together[row])
    # ...nor on how many threads share the work.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert torch.equal(kernels.linear(x, *args), together)
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_int8_sums_are_exact_where_an_int32_sum_would_overflow(instruction_set):
    # 20000 products of 127 * 32767 would overflow int32 (4e10); x is quantized with a smaller
    # range for such a long row, and the lanes are added in int64.
    in_features = 20000
    weight = torch.full((3, in_features), 127, dtype=torch.int8)
    weight[1] = -127
    scales = torch.tensor([1.0, 1.0, 0.5])
    x = torch.ones(1, in_features)
    got = kernels.linear(x, weight, scales)
    assert got.tolist() == [[127.0 * in_features, -127.0 * in_features, 63.5 * in_features]]


@needs_kernels
@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_a_model_on_the_avx2_kernels_gives_the_avx512_models_logits_to_rounding(dtype):
    if kernels.instruction_set() != "avx512":
        pytest.skip("this CPU runs only the AVX2 kernels")
    torch.manual_seed(0)
    model = prepare_for_inference(Transformer(load_preset("tiny-gpt2").model), dtype)
    prompt = torch.tensor([[5, 17, 3, 99, 42, 7]])

    @torch.inference_mode()
    def logits():
        cache = model.new_cache(1, capacity=16)
        first = model(prompt, cache=cache).logits[:, -1]
        return torch.cat([first, model(torch.tensor([[8]]), cache=cache).logits[:, -1]]).float()

    wide = logits()
    kernels.use_instruction_set("avx2")
    try:
        assert kernels.instruction_set() == "avx2"
        narrow = logits()
    finally:
        kernels.use_instruction_set("avx512")
    # int8 sums are exact integers in both (x is quantized alike while K is short), so only bf16
    # can differ, by the fp32 rounding of the sums before the output's rounding to bf16.
    if dtype == "int8":
        assert torch.equal(narrow, wide)
    assert relative_error(narrow, wide) < 1e-2


@needs_kernels
def test_an_unknown_instruction_set_is_refused_in_a_sentence():
    with pytest.raises(PrometheanError, match="^the instruction set must be avx512 or avx2, "
                       "not 'sse'.$"):
        kernels.use_instruction_set("sse")


@needs_kernels
def test_bad_arguments_are_refused_by_the_kernel():
    with pytest.raises(RuntimeError, match="x has 5 features, the weight 4"):
        kernels.linear(torch.ones(1, 5).bfloat16(), torch.ones(3, 4).bfloat16())
    with pytest.raises(RuntimeError, match="int8 weights need their scales"):
        kernels.linear(torch.ones(1, 4).bfloat16(), torch.ones(3, 4, dtype=torch.int8))


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
    if kernels.available():
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
                       "echo 'kernels.cpp:1: error: no' >&2\nexit 1\n")
    failing.chmod(0o755)
    cache = tmp_path / "kernels"
    done = run_python(CHECK, CXX=str(failing), PROMETHEAN_KERNEL_CACHE=str(cache))
    if kernels.unavailable_reason() is not None and "compiler" not in kernels.unavailable_reason():
        pytest.skip(f"the kernels cannot run here anyway: {kernels.unavailable_reason()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"building them failed ({failing} exited with 1: kernels.cpp:1: error: no)",
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
    assert first.stdout.splitlines() == ["None", "Bf16Linear FusedDecode"]
    assert len(list(cache.glob("*/promethean_kernels.so"))) == 1
    second = run_python(CHECK, PROMETHEAN_KERNEL_CACHE=str(cache))
    assert second.returncode == 0 and second.stderr == ""
    assert second.stdout == first.stdout
