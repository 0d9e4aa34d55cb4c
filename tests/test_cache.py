"""The decode cache's batching operations (promethean.model.cache): rows prefilled apart and
joined in one cache, then left again, decode as they would alone."""

import pytest
import torch

from promethean.model.cache import KVCache
from tests.conftest import build, trained_like

SHORT, LONG = [5, 17, 9], [3, 8, 21, 4, 30, 2, 11]


def prefilled(model, prompt: list[int]) -> tuple[KVCache, torch.Tensor]:
    cache = model.new_cache(1, capacity=32)
    logits = model(torch.tensor([prompt]), cache=cache).logits[:, -1]
    return cache, logits


def decoded_alone(model, prompt: list[int], steps: list[int]) -> list[torch.Tensor]:
    """The last-position logits after the prompt and after each token of `steps`, row alone."""
    cache, logits = prefilled(model, prompt)
    found = [logits[0]]
    for token in steps:
        found.append(model(torch.tensor([[token]]), cache=cache).logits[0, -1])
    return found


@pytest.mark.parametrize("family", ["tiny-gpt2", "tiny-gemma3", "tiny-sssm"])
@pytest.mark.parametrize("first", [SHORT, LONG], ids=["short-first", "long-first"])
@torch.no_grad()
def test_rows_joined_and_left_decode_as_alone(family, first):
    # A window of 4 is shorter than the long prompt: its sliding layers have dropped slots.
    overrides = {"sliding_window": 4} if family == "tiny-gemma3" else {}
    model = trained_like(build(family, **overrides))
    second = LONG if first is SHORT else SHORT
    steps = [7, 12, 1]
    alone = {tuple(prompt): decoded_alone(model, prompt, steps) for prompt in (first, second)}

    batch, _ = prefilled(model, first)
    newcomer, _ = prefilled(model, second)
    batch.concat_rows(newcomer)
    assert batch.batch_size == 2 and batch.length == len(LONG)
    padding = [len(LONG) - len(first), len(LONG) - len(second)]
    assert batch.padding_per_row().tolist() == padding
    logits = model(torch.tensor([[steps[0]], [steps[0]]]), cache=batch).logits[:, -1]
    for row, prompt in enumerate((first, second)):
        torch.testing.assert_close(logits[row], alone[tuple(prompt)][1], rtol=1e-4, atol=1e-5)

    # The long row leaves: the short one's padding columns go, and it decodes on alone.
    short_row = 0 if first is SHORT else 1
    batch.select_rows(torch.tensor([short_row]))
    batch.trim_common_padding()
    assert (batch.batch_size, batch.length) == (1, len(SHORT) + 1)
    assert batch.padding_per_row().tolist() == [0]
    for index, token in enumerate(steps[1:], start=2):
        logits = model(torch.tensor([[token]]), cache=batch).logits[0, -1]
        torch.testing.assert_close(logits, alone[tuple(SHORT)][index], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_padding_added_in_front_moves_no_key():
    model = trained_like(build("tiny-llama"))
    cache, _ = prefilled(model, SHORT)
    held = [layer.held()[0].clone() for layer in cache.layers]
    cache.pad_left(3)
    assert (cache.length, cache.padding_per_row().tolist()) == (len(SHORT) + 3, [3])
    for layer, keys in zip(cache.layers, held):
        assert torch.equal(layer.held()[0][:, :, 3:], keys)
    assert cache.device == torch.device("cpu")
