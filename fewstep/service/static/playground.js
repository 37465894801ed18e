// fewstep playground: one page over the public API (the same calls a client makes).
// No framework and no build step; nothing is fetched from outside this server.
// The API key lives in memory, or in sessionStorage when the person asks; it travels in the
// Authorization header, or in the first WebSocket message (browsers cannot set headers there),
// never in a URL.

const KEY_STORE = "fewstep.apiKey";
const $ = (id) => document.getElementById(id);

const state = {
  key: "",
  models: [],
  video: null, // the open WebSocket stream, if any
  job: null, // {id, abort, shown: Set}
  clip: null, // the video being followed: {id, abort}
};

// ---------------------------------------------------------------------------------------------
// API calls and their errors

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function apiError(res) {
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = await res.json();
    message = body?.error?.message ?? (typeof body?.detail === "string" ? body.detail : message);
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(res.status, message, res.headers.get("Retry-After"));
}

async function api(path, { method = "GET", body, signal } = {}) {
  let res;
  try {
    res = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, `the server could not be reached (${e.message})`);
  }
  if (!res.ok) throw await apiError(res);
  return res;
}

const apiJson = async (path, opts) => (await api(path, opts)).json();

// A streamed image request (Server-Sent Events): `onPartial` for each partial image as it arrives; resolves to the
// unstreamed response's shape once the completed image comes, rejects with the server's error event.
async function streamImage(path, body, onPartial) {
  const res = await api(path, { method: "POST", body });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) throw new ApiError(0, "the stream ended before the image was complete");
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = /^event: (.*)$/m.exec(frame)?.[1];
      const data = /^data: (.*)$/m.exec(frame)?.[1];
      if (!name || !data) continue;
      const event = JSON.parse(data);
      if (name === "error") throw new ApiError(500, event.error?.message ?? "the image failed");
      if (name.endsWith(".partial_image")) onPartial(event);
      if (name.endsWith(".completed")) {
        reader.cancel();
        const { b64_json, seed, size, steps, nfe, model_version } = event;
        return { model: body.model, model_version, steps, nfe, size, hybrid: Boolean(body.hybrid), data: [{ b64_json, seed }] };
      }
    }
  }
}

function describe(err) {
  if (!(err instanceof ApiError)) return String(err?.message ?? err);
  let text = err.message;
  if (err.retryAfter && (err.status === 429 || err.status === 503)) {
    text += ` Retry in ${err.retryAfter} s.`;
  }
  if (err.status === 401) text += " Enter an API key at the top of the page.";
  return text;
}

function showError(where, err) {
  const el = $(`${where}-error`);
  el.textContent = describe(err);
  el.hidden = false;
}

function clearError(where) {
  const el = $(`${where}-error`);
  el.textContent = "";
  el.hidden = true;
}

// ---------------------------------------------------------------------------------------------
// Small DOM helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function fillMeta(dl, rows) {
  dl.replaceChildren();
  for (const [label, field, value] of rows) {
    dl.append(el("dt", { text: label }), el("dd", { "data-field": field, text: String(value) }));
  }
}

function pngUrl(b64) {
  return `data:image/png;base64,${b64}`;
}

function randomSeed() {
  const a = new Uint32Array(1);
  crypto.getRandomValues(a);
  return a[0] >>> 1; // the server takes seeds in [0, 2^31)
}

async function busy(button, work) {
  button.disabled = true;
  button.setAttribute("aria-busy", "true");
  try {
    return await work();
  } finally {
    button.disabled = false;
    button.removeAttribute("aria-busy");
  }
}

// ---------------------------------------------------------------------------------------------
// Tabs (WAI-ARIA tabs pattern: arrow keys, Home, End; the hash names the open panel)

const tabs = [...document.querySelectorAll('[role="tab"]')];

function openTab(tab, focus = false) {
  for (const t of tabs) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  const name = tab.id.replace("tab-", "");
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "status") refreshModels();
}

for (const tab of tabs) {
  tab.addEventListener("click", () => openTab(tab));
  tab.addEventListener("keydown", (e) => {
    const i = tabs.indexOf(tab);
    const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[e.key];
    if (next === undefined) return;
    e.preventDefault();
    openTab(tabs[(next + tabs.length) % tabs.length], true);
  });
}

// ---------------------------------------------------------------------------------------------
// The API key

function setKey(value, remember) {
  state.key = value.trim();
  if (remember && state.key) sessionStorage.setItem(KEY_STORE, state.key);
  else sessionStorage.removeItem(KEY_STORE);
}

function initKey() {
  const stored = sessionStorage.getItem(KEY_STORE);
  if (stored) {
    $("api-key").value = stored;
    $("key-remember").checked = true;
    state.key = stored;
  }
  const update = () => setKey($("api-key").value, $("key-remember").checked);
  $("api-key").addEventListener("input", update);
  $("api-key").addEventListener("change", () => {
    update();
    refreshModels();
  });
  $("key-remember").addEventListener("change", update);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    update();
    refreshModels();
  });
}

// ---------------------------------------------------------------------------------------------
// Models: /v1/models fills every model picker and the status table

function modelById(id) {
  return state.models.find((m) => m.id === id);
}

async function refreshModels() {
  try {
    const body = await apiJson("v1/models");
    state.models = body.data;
    $("notice").hidden = true;
  } catch (e) {
    $("notice").textContent = `Models could not be listed: ${describe(e)}`;
    $("notice").hidden = false;
    return;
  }
  for (const select of document.querySelectorAll("select[data-kind]")) {
    const { kind, takes } = select.dataset; // `takes`: a card field the model must have true (`videos`)
    const before = select.value;
    const usable = state.models.filter((m) => m.kind === kind && m.version !== null && (!takes || m[takes]));
    select.replaceChildren(...usable.map((m) => el("option", { value: m.id, text: `${m.id} (v${m.version})` })));
    if (usable.some((m) => m.id === before)) select.value = before;
    select.dispatchEvent(new Event("change"));
  }
  renderStatus();
}

function renderStatus() {
  const rows = state.models.map((m) => {
    const versions = m.versions.map((v) => {
      const span = el("span", { class: `v ${v.status}`, text: `v${v.version} ${v.status}` });
      return v.reason ? el("span", { class: "why" }, span, ` ${v.reason}`) : span;
    });
    const cells = [
      m.id,
      m.kind,
      m.version === null ? "none" : `v${m.version}`,
      el("span", { class: "versions" }, ...versions),
      m.family ?? (m.kind === "image" ? "fewstep" : "–"),
      m.steps.join(", "),
      m.size,
      `${m.backend} ${m.precision}`,
      m.hybrid ? "yes" : "no",
    ];
    return el("tr", { "data-model": m.id }, ...cells.map((c) => el("td", {}, c)));
  });
  $("status-table").tBodies[0].replaceChildren(...rows);
}

// A steps slider walks the model's allowed step counts (they need not be contiguous).
function stepsSlider(prefix, modelSelect) {
  const input = $(`${prefix}-steps`);
  const out = $(`${prefix}-steps-out`);
  let allowed = [1, 2, 3, 4];
  const show = () => {
    out.textContent = String(allowed[Number(input.value)] ?? "");
    input.setAttribute("aria-valuetext", `${out.textContent} steps`);
  };
  input.addEventListener("input", show);
  modelSelect.addEventListener("change", () => {
    const m = modelById(modelSelect.value);
    if (!m || !m.steps.length) return;
    const current = allowed[Number(input.value)];
    allowed = m.steps;
    input.max = String(allowed.length - 1);
    const keep = allowed.indexOf(current);
    input.value = String(keep >= 0 ? keep : Math.max(0, allowed.indexOf(m.default_steps)));
    input.disabled = allowed.length < 2;
    show();
  });
  show();
  return () => allowed[Number(input.value)];
}

// The hybrid checkbox of a panel: offered only where the model serves its teacher.
function offerHybrid(prefix, m) {
  const box = $(`${prefix}-hybrid`);
  const label = $(`${prefix}-hybrid-label`);
  box.disabled = !m.hybrid;
  if (!m.hybrid) box.checked = false;
  label.classList.toggle("unavailable", !m.hybrid);
  label.title = m.hybrid ? "" : "this model serves no teacher";
}

// ---------------------------------------------------------------------------------------------
// Image panel

function sizeChoices(m) {
  const native = m.size;
  if (!m.sizes) return [native];
  const { min, max, multiple } = m.sizes;
  const sides = [];
  for (let s = Math.ceil(min / multiple) * multiple; s <= max; s += multiple) sides.push(s);
  const stride = Math.max(1, Math.ceil(sides.length / 12)); // a short list, not every multiple
  const squares = sides.filter((_, i) => i % stride === 0).map((s) => `${s}x${s}`);
  return [native, ...squares.filter((s) => s !== native)];
}

function initImage() {
  const model = $("image-model");
  const steps = stepsSlider("image", model);
  const setVisible = (cls, on) => document.querySelectorAll(`.${cls}`).forEach((n) => (n.hidden = !on));
  model.addEventListener("change", () => {
    const m = modelById(model.value);
    if (!m) return;
    offerHybrid("image", m);
    const sizes = sizeChoices(m);
    $("image-size").replaceChildren(...sizes.map((s) => el("option", { value: s, text: s })));
    setVisible("opt-size", sizes.length > 1);
    const g = m.guidance;
    const takesGuidance = Boolean(g && g.mode !== "none");
    setVisible("opt-guidance", takesGuidance);
    setVisible("opt-negative", Boolean(g && g.mode === "cfg"));
    if (takesGuidance) {
      const input = $("image-guidance");
      input.min = String(g.min);
      input.max = String(g.max);
      input.value = String(g.default);
      $("image-guidance-range").textContent = `(${g.min}–${g.max})`;
    }
  });
  $("image-seed-random").addEventListener("click", () => ($("image-seed").value = String(randomSeed())));

  $("image-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const m = modelById(model.value);
    const body = {
      model: model.value,
      prompt: $("image-prompt").value,
      n: 1,
      steps: steps(),
      hybrid: $("image-hybrid").checked,
    };
    const seed = $("image-seed").value.trim();
    if (seed !== "") body.seed = Number(seed);
    if (!$("image-size").hidden) body.size = $("image-size").value;
    if (m?.guidance && m.guidance.mode !== "none" && $("image-guidance").value !== "") {
      body.guidance_scale = Number($("image-guidance").value);
    }
    if (m?.guidance?.mode === "cfg" && $("image-negative").value) body.negative_prompt = $("image-negative").value;
    const streamed = $("image-partials").checked;
    if (streamed) Object.assign(body, { stream: true, partial_images: 3 });
    busy($("image-go"), async () => {
      clearError("image");
      const t0 = performance.now();
      const img = $("image-out");
      try {
        let r;
        let partials = 0;
        if (streamed) {
          r = await streamImage("v1/images/generations", body, (event) => {
            partials += 1;
            img.src = pngUrl(event.b64_json);
            img.alt = `${body.prompt}: partial image ${event.partial_image_index + 1}`;
            img.hidden = false;
          });
        } else {
          r = await apiJson("v1/images/generations", { method: "POST", body });
        }
        const ms = performance.now() - t0;
        img.src = pngUrl(r.data[0].b64_json);
        img.alt = `${body.prompt} (seed ${r.data[0].seed}, ${r.steps} steps)`;
        img.hidden = false;
        fillMeta($("image-meta"), [
          ["Latency", "latency", `${ms.toFixed(0)} ms`],
          ["Steps", "steps", r.steps],
          ["NFE", "nfe", r.nfe],
          ["Version", "version", `${r.model} v${r.model_version}`],
          ["Seed", "seed", r.data[0].seed],
          ["Size", "size", r.size],
          ["Hybrid", "hybrid", r.hybrid ? "yes" : "no"],
          ...(streamed ? [["Partial images", "partials", partials]] : []),
        ]);
      } catch (err) {
        showError("image", err);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Seeds panel: one prompt over 8 seeds, the student and (where there is a teacher) the hybrid

function initSeeds() {
  const model = $("seeds-model");
  const steps = stepsSlider("seeds", model);
  $("seeds-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const m = modelById(model.value);
    const base = { model: model.value, prompt: $("seeds-prompt").value, n: 8, steps: steps() };
    const seed = Number($("seeds-base").value || 0);
    const modes = m?.hybrid ? [false, true] : [false];
    busy($("seeds-go"), async () => {
      clearError("seeds");
      try {
        const rows = await Promise.all(
          modes.map(async (hybrid) => {
            const t0 = performance.now();
            const r = await apiJson("v1/images/generations", { method: "POST", body: { ...base, seed, hybrid } });
            return { r, ms: performance.now() - t0 };
          }),
        );
        $("seeds-out").replaceChildren(
          ...rows.map(({ r, ms }) => {
            const name = r.hybrid ? "Hybrid" : "Student";
            const head = el("h2", {
              text: `${name} · ${r.steps} steps · NFE ${r.nfe} · ${ms.toFixed(0)} ms for 8`,
            });
            const figs = r.data.map((d) =>
              el(
                "figure",
                {},
                el("img", { src: pngUrl(d.b64_json), alt: `${name}, seed ${d.seed}` }),
                el("figcaption", { text: `seed ${d.seed}` }),
              ),
            );
            return el("div", { class: "seed-row", "data-mode": r.hybrid ? "hybrid" : "student" }, head, el("div", { class: "grid" }, ...figs));
          }),
        );
      } catch (err) {
        showError("seeds", err);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------------
// Video panel: frames over the WebSocket into a canvas

function initVideo() {
  const model = $("video-model");
  const steps = stepsSlider("video", model);
  const canvas = $("video-canvas");
  const ctx = canvas.getContext("2d");
  model.addEventListener("change", () => {
    const m = modelById(model.value);
    if (!m) return;
    offerHybrid("video", m);
  });

  const running = (on) => {
    $("video-go").disabled = on;
    $("video-stop").disabled = !on;
    $("steer-go").disabled = !on;
  };

  $("video-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (state.video) return;
    clearError("video");
    const url = new URL("v1/video/stream", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    const start = {
      model: model.value,
      prompt: $("video-prompt").value,
      frames: Number($("video-frames").value),
      steps: steps(),
      hybrid: $("video-hybrid").checked,
    };
    if ($("video-seed").value !== "") start.seed = Number($("video-seed").value);
    if (state.key) start.api_key = state.key; // browsers cannot set headers on a WebSocket
    const ws = new WebSocket(url);
    const s = { ws, t0: 0, firstAt: 0, drawn: 0, index: -1, done: null, failed: false, steeredAt: null, chain: Promise.resolve() };
    state.video = s;
    canvas.dataset.framesDrawn = "0";
    canvas.dataset.state = "connecting";
    running(true);
    const meta = () => {
      const now = performance.now();
      const fps = s.drawn > 1 ? ((s.drawn - 1) * 1000) / (now - s.firstAt) : 0;
      const rows = [
        ["Frame", "frame", s.index < 0 ? "–" : `${s.index + 1} / ${start.frames}`],
        ["Drawn", "drawn", s.drawn],
        ["First frame", "ttff", s.firstAt ? `${(s.firstAt - s.t0).toFixed(0)} ms` : "–"],
        ["Live fps", "fps", fps ? fps.toFixed(1) : "–"],
      ];
      if (s.steeredAt !== null) rows.push(["Prompt changed", "steered", `after frame ${s.steeredAt + 1}`]);
      if (s.done) {
        rows.push(
          ["Version", "version", `${s.done.model} v${s.done.model_version}`],
          ["Server fps", "server-fps", s.done.fps],
          ["Prompt", "prompt", s.done.prompt],
        );
      }
      fillMeta($("video-meta"), rows);
    };
    ws.onopen = () => {
      s.t0 = performance.now();
      canvas.dataset.state = "streaming";
      ws.send(JSON.stringify(start));
      meta();
    };
    ws.onmessage = (ev) => {
      let msg;
      try {
        msg = JSON.parse(ev.data);
      } catch {
        return;
      }
      if (msg.type === "frame") {
        // decode in arrival order; a frame is counted once it is on the canvas
        s.chain = s.chain.then(async () => {
          const img = new Image();
          img.src = pngUrl(msg.image);
          await img.decode();
          ctx.imageSmoothingEnabled = false;
          ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
          if (!s.firstAt) s.firstAt = performance.now();
          s.drawn += 1;
          s.index = msg.index;
          canvas.dataset.framesDrawn = String(s.drawn);
          meta();
        });
      } else if (msg.type === "done") {
        s.chain = s.chain.then(() => {
          s.done = msg;
          meta();
        });
      } else if (msg.type === "error") {
        s.failed = true;
        showError("video", new Error(msg.message));
      }
    };
    ws.onerror = () => {
      if (!s.failed) showError("video", new Error("the video stream could not be opened"));
      s.failed = true;
    };
    ws.onclose = (ev) => {
      s.chain.then(() => {
        canvas.dataset.state = s.done ? "done" : "closed";
        if (!s.done && !s.failed && ev.code !== 1000 && ev.code !== 1005) {
          showError("video", new Error(`the stream closed early (code ${ev.code}${ev.reason ? `: ${ev.reason}` : ""})`));
        }
        state.video = null;
        running(false);
        meta();
      });
    };
  });

  $("video-stop").addEventListener("click", () => state.video?.ws.close(1000, "stopped by the viewer"));

  $("steer-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const s = state.video;
    if (!s || s.ws.readyState !== WebSocket.OPEN) return;
    s.ws.send(JSON.stringify({ type: "prompt", prompt: $("steer-prompt").value }));
    s.steeredAt = Math.max(0, s.index);
  });
}

// ---------------------------------------------------------------------------------------------
// Videos panel: POST /v1/videos, poll its status, play the MP4, cancel. A <video src> cannot send the
// Authorization header, so the MP4 is fetched like every other call and played from a blob: URL.

const POLL_MS = 300; // how often a video that is not finished is asked for its status

function pause(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

// The frame count the server makes for `seconds` of model `m` (its rule: round(seconds × fps), then the nearest
// count the model makes, 1 + k·frame_step, at most max_frames).
function clipFrames(m, seconds) {
  const asked = Math.round(seconds * m.fps);
  const step = m.frame_step || 1;
  let k = Math.max(0, Math.round((asked - 1) / step));
  while (k && 1 + k * step > m.max_frames) k -= 1;
  return 1 + k * step;
}

const short = (x) => String(Number(x.toFixed(3)));

function initVideos() {
  const model = $("videos-model");
  const steps = stepsSlider("videos", model);
  const seconds = $("videos-seconds");
  const status = $("videos-status");
  const progress = $("videos-progress");
  const player = $("videos-out");
  const mine = []; // this page's videos, newest first: the Video objects as last seen

  const frames = () => {
    const m = modelById(model.value);
    const s = Number(seconds.value);
    $("videos-frames").textContent =
      m?.fps && seconds.validity.valid && s > 0 ? `${clipFrames(m, s)} frames at ${short(m.fps)} fps` : "";
  };
  model.addEventListener("change", () => {
    const m = modelById(model.value);
    if (!m?.fps) return;
    seconds.min = String(1 / m.fps);
    seconds.max = String(m.max_frames / m.fps);
    $("videos-seconds-range").textContent = `(${short(1 / m.fps)}–${short(m.max_frames / m.fps)})`;
    frames();
  });
  seconds.addEventListener("input", frames);
  $("videos-seed-random").addEventListener("click", () => ($("videos-seed").value = String(randomSeed())));

  const renderRecent = () => {
    $("videos-recent").replaceChildren(
      ...mine.map((v) => {
        const label = `${v.prompt} · ${v.seconds} s · seed ${v.seed} · ${v.status}`;
        const item = v.status === "completed"
          ? el("button", { type: "button", "data-video": v.id, "aria-label": `Play ${label}`, text: `▶ ${label}` })
          : el("span", { text: label });
        if (v.status === "completed") item.addEventListener("click", () => play(v));
        return el("li", { "data-video": v.id }, item);
      }),
    );
  };

  const show = (v) => {
    const i = mine.findIndex((x) => x.id === v.id);
    if (i >= 0) mine[i] = v;
    else mine.unshift(v);
    mine.splice(8);
    renderRecent();
    if (state.clip?.id !== v.id) return;
    progress.value = v.progress ?? 0;
    let text = `Video ${v.id}: ${v.status.replace("_", " ")}, ${v.progress ?? 0}%`;
    if (v.error) text += ` (${v.error.code}: ${v.error.message})`;
    status.textContent = text;
    status.dataset.status = v.status;
    const seen = (status.dataset.seen ?? "").split(" ").filter(Boolean);
    if (seen.at(-1) !== v.status) status.dataset.seen = [...seen, v.status].join(" ");
  };

  const play = async (v) => {
    clearError("videos");
    try {
      const blob = await (await api(`v1/videos/${v.id}/content`)).blob();
      if (player.src) URL.revokeObjectURL(player.src);
      player.dataset.state = "loading";
      player.dataset.video = v.id;
      player.setAttribute("aria-label", `${v.prompt} (${v.seconds} s, seed ${v.seed}, ${v.steps} steps)`);
      player.src = URL.createObjectURL(blob);
      player.hidden = false;
    } catch (err) {
      showError("videos", err);
    }
  };
  player.addEventListener("loadedmetadata", () => (player.dataset.state = "loaded"));
  player.addEventListener("error", () => {
    if (!player.getAttribute("src")) return;
    player.dataset.state = "error";
    showError("videos", new Error(`the browser could not play the MP4 (${player.error?.message || "no decoder"})`));
  });

  const follow = async (clip) => {
    let v;
    try {
      for (;;) {
        v = await apiJson(`v1/videos/${clip.id}`, { signal: clip.abort.signal });
        show(v);
        if (v.status === "completed" || v.status === "failed") break;
        await pause(POLL_MS, clip.abort.signal);
        if (clip.abort.signal.aborted) return;
      }
    } catch (err) {
      if (err.name !== "AbortError") showError("videos", err);
      return;
    } finally {
      if (state.clip === clip) {
        $("videos-cancel").disabled = true;
        $("videos-go").disabled = false;
      }
    }
    if (v.status === "completed") await play(v);
    else if (v.error?.code !== "cancelled") showError("videos", new Error(v.error?.message ?? "the video failed"));
  };

  $("videos-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    clearError("videos");
    const body = { model: model.value, prompt: $("videos-prompt").value, seconds: seconds.value, steps: steps() };
    if ($("videos-seed").value !== "") body.seed = Number($("videos-seed").value);
    $("videos-go").disabled = true;
    try {
      const v = await apiJson("v1/videos", { method: "POST", body });
      state.clip?.abort.abort();
      state.clip = { id: v.id, abort: new AbortController() };
      delete status.dataset.seen;
      player.hidden = true;
      show(v);
      $("videos-cancel").disabled = false;
      follow(state.clip);
    } catch (err) {
      showError("videos", err);
      $("videos-go").disabled = false;
    }
  });

  $("videos-cancel").addEventListener("click", async () => {
    const clip = state.clip;
    if (!clip) return;
    try {
      await api(`v1/videos/${clip.id}`, { method: "DELETE" });
    } catch (err) {
      showError("videos", err);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Jobs panel: submit, follow the events stream (fetch, so the key travels in a header), cancel

async function* sseEvents(res) {
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
    }
  }
}

function initJobs() {
  const model = $("jobs-model");
  const steps = stepsSlider("jobs", model);
  const status = $("jobs-status");
  const progress = $("jobs-progress");

  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  // Item and cancel events carry counts, not the job's state: a state the server has already called
  // final (the DELETE's answer) is kept until the stream's end event confirms it.
  const counts = (c) => {
    const prev = status.dataset.status;
    const now = c.status ?? (TERMINAL.has(prev) ? prev : "running");
    progress.max = c.total;
    progress.value = c.done + c.failed + c.cancelled;
    status.textContent = `Job ${state.job?.id ?? ""}: ${now}, ${c.done} of ${c.total} done` +
      (c.failed ? `, ${c.failed} failed` : "") + (c.cancelled ? `, ${c.cancelled} cancelled` : "");
    status.dataset.status = now;
  };

  const fetchResults = async (job) => {
    const r = await apiJson(`v1/jobs/${job.id}/results`);
    for (const d of r.data) {
      if (job.shown.has(d.index)) continue;
      job.shown.add(d.index);
      const prompt = job.prompts[d.request] ?? "";
      $("jobs-out").append(
        el(
          "figure",
          { "data-index": String(d.index) },
          el("img", { src: pngUrl(d.b64_json), alt: `${prompt}, seed ${d.seed}` }),
          el("figcaption", { text: `#${d.index} ${prompt} · seed ${d.seed}` }),
        ),
      );
    }
    for (const err of r.errors) {
      if (job.shown.has(`e${err.index}`)) continue;
      job.shown.add(`e${err.index}`);
      $("jobs-out").append(el("p", { class: "item-error", text: `#${err.index}: ${err.outcome}${err.message ? ` (${err.message})` : ""}` }));
    }
  };

  const follow = async (job) => {
    let res;
    try {
      res = await api(`v1/jobs/${job.id}/events`, { signal: job.abort.signal });
    } catch (err) {
      if (err.name !== "AbortError") showError("jobs", err);
      return;
    }
    // One results fetch at a time: items that finish during it are picked up by one more fetch.
    let inflight = null;
    let again = false;
    const refresh = () => {
      if (inflight) {
        again = true;
        return inflight;
      }
      inflight = (async () => {
        do {
          again = false;
          await fetchResults(job);
        } while (again);
      })()
        .catch((err) => showError("jobs", err))
        .finally(() => (inflight = null));
      return inflight;
    };
    try {
      for await (const { event, data } of sseEvents(res)) {
        if (event === "status") counts(data);
        else if (event === "item" || event === "cancel") {
          counts(data);
          if (event === "item" && data.outcome === "ok") refresh();
        } else if (event === "end") {
          counts(data);
          await refresh();
          status.dataset.ended = "true";
          break;
        } else if (event === "error") {
          showError("jobs", new Error(data.message));
          break;
        }
      }
    } catch (err) {
      if (err.name !== "AbortError") showError("jobs", err);
    } finally {
      job.abort.abort();
      if (state.job === job) {
        $("jobs-cancel").disabled = true;
        $("jobs-go").disabled = false;
      }
    }
  };

  $("jobs-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    clearError("jobs");
    const prompts = $("jobs-prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
    const n = Number($("jobs-n").value || 1);
    const body = { model: model.value, requests: prompts.map((prompt) => ({ prompt, n, steps: steps() })) };
    $("jobs-go").disabled = true;
    try {
      const job = await apiJson("v1/jobs", { method: "POST", body });
      state.job?.abort.abort();
      state.job = { id: job.id, prompts, shown: new Set(), abort: new AbortController() };
      $("jobs-out").replaceChildren();
      delete status.dataset.ended;
      delete status.dataset.status;
      counts(job);
      $("jobs-cancel").disabled = false;
      follow(state.job);
    } catch (err) {
      showError("jobs", err);
      $("jobs-go").disabled = false;
    }
  });

  $("jobs-cancel").addEventListener("click", async () => {
    const job = state.job;
    if (!job) return;
    try {
      counts(await apiJson(`v1/jobs/${job.id}`, { method: "DELETE" }));
    } catch (err) {
      showError("jobs", err);
    }
  });
}

// ---------------------------------------------------------------------------------------------

function init() {
  initKey();
  initImage();
  initSeeds();
  initVideo();
  initVideos();
  initJobs();
  $("status-refresh").addEventListener("click", refreshModels);
  const fromHash = tabs.find((t) => `#${t.id.replace("tab-", "")}` === location.hash);
  openTab(fromHash ?? tabs[0]);
  refreshModels().then(() => document.body.setAttribute("data-ready", "true"));
}

init();
