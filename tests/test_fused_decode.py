"""The fused decode step (`promethean/inference/fused_decode.py`): every block of a decode step in
one call of Promethean's kernels, bit-identical to the model's kernel layers."""

import copy

import pytest
import torch

from promethean.config import load_preset
from promethean.errors import PrometheanError
from promethean.inference import fused_decode, kernels
from promethean.inference.generate import GREEDY, generate
from promethean.inference.quantize import prepare_for_inference
from promethean.model import Transformer
from tests.conftest import trained_like

needs_kernels = pytest.mark.skipif(
    not kernels.available(), reason=f"Promethean's kernels cannot run here: "
    f"{kernels.unavailable_reason()}"
)


CONFIGS = {
    "tiny-gpt2": lambda: load_preset("tiny-gpt2").model,  # LayerNorm, GELU, learned positions
    "tiny-llama": lambda: load_preset("tiny-llama").model,  # RMSNorm, SwiGLU, RoPE, GQA 4:1
    # QK-norm, sandwich norms, unit-offset RMSNorm, GeGLU, scaled embeddings, dual RoPE, and
    # sliding-window layers with a window of 4, so that their caches compact as they decode.
    "tiny-gemma3": lambda: load_preset("tiny-gemma3").model.model_copy(
        update={"sliding_window": 4}),
}


def prepared(name: str, dtype: str) -> Transformer:
    torch.manual_seed(0)
    return prepare_for_inference(trained_like(Transformer(CONFIGS[name]())), dtype)


def count_fused_steps(model: Transformer) -> list[int]:
    calls = [0]
    step = model.fused_decode.step

    def counted(*args):
        calls[0] += 1
        return step(*args)

    model.fused_decode.step = counted
    return calls


@torch.inference_mode()
def decode(model: Transformer, prompt: list[int], tokens: list[int], capacity: int):
    """Logits of the prompt's last position and of each fed token, and the cache."""
    cache = model.new_cache(1, capacity=capacity)
    logits = [model(torch.tensor([prompt]), cache=cache).logits[:, -1]]
    for token in tokens:
        logits.append(model(torch.tensor([[token]]), cache=cache).logits[:, -1])
    return torch.cat(logits), cache


@needs_kernels
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_fused_steps_give_the_module_paths_logits_and_cache_bit_for_bit(name, dtype):
    model = prepared(name, dtype)
    assert model.fused_decode is not None
    calls = count_fused_steps(model)
    prompt, tokens = [5, 17, 3, 99, 42], [7, 8, 250, 1, 0, 64, 33, 2, 11, 19, 300, 4]
    # Capacity 8: the cache is full after three new tokens (and again at 16); each of those
    # steps takes the layers, which grow the buffers (or compact a windowed layer's), and the
    # fused step carries on in the grown cache.
    fused, fused_cache = decode(model, prompt, tokens, capacity=8)
    assert calls[0] >= len(tokens) - 3  # (windowed layers also compact now and then)
    model.fused_decode = None
    plain, plain_cache = decode(model, prompt, tokens, capacity=8)
    assert torch.equal(fused, plain)
    for mine, theirs in zip(fused_cache.layers, plain_cache.layers):
        assert (mine.first_slot, mine.filled) == (theirs.first_slot, theirs.filled)
        assert torch.equal(mine.keys[:, :, : mine.filled], theirs.keys[:, :, : theirs.filled])
        assert torch.equal(mine.values[:, :, : mine.filled], theirs.values[:, :, : theirs.filled])


@needs_kernels
def test_generation_with_the_fused_step_gives_the_same_tokens():
    model = prepared("tiny-llama", "int8")
    calls = count_fused_steps(model)
    fused = generate(model, [[1, 2, 3, 4]], GREEDY)[0].token_ids
    assert calls[0] == len(fused) - 1  # every step after the prompt's
    model.fused_decode = None
    assert fused == generate(model, [[1, 2, 3, 4]], GREEDY)[0].token_ids


@torch.inference_mode()
def decode_padded_batch(model: Transformer, steps: int):
    """Three prompts of 5, 3 and 1 tokens, left-padded into one batch (as `generate` and the
    serving engine batch them), then `steps` tokens per row."""
    prompts = torch.tensor([[5, 17, 3, 99, 42], [0, 0, 8, 250, 1], [0, 0, 0, 0, 64]])
    cache = model.new_cache(3, capacity=8, left_padding=torch.tensor([0, 2, 4]))
    logits = [model(prompts, cache=cache).logits[:, -1]]
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        tokens = torch.randint(0, model.config.vocab_size, (3, 1), generator=generator)
        logits.append(model(tokens, cache=cache).logits[:, -1])
    return torch.stack(logits), cache


@needs_kernels
@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_a_left_padded_batch_steps_bit_for_bit_like_the_module_path(name, dtype):
    # The padded rows see only their own slots, and LLaMA's rotary tables their own positions.
    model = prepared(name, dtype)
    calls = count_fused_steps(model)
    fused, fused_cache = decode_padded_batch(model, steps=6)
    assert calls[0] >= 4  # the cache fills once (8 slots); that step grows or compacts it
    model.fused_decode = None
    plain, plain_cache = decode_padded_batch(model, steps=6)
    assert torch.equal(fused, plain)
    for mine, theirs in zip(fused_cache.layers, plain_cache.layers):
        assert torch.equal(mine.keys[:, :, : mine.filled], theirs.keys[:, :, : theirs.filled])


@needs_kernels
def test_prompts_training_gradients_and_hooks_keep_the_module_path():
    model = prepared("tiny-gpt2", "fp32")
    calls = count_fused_steps(model)
    learning = model.new_cache(1, capacity=16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=learning)
    model(torch.tensor([[4]]), cache=learning)  # gradients enabled: the step has no backward
    cache = model.new_cache(1, capacity=16)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        model(torch.tensor([[4, 5]]), cache=cache)  # two new tokens: not a decode step
        model(torch.tensor([[6]]), cache=cache)  # a decode step: the only fused one here
        # A hook on a module the step stands in for (here one that changes the output) must
        # run: the layers do.
        up = model.blocks[1].mlp.up_proj
        hook = up.register_forward_hook(lambda _module, _args, output: output * 0)
        hooked = model(torch.tensor([[7]]), cache=cache).logits
        hook.remove()
        model(torch.tensor([[8]]), cache=cache)
        assert calls[0] == 2  # the hook gone, the step is back
        hook = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
        model(torch.tensor([[9]]), cache=cache)
        hook.remove()
        model.train()
        model(torch.tensor([[10]]), cache=cache)
    assert calls[0] == 2
    model.eval()
    model.fused_decode = None
    with torch.inference_mode():  # the same calls on the module path throughout
        plain = model.new_cache(1, capacity=16)
        for ids in ([[1, 2, 3]], [[4, 5]], [[6]]):
            model(torch.tensor(ids), cache=plain)
        hook = up.register_forward_hook(lambda _module, _args, output: output * 0)
        assert torch.equal(model(torch.tensor([[7]]), cache=plain).logits, hooked)
        hook.remove()


@needs_kernels
@pytest.mark.parametrize("where", ["final_norm", "lm_head"])
def test_the_step_ends_with_the_head_and_a_hook_there_still_runs(where):
    model = prepared("tiny-llama", "bf16")
    assert model.fused_decode.returns_logits
    calls = count_fused_steps(model)
    with torch.inference_mode():
        cache = model.new_cache(1, capacity=16)
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        logits = model(torch.tensor([[4]]), cache=cache).logits
        assert calls[0] == 1 and logits.shape == (1, 1, model.config.vocab_size)
        assert logits.dtype == torch.bfloat16 and bool(logits.abs().sum() > 0)
        hook = getattr(model, where).register_forward_hook(lambda _m, _a, output: output * 0)
        hooked = model(torch.tensor([[5]]), cache=cache).logits
        hook.remove()
        assert calls[0] == 1 and not bool(hooked.abs().sum())  # the layers ran, and the hook
        model(torch.tensor([[6]]), cache=cache)
        assert calls[0] == 2


@needs_kernels
def test_a_prepared_model_refuses_a_conversion_in_a_sentence():
    model = prepared("tiny-gpt2", "int8")
    before, _ = decode(model, [1, 2, 3], [4, 5], capacity=8)
    model.to("cpu")  # changes nothing: allowed, and the step is gathered again
    assert model.fused_decode is not None
    assert torch.equal(decode(model, [1, 2, 3], [4, 5], capacity=8)[0], before)
    with pytest.raises(PrometheanError, match="^a model prepared for inference cannot be "
                       r"converted with \.to\(\) or \.float\(\); load the checkpoint again\.$"):
        model.float()


@needs_kernels
def test_models_the_step_cannot_express_keep_the_layers_and_say_why():
    torch.manual_seed(0)
    model = prepare_for_inference(Transformer(load_preset("tiny-sssm").model), "bf16")
    assert model.fused_decode is None
    assert fused_decode.install(model) == "layer 0 is an SSM mixer"
    plain = Transformer(load_preset("tiny-gpt2").model)
    assert (fused_decode.install(plain)
            == "layer 0 is not on the kernels' layers (prepare the model first)")


@needs_kernels
def test_a_cache_without_room_is_refused():
    model = prepared("tiny-gpt2", "bf16")
    step = model.fused_decode
    with torch.inference_mode():
        cache = model.new_cache(1, capacity=4)
        model(torch.tensor([[1, 2, 3, 4]]), cache=cache)
        assert not step.can_step(cache)
        x = torch.zeros(1, 1, model.config.n_embd, dtype=torch.bfloat16)
        layers = cache.layers
        with pytest.raises(RuntimeError, match="a cache buffer has no room for the new token"):
            kernels.decode_blocks(x, step.params, [layer.keys for layer in layers],
                                  [layer.values for layer in layers], [0] * len(layers),
                                  [layer.filled for layer in layers], step.windows, [], None, 4,
                                  step.shape, step.reals)


@needs_kernels
def test_a_deep_copied_model_steps_with_its_own_tensors():
    model = prepared("tiny-gpt2", "bf16")
    twin = copy.deepcopy(model)
    twin_params = {id(tensor) for tensor in twin.fused_decode.params if tensor is not None}
    assert twin_params.isdisjoint(id(tensor) for tensor in model.fused_decode.params)
    assert twin.fused_decode.params[2] is twin.blocks[0].attn.qkv_proj.packed
    first, _ = decode(model, [1, 2, 3], [4, 5], capacity=8)
    again, _ = decode(twin, [1, 2, 3], [4, 5], capacity=8)
    assert torch.equal(first, again)
    with torch.no_grad():
        twin.blocks[0].attn.qkv_proj.packed.zero_()  # the twin's step must see its own weights
    changed, _ = decode(twin, [1, 2, 3], [4, 5], capacity=8)
    assert not torch.equal(changed, first)
    assert torch.equal(decode(model, [1, 2, 3], [4, 5], capacity=8)[0], first)
