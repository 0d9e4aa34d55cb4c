// The web chat: plain JS, no build step and nothing fetched from elsewhere (the server may be
// offline). Each reply streams from /v1/chat/completions (server-sent events read with fetch and
// a ReadableStream); the conversation so far is sent with every message, as the OpenAI API wants.
// Sampling comes from the page's query string: /?temperature=0&top_k=40&max_tokens=64&model=NAME
// (by default the chat card's temperature 0.8 and top-k 200).
"use strict";

const KEY_STORAGE = "promethean-api-key";
const query = new URLSearchParams(window.location.search);
const sampling = {
  temperature: numberFromQuery("temperature", 0.8),
  top_k: numberFromQuery("top_k", 200),
  max_tokens: numberFromQuery("max_tokens", null),
  model: query.get("model"),
};

const conversationView = document.getElementById("conversation");
const messageBox = document.getElementById("message");
const sendButton = document.getElementById("send");
const errorBox = document.getElementById("error");
const keySetting = document.getElementById("key-setting");
const keyField = document.getElementById("api-key");
const memorySetting = document.getElementById("memory-setting");
const memoryBox = document.getElementById("memory");

const conversation = []; // finished turns: {role, content}
let chatId = newChatId(); // groups this conversation's turns in the server's chat log
let busy = false;

function numberFromQuery(name, fallback) {
  const raw = query.get(name);
  if (raw === null || raw === "") return fallback;
  const value = Number(raw);
  return Number.isFinite(value) ? value : fallback;
}

function newChatId() {
  // crypto.randomUUID exists only in secure contexts (https, localhost); plain http elsewhere.
  if (window.crypto && crypto.randomUUID) return "web-" + crypto.randomUUID();
  return "web-" + Date.now().toString(16) + Math.random().toString(16).slice(2);
}

function storedKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function headers() {
  const result = { "Content-Type": "application/json" };
  const key = keyField.value.trim() || storedKey();
  if (key) result.Authorization = "Bearer " + key;
  return result;
}

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = "turn " + role;
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  turn.appendChild(body);
  conversationView.appendChild(turn);
  conversationView.scrollTop = conversationView.scrollHeight;
  return turn;
}

function showError(message) {
  errorBox.textContent = message;
  errorBox.hidden = false;
}

function hideError() {
  errorBox.hidden = true;
  errorBox.textContent = "";
}

function setBusy(value) {
  busy = value;
  sendButton.disabled = value;
  document.body.dataset.busy = String(value);
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// One sentence a person can act on, from the server's OpenAI-style error body.
async function errorFrom(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = (body.error && body.error.message) || "";
  } catch (_) {
    detail = response.statusText;
  }
  if (response.status === 401) {
    return new ApiError(401, "This server needs an API key: enter it above and send again. (" + detail + ")");
  }
  if (response.status === 503) {
    const wait = response.headers.get("Retry-After") || "a few";
    return new ApiError(503, "The server is busy (503): try again in " + wait + " s. (" + detail + ")");
  }
  return new ApiError(response.status, "Error " + response.status + ": " + detail);
}

function showMemories(turn, memories) {
  if (!memories.length) return;
  const note = document.createElement("small");
  note.className = "memories";
  note.textContent = "recalled " + memories.length + (memories.length === 1 ? " memory" : " memories");
  note.title = memories.map((memory) => memory.text).join("\n---\n");
  turn.appendChild(note);
}

// Read the server-sent events of a streamed chat completion into `turn`; the reply's text.
async function readReply(response, turn) {
  const text = turn.querySelector(".text");
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let reply = "";
  let chunks = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice("data: ".length);
        if (data === "[DONE]") return reply.trim();
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, "Error: " + chunk.error.message);
        if (chunk.memories) showMemories(turn, chunk.memories);
        const choice = chunk.choices && chunk.choices[0];
        if (choice && choice.delta && choice.delta.content) {
          reply += choice.delta.content;
          chunks += 1;
          turn.dataset.chunks = String(chunks);
          text.textContent = reply.trimStart();
          conversationView.scrollTop = conversationView.scrollHeight;
        }
      }
    }
  }
  throw new ApiError(0, "The connection closed before the reply was complete.");
}

async function send() {
  const message = messageBox.value.trim();
  if (!message || busy) return;
  setBusy(true);
  hideError();
  const humanTurn = addTurn("human", message);
  const replyTurn = addTurn("assistant", "");
  replyTurn.dataset.state = "streaming";
  messageBox.value = "";
  const body = {
    messages: [...conversation, { role: "user", content: message }],
    stream: true,
    temperature: sampling.temperature,
    chat_id: chatId,
  };
  if (sampling.top_k !== null) body.top_k = sampling.top_k;
  if (sampling.max_tokens !== null) body.max_tokens = sampling.max_tokens;
  if (sampling.model) body.model = sampling.model;
  if (memoryBox.checked) body.memory = true;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
    });
    if (!response.ok) throw await errorFrom(response);
    const key = keyField.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key); // it worked: keep it for this tab
    const reply = await readReply(response, replyTurn);
    replyTurn.querySelector(".text").textContent = reply;
    replyTurn.dataset.state = "done";
    conversation.push({ role: "user", content: message }, { role: "assistant", content: reply });
  } catch (error) {
    // The turn did not happen: keep it on screen, greyed, and give the message back to resend.
    replyTurn.remove();
    humanTurn.classList.add("failed");
    messageBox.value = message;
    if (error.status === 401) {
      keySetting.hidden = false;
      keyField.focus();
    }
    showError(error instanceof ApiError ? error.message : "Error: " + error.message);
  } finally {
    setBusy(false);
    if (document.activeElement !== keyField) messageBox.focus();
  }
}

document.getElementById("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});

messageBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});

// A new conversation: the model sees none of the old turns, and the chat log files the next
// turns under a new chat_id (finetune-chat then treats them as a conversation of their own).
document.getElementById("new-conversation").addEventListener("click", () => {
  if (busy) return;
  conversation.length = 0;
  conversationView.replaceChildren();
  chatId = newChatId();
  hideError();
  messageBox.focus();
});

keyField.addEventListener("keydown", (event) => {
  if (event.key === "Enter") {
    event.preventDefault();
    send();
  }
});

// /health needs no key: it names the model and says whether the server has a memory.
async function describeServer() {
  if (storedKey()) {
    keyField.value = storedKey();
    keySetting.hidden = false;
  }
  try {
    const health = await (await fetch("health")).json();
    document.getElementById("model-name").textContent = sampling.model || health.model;
    memorySetting.hidden = !health.memory;
  } catch (_) {
    showError("The server does not answer at " + window.location.origin + ".");
  }
  document.body.dataset.ready = "true";
}

setBusy(false);
describeServer();
