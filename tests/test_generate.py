import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from promethean.config import list_presets, load_preset
from promethean.errors import PrometheanError
from promethean.inference.generate import (
    GREEDY,
    SamplingParams,
    generate,
    generate_text,
    process_logits,
    stream,
    stream_tokens,
)
from promethean.model import Transformer, TransformerOutput
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build

TOKENIZER = ByteTokenizer()


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, top_k=None, **kwargs)


@pytest.mark.parametrize("preset", list_presets())
def test_greedy_with_cache_equals_greedy_without_it_on_every_preset(preset):
    full_size = not preset.startswith("tiny-")
    config = load_preset(preset).model
    torch.manual_seed(0)
    model = Transformer(config).eval()
    prompt_length, new_tokens = (6, 6) if full_size else (40, 40)
    torch.manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (prompt_length,)).tolist()
    cached = generate(model, [prompt], greedy(new_tokens))[0]
    uncached = generate(model, [prompt], greedy(new_tokens), use_cache=False)[0]
    assert len(cached.token_ids) == new_tokens
    assert cached.token_ids == uncached.token_ids


def test_a_batch_of_uneven_prompts_equals_each_prompt_alone(tiny_model):
    prompts = [TOKENIZER.encode(text) for text in ["Hi", "The cat sat on the mat " * 3, "a"]]
    batched = generate(tiny_model, prompts, greedy(45))
    for prompt, completion in zip(prompts, batched):
        alone = generate(tiny_model, [prompt], greedy(45), use_cache=False)[0]
        assert completion.token_ids == alone.token_ids


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    model = build("tiny-gpt2")
    params = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    first = generate(model, [[1, 2, 3]], params)[0].token_ids
    assert first == generate(model, [[1, 2, 3]], params)[0].token_ids
    other = SamplingParams(max_new_tokens=30, temperature=1.0, top_k=50, top_p=0.95, seed=8)
    assert first != generate(model, [[1, 2, 3]], other)[0].token_ids


def test_top_k_of_one_is_greedy():
    model = build("tiny-llama")
    sampled = generate(model, [[5, 6]], SamplingParams(max_new_tokens=20, temperature=1.3, top_k=1, seed=0))
    assert sampled[0].token_ids == generate(model, [[5, 6]], greedy(20))[0].token_ids


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept_k = process_logits(logits, SamplingParams(temperature=1.0, top_k=2), None)
    assert torch.isfinite(kept_k).tolist() == [[True, True, False, False]]
    kept_p = process_logits(logits, SamplingParams(temperature=1.0, top_k=None, top_p=0.8), None)
    assert torch.isfinite(kept_p).tolist() == [[True, True, False, False]]
    kept_p = process_logits(logits, SamplingParams(temperature=1.0, top_k=None, top_p=0.81), None)
    assert torch.isfinite(kept_p).tolist() == [[True, True, True, False]]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    out = process_logits(logits, SamplingParams(temperature=0, top_k=None, repetition_penalty=2.0), seen)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_repetition_penalty_changes_greedy_output():
    model = build("tiny-gpt2")
    plain = generate(model, [[1, 2]], greedy(40))[0].token_ids
    penalised = generate(model, [[1, 2]], greedy(40, repetition_penalty=5.0))[0].token_ids
    assert len(set(penalised)) > len(set(plain))


def test_stop_token_ends_the_completion_and_is_not_returned():
    model = build("tiny-gpt2")
    reference = generate(model, [[1, 2, 3]], greedy(30))[0].token_ids
    stop = reference[5]
    first = reference.index(stop)
    result = generate(model, [[1, 2, 3]], greedy(30, stop_token_ids=(stop,)))[0]
    assert result.token_ids == reference[:first]
    assert result.finish_reason == "stop"


def test_stop_string_cuts_the_text_before_it():
    model = build("tiny-llama")
    prompt = "Once upon"
    reference = generate_text(model, TOKENIZER, [prompt], greedy(40))[0]
    assert reference.finish_reason == "length"
    stop = reference.text[10:13]
    result = generate_text(model, TOKENIZER, [prompt], greedy(40, stop_strings=(stop,)))[0]
    assert result.finish_reason == "stop"
    assert result.text == reference.text[: reference.text.find(stop)]


def test_streaming_yields_the_same_text_as_generate():
    model = build("tiny-gemma3")
    params = greedy(60)
    pieces = list(stream(model, TOKENIZER, "Hello", params))
    assert len(pieces) > 1
    assert "".join(pieces) == generate_text(model, TOKENIZER, ["Hello"], params)[0].text


def test_streaming_never_shows_a_stop_string():
    model = build("tiny-gemma3")
    reference = generate_text(model, TOKENIZER, ["Hello"], greedy(60))[0].text
    stop = reference[20:24]
    pieces = list(stream(model, TOKENIZER, "Hello", greedy(60, stop_strings=(stop,))))
    assert "".join(pieces) == reference[: reference.find(stop)]


class ScriptedModel(torch.nn.Module):
    """Stands in for a model: its greedy choice at step i is script[i], whatever the input."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.config = load_preset("tiny-gpt2").model
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the loop a device to read
        self.script = script
        self.calls = 0

    def new_cache(self, batch_size, capacity=None, left_padding=None):
        return build("tiny-gpt2").new_cache(batch_size, capacity, left_padding)

    def forward(self, idx, targets=None, cache=None, last_logits_only=False):
        logits = torch.zeros(idx.shape[0], 1, self.config.vocab_size)
        logits[:, :, self.script[self.calls]] = 1.0
        self.calls += 1
        return TransformerOutput(logits, None)


def test_streaming_never_splits_a_utf8_character_or_shows_a_partial_stop_string():
    script = list("é€ab<|x".encode()) + list(b"yz")
    pieces = list(stream(ScriptedModel(script), TOKENIZER, "q", greedy(len(script), stop_strings=("<|x",))))
    assert pieces == ["é", "€", "a", "b"]


def test_prompt_longer_than_context_is_refused_unless_cropped():
    model = build("tiny-gpt2")
    prompt = list(range(100)) * 3  # 300 > 256
    with pytest.raises(PrometheanError) as error:
        generate(model, [prompt], greedy(5))
    assert str(error.value) == (
        "the prompt is 300 tokens but the model's context is 256; shorten it, or ask to crop it "
        "to the most recent tokens (--crop)."
    )
    cropped = generate(model, [prompt], greedy(5), crop=True)[0]
    assert cropped.token_ids == generate(model, [prompt[-255:]], greedy(5))[0].token_ids


def test_generation_stops_when_the_context_is_full():
    model = build("tiny-gpt2")
    result = generate(model, [list(range(250))], greedy(50))[0]
    assert len(result.token_ids) == 6
    assert result.finish_reason == "length"


def test_bad_sampling_parameters_are_refused():
    with pytest.raises(PrometheanError, match=r"top_p must be in \(0, 1\], got 1.5."):
        SamplingParams(top_p=1.5)
    with pytest.raises(PrometheanError, match="temperature must be a finite number, 0 or more, got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(PrometheanError, match="stop strings need a tokenizer"):
        generate(build("tiny-gpt2"), [[1]], greedy(3, stop_strings=("x",)))


def test_zero_new_tokens_returns_nothing():
    assert generate(build("tiny-gpt2"), [[1, 2]], greedy(0))[0].token_ids == []


def test_greedy_default_is_deterministic():
    model = build("tiny-gpt2")
    assert GREEDY.greedy
    assert generate(model, [[3]], GREEDY) == generate(model, [[3]], GREEDY)


def test_token_stream_yields_the_generated_ids_one_by_one():
    model = build("tiny-llama")
    streamed = stream_tokens(model, [4, 5, 6], greedy(25))
    first = next(streamed)
    assert [first, *streamed] == generate(model, [[4, 5, 6]], greedy(25))[0].token_ids


@settings(max_examples=300, deadline=None)
@given(
    temperature=st.one_of(st.floats(0, 2), st.sampled_from([0.0, 5e-324, 1e-300, 1e-40, 1e-6])),
    top_p=st.one_of(st.none(), st.floats(5e-324, 1), st.sampled_from([1e-300, 1e-45, 1.0])),
    top_k=st.one_of(st.none(), st.integers(1, 300)),
    penalty=st.one_of(st.floats(1e-300, 1e300), st.sampled_from([1e-300, 1.0, 1e300])),
    seed=st.integers(-(2**63), 2**64 - 1),
    scale=st.sampled_from([1.0, 30.0, 1e30]),
)
def test_sampling_never_fails_over_the_whole_accepted_range(temperature, top_p, top_k, penalty,
                                                            seed, scale):
    from promethean.inference.generate import pick_tokens, process_logits, sampling_generator

    params = SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k,
                            repetition_penalty=penalty, seed=seed)
    logits = torch.randn(2, 257, generator=torch.Generator().manual_seed(seed % 1000)) * scale
    seen = torch.zeros(2, 257, dtype=torch.bool)
    seen[:, :40] = True
    chosen = pick_tokens(process_logits(logits, params, seen), params,
                         sampling_generator(params, torch.device("cpu")))
    assert chosen.shape == (2,) and all(0 <= int(token) < 257 for token in chosen)


def test_a_temperature_below_the_greedy_threshold_is_greedy_and_a_bad_seed_is_refused():
    from promethean.inference.generate import GREEDY_BELOW_TEMPERATURE

    assert SamplingParams(temperature=1e-300).greedy
    assert not SamplingParams(temperature=GREEDY_BELOW_TEMPERATURE).greedy
    with pytest.raises(PrometheanError, match=r"^seed must be an integer from -2\*\*63 to "
                                              r"2\*\*64 - 1, got 18446744073709551616\.$"):
        SamplingParams(temperature=1.0, seed=2**64)
