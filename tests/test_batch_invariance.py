"""The README's guarantee: on Promethean's CPU kernels a sequence's logits are bit-identical
whether it is decoded alone or in any batch, left-padded or not, at any step, for every
inference dtype and every preset family; so the serving engine's greedy output under concurrent
load equals `generate` alone, and a model gives the same bits on AVX2 as on AVX-512.

Every model here has trained-like weights (non-zero biases, norm gains away from one) or is a
trained checkpoint: fresh weights would hide a bias or gain applied differently per batch."""

import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promethean.checkpoint import load_checkpoint
from promethean.inference import kernels
from promethean.inference.engine import Engine
from promethean.inference.generate import SamplingParams, generate
from promethean.inference.quantize import prepare_for_inference
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build, trained_like

pytestmark = pytest.mark.skipif(
    not kernels.available(),
    reason=f"the guarantee is the kernels', which cannot run here: {kernels.unavailable_reason()}")

TOKENIZER = ByteTokenizer()
DTYPES = ["fp32", "bf16", "int8"]
# One of each family: GPT-2, LLaMA (GQA, RoPE), Gemma-3 (sliding-window layers, here with a
# window of 6 so that their caches compact while decoding), the SSSM hybrid and a pure SSM.
FAMILIES = {
    "tiny-gpt2": {},
    "tiny-llama": {},
    "tiny-gemma3": {"sliding_window": 6},
    "tiny-sssm": {},
    "tiny-ssm": {},
}
EXAMPLES = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
_MODELS: dict = {}


def prepared(family: str, dtype: str):
    """A trained-like model of `family` prepared in `dtype` (built once per session)."""
    if (family, dtype) not in _MODELS:
        model = trained_like(build(family, **FAMILIES[family]), seed=3)
        _MODELS[family, dtype] = prepare_for_inference(model, dtype)
    return _MODELS[family, dtype]


@torch.inference_mode()
def decode(model, prompts: list[list[int]], fed: torch.Tensor, capacity: int) -> torch.Tensor:
    """(rows, steps + 1, vocab): the logits of each prompt's last position, then of each token
    fed, with the prompts left-padded into one batch as `generate` and the engine batch them."""
    longest = max(len(prompt) for prompt in prompts)
    padding = [longest - len(prompt) for prompt in prompts]
    ids = torch.tensor([[0] * pad + prompt for pad, prompt in zip(padding, prompts)])
    left_padding = torch.tensor(padding) if any(padding) else None
    cache = model.new_cache(len(prompts), capacity=capacity, left_padding=left_padding)
    logits = [model(ids, cache=cache, last_logits_only=True).logits[:, -1]]
    for step in range(fed.shape[1]):
        logits.append(model(fed[:, step : step + 1], cache=cache).logits[:, -1])
    return torch.stack(logits, dim=1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
@EXAMPLES
@given(data=st.data())
def test_a_rows_logits_do_not_depend_on_the_batch_it_is_decoded_in(family, dtype, data):
    model = prepared(family, dtype)
    vocab = model.config.vocab_size
    tokens = st.integers(0, vocab - 1)
    prompt = data.draw(st.lists(tokens, min_size=1, max_size=14), label="prompt")
    others = data.draw(st.lists(st.lists(tokens, min_size=1, max_size=20), min_size=1,
                                max_size=3), label="others")
    position = data.draw(st.integers(0, len(others)), label="position")
    steps = data.draw(st.integers(1, 8), label="steps")
    capacity = data.draw(st.sampled_from([4, 16, 64]), label="capacity")  # growth mid-decode
    seed = data.draw(st.integers(0, 2**16), label="seed")
    generator = torch.Generator().manual_seed(seed)
    batch = others[:position] + [prompt] + others[position:]
    fed = torch.randint(0, vocab, (len(batch), steps), generator=generator)
    alone = decode(model, [prompt], fed[position : position + 1], capacity)[0]
    together = decode(model, batch, fed, capacity)[position]
    assert torch.equal(alone, together)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-gemma3", "tiny-sssm"])
def test_a_prompt_prefilled_in_pieces_gives_the_logits_of_one_prefill(family, dtype):
    """Whatever way a sequence reaches the cache (a prompt at once, in chunks, token by token),
    each position computes alike: what prefix reuse and chunked prefill rely on."""
    model = prepared(family, dtype)
    sequence = torch.randint(0, model.config.vocab_size, (1, 13),
                             generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        whole = model(sequence, cache=model.new_cache(1, capacity=16)).logits
        cache = model.new_cache(1, capacity=4)
        pieces = [model(sequence[:, a:b], cache=cache).logits
                  for a, b in ((0, 5), (5, 6), (6, 11), (11, 12), (12, 13))]
    assert torch.equal(torch.cat(pieces, dim=1), whole)


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, top_k=None)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-llama", "tiny-gemma3", "tiny-sssm"])
def test_the_engines_greedy_replies_under_concurrent_load_equal_generate_alone(family, dtype):
    model = prepared(family, dtype)
    generator = torch.Generator().manual_seed(1)
    requests = [
        (torch.randint(0, 256, (int(length),), generator=generator).tolist(), int(budget))
        for length, budget in zip(torch.randint(1, 40, (12,), generator=generator),
                                  torch.randint(1, 30, (12,), generator=generator))
    ]
    expected = [generate(model, [prompt], greedy(budget))[0].token_ids
                for prompt, budget in requests]
    engine = Engine(model, TOKENIZER, max_batch_size=5, max_queue=64)
    results: dict[int, list[int]] = {}
    try:
        def client(indices):
            for index in indices:  # arrivals spread over the run: rows join and leave batches
                time.sleep(0.002 * (index % 3))
                prompt, budget = requests[index]
                results[index] = engine.submit(prompt, greedy(budget)).result(timeout=120).token_ids

        threads = [threading.Thread(target=client, args=(range(i, len(requests), 4),))
                   for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
    finally:
        engine.shutdown()
    assert [results.get(i) for i in range(len(requests))] == expected
    assert engine.peak_batch_size >= 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_trained_checkpoint_replies_alike_alone_and_among_other_requests(dtype,
                                                                           trained_checkpoint):
    directory, _ = trained_checkpoint
    model = prepare_for_inference(load_checkpoint(directory).model, dtype)
    prompts = [TOKENIZER.encode(text) for text in
               ["def ", "import os\n", "class Parser:\n    def __init__(self", "    return "]]
    expected = [generate(model, [prompt], greedy(30))[0].token_ids for prompt in prompts]
    together = generate(model, prompts, greedy(30))
    assert [completion.token_ids for completion in together] == expected
    engine = Engine(model, TOKENIZER, max_batch_size=4)
    try:
        handles = [engine.submit(prompt, greedy(30)) for prompt in prompts]
        assert [handle.result(timeout=60).token_ids for handle in handles] == expected
    finally:
        engine.shutdown()


@pytest.mark.skipif(kernels.available() and kernels.instruction_set() != "avx512",
                    reason="this CPU lacks AVX-512 with bf16 and VNNI, so only the AVX2 kernels "
                    "run here and there is no second instruction set to compare with")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_model_gives_the_same_logits_on_avx2_as_on_avx512(family, dtype):
    model = prepared(family, dtype)
    prompts = [[5, 17, 3, 99, 42, 7, 1], [8, 250]]
    fed = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    wide = decode(model, prompts, fed, capacity=8)
    kernels.use_instruction_set("avx2")
    try:
        narrow = decode(model, prompts, fed, capacity=8)
    finally:
        kernels.use_instruction_set("avx512")
    assert torch.equal(wide, narrow)
