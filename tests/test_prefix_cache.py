"""Prefix reuse: a prompt that starts with a finished sequence prefills only what follows, and
nothing it answers changes, bit for bit (every preset family, fp32 and bf16, on the inference
kernels), however entries come and go under a small budget."""

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from promethean.inference.engine import Engine
from promethean.inference.generate import SamplingParams
from promethean.inference.prefix_cache import BLOCK_TOKENS, PrefixStore
from promethean.inference.quantize import prepare_for_inference
from tests.conftest import (
    FAILING_SEED,
    build,
    sampling_fails_for_failing_seed,
    trained_like,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = ["tiny-gpt2", "tiny-llama", "tiny-gemma3", "tiny-sssm"]


def prepared(preset: str, dtype: str = "fp32"):
    return prepare_for_inference(trained_like(build(preset)), dtype).eval()


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", PRESETS)
def test_a_reused_prefix_gives_the_logits_of_a_whole_prefill(preset, dtype):
    """80 tokens prefilled whole, against 56 of them decoded into a batch row (left-padded
    beside a longer row), copied out, cut to 48 (or kept whole where an SSM layer needs it),
    then the rest prefilled: the same logits, and the same logits for ten decode steps after."""
    model = prepared(preset, dtype)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, 90), generator=generator)
    with torch.inference_mode():
        whole = model.new_cache(1, capacity=100)
        expected = [model(ids[:, :80], cache=whole).logits[:, -1]]
        for step in range(80, 90):
            expected.append(model(ids[:, step : step + 1], cache=whole).logits[:, -1])

        # The sequence as the engine holds it: row 1 of a batch, 4 slots of left padding.
        other = torch.randint(0, model.config.vocab_size, (1, 44), generator=generator)
        batch = torch.cat((other, torch.cat((torch.zeros(1, 4, dtype=torch.long),
                                             ids[:, :40]), dim=1)))
        cache = model.new_cache(2, capacity=100, left_padding=torch.tensor([0, 4]))
        model(batch, cache=cache)
        for step in range(40, 56):
            model(torch.stack((other[:, -1], ids[:, step])), cache=cache)
        held = cache.row_copy(1)
        assert held.length == 56 and held.left_padding is None
        hybrid = any(model.config.layer_mixer(i) == "ssm" for i in range(model.config.n_layer))
        reused = 56 if hybrid else 48
        if hybrid:
            assert held.prefix(48, 100) is None  # a state exists only where it stopped
        restored = held.prefix(reused, 100)
        got = [model(ids[:, reused:80], cache=restored).logits[:, -1]]
        for step in range(80, 90):
            got.append(model(ids[:, step : step + 1], cache=restored).logits[:, -1])
    for want, have in zip(expected, got, strict=True):
        assert torch.equal(want, have)
    # The copy was cut from is left as it was (a later prompt may reuse it again).
    assert held.length == 56


def test_a_windowed_layer_cannot_restore_slots_it_no_longer_holds():
    model = prepared("tiny-gemma3")
    ids = torch.randint(0, model.config.vocab_size, (1, 120))
    with torch.inference_mode():
        cache = model.new_cache(1, capacity=128)
        model(ids[:, :20], cache=cache)
        for step in range(20, 120):
            model(ids[:, step : step + 1], cache=cache)
    held = cache.row_copy(0)
    assert held.prefix(30, 128) is None  # its window slid past slot 0 long ago
    assert held.prefix(120, 128) is not None


def chat_turns(vocab: int, turns: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(5, 30, (1,), generator=generator)),),
                          generator=generator).tolist() for _ in range(turns)]


def run_chat(engine: Engine, messages: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Each turn's prompt is the whole conversation so far (as chat clients resend it)."""
    history, replies = [], []
    for message in messages:
        history = history + message
        reply = engine.generate(history, params).token_ids
        replies.append(reply)
        history = history + reply
    return replies


@pytest.mark.parametrize("preset", ["tiny-gpt2", "tiny-gemma3", "tiny-sssm"])
def test_a_chat_prefills_only_each_new_message_and_answers_the_same(preset):
    model = prepared(preset)
    messages = chat_turns(model.config.vocab_size, 5, seed=3)
    for params in (SamplingParams(max_new_tokens=12, temperature=0),
                   SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=7)):
        plain, reusing = Engine(model), Engine(model, prefix_cache_bytes=64 << 20)
        try:
            assert run_chat(reusing, messages, params) == run_chat(plain, messages, params)
            stats = reusing.prefixes.stats
            assert stats.hits >= 3 and stats.lookups == 5
            assert reusing.prefilled_tokens + stats.reused_tokens == plain.prefilled_tokens
            assert reusing.prefilled_tokens < plain.prefilled_tokens / 2
            if preset == "tiny-gpt2":  # each turn's sequence stands in for the one before it
                assert len(reusing.prefixes) == 1 and stats.superseded == 4
            if preset == "tiny-sssm":  # a state cannot be cut back: every turn is kept
                assert len(reusing.prefixes) == 5 and stats.superseded == 0
        finally:
            plain.shutdown()
            reusing.shutdown()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 40), st.integers(1, 8)),
                min_size=4, max_size=10),
       st.integers(1, 4))
def test_under_churn_outputs_stay_those_of_no_reuse_and_the_budget_holds(requests, entries):
    """Prompts from four shared stems with random tails, submitted together or in turn, into a
    store that holds only a few sequences: every completion equals the engine without reuse,
    and the store never holds more bytes than its budget."""
    model = CHURN_MODEL
    vocab = model.config.vocab_size
    stems = [torch.randint(0, vocab, (48,), generator=torch.Generator().manual_seed(s)).tolist()
             for s in range(4)]
    prompts = [stems[stem][: BLOCK_TOKENS + tail] + [tail % vocab] * extra
               for stem, tail, extra in requests]
    params = SamplingParams(max_new_tokens=6, temperature=0)
    budget = entries * 70 * 4 * model.config.n_layer * 2 * model.config.n_embd
    plain, reusing = Engine(model, max_batch_size=3), Engine(model, max_batch_size=3,
                                                              prefix_cache_bytes=budget)
    try:
        expected = [plain.generate(prompt, params).token_ids for prompt in prompts]
        together = [reusing.submit(prompt, params) for prompt in prompts[: len(prompts) // 2]]
        got = [handle.result(timeout=60).token_ids for handle in together]
        got += [reusing.generate(prompt, params).token_ids for prompt in prompts[len(got):]]
        assert got == expected
        assert reusing.prefixes.nbytes <= budget
    finally:
        plain.shutdown()
        reusing.shutdown()


CHURN_MODEL = prepared("tiny-gpt2")


def test_a_model_off_the_kernels_does_not_reuse():
    """PyTorch's own products may round a row differently with the number of rows, so reuse
    would change answers there: an engine on an unprepared model keeps no prefixes."""
    engine = Engine(trained_like(build("tiny-gpt2")), prefix_cache_bytes=64 << 20)
    try:
        assert engine.prefixes is None
        assert engine.counters()["hits"] == 0
    finally:
        engine.shutdown()


def test_the_store_evicts_least_recently_used_and_matches_only_what_it_holds():
    model = prepared("tiny-gpt2")
    with torch.inference_mode():
        def held(tokens):
            cache = model.new_cache(1, capacity=64)
            model(torch.tensor([tokens]), cache=cache)
            return cache

        first, second, third = ([i % 50 + k for i in range(40)] for k in (1, 2, 3))
        one = held(first).nbytes()
        store = PrefixStore(budget_bytes=2 * one)
        store.put(first, held(first))
        store.put(second, held(second))
        assert store.lookup(first + [7], 64)[0] == 40  # first is now the most recent
        store.put(third, held(third))  # over budget: second, the least recent, goes
        assert len(store) == 2 and store.stats.evicted == 1 and store.nbytes <= 2 * one
        assert store.lookup(second + [7], 64) is None
        assert store.lookup(third[:30] + [99, 98], 64)[0] == 30  # a partial match
        assert store.lookup(third[:10] + [99] * 20, 64) is None  # shorter than a block
        assert store.lookup(first, 64)[0] == 39  # one prompt token is always left to run
        store.put(list(range(8)), held(list(range(8))))  # shorter than a block: not kept
        assert len(store) == 2


def test_the_server_reuses_a_resent_conversation_and_reports_it_in_metrics(tmp_path):
    """Four chat turns over /v1/chat/completions, each resending the whole conversation, then
    three over /chat (the server keeps that conversation), on a server with reuse and one with
    --prefix-cache-memory 0: the same replies; /metrics counts the hits and the reused tokens,
    and the prompt tokens run add up to the other's."""
    import httpx

    from promethean.checkpoint import save_checkpoint
    from promethean.serve.app import build_app
    from promethean.tokenizer import ByteTokenizer
    from tests.test_serve import RunningServer

    checkpoint = tmp_path / "tiny-chat"
    save_checkpoint(checkpoint, trained_like(build("tiny-llama")), ByteTokenizer())

    def converse(prefix_cache_bytes):
        running = RunningServer(build_app(checkpoint, chat_log=None,
                                          prefix_cache_bytes=prefix_cache_bytes))
        try:
            messages, replies = [], []
            for turn in range(4):
                messages.append({"role": "user", "content": f"turn {turn}: tell me more, please"})
                body = {"model": "tiny-chat", "messages": messages, "max_tokens": 12,
                        "temperature": 0}
                reply = httpx.post(running.url + "/v1/chat/completions", json=body, timeout=60)
                assert reply.status_code == 200
                content = reply.json()["choices"][0]["message"]["content"]
                replies.append(content)
                messages.append({"role": "assistant", "content": content})
            chat_id = None  # /chat (the web page's route) keeps the conversation itself
            for turn in range(3):
                body = {"message": f"and then, part {turn}?", "max_tokens": 12,
                        "temperature": 0, **({"chat_id": chat_id} if chat_id else {})}
                reply = httpx.post(running.url + "/chat", json=body, timeout=60)
                assert reply.status_code == 200
                chat_id = reply.json()["chat_id"]
                replies.append(reply.json()["response"])
            text = httpx.get(running.url + "/metrics", timeout=10).text
            counters = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                        if line.startswith("promethean_") and " " in line}
            return replies, counters
        finally:
            running.stop()

    reusing, counted = converse(64 << 20)
    plain, plain_counted = converse(0)
    assert reusing == plain
    assert counted["promethean_prefix_hits_total"] >= 3 + 2
    assert counted["promethean_prefix_lookups_total"] == 4 + 3
    assert plain_counted["promethean_prefix_hits_total"] == 0
    assert counted["promethean_prefilled_tokens_total"] + \
        counted["promethean_prefix_reused_tokens_total"] == \
        plain_counted["promethean_prefilled_tokens_total"]
    assert 0 < counted["promethean_prefix_cache_bytes"] <= 64 << 20


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 30),
                          st.sampled_from(["ok", "ok", "fails", "cancelled"])),
                min_size=3, max_size=9))
@example(requests=[(0, 0, "cancelled"), (1, 0, "cancelled"), (0, 0, "cancelled")])
def test_a_failing_or_cancelled_request_on_the_reuse_path_fails_alone(requests):
    """Requests that reuse shared stems, some failing in their own sampling (seed 666), some
    cancelled at once, all in flight together: each of the others answers what the engine
    without reuse answers alone, and the engine carries on."""
    from promethean.inference.engine import RequestFailedError

    model = CHURN_MODEL
    stems = [torch.randint(0, 500, (40,), generator=torch.Generator().manual_seed(s)).tolist()
             for s in range(3)]
    prompts = [stems[stem][: BLOCK_TOKENS + tail] + [tail] for stem, tail, _ in requests]

    def params(kind):
        return SamplingParams(max_new_tokens=6, temperature=0.8, top_k=50,
                              seed=FAILING_SEED if kind == "fails" else 5)

    plain = Engine(model, max_batch_size=4)
    try:
        expected = [plain.generate(prompt, params("ok")).token_ids for prompt in prompts]
    finally:
        plain.shutdown()
    with sampling_fails_for_failing_seed():
        reusing = Engine(model, max_batch_size=4, prefix_cache_bytes=8 << 20)
        try:
            for prompt in prompts[:2]:  # something to reuse before the burst
                reusing.generate(prompt, params("ok"))
            handles = [reusing.submit(prompt, params(kind))
                       for prompt, (_, _, kind) in zip(prompts, requests)]
            for handle, (_, _, kind) in zip(handles, requests):
                if kind == "cancelled":
                    handle.cancel()
            for handle, want, (_, _, kind) in zip(handles, expected, requests):
                if kind == "fails":
                    with pytest.raises(RequestFailedError):
                        handle.result(timeout=60)
                elif kind == "ok":
                    assert handle.result(timeout=60).token_ids == want
                else:
                    handle.result(timeout=60)  # ends, cancelled or done, without an error
            assert reusing.alive
            if requests[0][2] != "cancelled":  # admitted: it finds its own warm-up sequence
                assert reusing.prefixes.stats.hits >= 1
            assert reusing.generate(prompts[0], params("ok")).token_ids == expected[0]
            assert reusing.prefixes.stats.hits >= 1
            assert reusing.prefixes.nbytes <= 8 << 20
        finally:
            reusing.shutdown()


FUZZ_MODELS = {family: prepare_for_inference(
    trained_like(build(family, **({"sliding_window": 4} if family == "tiny-gemma3" else {}))),
    "fp32").eval() for family in ("tiny-llama", "tiny-gemma3", "tiny-sssm")}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(FUZZ_MODELS)),
       st.lists(st.tuples(st.sampled_from(["join", "step", "leave", "copy"]),
                          st.integers(0, 2**32)), min_size=2, max_size=14))
@example("tiny-gemma3", [("join", 1), ("step", 2), ("join", 3), ("step", 4), ("step", 5),
                         ("copy", 6), ("join", 7), ("leave", 8), ("step", 9), ("copy", 10)])
@example("tiny-sssm", [("join", 1), ("join", 3), ("step", 4), ("copy", 6), ("copy", 7)])
def test_a_row_copied_from_any_batch_state_continues_as_a_fresh_prefill(family, operations):
    """Rows join the batch (prefilled apart, of any length), decode together, leave, in any
    order; a copy of any row at any point (`row_copy`, then `prefix` at its full length), given
    one more token, gives the logits of that row's whole sequence prefilled afresh, bit for bit
    (a window of 4 that has slid; an SSM state)."""
    import random

    model = FUZZ_MODELS[family]
    vocab = model.config.vocab_size
    rows: list[list[int]] = []
    cache = None
    with torch.inference_mode():
        for operation, seed in operations:
            draw = random.Random(seed)
            if operation == "join" or cache is None:
                prompt = [draw.randrange(vocab) for _ in range(draw.randint(1, 20))]
                joining = model.new_cache(1, capacity=64)
                model(torch.tensor([prompt]), cache=joining)
                cache = joining if cache is None else (cache.concat_rows(joining) or cache)
                rows.append(prompt)
            elif operation == "step":
                tokens = [draw.randrange(vocab) for _ in rows]
                model(torch.tensor(tokens)[:, None], cache=cache)
                for row, token in zip(rows, tokens):
                    row.append(token)
            elif operation == "leave" and len(rows) > 1:
                keep = sorted(draw.sample(range(len(rows)), len(rows) - 1))
                cache.select_rows(torch.tensor(keep))
                cache.trim_common_padding()
                rows = [rows[index] for index in keep]
            elif operation == "copy":
                row = draw.randrange(len(rows))
                held = cache.row_copy(row)
                assert held.length == len(rows[row]) and held.left_padding is None
                restored = held.prefix(len(rows[row]), 64)
                token = draw.randrange(vocab)
                got = model(torch.tensor([[token]]), cache=restored).logits[0, -1]
                fresh = model.new_cache(1, capacity=64)
                want = model(torch.tensor([rows[row] + [token]]), cache=fresh).logits[0, -1]
                assert torch.equal(got, want)
