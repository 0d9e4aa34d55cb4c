"""The server, running for real (uvicorn on a free port), driven over HTTP by the official
`openai` client and by httpx."""

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from hypothesis import strategies as st
import openai
import pytest
import uvicorn

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.inference.engine import Engine
from promethean.inference.generate import SamplingParams
from promethean.serve.app import create_app
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build

API_KEY = "secret-key"
MODEL = "tiny-chat"
GREEDY_PARAMS = SamplingParams(max_new_tokens=8, temperature=0.0, top_k=None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningServer:
    def __init__(self, app) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve") / MODEL
    save_checkpoint(directory, build("tiny-llama"), ByteTokenizer())
    return directory


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    loaded = load_checkpoint(checkpoint)
    log = tmp_path_factory.mktemp("log") / "chat.jsonl"
    app = create_app(loaded.model, loaded.tokenizer, model_name=MODEL, api_key=API_KEY,
                     chat_log=log, max_batch_size=8, max_queue=64)
    running = RunningServer(app)
    running.chat_log = log
    yield running
    running.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}"}


def test_completions_with_the_openai_client(client):
    result = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                       temperature=0)
    assert result.model == MODEL
    assert isinstance(result.choices[0].text, str)
    assert result.choices[0].finish_reason in ("stop", "length")
    assert result.usage.prompt_tokens == len("Once upon a time")
    again = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8,
                                      temperature=0)
    assert again.choices[0].text == result.choices[0].text


def test_streamed_completion_equals_the_whole_one(client):
    whole = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=12,
                                            temperature=0, stream=True))
    assert "".join(chunk.choices[0].text for chunk in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_completions_plain_and_streamed(client):
    messages = [{"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                           temperature=0)
    assert whole.choices[0].message.role == "assistant"
    assert "\n" not in whole.choices[0].message.content
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text.strip() == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "prompt": "abc", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=auth()) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list()] == [MODEL]


def test_unknown_model_is_a_404_the_client_understands(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)


def test_chat_endpoint_keeps_the_conversation_and_logs_each_turn(server):
    first = httpx.post(server.url + "/chat", json={"message": "Hello", "max_tokens": 8},
                       headers=auth(), timeout=60)
    assert first.status_code == 200, first.text
    body = first.json()
    assert set(body) >= {"response", "chat_id"}
    assert "\n" not in body["response"]
    second = httpx.post(server.url + "/chat", timeout=60, headers=auth(),
                        json={"message": "And?", "chat_id": body["chat_id"], "max_tokens": 8})
    assert second.json()["chat_id"] == body["chat_id"]
    records = [json.loads(line) for line in server.chat_log.read_text().splitlines()]
    mine = [r for r in records if r["chat_id"] == body["chat_id"]]
    assert [r["human"] for r in mine] == ["Hello", "And?"]
    assert mine[0]["assistant"] == body["response"]


def test_concurrent_chats_append_intact_lines(server):
    before = len(server.chat_log.read_text().splitlines()) if server.chat_log.exists() else 0

    def one(index: int) -> int:
        return httpx.post(server.url + "/chat", headers=auth(), timeout=120,
                          json={"message": f"message {index} " + "x" * index,
                                "max_tokens": 6}).status_code

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(one, range(24)))
    assert statuses == [200] * 24
    lines = server.chat_log.read_text().splitlines()
    assert len(lines) == before + 24
    humans = {json.loads(line)["human"] for line in lines[before:]}
    assert humans == {f"message {index} " + "x" * index for index in range(24)}


def test_health_is_open_and_everything_else_needs_the_key(server):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    for method, path in [("GET", "/metrics"), ("GET", "/v1/models"), ("POST", "/chat"),
                         ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
        response = httpx.request(method, server.url + path, json={"message": "hi"})
        assert response.status_code == 401, path
        assert "API key" in response.json()["error"]["message"]
        wrong = httpx.request(method, server.url + path, headers={"Authorization": "Bearer no"})
        assert wrong.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3)
    text = httpx.get(server.url + "/metrics", headers=auth()).text
    assert 'promethean_requests_total{route="/v1/completions",status="200"}' in text
    assert "# TYPE promethean_request_latency_seconds histogram" in text
    assert 'promethean_request_latency_seconds_bucket{le="+Inf"}' in text
    assert "promethean_queue_depth 0" in text
    generated = [line for line in text.splitlines()
                 if line.startswith("promethean_generated_tokens_total")]
    assert int(generated[0].split()[1]) > 0


@pytest.mark.parametrize(
    ("path", "body", "fragment"),
    [
        ("/v1/completions", b"{not json", "not valid JSON"),
        ("/v1/completions", b"[1, 2]", "JSON object"),
        ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": "many"}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, "max_tokens must be"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 100000}, "max_tokens must be"),
        ("/v1/completions", {"model": MODEL, "prompt": "x" * 300}, "context"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]},
         "role"),
        ("/chat", {"message": 3}, "message"),
        ("/chat", {}, "message"),
    ],
)
def test_bad_requests_get_clear_400_bodies(server, path, body, fragment):
    if isinstance(body, bytes):
        response = httpx.post(server.url + path, content=body, headers=auth())
    else:
        response = httpx.post(server.url + path, json=body, headers=auth())
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]["message"]


def slowed_engine(step_seconds: float, **kwargs) -> Engine:
    """An engine whose decode steps wait (on `engine.gate` when given, else a fixed sleep)."""
    engine = Engine(build("tiny-llama"), ByteTokenizer(), **kwargs)
    original = engine._step

    def slow_step():
        time.sleep(step_seconds)
        original()

    engine._step = slow_step
    return engine


def test_client_disconnect_cancels_the_generation():
    engine = slowed_engine(0.05)  # 250 tokens would take over 12 s
    running = RunningServer(create_app(engine=engine, model_name=MODEL))
    try:
        body = {"model": MODEL, "prompt": "go", "max_tokens": 250, "stream": True}
        with httpx.stream("POST", running.url + "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break
        assert engine.running == 1
        deadline = time.monotonic() + 3
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running == 0

        # The same for a request that does not stream.
        def post():
            try:
                httpx.post(running.url + "/v1/completions", timeout=0.5,
                           json={"model": MODEL, "prompt": "go", "max_tokens": 250})
            except httpx.TimeoutException:
                pass

        post()
        deadline = time.monotonic() + 3
        while engine.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running == 0
    finally:
        running.stop()


def test_overload_answers_503_with_retry_after():
    model = build("tiny-llama")
    engine = Engine(model, ByteTokenizer(), max_batch_size=1, max_queue=1)
    gate = threading.Event()
    original = engine._step

    def slow_step():
        gate.wait(20)
        original()

    engine._step = slow_step
    running = RunningServer(create_app(engine=engine, model_name=MODEL))
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 5}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, running.url + "/v1/completions", json=body, timeout=30)
            while engine.running == 0:
                time.sleep(0.01)
            second = pool.submit(httpx.post, running.url + "/v1/completions", json=body, timeout=30)
            while engine.queue_depth == 0:
                time.sleep(0.01)
            started = time.monotonic()
            overloaded = httpx.post(running.url + "/v1/completions", json=body, timeout=30)
            assert time.monotonic() - started < 5  # answered at once, never a hang
            assert overloaded.status_code == 503
            assert overloaded.headers["Retry-After"] == "1"
            assert "busy" in overloaded.json()["error"]["message"]
            gate.set()
            assert first.result().status_code == 200
            assert second.result().status_code == 200
    finally:
        gate.set()
        running.stop()


def test_serve_command_starts_a_server(checkpoint, tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "promethean", "serve", str(checkpoint), "--port", str(port),
         "--chat-log", str(tmp_path / "log.jsonl"), "--dtype", "bf16",
         "--memory", str(tmp_path / "memory")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read().decode()
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert response.json()["model"] == MODEL
        assert response.json()["memory"] is True
        reply = httpx.post(f"http://127.0.0.1:{port}/chat", timeout=60,
                           json={"message": "hi there", "max_tokens": 8, "memory": True})
        assert reply.status_code == 200
        assert reply.json()["memories"] == []  # a new memory holds nothing yet
        assert (tmp_path / "log.jsonl").read_text().count("\n") == 1
    finally:
        process.terminate()
        process.wait(20)
    assert reply.json()["response"]  # so the exchange was remembered, and saved at shutdown:
    assert json.loads((tmp_path / "memory" / "tree.json").read_text())["items"] == 1


def test_serve_command_refuses_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "promethean", "serve", str(tmp_path / "none")],
                            check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "not a checkpoint directory" in result.stderr
    assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ serve --dtype, engine totals
def adapter_checkpoint(directory, adapter: str = "loud"):
    """A checkpoint with one adapter whose random B makes it change the outputs."""
    import torch

    from promethean.continual.adapters import Adapters, adapter_directory, checkpoint_sha256

    save_checkpoint(directory, build("tiny-llama"), ByteTokenizer())
    adapters = Adapters(load_checkpoint(directory).model, base_sha256=checkpoint_sha256(directory))
    adapters.add(adapter, rank=4)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in adapters.trainable_parameters(adapter).items():
            if key.endswith("lora_B"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    adapters.save(adapter, adapter_directory(directory, adapter))
    return directory


def greedy_reference(checkpoint, dtype: str, adapter: str | None, prompt: str) -> str:
    """What `generate` says for the checkpoint (adapter merged in fp32 first), prepared as dtype."""
    from promethean.continual.adapters import load_adapter_onto
    from promethean.inference.generate import SamplingParams, generate_text
    from promethean.inference.quantize import prepare_for_inference

    model = load_checkpoint(checkpoint).model
    if adapter is not None:
        load_adapter_onto(model, checkpoint, adapter)
    model = prepare_for_inference(model, dtype)
    params = SamplingParams(max_new_tokens=10, temperature=0,
                            stop_token_ids=(ByteTokenizer().eot_id,))
    return generate_text(model, ByteTokenizer(), [prompt], params)[0].text


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_serve_dtype_prepares_the_base_and_serves_adapters_over_it(tmp_path, dtype):
    """The base is prepared as `dtype` and answers as that model does; an adapter rides on it in
    a slot (fp32 low-rank updates over the prepared base, no copy of the model), and answers as
    the adapter's own hooks do within rounding (tests/test_adapter_slots.py): here, as a model
    prepared alike with that adapter in a slot, and unlike the base."""
    from promethean.inference.quantize import PREPARED_ATTRIBUTE
    from promethean.serve.app import build_app

    checkpoint = adapter_checkpoint(tmp_path / MODEL)
    app = build_app(checkpoint, chat_log=None, dtype=dtype)
    running = RunningServer(app)
    try:
        client = openai.OpenAI(base_url=running.url + "/v1", api_key="unused", max_retries=0)
        served = {}
        for model in (MODEL, f"{MODEL}:loud"):
            served[model] = client.completions.create(
                model=model, prompt="Once upon", max_tokens=10, temperature=0).choices[0].text
        variants = app.state.server.variants
        # int8 falls back to bf16 where its kernel is missing.
        assert getattr(variants.base.model, PREPARED_ATTRIBUTE, None) in (dtype, "bf16")
        assert variants.batched and not variants.engines  # no model copies
    finally:
        running.stop()
    assert served[MODEL] == greedy_reference(checkpoint, dtype, None, "Once upon")
    assert served[f"{MODEL}:loud"] == slotted_reference(checkpoint, dtype, "loud", "Once upon")
    assert served[f"{MODEL}:loud"] != served[MODEL]


def slotted_reference(checkpoint, dtype: str, adapter: str, prompt: str) -> str:
    """Greedy text of `adapter` in a slot over the base prepared as `dtype`, alone in an engine
    of its own."""
    from promethean.continual.adapters import adapter_directory, checkpoint_sha256, read_adapter
    from promethean.inference.adapter_slots import slot_adapter
    from promethean.inference.engine import Engine
    from promethean.inference.generate import SamplingParams
    from promethean.inference.quantize import prepare_for_inference

    model = prepare_for_inference(load_checkpoint(checkpoint).model, dtype)
    saved = read_adapter(adapter_directory(checkpoint, adapter), checkpoint_sha256(checkpoint))
    weights = slot_adapter(model, adapter, adapter, saved.matrices, saved.config.scaling)
    engine = Engine(model, ByteTokenizer(), max_adapters=1)
    try:
        params = SamplingParams(max_new_tokens=10, temperature=0,
                                stop_token_ids=(ByteTokenizer().eot_id,))
        return engine.submit(ByteTokenizer().encode(prompt), params, adapter=weights).result().text
    finally:
        engine.shutdown()


def test_serve_refuses_an_unknown_dtype(checkpoint):
    from promethean.errors import PrometheanError
    from promethean.serve.app import build_app

    sentence = r"^--dtype must be one of fp32, bf16, int8, got 'fp8'\.$"
    with pytest.raises(PrometheanError, match=sentence):
        build_app(checkpoint, chat_log=None, dtype="fp8")


def test_health_and_metrics_count_every_engine():
    base = Engine(build("tiny-llama"), ByteTokenizer())
    adapter_engine = slowed_engine(0, max_batch_size=1)
    gate = threading.Event()
    original = adapter_engine._step

    def held_step():
        gate.wait(20)
        original()

    adapter_engine._step = held_step
    app = create_app(engine=base, model_name=MODEL)
    app.state.server.variants.engines["held"] = adapter_engine  # as if built for MODEL:held
    running = RunningServer(app)
    try:
        from promethean.inference.generate import SamplingParams

        handles = [adapter_engine.submit([1, 2, 3], SamplingParams(max_new_tokens=3, temperature=0))
                   for _ in range(2)]
        while adapter_engine.running == 0:
            time.sleep(0.01)
        health = httpx.get(running.url + "/health").json()
        assert (health["queue_depth"], health["running"]) == (1, 1)
        text = httpx.get(running.url + "/metrics").text
        assert "promethean_queue_depth 1" in text and "promethean_running_requests 1" in text
        gate.set()
        for handle in handles:
            handle.result(20)
    finally:
        gate.set()
        running.stop()


def test_the_web_page_is_open_but_the_api_it_calls_is_not(server):
    assert httpx.get(server.url + "/").status_code == 200
    assert httpx.get(server.url + "/static/chat.css").status_code == 200
    assert httpx.get(server.url + "/static/missing.js").status_code == 404
    assert httpx.get(server.url + "/health").json()["memory"] is False
    assert httpx.post(server.url + "/v1/chat/completions", json={}).status_code == 401


# ----------------------------------------------------------- one request fails alone
HOSTILE_SAMPLING = [
    {"temperature": 1e-300}, {"temperature": 1e-40}, {"temperature": 5e-324},
    {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1.0, "repetition_penalty": 1e-300},
    {"temperature": 0.0, "repetition_penalty": 1e-300}, {"temperature": 1.0, "seed": 2**63},
    {"temperature": 2.0, "top_k": 1, "repetition_penalty": 1e300},
]


@pytest.mark.parametrize("values", HOSTILE_SAMPLING)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_extreme_sampling_values_are_answered_and_break_nothing(server, path, values):
    body = {"model": MODEL, "max_tokens": 4, **values}
    body.update({"prompt": "hi"} if path == "/v1/completions"
                else {"messages": [{"role": "user", "content": "hi"}]})
    response = httpx.post(server.url + path, json=body, headers=auth(), timeout=60)
    assert response.status_code == 200, response.text
    streamed = httpx.post(server.url + path, json={**body, "stream": True}, headers=auth(),
                          timeout=60)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


@pytest.mark.parametrize("seed", [2**64, 2**70, -(2**70)])
def test_a_seed_out_of_a_generators_range_is_a_400_that_names_it(server, seed):
    for path, extra in [("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                        ("/chat", {"message": "hi"})]:
        response = httpx.post(server.url + path, json={"model": MODEL, "max_tokens": 2,
                                                       "temperature": 1.0, "seed": seed, **extra},
                              headers=auth(), timeout=60)
        assert response.status_code == 400, (path, response.text)
        assert "seed" in response.json()["error"]["message"]


def test_a_request_whose_sampling_fails_ends_alone_and_the_others_are_unchanged(monkeypatch):
    from promethean.inference import engine as engine_module
    from promethean.inference.engine import RequestFailedError
    from promethean.inference.generate import SamplingParams

    original = engine_module.pick_tokens

    def failing(logits, params, generator):  # a fault in one request's own sampling
        if params.seed == 666:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return original(logits, params, generator)

    monkeypatch.setattr(engine_module, "pick_tokens", failing)
    engine = Engine(build("tiny-llama"), ByteTokenizer(), max_batch_size=8)
    try:
        def params(seed):
            return SamplingParams(max_new_tokens=12, temperature=1.0, top_k=None, seed=seed)

        alone = [engine.generate([5, 6, 7], params(seed)).token_ids for seed in (1, 2)]
        handles = [engine.submit([5, 6, 7], params(1)), engine.submit([9, 9], params(666)),
                   engine.submit([5, 6, 7], params(2))]
        with pytest.raises(RequestFailedError, match="^generation failed: probability tensor "):
            handles[1].result(timeout=60)
        assert [handles[0].result(60).token_ids, handles[2].result(60).token_ids] == alone
        assert engine.alive and engine.generate([5, 6, 7], params(1)).token_ids == alone[0]
    finally:
        engine.shutdown()


def test_a_failed_batch_step_fails_its_rows_and_the_engine_serves_the_next(monkeypatch):
    from promethean.inference.engine import RequestFailedError

    engine = Engine(build("tiny-llama"), ByteTokenizer(), max_batch_size=8)
    original, calls = engine._step, [0]

    def step_once_broken():
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("out of memory")
        original()

    engine._step = step_once_broken
    try:
        handle = engine.submit([1, 2, 3], GREEDY_PARAMS)
        with pytest.raises(RequestFailedError, match=r"^generation failed: out of memory\.$"):
            handle.result(timeout=60)
        assert engine.alive
        assert len(engine.generate([1, 2, 3], GREEDY_PARAMS).token_ids) == 8
    finally:
        engine.shutdown()


def test_health_says_so_while_the_engine_is_down_and_a_new_one_takes_over():
    engine = Engine(build("tiny-llama"), ByteTokenizer())
    app = create_app(engine=engine, tokenizer=ByteTokenizer(), model_name=MODEL)
    running = RunningServer(app)
    try:
        engine.shutdown()  # as if its thread had died
        down = httpx.get(running.url + "/health", timeout=10)
        assert down.status_code == 503 and down.json()["status"] == "engine_down"
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "temperature": 0}
        assert httpx.post(running.url + "/v1/completions", json=body, timeout=60).status_code == 200
        assert httpx.get(running.url + "/health", timeout=10).json()["status"] == "ok"
    finally:
        running.stop()


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b'{"model": "tiny-chat", "prompt": "\\ud800", "max_tokens": 2}', "lone UTF-16 surrogate"),
        (b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", "number too long"),
        (b'{"prompt": "\xff\xfe"}', "not valid JSON"),
    ],
)
def test_hostile_bodies_get_one_json_sentence(server, body, fragment):
    for path in ("/v1/completions", "/v1/chat/completions", "/chat"):
        response = httpx.post(server.url + path, content=body, timeout=60,
                              headers={**auth(), "Content-Type": "application/json"})
        assert response.status_code == 400, (path, response.text)
        assert fragment in response.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_in_the_error_shape(server):
    missing = httpx.get(server.url + "/v1/nothing", headers=auth(), timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"] == {"message": "there is no route /v1/nothing.",
                                       "type": "invalid_request_error", "param": None,
                                       "code": "not_found"}
    wrong = httpx.get(server.url + "/v1/completions", headers=auth(), timeout=10)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["message"] == "/v1/completions does not take GET."


def test_a_page_of_another_origin_cannot_post_and_the_servers_own_page_can(server):
    lines = server.chat_log.read_text().count("\n") if server.chat_log.exists() else 0
    foreign = httpx.post(server.url + "/chat", content=json.dumps({"message": "buy now"}),
                         headers={**auth(), "Origin": "https://attacker.example",
                                  "Content-Type": "text/plain"}, timeout=30)
    assert foreign.status_code == 403
    assert foreign.json()["error"]["message"] == (
        "a page from https://attacker.example may not call this server: only its own page, or "
        "an origin given with --allow-origin.")
    assert (server.chat_log.read_text().count("\n") if server.chat_log.exists() else 0) == lines
    own = httpx.post(server.url + "/v1/completions", headers={**auth(), "Origin": server.url},
                     json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=60)
    assert own.status_code == 200


def test_allowed_origins_and_hosts():
    app = create_app(build("tiny-llama"), ByteTokenizer(), model_name=MODEL,
                     allowed_origins=("https://app.example",),
                     allowed_hosts=("localhost", "127.0.0.1", "::1"))
    running = RunningServer(app)
    try:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
        allowed = httpx.post(running.url + "/v1/completions", json=body, timeout=60,
                             headers={"Origin": "https://app.example"})
        assert allowed.status_code == 200
        rebound = httpx.post(running.url + "/v1/completions", json=body, timeout=60,
                             headers={"Host": "attacker.example"})
        assert rebound.status_code == 403
        assert rebound.json()["error"]["code"] == "host_not_allowed"
        named = httpx.get(f"http://localhost:{running.port}/health", timeout=10)
        assert named.status_code == 200
        # The allowed origin's preflight is answered (CORS, configured), a foreign one's is not.
        preflight = {"Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization,content-type"}
        answered = httpx.options(running.url + "/v1/completions", timeout=10,
                                 headers={**preflight, "Origin": "https://app.example"})
        assert answered.status_code == 200
        assert answered.headers["access-control-allow-origin"] == "https://app.example"
        foreign = httpx.options(running.url + "/v1/completions", timeout=10,
                                headers={**preflight, "Origin": "https://attacker.example"})
        assert "access-control-allow-origin" not in foreign.headers
    finally:
        running.stop()


def test_every_size_is_bounded_and_each_refusal_names_its_limit():
    from promethean.serve.app import ServeLimits

    limits = ServeLimits(max_body_bytes=20_000, max_text_chars=5_000, max_messages=3,
                         max_chat_id_chars=40, max_stop_chars=10, max_history_tokens=60,
                         max_chats=2)
    app = create_app(build("tiny-llama"), ByteTokenizer(), model_name=MODEL, limits=limits)
    running = RunningServer(app)
    url = running.url

    def refused(path, body=None, content=None, status=400):
        response = httpx.post(url + path, json=body, content=content, timeout=60)
        assert response.status_code == status, response.text
        return response.json()["error"]["message"]

    try:
        big = json.dumps({"prompt": "x" * 30_000}).encode()
        assert "max_body_bytes" in refused("/v1/completions", content=big, status=413)
        chunked = (piece for piece in [big[:15_000], big[15_000:]])  # no Content-Length
        assert "max_body_bytes" in refused("/v1/completions", content=chunked, status=413)
        assert "max_text_chars" in refused("/v1/completions", {"prompt": "x" * 6_000})
        assert "max_text_chars" in refused("/chat", {"message": "x" * 6_000})
        message = {"role": "user", "content": "hi"}
        assert "max_messages" in refused("/v1/chat/completions", {"messages": [message] * 4})
        assert "max_chat_id_chars" in refused("/chat", {"message": "hi", "chat_id": "c" * 41})
        assert "max_stop_chars" in refused("/v1/completions", {"prompt": "hi", "stop": "s" * 11})
        # A kept conversation stays within its tokens; the least recently used chat goes.
        server = app.state.server
        for turn in range(8):
            answer = httpx.post(url + "/chat", json={"message": f"turn {turn} " + "w" * 20,
                                                     "chat_id": "long", "max_tokens": 4,
                                                     "temperature": 0}, timeout=60)
            assert answer.status_code == 200, answer.text
            kept = server.chats[("", "long")]  # (user, chat id): the default user
            assert sum(tokens for _, tokens in kept) <= 60 and kept[0][0].role == "human"
        assert kept[-2][0].text.startswith("turn 7")
        for chat in ("a", "b"):
            httpx.post(url + "/chat", json={"message": "hi", "chat_id": chat, "max_tokens": 2},
                       timeout=60)
        assert list(server.chats) == [("", "a"), ("", "b")]
    finally:
        running.stop()


def test_openai_parameters_are_honoured_or_refused_by_name(client):
    one = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                         max_completion_tokens=1, temperature=0)
    assert one.usage.completion_tokens == 1
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    streamed = list(client.completions.create(model=MODEL, prompt="abc", max_tokens=3,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    assert streamed[-1].usage.prompt_tokens == 3
    echoed = client.completions.create(model=MODEL, prompt="abc", max_tokens=2, temperature=0,
                                       echo=True)
    plain = client.completions.create(model=MODEL, prompt="abc", max_tokens=2, temperature=0)
    assert echoed.choices[0].text == "abc" + plain.choices[0].text
    for name, value in [("tools", [{"type": "function", "function":
                                                         {"name": "f", "parameters": {}}}]),
                        ("response_format", {"type": "json_object"}), ("presence_penalty", 0.5)]:
        with pytest.raises(openai.BadRequestError, match=f"{name} is not supported"):
            client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                   "content": "hi"}],
                                           max_tokens=2, **{name: value})
    # Their no-op values are fine (some clients always send them).
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=2, presence_penalty=0, logprobs=False)


# ------------------------------------------------------------------------- fuzzing
def _json_values():
    scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
               | st.floats(allow_nan=False) | st.text(max_size=40))
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


_FIELDS = ["model", "prompt", "messages", "message", "max_tokens", "max_completion_tokens",
           "temperature", "top_p", "top_k", "repetition_penalty", "stop", "seed", "stream",
           "stream_options", "n", "echo", "memory", "chat_id", "user", "logprobs"]
_MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system",
                                                                      "assistant", "robot"]),
                                             "content": st.text(max_size=30)}), max_size=3)
_BODIES = st.dictionaries(st.sampled_from(_FIELDS), _json_values() | _MESSAGES, max_size=8).map(
    lambda body: {**body, "max_tokens": body["max_tokens"]}
    if isinstance(body.get("max_tokens"), int) and 0 < body["max_tokens"] <= 8
    else {**body, "max_tokens": 4})


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions", "/chat"])
def test_fuzzed_bodies_never_get_a_5xx_and_the_server_keeps_answering(server, path):
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(body=_BODIES, raw=st.booleans())
    def one(body, raw):
        content = json.dumps(body).encode() if not raw else json.dumps(body)[:-1].encode()
        response = httpx.post(server.url + path, content=content, timeout=60,
                              headers={**auth(), "Content-Type": "application/json"})
        assert response.status_code < 500 or response.status_code == 503, response.text
        if response.status_code != 200:
            assert "message" in response.json()["error"]

    one()
    normal = httpx.post(server.url + "/v1/completions", headers=auth(), timeout=60,
                        json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert normal.status_code == 200
    assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"


def test_logprobs_are_the_models_log_softmax_for_completions_and_chat(client):
    import math

    import torch

    from promethean.inference.engine import token_logprobs

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        # Greedy: the chosen token is the most likely one.
        assert item.token == item.top_logprobs[0].token
        assert math.isclose(item.logprob, item.top_logprobs[0].logprob)
    plain = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0,
                                      logprobs=1)
    logprobs = plain.choices[0].logprobs
    assert "".join(logprobs.tokens) == plain.choices[0].text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(3)]
    # An independent computation: log-softmax by hand over known logits.
    logits = torch.tensor([2.0, 0.5, -1.0, 1.5])
    chosen, best = token_logprobs(logits, 1, 2)
    total = math.log(sum(math.exp(v) for v in [2.0, 0.5, -1.0, 1.5]))
    assert math.isclose(chosen, 0.5 - total, rel_tol=1e-6)
    assert [index for index, _ in best] == [0, 3] and math.isclose(best[0][1], 2.0 - total,
                                                                    rel_tol=1e-6)
    with pytest.raises(openai.BadRequestError, match="logprobs in a stream is not supported"):
        client.completions.create(model=MODEL, prompt="abc", max_tokens=2, logprobs=1,
                                  stream=True)


def test_the_openapi_schema_documents_every_request_body(server):
    schema = httpx.get(server.url + "/openapi.json", headers=auth(), timeout=30).json()
    for path, model, field in [("/v1/completions", "CompletionBody", "prompt"),
                               ("/v1/chat/completions", "ChatCompletionBody", "messages"),
                               ("/chat", "ChatBody", "message")]:
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert field in schema["components"]["schemas"][model]["properties"]
    assert "ChatMessage" in schema["components"]["schemas"]  # the models' own references resolve


def test_the_chat_log_is_owner_only_even_when_it_was_made_before(tmp_path):
    import stat

    from promethean.serve.app import ChatLog

    older = tmp_path / "chat.jsonl"
    older.write_text('{"human": "kept"}\n')
    older.chmod(0o644)
    ChatLog(older).append({"human": "hi", "assistant": "hello"})
    assert stat.S_IMODE(older.stat().st_mode) == 0o600
    assert older.read_text().splitlines()[0] == '{"human": "kept"}'  # nothing lost
    fresh = tmp_path / "new" / "chat.jsonl"
    ChatLog(fresh).append({"human": "hi"})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o600
