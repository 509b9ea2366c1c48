// forwardpass dashboard: plain JavaScript, no build step, nothing loaded from elsewhere.
// Pages (the part after #): /            every model, its versions and state, held-out scores, drift
//                           /model/NAME  try it: a form, an image or a drawing, a chat, a text, a WAV file
//                           /metrics     live charts from the server's /metrics, usage per key
// Every call goes to this server's own API (the key, when given, as a Bearer token).

const $ = (selector, root = document) => root.querySelector(selector);
const main = $("#main");
const status = $("#status");
let models = [];
let leaving = () => {}; // the current page's clean-up (timers, a stream in flight)
let visit = 0; // which navigation is current: a page whose awaits end after the next one began draws nothing
const gone = (mine) => mine !== visit;

// -- the API -----------------------------------------------------------------------------------------

function headers(extra = {}) {
  const key = localStorage.getItem("forwardpass-key");
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, body, options = {}) {
  const init = { method: body === undefined ? "GET" : "POST", headers: headers(body === undefined ? {} :
    { "Content-Type": "application/json" }), signal: options.signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (options.raw) return response;
  const text = await response.text();
  let doc;
  try { doc = text ? JSON.parse(text) : {}; } catch { doc = { error: text }; }
  if (!response.ok) {
    const message = doc.error && doc.error.message ? doc.error.message : doc.error || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return doc;
}

function say(message, error = false) {
  status.setAttribute("role", error ? "alert" : "status");
  status.textContent = message;
  status.classList.toggle("error", error);
  if (!error) setTimeout(() => { if (status.textContent === message) status.textContent = ""; }, 4000);
}

// -- small DOM helpers ---------------------------------------------------------------------------------

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== false && value !== null && value !== undefined) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

const badge = (text) => el("span", { class: `badge ${text}` }, text);
const number = (v, digits = 3) => (v === null || v === undefined || Number.isNaN(v) ? "-" :
  Math.abs(v) >= 1000 ? Math.round(v).toLocaleString() : Number(v.toPrecision(digits)).toString());

function bars(rows) { // [[label, share 0..1, text]]
  return el("ul", { class: "bars" }, rows.map(([label, share, text]) => {
    const bar = el("div", { class: "bar", role: "presentation" });
    bar.style.width = `${Math.max(0, Math.min(1, share)) * 100}%`;
    return el("li", {}, el("span", {}, label), bar, el("span", { class: "now" }, text));
  }));
}

// -- pages ---------------------------------------------------------------------------------------------

async function route() {
  leaving();
  leaving = () => {};
  const mine = ++visit;
  const path = location.hash.replace(/^#/, "") || "/";
  for (const link of document.querySelectorAll("nav a")) {
    const current = (link.dataset.nav === "metrics") === path.startsWith("/metrics");
    if (current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  try {
    if (path.startsWith("/model/")) await modelPage(decodeURIComponent(path.slice(7)), mine);
    else if (path.startsWith("/metrics")) metricsPage(mine);
    else await modelsPage(mine);
  } catch (error) {
    if (gone(mine)) return;
    main.replaceChildren(el("h1", {}, "Could not load this page"), el("p", { class: "error" }, error.message),
      el("p", { class: "muted" }, "A server that requires a key needs it above."));
  }
}

async function loadModels() {
  models = (await api("/ui/api/models")).models;
  return models;
}

async function modelsPage(mine) {
  await loadModels();
  if (gone(mine)) return;
  const rows = models.map((m) => {
    const states = m.versions.map((v) => el("div", {}, `v${v.version} `, badge(v.state),
      v.reason ? el("div", { class: "muted" }, v.reason) : null));
    const scores = Object.entries(m.metrics || {}).filter(([k]) => k !== "eval_rows")
      .map(([k, v]) => `${k} ${number(v)}`).join(", ");
    const size = m.image && m.image.size;
    const inputs = m.kind === "tabular" ? `${m.features.length} features` : m.kind === "image" ?
      `image${size ? ` ${Array.isArray(size) ? size.join("x") : size}` : ""}` : m.kind;
    return el("tr", {},
      el("td", {}, el("a", { href: `#/model/${encodeURIComponent(m.name)}` }, m.name)),
      el("td", {}, states), el("td", {}, m.task || "-"), el("td", {}, inputs),
      el("td", {}, scores || "-"), el("td", {}, m.drift ? badge(m.drift) : el("span", { class: "muted" }, "-")));
  });
  main.replaceChildren(el("h1", {}, "Models"),
    el("div", { class: "scroll" }, el("table", {},
      el("thead", {}, el("tr", {}, ["model", "versions", "task", "inputs", "held-out", "drift"].map((h) =>
        el("th", { scope: "col" }, h)))), el("tbody", {}, rows))));
}

async function modelPage(name, mine) {
  if (!models.length) await loadModels();
  if (gone(mine)) return;
  const model = models.find((m) => m.name === name);
  if (!model) throw new Error(`no model named '${name}'`);
  const scores = Object.entries(model.metrics || {}).filter(([k]) => k !== "eval_rows")
    .map(([k, v]) => `${k} ${number(v)}`).join(", ");
  const head = [el("h1", {}, model.name, " ", el("span", { class: "muted" }, `v${model.version ?? "-"}`)),
    el("p", {}, model.description || ""), scores ? el("p", { class: "muted" }, `Held-out: ${scores}`) : null];
  const body = { tabular: tabularTry, image: imageTry, generation: chatTry, text: textTry, embedding: embedTry,
    audio: audioTry, stream: audioTry }[model.kind];
  const panel = el("section", { class: "card", "aria-label": "Try it" });
  main.replaceChildren(...head.filter(Boolean), panel);
  if (model.error) panel.append(el("p", { class: "error" }, model.error));
  else if (body) body(model, panel);
  else panel.append(el("p", {}, `This model takes tensors (${model.kind}); try it with V2 at `,
    el("code", {}, `/v2/models/${model.name}/infer`), "."));
  if (model.drift) {
    const drift = el("section", { class: "card" }, el("h2", {}, "Drift"), el("p", { class: "muted" }, "Loading..."));
    main.append(drift);
    api(`/v2/models/${encodeURIComponent(name)}/drift`).then((report) => {
      if (gone(mine)) return;
      const features = (report.features || []).map((f) => [f.name, Math.min(1, (f.psi || 0) / 0.5),
        `${number(f.psi)}`]);
      drift.replaceChildren(el("h2", {}, "Drift ", badge(report.status)),
        el("p", { class: "muted" }, `${report.rows ?? 0} recent rows against ${report.reference_rows ?? "-"} ` +
          "reference rows; population stability index per feature (0.1 moderate, 0.25 significant)"), bars(features));
    }).catch((error) => drift.replaceChildren(el("h2", {}, "Drift"), el("p", { class: "error" }, error.message)));
  }
}

function answerView(answer, model) {
  if (answer && answer.label !== undefined) {
    const top = answer.top_k || [{ label: answer.label, probability: answer.probability }];
    return [el("p", { class: "answer", "data-answer": answer.label }, String(answer.label)),
      bars(top.map((t) => [String(t.label), t.probability, `${(t.probability * 100).toFixed(1)}%`]))];
  }
  if (answer && answer.value !== undefined) {
    const interval = answer.low !== undefined ? ` (${Math.round(answer.level * 100)}% interval ` +
      `${number(answer.low)} to ${number(answer.high)})` : "";
    return [el("p", { class: "answer", "data-answer": answer.value }, `${number(answer.value, 5)}${interval}`)];
  }
  return [el("pre", {}, JSON.stringify(answer, null, 1).slice(0, 4000))];
}

async function predict(model, instances, out, button) {
  button.disabled = true;
  const start = performance.now();
  try {
    const doc = await api(`/v1/models/${encodeURIComponent(model.name)}:predict`, { instances });
    const ms = performance.now() - start;
    out.replaceChildren(...answerView(Array.isArray(doc.predictions) ? doc.predictions[0] : doc.predictions, model),
      el("p", { class: "muted" }, `${ms.toFixed(1)} ms, version ${doc.model_version}`));
  } catch (error) {
    out.replaceChildren(el("p", { class: "error" }, error.message));
  } finally {
    button.disabled = false;
  }
}

function tabularTry(model, panel) {
  const fields = model.features.map((name, i) => el("label", {}, name,
    el("input", { type: "number", step: "any", name, required: true, value: "", "aria-label": name, "data-index": i })));
  const out = el("div", { "aria-live": "polite" });
  const button = el("button", { type: "submit" }, "Predict");
  const form = el("form", { onsubmit: (event) => {
    event.preventDefault();
    const row = {};
    for (const input of form.querySelectorAll("input")) row[input.name] = Number(input.value);
    predict(model, [row], out, button);
  } }, el("div", { class: "form" }, fields), el("div", { class: "row" }, button));
  panel.append(el("h2", {}, "Try it"), form, out);
}

function imageTry(model, panel) {
  const out = el("div", { "aria-live": "polite" });
  const upload = el("input", { type: "file", accept: "image/*", id: "image-file" });
  const predictFile = el("button", { type: "button" }, "Predict the file");
  predictFile.addEventListener("click", async () => {
    const file = upload.files[0];
    if (!file) { say("Choose an image file first", true); return; }
    try { predict(model, [{ b64: await base64(file) }], out, predictFile); }
    catch (error) { out.replaceChildren(el("p", { class: "error" }, `${file.name}: ${error.message}`)); }
  });
  // a drawing: white ink on black, as the digits model reads; mouse, pen or touch
  const canvas = el("canvas", { class: "draw", width: 192, height: 192, "aria-label": "Drawing area: draw with a " +
    "mouse, pen or finger; or upload a file instead" });
  const ink = canvas.getContext("2d");
  const clear = () => { ink.fillStyle = "#000"; ink.fillRect(0, 0, canvas.width, canvas.height); };
  clear();
  let drawing = false;
  const at = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true; canvas.setPointerCapture(event.pointerId);
    ink.strokeStyle = "#fff"; ink.lineWidth = 30; ink.lineCap = "round"; ink.lineJoin = "round";
    ink.beginPath(); ink.moveTo(...at(event)); ink.lineTo(...at(event)); ink.stroke();
  });
  canvas.addEventListener("pointermove", (event) => { if (drawing) { ink.lineTo(...at(event)); ink.stroke(); } });
  canvas.addEventListener("pointerup", () => { drawing = false; });
  const predictDrawing = el("button", { type: "button", id: "predict-drawing" }, "Predict the drawing");
  predictDrawing.addEventListener("click", () => predict(model, [{ b64: canvas.toDataURL("image/png").split(",")[1] }],
    out, predictDrawing));
  panel.append(el("h2", {}, "Try it"),
    el("div", { class: "row" }, el("label", { for: "image-file" }, "An image: "), upload, predictFile),
    el("p", { class: "muted" }, "Or draw one:"), canvas,
    el("div", { class: "row" }, predictDrawing, el("button", { type: "button", class: "plain", onclick: clear }, "Clear")),
    out);
}

function base64(file) { // a file's bytes as base64 (a data URL's tail: no size limit of String.fromCharCode)
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",")[1] || "");
    reader.onerror = () => reject(reader.error || new Error("the file could not be read"));
    reader.readAsDataURL(file);
  });
}

function textTry(model, panel) {
  const text = el("textarea", { "aria-label": "Text to classify", id: "text-input" });
  const out = el("div", { "aria-live": "polite" });
  const button = el("button", { type: "button" }, "Predict");
  button.addEventListener("click", () => predict(model, [text.value], out, button));
  panel.append(el("h2", {}, "Try it"), text, el("div", { class: "row" }, button), out);
}

function embedTry(model, panel) {
  const text = el("textarea", { "aria-label": "Text to embed", id: "text-input" }, "The quick brown fox");
  const out = el("div", { "aria-live": "polite" });
  const button = el("button", { type: "button" }, "Embed");
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      const doc = await api("/v1/embeddings", { model: model.name, input: text.value });
      const vector = doc.data[0].embedding;
      out.replaceChildren(el("p", {}, `${vector.length} dimensions, ${doc.usage.prompt_tokens} tokens`),
        el("pre", {}, vector.slice(0, 12).map((v) => v.toFixed(4)).join(", ") + ", ..."));
    } catch (error) { out.replaceChildren(el("p", { class: "error" }, error.message)); }
    finally { button.disabled = false; }
  });
  panel.append(el("h2", {}, "Try it"), text, el("div", { class: "row" }, button), out);
}

function chatTry(model, panel) {
  const log = el("div", { class: "chat", "aria-live": "polite", id: "chat-log" });
  const messages = [];
  const prompt = el("textarea", { id: "chat-input", "aria-label": "Message", placeholder: "Say something" });
  const setting = (label, name, value, attrs) => el("label", {}, label, el("input", { type: "number", name, value, ...attrs }));
  const settings = el("div", { class: "form" },
    setting("temperature", "temperature", "0.7", { step: "0.1", min: "0", max: "2" }),
    setting("top_p", "top_p", "0.95", { step: "0.05", min: "0", max: "1" }),
    setting("max_tokens", "max_tokens", "64", { step: "1", min: "1", max: String(model.context_length || 2048) }),
    setting("seed (empty: random)", "seed", "", { step: "1" }));
  const info = el("p", { class: "muted", id: "chat-info" });
  const send = el("button", { type: "submit", id: "chat-send" }, "Send");
  const stop = el("button", { type: "button", class: "plain", disabled: true }, "Stop");
  let controller = null;
  stop.addEventListener("click", () => controller && controller.abort());
  leaving = () => controller && controller.abort();
  const form = el("form", { onsubmit: async (event) => {
    event.preventDefault();
    if (!prompt.value.trim()) return;
    messages.push({ role: "user", content: prompt.value });
    log.append(el("div", { class: "msg user" }, prompt.value));
    prompt.value = "";
    const reply = el("div", { class: "msg assistant" });
    log.append(reply);
    const body = { model: model.name, messages, stream: true, stream_options: { include_usage: true } };
    for (const input of settings.querySelectorAll("input")) if (input.value !== "") body[input.name] = Number(input.value);
    controller = new AbortController();
    send.disabled = true; stop.disabled = false;
    log.setAttribute("aria-busy", "true"); // read the reply once it is whole, not token by token
    const start = performance.now();
    let first = null, chunks = 0, usage = null, text = "";
    try {
      const response = await api("/v1/chat/completions", body, { raw: true, signal: controller.signal });
      if (!response.ok) {
        const doc = await response.json().catch(() => ({}));
        throw new Error(`${response.status}: ${(doc.error && doc.error.message) || response.statusText}`);
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
          if (!data || data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "the stream failed");
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            chunks += 1;
            text += delta.content;
            reply.textContent = text;
            log.scrollTop = log.scrollHeight;
          }
        }
      }
      messages.push({ role: "assistant", content: text });
      const seconds = (performance.now() - start) / 1000;
      const tokens = usage ? usage.completion_tokens : chunks;
      const decode = first === null ? 0 : (performance.now() - first) / 1000;
      info.textContent = `time to first token ${first === null ? "-" : ((first - start)).toFixed(0)} ms, ` +
        `${tokens} tokens in ${seconds.toFixed(2)} s (${tokens > 1 && decode > 0 ? ((tokens - 1) / decode).toFixed(1) : "-"} tokens/s)` +
        (usage ? `, prompt ${usage.prompt_tokens} tokens` : "");
      info.dataset.tokens = String(tokens);
    } catch (error) {
      if (error.name !== "AbortError") reply.replaceChildren(el("span", { class: "error" }, error.message));
      messages.pop();
    } finally {
      send.disabled = false; stop.disabled = true; controller = null;
      log.removeAttribute("aria-busy");
    }
  } }, prompt, el("div", { class: "row" }, send, stop), settings);
  panel.append(el("h2", {}, "Chat"), log, form, info);
}

function audioTry(model, panel) {
  const out = el("div", { "aria-live": "polite" });
  const upload = el("input", { type: "file", accept: "audio/wav,audio/*", id: "audio-file" });
  const button = el("button", { type: "button" }, model.kind === "stream" ? "Stream it" : "Predict");
  button.addEventListener("click", async () => {
    const file = upload.files[0];
    if (!file) { say("Choose a WAV file first", true); return; }
    button.disabled = true;
    try {
      if (model.kind !== "stream") await predict(model, [{ b64: await base64(file) }], out, button);
      else await streamAudio(model, await file.arrayBuffer(), out);
    }
    catch (error) { out.replaceChildren(el("p", { class: "error" }, error.message)); }
    finally { button.disabled = false; }
  });
  panel.append(el("h2", {}, "Try it"), el("div", { class: "row" }, el("label", { for: "audio-file" }, "A WAV file: "),
    upload, button), out);
}

async function streamAudio(model, bytes, out) {
  // the file at 16 kHz, mono, sent over the model's WebSocket stream 512 samples a frame
  const decoded = await new AudioContext().decodeAudioData(bytes);
  const rate = 16000;
  const offline = new OfflineAudioContext(1, Math.ceil(decoded.duration * rate), rate);
  const source = offline.createBufferSource();
  source.buffer = decoded; source.connect(offline.destination); source.start();
  const samples = (await offline.startRendering()).getChannelData(0);
  const frames = Math.floor(samples.length / 512);
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v2/models/${encodeURIComponent(model.name)}/stream`;
  // a browser's WebSocket sends no headers: the key goes as a subprotocol, beside "forwardpass"
  const key = localStorage.getItem("forwardpass-key");
  const encoded = key && btoa(key).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, ""); // base64url: a token
  const socket = new WebSocket(url, key ? ["forwardpass", `bearer.${encoded}`] : []);
  const closeIt = leaving;
  leaving = () => { socket.close(); closeIt(); };
  let found;
  try { found = await exchange(socket, samples, frames); }
  finally { socket.onclose = null; socket.close(); }
  const { probabilities, events } = found;
  const chart = el("canvas", { class: "chart", "aria-label": "Speech probability per 32 ms window" });
  out.replaceChildren(el("p", {}, `${frames} windows of 32 ms; ${events.length} speech events`), chart,
    el("pre", {}, events.map((e) => `${e.event} at ${number(e.time)} s`).join("\n")));
  drawChart(chart, [{ name: "speech", values: probabilities }], 1);
}

function exchange(socket, samples, frames) { // every frame sent, every answer read: {probabilities, events}
  const probabilities = [];
  const events = [];
  return new Promise((resolve, reject) => {
    socket.onerror = () => reject(new Error("the stream failed (is the key set above the one this server expects?)"));
    socket.onclose = (event) => reject(new Error(`the stream closed (${event.code}${event.reason ? `: ${event.reason}` : ""})`));
    socket.onopen = () => {
      for (let i = 0; i < frames; i++) {
        const data = Array.from(samples.subarray(i * 512, (i + 1) * 512));
        socket.send(JSON.stringify({ inputs: [{ name: "input", datatype: "FP32", shape: [1, 512], data }] }));
      }
      if (!frames) resolve({ probabilities, events });
    };
    socket.onmessage = (message) => {
      const doc = JSON.parse(message.data);
      if (doc.error) { reject(new Error(doc.error)); return; }
      for (const output of doc.outputs || []) {
        if (output.datatype === "FP32") probabilities.push(output.data[0]);
        if (output.datatype === "BYTES") for (const e of output.data) events.push(typeof e === "string" ? JSON.parse(e) : e);
      }
      if (probabilities.length >= frames) resolve({ probabilities, events });
    };
  });
}

// -- metrics -------------------------------------------------------------------------------------------

function parseMetrics(text) { // Prometheus text -> [{name, labels, value}]
  const found = [];
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const match = /^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)/.exec(line);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    found.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return found;
}

const sum = (samples, name, where = () => true) =>
  samples.filter((s) => s.name === name && where(s.labels)).reduce((a, s) => a + s.value, 0);

function buckets(samples, name) { // cumulative counts by upper bound, summed over models
  const by = new Map();
  for (const s of samples) if (s.name === name) by.set(s.labels.le, (by.get(s.labels.le) || 0) + s.value);
  return by;
}

function quantile(now, before, q) { // from two snapshots of a cumulative histogram
  const edges = [...now.keys()].map((le) => [le, le === "+Inf" ? Infinity : Number(le)]).sort((a, b) => a[1] - b[1]);
  const counts = edges.map(([le]) => (now.get(le) || 0) - ((before && before.get(le)) || 0));
  const total = counts[counts.length - 1] || 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0, below = 0;
  for (let i = 0; i < edges.length; i++) {
    if (counts[i] >= rank) {
      const upper = edges[i][1] === Infinity ? lower : edges[i][1];
      const inBucket = counts[i] - below;
      return inBucket > 0 ? lower + (upper - lower) * (rank - below) / inBucket : upper;
    }
    lower = edges[i][1]; below = counts[i];
  }
  return lower;
}

const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

function drawChart(canvas, series, fixedMax = null) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300, height = canvas.clientHeight || 150;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  const values = series.flatMap((s) => s.values.filter((v) => v !== null && Number.isFinite(v)));
  const top = fixedMax ?? Math.max(1, ...values) * 1.15; // an idle chart reads 0 to 1, not 0 to 1e-9
  const style = getComputedStyle(document.body);
  g.strokeStyle = style.getPropertyValue("--line"); g.fillStyle = style.getPropertyValue("--muted");
  g.font = "11px system-ui"; g.lineWidth = 1;
  for (const f of [0, 0.5, 1]) {
    const y = height - 14 - f * (height - 24);
    g.beginPath(); g.moveTo(0, y); g.lineTo(width, y); g.stroke();
    g.fillText(number(top * f), 2, y - 2);
  }
  series.forEach((s, i) => {
    const points = s.values;
    const n = Math.max(2, points.length);
    g.strokeStyle = COLORS[i % COLORS.length]; g.lineWidth = 2; g.beginPath();
    let started = false;
    points.forEach((v, j) => {
      if (v === null || !Number.isFinite(v)) { started = false; return; }
      const x = (j / (n - 1)) * (width - 4) + 2, y = height - 14 - Math.min(1, v / top) * (height - 24);
      if (started) g.lineTo(x, y); else { g.moveTo(x, y); started = true; }
    });
    g.stroke();
  });
}

const ms = (seconds) => (seconds === null ? null : seconds * 1000);

const CHARTS = [
  ["requests", "Requests / s", (d) => ({ all: d.rate("forwardpass_requests_total") })],
  ["latency", "Latency, ms (p50, p99)", (d) => ({ p50: ms(d.quantile(0.5)), p99: ms(d.quantile(0.99)) })],
  ["batch", "Rows per batch", (d) => ({ mean: d.ratio("forwardpass_batch_size_sum", "forwardpass_batch_size_count") })],
  ["cache", "Cache hit rate, %", (d) => ({ hits: d.share("forwardpass_cache_hits_total", "forwardpass_cache_misses_total") })],
  ["tokens", "Tokens / s generated", (d) => ({ all: d.gauge("forwardpass_generation_tokens_per_second") })],
  ["queue", "Queue depth", (d) => ({ "requests in flight": Math.max(0, d.gauge("forwardpass_inflight_requests") - 1),
    "generation queue": d.gauge("forwardpass_generation_queue_depth") })],
  ["drift", "Drift: largest PSI per model", (d) => d.driftByModel()],
];

function metricsPage(mine) {
  const POINTS = 60, EVERY = 2000;
  const history = Object.fromEntries(CHARTS.map(([id]) => [id, {}]));
  const cards = CHARTS.map(([id, title]) => el("section", { class: "card" },
    el("div", { class: "chart-head" }, el("h2", {}, title), el("span", { class: "now", id: `now-${id}` }, "")),
    el("canvas", { class: "chart", id: `chart-${id}`, role: "img", "aria-label": title }),
    el("div", { class: "legend", id: `legend-${id}` })));
  const usage = el("section", { class: "card", id: "usage" }, el("h2", {}, "Usage per key (this month)"),
    el("p", { class: "muted" }, "Loading..."));
  main.replaceChildren(el("h1", {}, "Metrics"), el("p", { class: "muted" }, `From /metrics every ${EVERY / 1000} s; ` +
    "the charts keep the last two minutes. With several workers, each scrape is one worker's."), el("div", { class: "grid" }, cards), usage);
  let before = null, beforeAt = 0, polls = 0;

  async function poll() {
    let samples;
    try {
      const response = await fetch("/metrics", { headers: headers() });
      if (!response.ok) throw new Error(`/metrics: ${response.status}`);
      samples = parseMetrics(await response.text());
    } catch (error) { if (!gone(mine)) say(error.message, true); return; }
    if (gone(mine)) return;
    const at = performance.now();
    const seconds = before ? (at - beforeAt) / 1000 : 0;
    const delta = (name) => { // a counter that went back (a restart, another worker answered): no value
      if (!before) return null;
      const d = sum(samples, name) - sum(before, name);
      return d < 0 ? null : d;
    };
    const view = {
      rate: (name) => { const d = delta(name); return seconds > 0 && d !== null ? d / seconds : null; },
      gauge: (name) => sum(samples, name),
      ratio: (a, b) => { const n = delta(b), x = delta(a); return n && x !== null ? x / n : null; },
      share: (a, b) => { const x = delta(a), y = delta(b); return x !== null && y !== null && x + y > 0 ? (100 * x) / (x + y) : null; },
      quantile: (q) => before ? quantile(buckets(samples, "forwardpass_request_duration_seconds_bucket"),
        buckets(before, "forwardpass_request_duration_seconds_bucket"), q) : null,
      driftByModel: () => {
        const worst = {};
        for (const s of samples) if (s.name === "forwardpass_drift_psi") {
          worst[s.labels.model] = Math.max(worst[s.labels.model] ?? 0, s.value);
        }
        return worst;
      },
    };
    for (const [id, , compute] of CHARTS) {
      const found = compute(view);
      const lines = history[id];
      for (const [name, value] of Object.entries(found)) {
        if (!lines[name]) lines[name] = Array(polls).fill(null);
        lines[name].push(value === null || value === undefined || Number.isNaN(value) ? null : value);
      }
      for (const [name, values] of Object.entries(lines)) {
        if (values.length < polls + 1) values.push(null);
        if (values.length > POINTS) values.splice(0, values.length - POINTS);
        if (!(name in found) && values.every((v) => v === null)) delete lines[name];
      }
      const series = Object.entries(lines).map(([name, values]) => ({ name, values }));
      drawChart($(`#chart-${id}`), series, id === "cache" ? 100 : null);
      $(`#now-${id}`).textContent = series.map((s) => number(s.values[s.values.length - 1])).join(" / ");
      $(`#legend-${id}`).replaceChildren(...series.map((s, i) => {
        const swatch = el("i");
        swatch.style.background = COLORS[i % COLORS.length];
        return el("span", {}, swatch, s.name);
      }));
    }
    before = samples; beforeAt = at; polls += 1;
    main.dataset.polls = String(polls);
    if (polls % 3 === 1) showUsage(usage);
  }

  poll();
  const timer = setInterval(poll, EVERY);
  leaving = () => clearInterval(timer);
}

async function showUsage(card) {
  const today = new Date().toISOString().slice(0, 10);
  try {
    const doc = await api(`/v1/usage?from=${today.slice(0, 8)}01`);
    const keys = {};
    for (const row of doc.data) {
      const k = keys[row.key] || (keys[row.key] = { requests: 0, tokens: 0, rows: 0, cost: 0 });
      k.requests += row.requests; k.rows += row.rows; k.cost += row.cost || 0;
      k.tokens += row.prompt_tokens + row.completion_tokens;
    }
    const most = Math.max(1, ...Object.values(keys).map((k) => k.requests));
    card.replaceChildren(el("h2", {}, "Usage per key (this month)"),
      Object.keys(keys).length ? bars(Object.entries(keys).map(([key, k]) => [key, k.requests / most,
        `${k.requests}`])) : el("p", { class: "muted" }, "No usage yet."),
      el("div", { class: "scroll" }, el("table", {}, el("thead", {}, el("tr", {},
        ["key", "requests", "rows", "tokens", "cost"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, Object.entries(keys).map(([key, k]) => el("tr", {}, el("td", {}, key), el("td", {}, k.requests),
        el("td", {}, k.rows), el("td", {}, k.tokens), el("td", {}, number(k.cost)))))))); 
  } catch (error) {
    card.replaceChildren(el("h2", {}, "Usage per key"), el("p", { class: "muted" }, error.message));
  }
}

// -- start -----------------------------------------------------------------------------------------------

$("#key").value = localStorage.getItem("forwardpass-key") || "";
$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("#key").value.trim();
  if (key) localStorage.setItem("forwardpass-key", key); else localStorage.removeItem("forwardpass-key");
  models = [];
  say(key ? "Key saved in this browser" : "Key removed");
  route();
});
window.addEventListener("hashchange", () => { route(); main.focus(); });
route();
