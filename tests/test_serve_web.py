"""The web chat page at `/`, driven end to end in headless Chromium (Playwright, sync API) against
a real uvicorn server: the page loads without a key, asks for one on 401, streams a greedy reply
that equals the server's own greedy chat completion, and the turn reaches the chat log."""

import json
import shutil

import httpx
import openai
import pytest

from promethean.checkpoint import load_checkpoint, save_checkpoint
from promethean.serve.app import create_app
from promethean.tokenizer import ByteTokenizer
from tests.conftest import build
from tests.test_serve import RunningServer

pytestmark = pytest.mark.usefixtures("one_thread")

API_KEY = "web-secret"
MODEL = "tiny-web"
MAX_TOKENS = 12
MESSAGE = "Hello there"


def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Chromium is not installed: `make test` installs it "
                    "(apt-get install chromium).", pytrace=False)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("web") / MODEL
    save_checkpoint(directory, build("tiny-llama"), ByteTokenizer())
    loaded = load_checkpoint(directory)
    log = tmp_path_factory.mktemp("log") / "chat.jsonl"
    running = RunningServer(create_app(loaded.model, loaded.tokenizer, model_name=MODEL,
                                       api_key=API_KEY, chat_log=log, max_batch_size=4))
    running.chat_log = log
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    executable = chromium_path()
    with sync_playwright() as playwright:
        # --no-sandbox: the tests run as root, where Chromium's sandbox refuses to start.
        launched = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context()
    opened = context.new_page()
    opened.set_default_timeout(15_000)
    opened.goto(f"{server.url}/?temperature=0&max_tokens={MAX_TOKENS}")
    opened.wait_for_selector("body[data-ready='true']")
    yield opened
    context.close()


def test_the_page_and_its_files_need_no_key_but_the_api_does(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'src="static/chat.js"' in page.text
    script = httpx.get(server.url + "/static/chat.js")
    assert script.status_code == 200 and "v1/chat/completions" in script.text
    assert httpx.post(server.url + "/v1/chat/completions", json={}).status_code == 401


def test_a_streamed_reply_equals_the_servers_greedy_completion_and_is_logged(page, server):
    page.fill("#message", MESSAGE)
    page.press("#message", "Enter")
    error = page.wait_for_selector("#error:not([hidden])")
    assert "needs an API key" in error.text_content()
    assert page.input_value("#message") == MESSAGE  # given back, to send again
    assert page.is_visible("#api-key")

    page.fill("#api-key", API_KEY)
    page.press("#message", "Enter")
    reply = page.wait_for_selector(".turn.assistant[data-state='done']")
    assert page.is_hidden("#error")
    assert int(reply.get_attribute("data-chunks")) >= 1  # it streamed, chunk by chunk
    shown = reply.query_selector(".text").text_content()

    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    expected = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": MESSAGE}], max_tokens=MAX_TOKENS,
        temperature=0,
    ).choices[0].message.content
    assert shown == expected and expected
    assert page.evaluate("sessionStorage.getItem('promethean-api-key')") == API_KEY

    records = [json.loads(line) for line in server.chat_log.read_text().splitlines()]
    mine = [record for record in records if record["chat_id"].startswith("web-")]
    assert [(r["human"], r["assistant"]) for r in mine] == [(MESSAGE, expected)]
    assert mine[0]["route"] == "/v1/chat/completions"


def test_the_conversation_is_sent_whole_until_a_new_one_is_started(page, server):
    page.evaluate(f"sessionStorage.setItem('promethean-api-key', '{API_KEY}')")
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    sent = []
    page.on("request", lambda request: sent.append(request.post_data_json)
            if request.url.endswith("/v1/chat/completions") else None)

    def say(message: str, replies_before: int) -> None:
        page.fill("#message", message)
        page.press("#message", "Enter")
        page.wait_for_function(
            f"document.querySelectorAll(\".turn.assistant[data-state='done']\").length > "
            f"{replies_before}")

    say("first", 0)
    say("second", 1)
    first_reply = page.query_selector_all(".turn.assistant .text")[0].text_content()
    assert [m["content"] for m in sent[1]["messages"]] == ["first", first_reply, "second"]
    assert sent[0]["chat_id"] == sent[1]["chat_id"]

    page.click("#new-conversation")
    assert page.query_selector_all(".turn") == []
    say("third", 0)
    assert [m["content"] for m in sent[2]["messages"]] == ["third"]
    assert sent[2]["chat_id"] != sent[1]["chat_id"] and sent[2]["chat_id"].startswith("web-")


def test_an_overloaded_server_is_shown_as_a_clear_error(page):
    body = {"error": {"message": "the server is busy: 64 requests are already waiting.",
                      "type": "server_overloaded", "param": None, "code": "overloaded"}}
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=503, headers={"Retry-After": "1"}, content_type="application/json",
        body=json.dumps(body)))
    page.fill("#message", "anyone?")
    page.click("#send")
    error = page.wait_for_selector("#error:not([hidden])").text_content()
    assert "busy (503): try again in 1 s" in error and "64 requests" in error
    assert page.query_selector(".turn.assistant") is None


def test_the_memory_box_recalls_into_the_reply(browser, tmp_path):
    from typer.testing import CliRunner

    from promethean.cli import app as cli
    from promethean.serve.app import ServerMemory

    fact = "The lighthouse keeper's cat is called Bartholomew."
    memory_dir = tmp_path / "memory"
    result = CliRunner().invoke(cli, ["memory", "add", str(memory_dir), "--text", fact])
    assert result.exit_code == 0, result.output
    directory = tmp_path / MODEL
    save_checkpoint(directory, build("tiny-llama"), ByteTokenizer())
    loaded = load_checkpoint(directory)
    memory = ServerMemory.open(memory_dir, directory, loaded.tokenizer)
    running = RunningServer(create_app(loaded.model, loaded.tokenizer, model_name=MODEL,
                                       checkpoint=directory, memory=memory))
    try:
        page = browser.new_page()
        page.set_default_timeout(15_000)
        page.goto(f"{running.url}/?temperature=0&max_tokens={MAX_TOKENS}")
        page.wait_for_selector("body[data-ready='true']")
        assert page.is_hidden("#api-key")  # this server needs no key
        page.check("#memory")
        page.fill("#message", "What is the cat called?")
        page.press("#message", "Enter")
        reply = page.wait_for_selector(".turn.assistant[data-state='done']")
        note = reply.query_selector(".memories")
        assert note.text_content() == "recalled 1 memory" and note.get_attribute("title") == fact
        page.close()
    finally:
        running.stop()
