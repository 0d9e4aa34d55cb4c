"""bf16 and weight-only int8 inference (`promethean.inference.quantize`)."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from promethean.checkpoint import load_checkpoint
from promethean.errors import PrometheanError
from promethean.inference.engine import Engine
from promethean.inference.generate import SamplingParams, generate
from promethean.inference import kernels
from promethean.inference.kernel_layers import Int8Embedding, KernelLinear, PackedEmbedding
from promethean.inference.quantize import Int8Linear, prepare_for_inference
from promethean.tokenizer import ByteTokenizer
from tests.conftest import TINY_PRESETS, build

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = ByteTokenizer()
# Relative L2 error of the logits against fp32, for random-weight tiny models. bf16 keeps 8
# significant bits (a rounding of at most 2^-9 = 0.2% per number) and int8 rounds each weight to
# 1/254 of its row's largest magnitude (and multiplies bf16 activations); both errors grow through
# the layers. Measured: at most 1.8% (bf16) and 3.8% (int8), on tiny-gemma3, whose sandwich norms
# and sqrt(width) embedding scale amplify them; the bounds leave about 1.6x headroom.
LOGIT_TOLERANCE = {"bf16": 0.03, "int8": 0.06}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, top_k=None)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want).norm() / want.norm())


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_prepared_logits_are_close_to_fp32(preset, dtype):
    reference = build(preset)
    prepared = prepare_for_inference(build(preset), dtype)
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, reference.config.vocab_size, (2, 12), generator=generator)
    with torch.no_grad():
        want = reference(idx).logits
        got = prepared(idx).logits
    assert relative_error(got, want) <= LOGIT_TOLERANCE[dtype]
    # Decoding with the cache gives the logits of a full forward (same weights, same kernels).
    with torch.no_grad():
        cache = prepared.new_cache(2)
        prepared(idx[:, :8], cache=cache)
        step = prepared(idx[:, 8:9], cache=cache, last_logits_only=True).logits
    assert relative_error(step, got[:, 8:9].float()) <= 0.01


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-llama", "tiny-sssm"])
def test_int8_stores_the_projections_as_int8_in_a_quarter_of_the_bytes(preset):
    model = build(preset)
    fp32_linear_bytes = sum(
        module.weight.numel() * 4
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not name.endswith(("x_proj", "dt_proj"))
    )
    tied = model.config.tie_embeddings
    prepare_for_inference(model, "int8")
    if kernels.available():  # the kernels' panels: int8, with fp32 scales per weight row
        linears = [m for name, m in model.named_modules() if isinstance(m, KernelLinear)
                   and not name.endswith(("x_proj", "dt_proj"))]
        assert all(m.packed.dtype == torch.int8 and m.weight_format == "int8" for m in linears)
        assert isinstance(model.lm_head, KernelLinear)
        if tied:  # still one matrix: the embedding reads the head's panels
            assert isinstance(model.token_embedding, PackedEmbedding)
            assert model.token_embedding.head[0] is model.lm_head
        else:
            assert isinstance(model.token_embedding, Int8Embedding)
    else:
        linears = [m for m in model.modules() if isinstance(m, Int8Linear)]
        assert all(m.weight.dtype == torch.int8 for m in linears)
        assert isinstance(model.lm_head, Int8Linear)
        assert isinstance(model.token_embedding, Int8Embedding)
        assert (model.token_embedding.weight is model.lm_head.weight) == tied
    int8_bytes = sum(m.weight_bytes() for m in linears)
    # 1 byte per weight plus a scale per row of 128+ weights (4 bytes with Promethean's kernels,
    # 2 with PyTorch's): at least 3.85x smaller.
    assert fp32_linear_bytes / int8_bytes >= 3.85
    remaining = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.endswith(("x_proj", "dt_proj"))
    ]
    assert remaining == []


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_generate_and_the_engine_decode_prepared_models(preset, dtype):
    model = prepare_for_inference(build(preset), dtype)
    prompts = [TOKENIZER.encode("Once upon a time"), TOKENIZER.encode("xyz " * 6)]
    expected = [generate(model, [prompt], greedy(24))[0] for prompt in prompts]
    assert all(len(completion.token_ids) == 24 for completion in expected)
    engine = Engine(model, TOKENIZER, max_batch_size=4)
    try:
        handles = [engine.submit(prompt, greedy(24)) for prompt in prompts]
        results = [handle.result(timeout=60) for handle in handles]
    finally:
        engine.shutdown()
    # The engine decodes both rows together, one left-padded: the same tokens as one at a time.
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]


def test_an_unknown_dtype_is_refused_in_one_sentence():
    with pytest.raises(PrometheanError) as error:
        prepare_for_inference(build("tiny-gpt2"), "int4")
    assert str(error.value) == "unknown inference dtype 'int4'; use one of fp32, bf16, fp16, int8."


@pytest.mark.parametrize("first", ["fp32", "bf16", "int8"])
def test_preparing_twice_is_refused(first):
    model = prepare_for_inference(build("tiny-gpt2"), first)
    with pytest.raises(PrometheanError) as error:
        prepare_for_inference(model, "int8")
    assert str(error.value) == (
        f"this model was already prepared for inference in {first}; load it again in fp32 to "
        "prepare it in another dtype."
    )


def test_a_non_fp32_model_and_an_unmerged_adapter_are_refused():
    refusal = "needs an fp32 model, but 'token_embedding.weight' is bfloat16"
    with pytest.raises(PrometheanError, match=refusal):
        prepare_for_inference(build("tiny-gpt2").to(torch.bfloat16), "int8")
    from promethean.continual.adapters import Adapters, LoraConfig

    model = build("tiny-llama")
    adapters = Adapters(model)
    adapters.add("domain", LoraConfig(rank=2))
    refusal = ("'blocks.0.attn.q_proj' carries the unmerged adapter 'domain'; merge the adapter "
               "into the weights")
    with pytest.raises(PrometheanError, match=refusal):
        prepare_for_inference(model, "int8")
    adapters.merge("domain")
    prepare_for_inference(model, "int8")  # merged: the adapter is in the weights


def test_a_hook_of_the_users_that_reads_the_adapters_is_not_taken_for_theirs():
    # An adapter's hook is known by its type, not by what a closure holds: a probe that refers
    # to the adapters is still a hook that converting the layer would drop.
    from promethean.continual.adapters import Adapters, LoraConfig, LoraHook
    from promethean.model.hooks import AdapterHook

    model = build("tiny-llama")
    adapters = Adapters(model)
    adapters.add("domain", LoraConfig(rank=2))
    adapters.merge("domain")
    up = model.blocks[0].mlp.up_proj
    assert [type(hook) for hook in up._forward_hooks.values()] == [LoraHook]
    assert isinstance(next(iter(up._forward_hooks.values())), AdapterHook)
    active = []
    up.register_forward_hook(lambda _module, _args, _output: active.append(adapters.active))
    with pytest.raises(PrometheanError) as error:
        prepare_for_inference(model, "int8")
    assert str(error.value) == ("'blocks.0.mlp.up_proj' carries a forward hook that converting it "
                                "for inference would drop; remove the hook first.")


def test_int8_falls_back_to_bf16_with_a_warning_where_the_kernel_fails(monkeypatch):
    from promethean.inference import quantize

    monkeypatch.setattr(quantize, "_int8_kernel_works", lambda device_type: False)
    monkeypatch.setattr(quantize.kernels, "available", lambda: False)  # nor Promethean's own
    warning = "int8 inference is not supported on cpu here .* runs in bf16"
    with pytest.warns(UserWarning, match=warning):
        model = prepare_for_inference(build("tiny-gpt2"), "int8")
    assert model.inference_dtype == "bf16"
    assert not any(isinstance(m, Int8Linear) for m in model.modules())
    assert len(generate(model, [[1, 2, 3]], greedy(5))[0].token_ids) == 5


def test_a_prepared_bf16_model_can_be_deep_copied():
    model = prepare_for_inference(build("tiny-llama"), "bf16")
    twin = copy.deepcopy(model)
    idx = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(model(idx).logits, twin(idx).logits)


# ---------------------------------------------------------------------- a trained model
def validation_loss(model, dataset) -> float:
    from promethean.data.batches import evaluate

    return evaluate(model, dataset, "val", batch_size=8, block_size=64).loss


def test_validation_loss_rises_at_most_1_percent_in_bf16_and_3_percent_in_int8(trained_checkpoint):
    directory, dataset = trained_checkpoint
    reference = validation_loss(load_checkpoint(directory).model.eval(), dataset)
    assert reference < 3.0  # trained: far below a uniform guess over 256 bytes (ln 256 = 5.5)
    for dtype, bound in (("bf16", 1.01), ("int8", 1.03)):
        model = prepare_for_inference(load_checkpoint(directory).model, dtype)
        assert validation_loss(model, dataset) <= bound * reference, dtype


def test_cli_generates_in_int8_and_refuses_an_unknown_dtype(trained_checkpoint):
    directory, _ = trained_checkpoint
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "promethean", "generate", str(directory), "-p", "def ",
               "--max-new-tokens", "24", "--temperature", "0", "--seed", "0"]
    done = subprocess.run([*command, "--dtype", "int8"], capture_output=True, text=True,
                          timeout=120, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    model = prepare_for_inference(load_checkpoint(directory).model, "int8")
    params = SamplingParams(max_new_tokens=24, temperature=0.0, top_k=None,
                            stop_token_ids=(TOKENIZER.eot_id,))
    expected = generate(model, [TOKENIZER.encode("def ")], params, tokenizer=TOKENIZER)[0]
    assert done.stdout == "def " + expected.text + "\n"
    refused = subprocess.run([*command, "--dtype", "int3"], capture_output=True, text=True,
                             timeout=120, env=env, cwd=REPO)
    assert refused.returncode == 1
    assert refused.stderr == (
        "error: unknown inference dtype 'int3'; use one of fp32, bf16, fp16, int8.\n"
    )


def test_the_cli_merges_an_adapter_into_fp32_weights_before_quantizing(tmp_path):
    from promethean.checkpoint import save_checkpoint
    from promethean.cli import _load_model
    from promethean.continual.adapters import (
        Adapters,
        adapter_directory,
        checkpoint_sha256,
        load_adapter_onto,
    )

    directory = tmp_path / "model"
    save_checkpoint(directory, build("tiny-llama"), TOKENIZER)
    adapters = Adapters(load_checkpoint(directory).model, base_sha256=checkpoint_sha256(directory))
    adapters.add("loud", rank=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a random B, so that the adapter changes the outputs
        for key, tensor in adapters.trainable_parameters("loud").items():
            if key.endswith("lora_B"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    adapters.save("loud", adapter_directory(directory, "loud"))

    loaded, _ = _load_model(str(directory), "cpu", "int8", adapter="loud")
    assert loaded.inference_dtype == "int8"
    merged_first = load_checkpoint(directory).model
    load_adapter_onto(merged_first, directory, "loud")
    prepare_for_inference(merged_first, "int8")
    plain = prepare_for_inference(load_checkpoint(directory).model, "int8")
    idx = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        got = loaded(idx).logits
        assert torch.equal(got, merged_first(idx).logits)
        assert relative_error(got, plain(idx).logits.float()) > 0.05  # the adapter is there


def test_the_decode_benchmark_counts_the_bytes_a_prepared_model_reads_per_token():
    from benchmarks.decode import weight_bytes_per_token

    fp32 = weight_bytes_per_token(build("tiny-gpt2"))
    bf16 = weight_bytes_per_token(prepare_for_inference(build("tiny-gpt2"), "bf16"))
    int8 = weight_bytes_per_token(prepare_for_inference(build("tiny-gpt2"), "int8"))
    # Half of fp32 but for what stays fp32 (biases, norms; with PyTorch's kernels the packed
    # matrices are counted and oneDNN's copies for several rows are not); the tied head once.
    assert 0.5 <= bf16 / fp32 < 0.51
    # 1 byte per matrix weight plus scales, biases and norms: just over a quarter.
    assert 0.25 < int8 / fp32 < 0.27


def _mapping_flags(address: int) -> set[str]:
    """The VmFlags of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return set(line.split()[1:])
    return set()


def _huge_pages_or_skip() -> None:
    from promethean.inference.kernel_layers import huge_page_bytes

    if huge_page_bytes(1) is None:
        pytest.skip("this OS has no madvise(MADV_HUGEPAGE): the panels stay on ordinary pages")


def test_the_huge_page_arena_is_advised_for_2mb_pages_and_aligned_to_them():
    from promethean.inference.kernel_layers import HUGE_PAGE, huge_page_bytes

    _huge_pages_or_skip()
    arena = huge_page_bytes(5 << 20)
    assert arena.dtype == torch.uint8 and arena.numel() == 5 << 20
    assert arena.data_ptr() % HUGE_PAGE == 0
    assert int(arena.sum()) == 0  # fresh anonymous memory reads as zeros
    if not Path("/proc/self/smaps").exists():
        pytest.skip("no /proc/self/smaps to read the mapping's flags from")
    # "hg": the mapping carries MADV_HUGEPAGE (whether the kernel then grants 2 MB pages depends
    # on its transparent_hugepage mode and free memory, not on us).
    assert "hg" in _mapping_flags(arena.data_ptr())


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-gemma3"])
def test_panels_moved_to_huge_pages_give_the_same_logits_and_tokens(preset, dtype, monkeypatch):
    from promethean.inference import kernel_layers
    from tests.conftest import trained_like

    _huge_pages_or_skip()
    monkeypatch.setattr(kernel_layers, "HUGE_PAGE_MINIMUM", 1 << 62)  # never moves
    stayed = prepare_for_inference(trained_like(build(preset)), dtype)
    monkeypatch.setattr(kernel_layers, "HUGE_PAGE_MINIMUM", 0)  # tiny models move too
    moved = prepare_for_inference(trained_like(build(preset)), dtype)
    layers = [m for m in moved.modules() if isinstance(m, KernelLinear)]
    storages = {layer.packed.untyped_storage().data_ptr() for layer in layers}
    assert len(storages) == 1, "every layer's panels are views of the one mapping"
    assert all(not m.packed.untyped_storage().data_ptr() in storages
               for m in stayed.modules() if isinstance(m, KernelLinear))
    idx = torch.randint(0, moved.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(moved(idx).logits, stayed(idx).logits)
    prompts = [idx[0].tolist(), idx[1, :6].tolist()]
    want = [c.token_ids for c in generate(stayed, prompts, greedy(8))]
    assert [c.token_ids for c in generate(moved, prompts, greedy(8))] == want
    # A copy gets ordinary memory of its own, and decodes alike.
    copied = copy.deepcopy(moved)
    copied_layers = [m for m in copied.modules() if isinstance(m, KernelLinear)]
    assert all(m.packed.untyped_storage().data_ptr() not in storages for m in copied_layers)
    assert [c.token_ids for c in generate(copied, prompts, greedy(8))] == want
