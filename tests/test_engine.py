import threading
import time

import pytest

from promethean.errors import PrometheanError
from promethean.inference.engine import Engine, QueueFullError
from promethean.inference.generate import SamplingParams, generate
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build

TOKENIZER = ByteTokenizer()


def greedy(n: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_new_tokens=n, temperature=0.0, top_k=None, **kwargs)


@pytest.fixture
def engine_for():
    engines = []

    def make(model, **kwargs):
        engine = Engine(model, TOKENIZER, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.shutdown()


PROMPTS = ["Hi", "The cat sat on the mat " * 3, "a", "Once upon a time", "xyz " * 9]


def test_concurrent_greedy_requests_equal_generate_one_at_a_time(tiny_model, engine_for, one_thread):
    engine = engine_for(tiny_model, max_batch_size=8)
    prompts = [TOKENIZER.encode(text) for text in PROMPTS]
    lengths = [70, 50, 45, 30, 25]
    handles = []
    for prompt, length in zip(prompts, lengths):
        # Each request joins a batch that is already decoding: some are shorter than the rows
        # there, some longer (then the batch is left-padded to the newcomer).
        handle = engine.submit(prompt, greedy(length))
        next(handle.events())
        handles.append(handle)
    for prompt, length, handle in zip(prompts, lengths, handles):
        expected = generate(tiny_model, [prompt], greedy(length))[0]
        got = handle.result(timeout=60)
        assert got.token_ids == expected.token_ids
        assert got.finish_reason == expected.finish_reason
    assert engine.peak_batch_size >= 3


def test_requests_submitted_together_and_a_late_joiner_match_generate(
    tiny_model, engine_for, one_thread
):
    model = tiny_model  # the newcomers are prefilled together, left-padded, then merged
    engine = engine_for(model, max_batch_size=4)
    prompts = [TOKENIZER.encode(text) for text in PROMPTS]
    handles = [engine.submit(p, greedy(40)) for p in prompts]  # more than the batch holds
    late = engine.submit(TOKENIZER.encode("late " * 20), greedy(20))
    assert late.result(timeout=60)
    assert engine.peak_batch_size == 4
    for prompt, handle in zip(prompts, handles):
        assert handle.result(timeout=60).token_ids == generate(model, [prompt], greedy(40))[0].token_ids
    expected = generate(model, [TOKENIZER.encode("late " * 20)], greedy(20))[0]
    assert late.result(timeout=60).token_ids == expected.token_ids


def test_streamed_text_and_stop_strings_match_generate(engine_for, one_thread):
    model = build("tiny-llama")
    engine = engine_for(model)
    prompt = TOKENIZER.encode("Hello there")
    free = generate(model, [prompt], greedy(30), tokenizer=TOKENIZER)[0]
    stop = free.text[10:13]
    params = greedy(30, stop_strings=(stop,))
    expected = generate(model, [prompt], params, tokenizer=TOKENIZER)[0]
    handle = engine.submit(prompt, params)
    events = list(handle.events())
    assert "".join(event.text for event in events) == expected.text
    assert all(stop not in event.text for event in events)
    assert events[-1].completion.text == expected.text
    assert events[-1].completion.finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_equals_generate(engine_for, one_thread):
    model = build("tiny-gpt2")
    engine = engine_for(model)
    params = SamplingParams(max_new_tokens=25, temperature=1.0, top_k=50, top_p=0.95, seed=7)
    handles = [engine.submit([1, 2, 3], params), engine.submit([4, 5, 6, 7, 8], greedy(10)),
               engine.submit([1, 2, 3], params)]
    results = [handle.result(timeout=60) for handle in handles]
    assert results[0].token_ids == results[2].token_ids
    assert results[0].token_ids == generate(model, [[1, 2, 3]], params)[0].token_ids


def test_cancelled_request_leaves_the_batch(engine_for, one_thread):
    model = build("tiny-llama")
    engine = engine_for(model)
    long = engine.submit([1, 2, 3], greedy(model.config.context_length))
    other = engine.submit([4, 5], greedy(20))
    for event in long.events():
        if len(event.token_ids):
            break
    long.cancel()
    completion = long.result(timeout=30)
    assert completion.finish_reason == "cancelled"
    assert len(completion.token_ids) < model.config.context_length - 3
    assert other.result(timeout=30).token_ids == generate(model, [[4, 5]], greedy(20))[0].token_ids
    deadline = time.monotonic() + 5
    while engine.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.running == 0


def test_full_queue_raises_a_specific_error(engine_for):
    model = build("tiny-llama")
    engine = engine_for(model, max_batch_size=1, max_queue=2)
    gate = threading.Event()
    original = engine._step

    def slow_step():
        gate.wait(10)
        original()

    engine._step = slow_step
    engine.submit([1, 2], greedy(50))
    time.sleep(0.2)  # the first request is running; the next two wait
    engine.submit([1, 2], greedy(5))
    engine.submit([1, 2], greedy(5))
    with pytest.raises(QueueFullError):
        engine.submit([1, 2], greedy(5))
    gate.set()


def test_bad_prompts_are_refused_with_a_clear_error(engine_for):
    model = build("tiny-llama")
    engine = engine_for(model)
    with pytest.raises(PrometheanError, match="empty"):
        engine.submit([], greedy(5))
    with pytest.raises(PrometheanError, match="context"):
        engine.submit([1] * model.config.context_length, greedy(5))


def test_the_cache_gauges_count_the_batch_caches_bytes_and_the_tokens_its_rows_hold(one_thread):
    """Two uneven requests together: the peak bytes are the padded batch cache's (rows x slots x
    a token's keys and values, computed here from the config), the peak tokens what the rows
    hold; idle, the current gauges read zero."""
    model = build("tiny-gpt2")
    config = model.config
    engine = Engine(model, max_batch_size=2)
    try:
        params = [SamplingParams(max_new_tokens=6, temperature=0),
                  SamplingParams(max_new_tokens=3, temperature=0)]
        handles = [engine.submit([1] * 10, params[0]), engine.submit([2] * 4, params[1])]
        for handle in handles:
            handle.result(timeout=60)
        counters = engine.counters()
    finally:
        engine.shutdown()
    token = 2 * config.n_layer * config.kv_heads * config.head_size * 4  # fp32 keys and values
    if engine.peak_batch_size == 2:  # admitted together: one prefill of 2 rows, 10 + 6 slots
        assert counters["peak_kv_bytes"] == 2 * 16 * token
        # Step 2, the second request's last: 10 + 2 and 4 + 2 tokens (prompt, then those fed).
        assert counters["peak_kv_tokens"] == 12 + 6
    assert counters["peak_kv_bytes"] >= counters["peak_kv_tokens"] * token
    assert counters["kv_bytes"] == 0 and counters["kv_tokens"] == 0
