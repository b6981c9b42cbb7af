// The playground: a conversation with this server's /v1 API, streamed, from the browser.
//
// Model output only ever enters the page as text (Text nodes, textContent), never as HTML: a model that
// writes <script> gets it shown. The page's Content Security Policy also refuses inline script and, through
// Trusted Types, any assignment of a string to innerHTML.

const KEY_STORAGE = "llmapi.key";
const REFRESH_MS = 3000;
const NUMBER = /^-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?$/;

// Each control: the API parameter it sets and how its text becomes that parameter (undefined: left out, so
// that the API's default applies). Errors naming the parameter are shown under the control (id + "-error").
// Log-probabilities and the output format depend on the mode (or need parsing first): see body().
const CONTROLS = [
  { param: "temperature", id: "temperature", read: number },
  { param: "top_p", id: "top_p", read: number },
  { param: "max_tokens", id: "max_tokens", read: number },
  { param: "seed", id: "seed", read: number },
  { param: "stop", id: "stop-sequences", read: stopSequences },
];
// Parameters an error may name that no control sets, and the field their errors are shown under.
const ERROR_FIELDS = {
  messages: "message",
  prompt: "message",
  max_completion_tokens: "max_tokens",
  logprobs: "top_logprobs",
  top_logprobs: "top_logprobs",
  response_format: "json-schema",
};
const EXTRA_FIELDS = ["top_logprobs", "json-schema"]; // fields with errors that CONTROLS does not list
const MODES = {
  chat: { path: "/v1/chat/completions", label: "Message" },
  completion: { path: "/v1/completions", label: "Prompt" },
};

const $ = (id) => document.getElementById(id);
const state = { mode: "chat", messages: [], controller: null };

// ---- values sent to the API: as typed, so that the API validates them and says what is wrong

function number(text) {
  const value = text.trim();
  if (value === "") return undefined;
  if (!NUMBER.test(value)) return value; // sent as a string: the API answers with its message for this field
  // Verbatim, so that a seed above 2**53 reaches the server exactly.
  return typeof JSON.rawJSON === "function" ? JSON.rawJSON(value) : Number(value);
}

function stopSequences(text) {
  const lines = text.split("\n").filter((line) => line !== "").map((line) => line.replaceAll("\\n", "\n"));
  return lines.length ? lines : undefined;
}

function randomSeed() {
  const [high, low] = crypto.getRandomValues(new Uint32Array(2));
  return ((BigInt(high & 0x7fffffff) << 32n) | BigInt(low)).toString(); // 0 .. 2**63-1, the API's range
}

function seedText() {
  const typed = $("seed").value.trim();
  if (typed !== "" || !$("pick-seed").checked) return typed;
  return randomSeed();
}

function body(prompt, seed, format) {
  const request = state.mode === "chat" ? { messages: conversation(prompt) } : { prompt };
  const chosen = { seed }; // the seed as sent (typed, or picked at random), not as its field shows it
  for (const control of CONTROLS) {
    const value = control.read(chosen[control.param] ?? $(control.id).value);
    if (value !== undefined) request[control.param] = value;
  }
  if ($("logprobs").checked) {
    const top = number($("top_logprobs").value);
    if (state.mode === "chat") {
      request.logprobs = true;
      if (top !== undefined) request.top_logprobs = top;
    } else {
      request.logprobs = top ?? 0; // completions: the number of alternatives is the parameter
    }
  }
  if (format) request.response_format = format;
  return { ...request, stream: true, stream_options: { include_usage: true } };
}

// The response_format the output-format controls ask for (null: none), or an error for the schema box, shown
// there without sending anything.
function responseFormat() {
  const kind = $("response-format").value;
  if (kind === "json_object") return { format: { type: "json_object" } };
  if (kind !== "json_schema") return { format: null };
  const text = $("json-schema").value;
  if (!text.trim()) return { error: "Type a JSON schema, or choose another output format." };
  let schema;
  try {
    schema = JSON.parse(text);
  } catch (exc) {
    return { error: `Not valid JSON: ${exc.message}` };
  }
  return { format: { type: "json_schema", json_schema: { name: "playground", schema } } };
}

function conversation(prompt) {
  const system = $("system").value;
  const head = system.trim() ? [{ role: "system", content: system }] : [];
  return [...head, ...state.messages, { role: "user", content: prompt }];
}

function authorization() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ---- errors: the API's one shape, shown next to the field its param names

async function apiError(response) {
  let error = null;
  try {
    error = (await response.json()).error;
  } catch {
    // not JSON (a proxy's page, say): the status says what little is known
  }
  if (!error || typeof error.message !== "string") {
    error = { message: response.statusText || "The request failed.", param: null };
  }
  return { status: response.status, message: error.message, param: error.param ?? null };
}

function fieldOf(error) {
  if (error.status === 401) return "key";
  const param = String(error.param ?? "").split(/[.[]/)[0];
  const control = CONTROLS.find((c) => c.param === param);
  return control ? control.id : ERROR_FIELDS[param] ?? "general";
}

function showError(error) {
  const field = fieldOf(error);
  const where = $(`${field}-error`);
  if (!where) return; // no field to blame: the turn shows the error
  where.textContent = error.status ? `${error.status}: ${error.message}` : error.message;
  where.hidden = false;
  $(field)?.setAttribute("aria-invalid", "true");
}

function clearError(field) {
  const where = $(`${field}-error`);
  if (where) {
    where.hidden = true;
    where.textContent = "";
  }
  $(field)?.removeAttribute("aria-invalid");
}

function clearErrors() {
  for (const field of ["key", "message", "system", ...CONTROLS.map((c) => c.id), ...EXTRA_FIELDS]) clearError(field);
}

// ---- the log: one turn per request

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// One token of an answer with log-probabilities: its text, in a span that says (title, and the tip on focus)
// how likely the model found it and what else it might have written.
function tokenSpan(text, entries) {
  const span = element("span", "token", text);
  span.tabIndex = 0;
  span.title = entries.length ? entries.map(describeToken).join("\n\n") : "no log-probability for this text";
  return span;
}

function describeToken({ token, logprob, top }) {
  const head = `${JSON.stringify(token)}: ${logprobText(logprob)}`;
  if (!top.length) return head;
  const lines = top.map((alt) => `${alt.token === token ? "→" : "  "} ${JSON.stringify(alt.token)}: ${logprobText(alt.logprob)}`);
  return [head, "Top alternatives:", ...lines].join("\n");
}

function logprobText(logprob) {
  if (logprob === null || logprob === undefined) return "no log-probability";
  const probability = Math.exp(logprob) * 100;
  const shown = probability >= 0.1 || probability === 0 ? probability.toFixed(1) : probability.toPrecision(2);
  return `logprob ${logprob.toFixed(4)}, probability ${shown}%`;
}

// A chunk's log-probabilities as [{token, logprob, top: [{token, logprob}]}], from either API's shape.
function tokenEntries(mode, logprobs) {
  if (!logprobs) return [];
  if (mode === "chat") {
    return (logprobs.content ?? []).map((entry) => ({
      token: entry.token,
      logprob: entry.logprob,
      top: (entry.top_logprobs ?? []).map((alt) => ({ token: alt.token, logprob: alt.logprob })),
    }));
  }
  const tops = logprobs.top_logprobs ?? [];
  return (logprobs.tokens ?? []).map((token, i) => {
    const top = Object.entries(tops[i] ?? {}).map(([alt, logprob]) => ({ token: alt, logprob }));
    top.sort((a, b) => b.logprob - a.logprob);
    // The legacy dict always holds the chosen token: with no alternative asked for, it is all there is.
    const alternatives = top.length === 1 && top[0].token === token ? [] : top;
    return { token, logprob: logprobs.token_logprobs?.[i] ?? null, top: alternatives };
  });
}

function addTurn(prompt, withLogprobs) {
  $("empty")?.remove();
  const turn = element("article", `turn ${state.mode}`);
  const answer = document.createTextNode("");
  const answerBox = element("p", "text answer");
  if (!withLogprobs) answerBox.append(answer); // with them: one span per token, appended as they come
  if (state.mode === "chat") {
    const user = element("div", "msg user");
    user.append(element("span", "who", "You"), element("p", "text", prompt));
    const model = element("div", "msg assistant");
    model.append(element("span", "who", "Model"), answerBox);
    turn.append(user, model);
  } else {
    const text = element("p", "text");
    text.append(element("span", "prompt", prompt), answerBox);
    answerBox.className = "answer";
    turn.append(text);
  }
  const figures = element("ul", "figures");
  const failure = element("p", "turn-error");
  failure.hidden = true;
  turn.append(figures, failure);
  $("log").append(turn);
  follow();
  return {
    append(piece, entries) {
      if (!withLogprobs) {
        answer.appendData(piece);
      } else if (entries.map((entry) => entry.token).join("") === piece) {
        answerBox.append(...entries.map((entry) => tokenSpan(entry.token, [entry])));
      } else {
        // The text is not the tokens' (a character split across tokens, a stop sequence cut off): one span
        // for the piece, its title listing every token, so that the answer's text stays exactly the API's.
        answerBox.append(tokenSpan(piece, entries));
      }
      follow();
    },
    fail(error) {
      failure.textContent = error.status ? `${error.status}: ${error.message}` : error.message;
      failure.hidden = false;
      turn.classList.add("failed");
    },
    figures(items) {
      figures.replaceChildren(
        ...items.map(([name, text]) => {
          const item = element("li", "", text);
          item.dataset.figure = name;
          return item;
        }),
      );
      follow();
    },
  };
}

function follow() {
  const log = $("log");
  log.scrollTop = log.scrollHeight;
}

// ---- Server-Sent Events over fetch: the server writes `data: {json}\n\n` events, then `data: [DONE]`

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const lines = block.split("\n").filter((line) => line.startsWith("data:"));
      const data = lines.map((line) => line.slice(5).replace(/^ /, "")).join("\n");
      if (data === "[DONE]") {
        reader.cancel();
        return;
      }
      if (data) yield JSON.parse(data);
    }
  }
}

// ---- one request: send, stream, figures

async function send() {
  const prompt = $("message").value;
  if (state.controller || !prompt.trim()) return;
  clearErrors();
  const { format, error } = responseFormat();
  if (error) {
    showError({ status: 0, message: error, param: "response_format" }); // nothing is sent
    return;
  }
  const temperature = $("temperature").value.trim();
  const ask = { mode: state.mode, prompt, seed: seedText(), greedy: temperature !== "" && Number(temperature) === 0 };
  const request = body(prompt, ask.seed, format);
  const turn = addTurn(prompt, request.logprobs !== undefined);
  const controller = new AbortController();
  setBusy(controller);
  $("message").value = "";
  const outcome = {
    started: performance.now(),
    firstAt: null,
    ended: null,
    text: "",
    finish: null,
    usage: null,
    requestId: null,
    failed: false,
  };
  try {
    await exchange(ask, request, turn, outcome, controller.signal);
  } catch (exc) {
    if (exc.name === "AbortError") {
      outcome.finish = "stopped by you";
    } else {
      fail(turn, outcome, { status: 0, message: `The server could not be reached (${exc.message}).` }, prompt);
    }
  } finally {
    outcome.ended = performance.now();
    const current = state.controller === controller; // not abandoned by New conversation or a mode switch
    const answered = !outcome.failed && (outcome.text !== "" || outcome.finish !== "stopped by you");
    if (ask.mode === "chat" && answered && current) {
      state.messages.push({ role: "user", content: prompt }, { role: "assistant", content: outcome.text });
    }
    turn.figures(figures(outcome, ask));
    if (current) setBusy(null);
  }
}

async function exchange(ask, request, turn, outcome, signal) {
  const response = await fetch(MODES[ask.mode].path, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authorization() },
    body: JSON.stringify(request),
    signal,
    cache: "no-store",
  });
  outcome.requestId = response.headers.get("X-Request-ID");
  if (!response.ok) {
    fail(turn, outcome, await apiError(response), ask.prompt);
    return;
  }
  for await (const chunk of events(response)) {
    if (chunk.error) {
      fail(turn, outcome, { status: chunk.error.code, message: chunk.error.message, param: chunk.error.param });
      return;
    }
    if (chunk.usage) outcome.usage = chunk.usage;
    for (const choice of chunk.choices ?? []) {
      const piece = ask.mode === "chat" ? choice.delta?.content : choice.text;
      if (piece) {
        outcome.firstAt ??= performance.now();
        outcome.text += piece;
        turn.append(piece, tokenEntries(ask.mode, choice.logprobs));
      }
      if (choice.finish_reason) outcome.finish = choice.finish_reason;
    }
  }
}

function fail(turn, outcome, error, prompt) {
  outcome.failed = true;
  turn.fail(error);
  showError(error);
  if (prompt !== undefined && $("message").value === "") $("message").value = prompt; // to fix and send again
}

function figures(outcome, { seed, greedy }) {
  const { started, ended, firstAt, usage } = outcome;
  if (outcome.failed && firstAt === null) {
    return [["finish", "finish: error"], ["request-id", `request id ${outcome.requestId ?? "none"}`]];
  }
  const items = [];
  items.push(["ttft", firstAt === null ? "first token: none" : `first token ${Math.round(firstAt - started)} ms`]);
  if (usage && firstAt !== null && usage.completion_tokens > 1 && ended > firstAt) {
    const rate = (usage.completion_tokens - 1) / ((ended - firstAt) / 1000);
    items.push(["rate", `${rate.toFixed(1)} tokens/s`]);
  } else {
    items.push(["rate", "tokens/s: n/a"]);
  }
  items.push([
    "usage",
    usage
      ? `usage ${usage.prompt_tokens} + ${usage.completion_tokens} = ${usage.total_tokens} tokens`
      : "usage: not sent",
  ]);
  items.push(["finish", `finish: ${outcome.finish ?? (outcome.failed ? "error" : "none")}`]);
  items.push(["seed", seed ? `seed ${seed}${greedy ? " (unused: temperature 0 is greedy)" : ""}` : "seed: none"]);
  items.push(["request-id", `request id ${outcome.requestId ?? "none"}`]);
  return items;
}

function setBusy(controller) {
  state.controller = controller;
  $("send").disabled = controller !== null;
  $("stop").disabled = controller === null;
  $("log").setAttribute("aria-busy", controller !== null ? "true" : "false");
}

function stop() {
  state.controller?.abort(); // the connection closes; the server notices and cancels the generation
}

function newConversation() {
  stop();
  setBusy(null);
  state.messages = [];
  const empty = element("p", "empty", "A new conversation: type a message and press Enter.");
  empty.id = "empty";
  $("log").replaceChildren(empty);
  clearErrors();
  $("message").focus();
}

function applyMode(mode) {
  state.mode = mode;
  $("message-label").textContent = MODES[mode].label;
  $("system-field").hidden = mode !== "chat";
}

// ---- the server panel: /ready for everyone, /status with the key

async function getJson(path, headers = {}) {
  const response = await fetch(path, { headers, cache: "no-store" });
  let data = null;
  try {
    data = await response.json();
  } catch {
    // leave data null
  }
  return { status: response.status, ok: response.ok, data };
}

function show(name, text) {
  document.querySelector(`[data-server="${name}"]`).textContent = text;
}

function known(value, suffix = "") {
  return value === null || value === undefined ? "not loaded" : `${value}${suffix}`;
}

async function refreshServer() {
  if (document.hidden) return;
  try {
    const ready = await getJson("/ready");
    show("readiness", ready.ok ? "ready" : `not ready: ${ready.data?.error?.message ?? ready.status}`);
    if (ready.ok) show("model", ready.data.model);
    const auth = authorization();
    if (!auth.Authorization) {
      $("server-note").textContent = "Enter the key to see the engine's live figures.";
      return;
    }
    const status = await getJson("/status", auth);
    if (!status.ok) {
      const message = status.data?.error?.message ?? `status ${status.status}`;
      $("server-note").textContent = `Live figures: ${status.status}: ${message}`;
      return;
    }
    const s = status.data;
    show("readiness", s.ready ? "ready" : `${s.state}${s.reason ? `: ${s.reason}` : ""}`);
    show("model", s.model);
    show("hardware", s.dtype === null ? "not loaded" : `${s.dtype} / ${s.device}`);
    show("engine", `${s.engine_mode}, up to ${s.max_batch_size} rows`);
    show("decoding", known(s.decoding));
    show("waiting", known(s.waiting));
    show("rate", known(s.tokens_per_second));
    show("requests", `${s.in_flight} of ${s.admission_limit} admitted`);
    show("worker", `pid ${s.pid} (each worker has its own model)`);
    $("server-note").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
  } catch (exc) {
    show("readiness", "unreachable");
    $("server-note").textContent = `The server could not be reached (${exc.message}).`;
  }
}

// ---- the token tip: a token's title, shown next to it while it has the focus (a title shows on hover only)

function tokenTip() {
  const tip = element("div", "token-tip");
  tip.id = "token-tip";
  tip.setAttribute("aria-hidden", "true"); // the span's title is its accessible description already
  tip.hidden = true;
  document.body.append(tip);
  const log = $("log");
  log.addEventListener("focusin", (event) => {
    const span = event.target.closest?.(".token");
    if (!span) return;
    tip.textContent = span.title;
    tip.hidden = false;
    const box = span.getBoundingClientRect();
    const left = Math.max(4, Math.min(box.left, window.innerWidth - tip.offsetWidth - 4));
    const below = box.bottom + 4 + tip.offsetHeight <= window.innerHeight;
    tip.style.left = `${left + window.scrollX}px`; // CSSOM, which the CSP allows (unlike a style attribute)
    tip.style.top = `${(below ? box.bottom + 4 : box.top - tip.offsetHeight - 4) + window.scrollY}px`;
  });
  log.addEventListener("focusout", () => {
    tip.hidden = true;
  });
  log.addEventListener("scroll", () => {
    tip.hidden = true;
  });
}

// ---- wiring

function start() {
  const key = $("key");
  key.value = sessionStorage.getItem(KEY_STORAGE) ?? "";
  key.addEventListener("input", () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    clearError("key");
  });
  key.addEventListener("change", refreshServer);
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    key.value = "";
    refreshServer();
  });
  for (const field of ["message", "system", ...CONTROLS.map((c) => c.id), ...EXTRA_FIELDS]) {
    $(field).addEventListener("input", () => clearError(field));
  }
  $("logprobs").addEventListener("change", () => clearError("top_logprobs"));
  const format = $("response-format");
  const showSchema = () => {
    $("json-schema-field").hidden = format.value !== "json_schema";
  };
  format.addEventListener("change", () => {
    showSchema();
    clearError("json-schema");
  });
  showSchema();
  tokenTip();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    } else if (event.key === "Escape") {
      stop();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new").addEventListener("click", newConversation);
  for (const radio of document.querySelectorAll('input[name="mode"]')) {
    radio.addEventListener("change", () => {
      applyMode(radio.value);
      newConversation();
    });
  }
  applyMode(document.querySelector('input[name="mode"]:checked').value);
  refreshServer();
  setInterval(refreshServer, REFRESH_MS);
  document.addEventListener("visibilitychange", refreshServer);
}

start();
