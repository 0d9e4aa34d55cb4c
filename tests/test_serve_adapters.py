"""Adapters over HTTP: `/v1/models` lists `BASE:ADAPTER`, a request naming one generates with it,
and an unknown one is a 404 the official client reports as NotFoundError."""

import time

import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.continual.adapters import Adapters, adapter_directory, checkpoint_sha256
from promethean.serve.app import create_app
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build
from tests.test_serve import RunningServer

MODEL = "tiny-base"
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapters") / MODEL
    save_checkpoint(directory, build("tiny-llama"), ByteTokenizer())
    model = load_checkpoint(directory).model
    adapters = Adapters(model, base_sha256=checkpoint_sha256(directory))
    generator = torch.Generator().manual_seed(0)
    for name in ("loud", "quiet"):
        adapters.add(name, rank=4)
        with torch.no_grad():  # nothing trained: a random B makes the adapter change the outputs
            for key, tensor in adapters.trainable_parameters(name).items():
                if key.endswith("lora_B"):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))
        adapters.save(name, adapter_directory(directory, name))
    return directory


@pytest.fixture(scope="module")
def server(checkpoint):
    loaded = load_checkpoint(checkpoint)
    app = create_app(loaded.model, loaded.tokenizer, model_name=MODEL, checkpoint=checkpoint,
                     max_batch_size=4, max_adapter_engines=1)
    running = RunningServer(app)
    running.app = app
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def greedy(client, model: str) -> str:
    result = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert result.model == model
    return result.choices[0].text


def test_models_lists_the_base_and_each_adapter(client):
    assert [model.id for model in client.models.list()] == [MODEL, f"{MODEL}:loud",
                                                            f"{MODEL}:quiet"]


def test_an_adapter_changes_greedy_output_and_the_base_is_unchanged(client, checkpoint):
    base = greedy(client, MODEL)
    loud = greedy(client, f"{MODEL}:loud")
    assert loud != base
    assert greedy(client, MODEL) == base  # the base engine's weights were not touched
    reference = load_checkpoint(checkpoint).model
    from promethean.continual.adapters import load_adapter_onto
    from promethean.inference.generate import SamplingParams, generate_text

    load_adapter_onto(reference, checkpoint, "loud")
    expected = generate_text(reference, ByteTokenizer(), [PROMPT],
                             SamplingParams(max_new_tokens=12, temperature=0,
                                            stop_token_ids=(ByteTokenizer().eot_id,)))[0]
    assert loud == expected.text  # the same as `promethean generate --adapter loud`


def test_chat_completions_with_an_adapter_streams(client):
    stream = client.chat.completions.create(model=f"{MODEL}:quiet", max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": "hi"}],
                                            stream=True)
    chunks = list(stream)
    assert chunks and all(chunk.model == f"{MODEL}:quiet" for chunk in chunks)


def test_at_most_max_adapter_engines_idle_adapters_are_kept(client, server):
    greedy(client, f"{MODEL}:loud")
    greedy(client, f"{MODEL}:quiet")
    variants = server.app.state.server.variants
    assert list(variants.engines) == ["quiet"]
    assert greedy(client, f"{MODEL}:loud") == greedy(client, f"{MODEL}:loud")  # rebuilt alike


@pytest.mark.parametrize("model", [f"{MODEL}:missing", "other", "other:loud", f"{MODEL}:../x"])
def test_an_unknown_model_or_adapter_is_a_404_naming_what_is_served(client, model):
    with pytest.raises(openai.NotFoundError) as caught:
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert f"'{model}' does not exist" in error["message"] and f"'{MODEL}:loud'" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])


def test_a_damaged_adapter_is_a_500_that_says_why(tmp_path, checkpoint):
    import shutil

    copy = tmp_path / MODEL
    shutil.copytree(checkpoint, copy)
    (adapter_directory(copy, "loud") / "adapter_model.safetensors").write_bytes(b"not tensors")
    loaded = load_checkpoint(copy)
    running = RunningServer(create_app(loaded.model, loaded.tokenizer, model_name=MODEL,
                                       checkpoint=copy))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError) as caught:
            greedy(client, f"{MODEL}:loud")
        assert caught.value.body["code"] == "adapter_load_failed"
        assert "the adapter 'loud' could not be loaded" in caught.value.body["message"]
        assert greedy(client, f"{MODEL}:quiet") != greedy(client, MODEL)  # the others still serve
    finally:
        running.stop()


# ----------------------------------------------------------- on the CPU kernels: one batch
@pytest.fixture(scope="module")
def slotted_server(checkpoint):
    from promethean.inference.quantize import prepare_for_inference

    loaded = load_checkpoint(checkpoint)
    app = create_app(prepare_for_inference(loaded.model, "fp32"), loaded.tokenizer,
                     model_name=MODEL, checkpoint=checkpoint, max_batch_size=8, max_adapters=1)
    running = RunningServer(app)
    running.app = app
    yield running
    running.stop()


@pytest.fixture
def slotted_client(slotted_server):
    return openai.OpenAI(base_url=slotted_server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def test_on_the_kernels_adapters_share_the_base_engine_and_a_busy_pool_is_a_503(
        slotted_client, slotted_server):
    """One slot: while a request for 'loud' holds it, a request for 'quiet' is a 503 with
    Retry-After that says why (the base and 'loud' still answer); once it is free, 'quiet' takes
    the slot and answers as it does alone; no engine or model copy is made."""
    import httpx

    alone = {model: greedy(slotted_client, model)
             for model in (MODEL, f"{MODEL}:quiet", f"{MODEL}:loud")}  # 'loud' read last
    assert len(set(alone.values())) == 3
    variants = slotted_server.app.state.server.variants
    slots = variants.base.adapters
    held = slots.acquire(variants.read["loud"][1])  # as a request in flight for 'loud' does
    try:
        response = httpx.post(slotted_server.url + "/v1/completions",
                              json={"model": f"{MODEL}:quiet", "prompt": PROMPT, "max_tokens": 4})
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.json()["error"]["code"] == "adapters_busy"
        assert "all 1 adapter slots are in use" in response.json()["error"]["message"]
        assert greedy(slotted_client, MODEL) == alone[MODEL]
        assert greedy(slotted_client, f"{MODEL}:loud") == alone[f"{MODEL}:loud"]  # shares it
        metrics = httpx.get(slotted_server.url + "/metrics").text
        assert "promethean_adapter_slots_in_use 1" in metrics
    finally:
        slots.release(held)
    assert greedy(slotted_client, f"{MODEL}:quiet") == alone[f"{MODEL}:quiet"]
    variants = slotted_server.app.state.server.variants
    assert variants.batched and not variants.engines
    metrics = httpx.get(slotted_server.url + "/metrics").text
    assert "promethean_adapter_slots 1" in metrics
    assert "promethean_adapter_slots_in_use 0" in metrics


def test_on_the_kernels_mixed_requests_answer_as_each_alone(checkpoint):
    """Base, 'loud' and 'quiet' requests in flight together on one engine with two slots: every
    reply is the one it gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    from promethean.inference.quantize import prepare_for_inference

    loaded = load_checkpoint(checkpoint)
    running = RunningServer(create_app(prepare_for_inference(loaded.model, "fp32"),
                                       loaded.tokenizer, model_name=MODEL, checkpoint=checkpoint,
                                       max_batch_size=8, max_adapters=2))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        models = [MODEL, f"{MODEL}:loud", f"{MODEL}:quiet"]
        alone = {model: greedy(client, model) for model in models}
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda model: (model, greedy(client, model)),
                                     [models[i % 3] for i in range(6)]))
        assert all(text == alone[model] for model, text in together)
    finally:
        running.stop()


def test_on_the_kernels_a_changed_or_damaged_adapter_is_read_again(tmp_path, checkpoint):
    """An adapter rewritten on disk is served as it is now; a damaged one is a 500 that says
    why, and the others still serve."""
    import shutil

    from promethean.continual.adapters import load_adapter_onto
    from promethean.inference.quantize import prepare_for_inference

    copy = tmp_path / MODEL
    shutil.copytree(checkpoint, copy)
    loaded = load_checkpoint(copy)
    running = RunningServer(create_app(prepare_for_inference(loaded.model, "fp32"),
                                       loaded.tokenizer, model_name=MODEL, checkpoint=copy,
                                       max_adapters=2))
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0,
                               timeout=60)
        loud, quiet = greedy(client, f"{MODEL}:loud"), greedy(client, f"{MODEL}:quiet")
        # 'loud' becomes a copy of 'quiet' on disk (saved atomically, as training saves it).
        model = load_checkpoint(copy).model
        adapters = load_adapter_onto(model, copy, "quiet", merge=False)
        adapters.save("quiet", adapter_directory(copy, "loud"))
        assert greedy(client, f"{MODEL}:loud") == quiet != loud
        (adapter_directory(copy, "loud") / "adapter_model.safetensors").write_bytes(b"broken")
        with pytest.raises(openai.InternalServerError) as caught:
            greedy(client, f"{MODEL}:loud")
        assert caught.value.body["code"] == "adapter_load_failed"
        assert "the adapter 'loud' could not be loaded" in caught.value.body["message"]
        assert greedy(client, f"{MODEL}:quiet") == quiet
    finally:
        running.stop()


SLOTTED_ALONE: dict = {}


@settings(max_examples=8, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([MODEL, f"{MODEL}:loud", f"{MODEL}:quiet",
                                           f"{MODEL}:missing", f"{MODEL}:", "other:loud"]),
                          st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]),
                                  min_size=1, max_size=12),
                          st.integers(-1, 8)),
                min_size=1, max_size=8))
def test_a_burst_of_mixed_requests_each_gets_its_own_answer_or_error(slotted_server, requests):
    """Requests for the base, both adapters, unknown models, bad max_tokens, all at once over
    HTTP on one engine with one adapter slot: each gets its reply as it does alone, or its own
    4xx (a 404 naming what is served, a 400 for the bad value), or a 503 busy when its adapter
    found the slot held; never a 500, and the engine serves on with no slot left held."""
    import httpx
    from concurrent.futures import ThreadPoolExecutor

    def send(request):
        model, prompt, max_tokens = request
        response = httpx.post(slotted_server.url + "/v1/completions", timeout=60,
                              json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                    "temperature": 0})
        return response.status_code, response.json()

    with ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(send, requests))
    for (model, prompt, max_tokens), (status, body) in zip(requests, answers):
        known = model in (MODEL, f"{MODEL}:loud", f"{MODEL}:quiet")
        if not known:
            assert status == 404 and body["error"]["code"] == "model_not_found"
        elif max_tokens < 1:
            assert status == 400
        elif status == 503:
            assert model != MODEL and body["error"]["code"] == "adapters_busy"
        else:
            assert status == 200, body
            key = (model, prompt, max_tokens)
            if key not in SLOTTED_ALONE:
                SLOTTED_ALONE[key] = send(key)[1]["choices"][0]["text"]
            assert body["choices"][0]["text"] == SLOTTED_ALONE[key]
    slots = slotted_server.app.state.server.variants.base.adapters
    deadline = time.monotonic() + 10
    while any(slots.users) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert slots.users == [0]
