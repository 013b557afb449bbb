// The chat page of `cumo-mlx serve`: plain JavaScript, no build step, nothing loaded from elsewhere.
// It talks to the server's OpenAI-compatible API (/v1/models, /v1/chat/completions) and to its
// expert view endpoint (/v1/cumo/routes).
"use strict";

const DEFAULTS = { system: "", temperature: 0.2, top_p: 0.7, max_tokens: 512, api_key: "" }; // CuMo's demo
const SETTINGS_KEY = "cumo-chat-settings";
const MAX_SIDE = 1008; // the model sees 336 px crops (3 x 3 of them at S2 scale 3)
// Okabe-Ito's colour-blind safe palette, then evenly spread hues for models with more experts.
const PALETTE = ["#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999999"];

const $ = (id) => document.getElementById(id);

// --- safe Markdown ---------------------------------------------------------------------------
// Everything is escaped first; only the tags made here reach the page, so no HTML or script from
// a model's answer ever runs.

function escapeHtml(text) {
  return text.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;")
    .replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function renderInline(escaped) {
  const codes = [];
  let html = escaped.replace(/`([^`\n]+)`/g, (_, code) => {
    codes.push(`<code>${code}</code>`);
    return `\u0000${codes.length - 1}\u0000`;
  });
  html = html
    .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*\w])\*([^*\n]+)\*(?!\w)/g, "$1<em>$2</em>")
    .replace(/(^|[^\w])_([^_\n]+)_(?!\w)/g, "$1<em>$2</em>")
    .replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g, '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>');
  return html.replace(/\u0000(\d+)\u0000/g, (_, i) => codes[Number(i)]);
}

function renderBlocks(text) {
  const out = [];
  let list = null; // "ul" or "ol" while inside a list
  let paragraph = [];
  const flush = () => {
    if (paragraph.length) out.push(`<p>${paragraph.map(renderInline).join("<br>")}</p>`);
    paragraph = [];
  };
  const closeList = () => {
    if (list) out.push(`</${list}>`);
    list = null;
  };
  for (const line of escapeHtml(text).split("\n")) {
    const heading = /^(#{1,6})\s+(.*)$/.exec(line);
    const bullet = /^\s*[-*+]\s+(.*)$/.exec(line);
    const numbered = /^\s*\d+[.)]\s+(.*)$/.exec(line);
    const quote = /^&gt;\s?(.*)$/.exec(line);
    if (heading || bullet || numbered || quote || !line.trim()) flush();
    if (!(bullet || numbered)) closeList();
    if (heading) {
      const level = Math.min(heading[1].length + 2, 6); // answers sit below the page's own headings
      out.push(`<h${level}>${renderInline(heading[2])}</h${level}>`);
    } else if (bullet || numbered) {
      const kind = bullet ? "ul" : "ol";
      if (list !== kind) {
        closeList();
        out.push(`<${kind}>`);
        list = kind;
      }
      out.push(`<li>${renderInline((bullet || numbered)[1])}</li>`);
    } else if (quote) {
      out.push(`<blockquote>${renderInline(quote[1])}</blockquote>`);
    } else if (line.trim()) {
      paragraph.push(line);
    }
  }
  flush();
  closeList();
  return out.join("");
}

function renderMarkdown(text) {
  // Fenced code blocks first (an unclosed fence, as while streaming, runs to the end).
  const parts = String(text).replace(/\u0000/g, "").split(/^```/m); // (NUL marks inline code)
  let html = renderBlocks(parts[0]);
  for (let i = 1; i < parts.length; i += 2) {
    const newline = parts[i].indexOf("\n");
    const lang = newline < 0 ? "" : parts[i].slice(0, newline).trim();
    const code = newline < 0 ? "" : parts[i].slice(newline + 1).replace(/\n$/, "");
    const label = /^[\w+#.-]{1,20}$/.test(lang) ? ` data-lang="${escapeHtml(lang)}"` : "";
    html += `<pre${label}><code>${escapeHtml(code)}</code></pre>`;
    if (i + 1 < parts.length) html += renderBlocks(parts[i + 1].replace(/^[^\n]*\n?/, ""));
  }
  return html;
}

// --- settings --------------------------------------------------------------------------------

const fields = { system: "system", temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens", api_key: "api-key" };

function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || "{}");
  } catch (e) {
    saved = {};
  }
  for (const [key, id] of Object.entries(fields)) $(id).value = key in saved ? saved[key] : DEFAULTS[key];
}

function saveSettings() {
  const values = {};
  for (const [key, id] of Object.entries(fields)) values[key] = $(id).value;
  localStorage.setItem(SETTINGS_KEY, JSON.stringify(values));
}

function numberSetting(id, fallback) {
  const value = parseFloat($(id).value);
  return Number.isFinite(value) ? value : fallback;
}

// The default is left to the server: the same 512, lowered to what fits a model with a smaller
// context (the demo's is 512 positions, its prompt included).
function maxTokens() {
  const value = Math.round(numberSetting("max-tokens", DEFAULTS.max_tokens));
  return value === DEFAULTS.max_tokens ? {} : { max_tokens: value };
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// --- images ----------------------------------------------------------------------------------

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const image = new Image();
    image.onload = () => resolve(image);
    image.onerror = () => reject(new Error("not an image the browser can read"));
    image.src = url;
  });
}

// The image as a data URI; one larger than MAX_SIDE is downscaled here (a smaller upload, and
// the model would shrink it anyway); a small one is sent as it is.
async function prepareImage(file) {
  const original = await readAsDataURL(file);
  const image = await loadImage(original);
  const side = Math.max(image.naturalWidth, image.naturalHeight);
  if (side <= MAX_SIDE) return original;
  const scale = MAX_SIDE / side;
  const canvas = document.createElement("canvas");
  canvas.width = Math.max(1, Math.round(image.naturalWidth * scale));
  canvas.height = Math.max(1, Math.round(image.naturalHeight * scale));
  const context = canvas.getContext("2d");
  context.imageSmoothingQuality = "high";
  context.drawImage(image, 0, 0, canvas.width, canvas.height);
  return canvas.toDataURL(file.type === "image/png" ? "image/png" : "image/jpeg", 0.92);
}

const attachments = []; // data URIs waiting for the next message

async function attachFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) {
      showError(`${file.name || "the file"} is not an image`);
      continue;
    }
    try {
      attachments.push(await prepareImage(file));
    } catch (e) {
      showError(`${file.name || "the image"}: ${e.message}`);
    }
  }
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  attachments.forEach((url, i) => {
    const item = document.createElement("div");
    item.className = "thumb";
    const image = document.createElement("img");
    image.src = url;
    image.alt = `Attached image ${i + 1}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "remove";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove image ${i + 1}`);
    remove.addEventListener("click", () => {
      attachments.splice(i, 1);
      renderAttachments();
      $("prompt").focus();
    });
    item.append(image, remove);
    box.append(item);
  });
}

// --- conversation ----------------------------------------------------------------------------

const conversation = []; // {role, text, images, element}
let controller = null; // the AbortController of the answer being streamed

function addMessage(role, text, images = []) {
  $("empty").hidden = true;
  const element = document.createElement("article");
  element.className = `message ${role}`;
  element.dataset.testid = `message-${role}`;
  element.setAttribute("aria-label", role === "user" ? "You" : "Assistant");
  if (images.length) {
    const row = document.createElement("div");
    row.className = "images";
    for (const [i, url] of images.entries()) {
      const image = document.createElement("img");
      image.src = url;
      image.alt = `Image ${i + 1} of this message`;
      row.append(image);
    }
    element.append(row);
  }
  const body = document.createElement("div");
  body.className = "body";
  element.append(body);
  const message = { role, text, images, element, body };
  setText(message, text);
  $("messages").append(element);
  conversation.push(message);
  element.scrollIntoView({ block: "end" });
  return message;
}

function setText(message, text) {
  message.text = text;
  if (message.role === "assistant") message.body.innerHTML = renderMarkdown(text);
  else message.body.textContent = text;
}

function showError(text, message = null) {
  const box = document.createElement("div");
  box.className = "error";
  box.setAttribute("role", "alert");
  box.dataset.testid = "error";
  box.textContent = text;
  (message ? message.element : $("messages")).append(box);
  box.scrollIntoView({ block: "end" });
}

// The OpenAI message list: system prompt, then every turn, images as data: URI image_url parts.
function apiMessages() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const m of conversation) {
    if (!m.images.length) messages.push({ role: m.role, content: m.text });
    else {
      const parts = m.images.map((url) => ({ type: "image_url", image_url: { url } }));
      messages.push({ role: m.role, content: [...parts, { type: "text", text: m.text }] });
    }
  }
  return messages;
}

async function errorMessage(response) {
  let text = "";
  try {
    text = await response.text();
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
    if (body && body.detail) return `${response.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
  } catch (e) {
    // not JSON: fall through to the plain text
  }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

// Parse server-sent events from a fetch body; calls onData with each `data:` payload.
async function readEvents(body, onData) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const lines = buffer.split(/\r?\n/);
    buffer = done ? "" : lines.pop();
    for (const line of lines) {
      if (line.startsWith("data:")) {
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(data);
      }
    }
    if (done) return;
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("regenerate").disabled = busy || !conversation.length;
  $("clear").disabled = busy;
}

function finish(message, stats) {
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.dataset.testid = "done";
  meta.textContent = stats;
  message.element.append(meta);
}

// Stream one answer to the conversation so far into a new assistant message.
async function answer() {
  const messages = apiMessages();
  // only the last answer carries the `done` hook
  document.querySelectorAll('[data-testid="done"]').forEach((e) => e.removeAttribute("data-testid"));
  const message = addMessage("assistant", "");
  message.element.setAttribute("aria-busy", "true");
  controller = new AbortController();
  setBusy(true);
  const start = performance.now();
  let first = null;
  let tokens = 0;
  let usage = null;
  let stopped = false;
  let failed = false;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({
        model: $("model-name").dataset.id || "cumo",
        messages,
        stream: true,
        stream_options: { include_usage: true },
        temperature: numberSetting("temperature", DEFAULTS.temperature),
        top_p: numberSetting("top-p", DEFAULTS.top_p),
        ...maxTokens(),
      }),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    await readEvents(response.body, (data) => {
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (first === null) first = performance.now();
        tokens += 1;
        const box = $("messages");
        const following = box.scrollHeight - box.scrollTop - box.clientHeight < 80;
        setText(message, message.text + delta.content);
        if (following) box.scrollTop = box.scrollHeight; // keep the growing answer in view
      }
    });
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else {
      failed = true;
      showError(e.message === "Failed to fetch" ? "cannot reach the server" : e.message, message);
    }
  } finally {
    controller = null;
    message.element.removeAttribute("aria-busy");
  }
  const end = performance.now();
  const generated = usage ? usage.completion_tokens : tokens;
  const parts = [];
  if (stopped) parts.push("stopped");
  if (first !== null) {
    parts.push(`${((first - start) / 1000).toFixed(2)} s to first token`);
    if (generated > 1 && end > first) parts.push(`${((generated - 1) / ((end - first) / 1000)).toFixed(1)} tokens/s`);
  } else if (!failed && !stopped) parts.push("empty answer");
  finish(message, parts.join(" · ") || "failed");
  if (!message.text && (failed || stopped)) conversation.pop(); // shown, not sent again
  setBusy(false);
  if (!failed) expertView.answered();
}

async function send() {
  if (controller) return;
  const text = $("prompt").value;
  if (!text.trim() && !attachments.length) return;
  addMessage("user", text, attachments.splice(0));
  renderAttachments();
  $("prompt").value = "";
  await answer();
}

// Answer the last question again (after an answer, in its place; after a failure, anew).
async function regenerate() {
  if (controller || !conversation.length) return;
  if (conversation[conversation.length - 1].role === "assistant") conversation.pop().element.remove();
  await answer();
}

function clearConversation() {
  if (controller) return;
  conversation.splice(0);
  $("messages").replaceChildren($("empty"));
  $("empty").hidden = false;
  expertView.reset();
  setBusy(false);
  $("prompt").focus();
}

// --- expert view -----------------------------------------------------------------------------

function expertColour(e, count) {
  if (count <= PALETTE.length) return PALETTE[e];
  return `hsl(${Math.round((360 * e) / count)}, 70%, 50%)`;
}

const expertView = {
  data: null, // the /v1/cumo/routes response for the chosen image
  loaded: null, // the request it answered
  picture: null,
  sources: [], // {url, question, answer} per image of the conversation
  folded: true,

  setFolded(folded) {
    this.folded = folded;
    $("experts").hidden = folded;
    $("experts-toggle").setAttribute("aria-expanded", String(!folded));
  },

  reset() {
    this.data = null;
    this.loaded = null;
    this.sources = [];
    $("experts-image").replaceChildren();
    $("experts-body").hidden = true;
    this.status("Ask about an image to see which expert each patch goes to.");
  },

  status(text) {
    $("experts-status").textContent = text;
    $("experts-status").hidden = !text;
  },

  // After an answer: every image of the conversation, with the question and answer of its turn.
  answered() {
    const sources = [];
    conversation.forEach((m, i) => {
      const reply = conversation[i + 1];
      for (const url of m.role === "user" ? m.images : []) {
        sources.push({ url, question: m.text, answer: reply && reply.role === "assistant" ? reply.text : "" });
      }
    });
    if (!sources.length) return;
    this.sources = sources;
    const select = $("experts-image");
    select.replaceChildren(...sources.map((_, i) => new Option(`${i + 1} of ${sources.length}`, String(i))));
    select.value = String(sources.length - 1);
    this.setFolded(false);
    this.load();
  },

  async load() {
    const source = this.sources[Number($("experts-image").value)];
    if (!source) return;
    const body = { image: source.url, question: source.question, answer: source.answer };
    const system = $("system").value.trim();
    if (system) body.system = system;
    const key = JSON.stringify(body);
    if (key === this.loaded) return; // a later turn: this image's routing is already shown
    this.loaded = key;
    this.status("Routing the image…");
    try {
      const response = await fetch("/v1/cumo/routes", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(body),
      });
      if (!response.ok) throw new Error(await errorMessage(response));
      this.data = await response.json();
      this.picture = await loadImage(this.data.image);
    } catch (e) {
      this.loaded = null;
      $("experts-body").hidden = true;
      this.status(`The expert view is not available: ${e.message}`);
      return;
    }
    const site = $("experts-site");
    const previous = site.value;
    site.replaceChildren(...this.data.sites.map((s, i) => new Option(s.name, String(i))));
    if (previous && Number(previous) < this.data.sites.length) site.value = previous;
    if (!this.data.sites.length) {
      this.status("This model has no MoE sites on the image side.");
      return;
    }
    this.status("");
    $("experts-body").hidden = false;
    this.draw();
  },

  draw() {
    if (!this.data || !this.data.sites.length) return;
    const site = this.data.sites[Number($("experts-site").value) || 0];
    const canvas = $("experts-canvas");
    const context = canvas.getContext("2d");
    const side = canvas.width;
    context.drawImage(this.picture, 0, 0, side, side);
    const rows = site.grid.length;
    const cell = side / rows;
    context.globalAlpha = Number($("experts-opacity").value);
    site.grid.forEach((row, y) => row.forEach((e, x) => {
      context.fillStyle = expertColour(e, site.num_experts);
      // whole pixels, so that neighbouring cells neither overlap nor leave gaps
      const x0 = Math.round(x * cell), y0 = Math.round(y * cell);
      context.fillRect(x0, y0, Math.round((x + 1) * cell) - x0, Math.round((y + 1) * cell) - y0);
    }));
    context.globalAlpha = 1;
    const shares = site.shares.map((s, e) => `expert ${e} ${s.toFixed(1)}%`).join(", ");
    canvas.setAttribute("aria-label", `${site.name}: ${rows} by ${rows} patches; ${shares}`);
    $("experts-caption").textContent = `${site.name}: the top-1 expert of each of its ${rows}\u00a0×\u00a0${rows} patches`;
    this.legend(site);
    this.tokens(site);
  },

  legend(site) {
    const items = site.shares.map((share, e) => {
      const item = document.createElement("li");
      item.dataset.share = String(share);
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.setProperty("background", expertColour(e, site.num_experts));
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.setProperty("width", `${share}%`);
      bar.style.setProperty("background", expertColour(e, site.num_experts));
      const label = document.createElement("span");
      label.textContent = `expert ${e}: ${share.toFixed(1)}% (${site.counts[e]} patches)`;
      item.append(swatch, label, bar);
      return item;
    });
    $("experts-legend").replaceChildren(...items);
  },

  // The answer's tokens coloured by their top-1 expert at the chosen LLM layer (Mixtral only).
  tokens() {
    const box = $("token-routes");
    const routes = this.data.tokens;
    if (!routes || !routes.available) {
      const note = document.createElement("p");
      note.className = "status";
      note.textContent = `Answer tokens: ${routes ? routes.reason : "not provided by this server"}.`;
      box.replaceChildren(note);
      return;
    }
    const layer = document.createElement("select");
    layer.id = "token-layer";
    routes.layers.forEach((name, i) => layer.append(new Option(name, String(i))));
    const label = document.createElement("label");
    label.append("Answer tokens at ", layer);
    const text = document.createElement("p");
    text.className = "tokens";
    const paint = () => {
      text.replaceChildren(...routes.tokens.map((t) => {
        const span = document.createElement("span");
        const e = t.experts[Number(layer.value)];
        span.textContent = t.text;
        span.title = `expert ${e}`;
        span.style.setProperty("border-bottom-color", expertColour(e, routes.num_experts));
        span.style.setProperty("background", `color-mix(in srgb, ${expertColour(e, routes.num_experts)} 35%, transparent)`);
        return span;
      }));
    };
    layer.addEventListener("change", paint);
    paint();
    box.replaceChildren(label, text);
  },
};

// --- wiring ----------------------------------------------------------------------------------

async function loadModelName() {
  const label = $("model-name");
  try {
    const response = await fetch("/v1/models", { headers: authHeaders() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const models = (await response.json()).data || [];
    label.dataset.id = models.length ? models[0].id : "";
    label.textContent = models.length ? models[0].id : "no model";
  } catch (e) {
    label.textContent = `model unknown (${e.message})`;
  }
}

function imageFiles(dataTransfer) {
  return Array.from((dataTransfer && dataTransfer.files) || []).filter((f) => f.type.startsWith("image/"));
}

function wire() {
  loadSettings();
  for (const id of Object.values(fields)) $(id).addEventListener("input", saveSettings);
  $("api-key").addEventListener("change", loadModelName);
  $("reset-settings").addEventListener("click", () => {
    localStorage.removeItem(SETTINGS_KEY);
    loadSettings();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("regenerate").addEventListener("click", regenerate);
  $("clear").addEventListener("click", clearConversation);
  $("image-input").addEventListener("change", async (event) => {
    await attachFiles(Array.from(event.target.files));
    event.target.value = "";
  });
  document.addEventListener("paste", (event) => {
    const files = imageFiles(event.clipboardData);
    if (files.length) {
      event.preventDefault();
      attachFiles(files);
    }
  });
  const zone = $("drop-zone");
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.hidden = false;
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) zone.hidden = true;
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.hidden = true;
    attachFiles(imageFiles(event.dataTransfer));
  });
  $("experts-toggle").addEventListener("click", () => expertView.setFolded(!expertView.folded));
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("experts-image").addEventListener("change", () => expertView.load());
  $("experts-site").addEventListener("change", () => expertView.draw());
  $("experts-opacity").addEventListener("input", () => expertView.draw());
  // Phones: settings start folded, so that the conversation gets the screen.
  if (window.matchMedia("(max-width: 760px)").matches) $("settings-toggle").click();
  loadModelName();
  $("prompt").focus();
}

wire();
// For tests and the curious: the renderer, and the conversation as sent (raw text, image count).
window.cumoChat = {
  markdown: renderMarkdown,
  messages: () => conversation.map((m) => ({ role: m.role, text: m.text, images: m.images.length })),
};
