// The page of `fastldm serve`: one form -> POST /fastldm/v1/jobs, progress and live preview from the job's
// server-sent events, results (PNG with its settings, depth, 3-D view) from the job's files. See
// src/fastldm/serve/jobs_api.py for the API. No framework, no network beyond this server.

const API = "/fastldm/v1";
const $ = (id) => document.getElementById(id);
const form = $("generate-form"), errorBox = $("error"), gallery = $("gallery");
let running = null;   // {id, events} of the job in progress

class ApiError extends Error {
  constructor(status, message, retryAfter) { super(message); this.status = status; this.retryAfter = retryAfter; }
}

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => null);
  if (!response.ok) {
    const message = body?.error?.message || body?.detail || response.statusText || `HTTP ${response.status}`;
    throw new ApiError(response.status, message, response.headers.get("Retry-After"));
  }
  return body;
}

function explain(error) {
  if (!(error instanceof ApiError)) return `Could not reach the server (${error.message}).`;
  if (error.status === 429) return `The server is busy: too many requests are waiting. Try again in about ${error.retryAfter || "a few"} seconds.`;
  if (error.status === 401) return "This server needs an API key.";
  if (error.status === 413) return `The request is too large: ${error.message}.`;
  if (error.status === 503) return `The server is shutting down: ${error.message}.`;
  return `Could not generate: ${error.message}.`;
}

function showError(text) {
  errorBox.textContent = text;
  errorBox.hidden = !text;
}

function option(select, value, selected) {
  const o = document.createElement("option");
  o.value = o.textContent = value;
  o.selected = value === selected;
  select.append(o);
}

async function init() {
  try {
    const info = await api(`${API}/info`);
    info.models.forEach((m) => option($("model"), m, info.default_model));
    info.samplers.forEach((s) => option($("sampler"), s, "DPM++ 2M"));
    $("n").max = info.limits.max_n;
    $("server-status").textContent = `fastldm ${info.version} · up to ${info.limits.max_width}x${info.limits.max_height}, ` +
      `${info.limits.max_steps} steps, ${info.limits.max_n} images`;
  } catch (e) {
    showError(explain(e));
  }
}

// Form values -> a job request. Size, seed and guidance left empty take the model's defaults / a random seed.
function jobRequest() {
  const body = { prompt: $("prompt").value, negative_prompt: $("negative").value, model: $("model").value,
                 sampler: $("sampler").value };
  const steps = $("steps").value.trim();
  body.steps = steps === "auto" ? "auto" : Number(steps);
  const size = $("size").value.trim();
  if (size) {
    const m = size.match(/^(\d+)\s*[x×*,]\s*(\d+)$/i);
    if (!m) throw new Error(`size "${size}" should look like 512x512 (width x height in pixels)`);
    body.width = Number(m[1]); body.height = Number(m[2]);
  }
  if ($("seed").value.trim()) body.seed = Number($("seed").value);
  if ($("guidance").value.trim()) body.guidance = Number($("guidance").value);
  body.n = Number($("n").value || 1);
  return body;
}

async function generate(event) {
  event.preventDefault();
  if (running) return;
  showError("");
  let body;
  try {
    body = jobRequest();
  } catch (e) {
    showError(`Could not generate: ${e.message}.`);
    return;
  }
  $("generate").disabled = true;
  try {
    const check = await api(`${API}/plan`, { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(body) });
    if (!check.ok) {
      showError(`Could not generate: ${check.error.message}.`);
      $("generate").disabled = false;
      return;
    }
    const job = await api(`${API}/jobs`, { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(body) });
    follow(job);
  } catch (e) {
    showError(explain(e));
    $("generate").disabled = false;
  }
}

function setProgress(text, fraction) {
  $("progress-label").textContent = text;
  if (fraction === null) $("progress").removeAttribute("value"); else $("progress").value = fraction;
}

function follow(job) {
  const events = new EventSource(job.events);
  running = { id: job.id, events };
  $("progress-panel").hidden = false;
  $("cancel").hidden = false;
  $("preview").hidden = true;
  setProgress("Waiting in the queue…", null);
  events.addEventListener("started", () => setProgress("Starting…", 0));
  events.addEventListener("step", (e) => {
    const d = JSON.parse(e.data);
    const eta = d.eta_s == null ? "" : `, about ${Math.ceil(d.eta_s)} s left`;
    setProgress(`Step ${d.step} of ${d.steps}${eta}`, d.step / d.steps);
    if (d.preview) { $("preview").src = d.preview; $("preview").hidden = false; }
  });
  events.addEventListener("done", (e) => { finish(); addResult(JSON.parse(e.data)); });
  for (const kind of ["failed", "cancelled"]) {
    events.addEventListener(kind, (e) => {
      finish();
      const d = JSON.parse(e.data);
      showError(kind === "cancelled" ? `Cancelled: ${d.error.message}.` : `Generation failed: ${d.error.message}.`);
    });
  }
  events.onerror = () => {   // the stream broke (server gone): ask once for the job's state
    if (!running || running.id !== job.id) return;
    finish();
    api(job.url).then((v) => (v.status === "done" ? addResult(v) : showError(`The job is ${v.status}.`)))
      .catch((err) => showError(explain(err)));
  };
}

function finish() {
  if (running) running.events.close();
  running = null;
  $("generate").disabled = false;
  $("cancel").hidden = true;
  $("progress-panel").hidden = true;
}

async function cancel() {
  if (!running) return;
  try { await api(`${API}/jobs/${running.id}/cancel`, { method: "POST" }); } catch (e) { showError(explain(e)); }
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  node.append(...children);
  return node;
}

function link(href, text, filename) {
  return el("a", { href, download: filename }, text);
}

// One job -> one gallery entry per image: the image (alt = its prompt), its depth map and 3-D view for RGBD
// models, the settings (the PNG's A1111 parameters), and downloads. The 3-D view reproduces the camera that took
// the image (tools/export3d.py: camera at (0, 0, 1) looking at the origin, vertical field of view fov_y).
function addResult(job) {
  $("empty").hidden = true;
  const prompt = job.request.prompt;
  job.result.images.forEach((image, i) => {
    const stem = `fastldm-${job.id.slice(0, 8)}-${i}`;
    const views = el("div", { class: "views" },
      el("figure", {}, el("img", { src: image.png, alt: prompt }),
         el("figcaption", {}, `seed ${image.seed}`)));
    const downloads = el("p", { class: "downloads" }, link(image.png, "Download PNG", `${stem}.png`));
    if (image.depth) {
      views.append(el("figure", {}, depthView(image.depth, `Depth map: ${prompt}`),
                      el("figcaption", {}, "depth, contrast stretched (near is bright)")));
      const fov = `${image.glb_fov_y.toFixed(2)}deg`;
      const viewer = el("model-viewer", {
        src: image.glb, alt: `3-D view: ${prompt}`, "camera-controls": "", "interaction-prompt": "none",
        "camera-orbit": "0deg 90deg 1m", "camera-target": "0m 0m 0m", "min-camera-orbit": "auto auto 0m",
        "field-of-view": fov, "max-field-of-view": fov, "min-field-of-view": "10deg", "shadow-intensity": "0",
        style: `aspect-ratio: ${job.result.width} / ${job.result.height}`,
      });
      viewer.addEventListener("load", () => { viewer.dataset.loaded = "true"; });
      viewer.addEventListener("error", () => { viewer.dataset.loaded = "error"; });
      views.append(el("figure", { class: "view3d" }, viewer, el("figcaption", {}, "3-D view: drag to turn")));
      downloads.append(link(image.depth, "Download depth (16-bit PNG)", `${stem}-depth.png`),
                       link(image.glb, "Download 3-D (GLB)", `${stem}.glb`));
    }
    gallery.prepend(el("li", { class: "result" }, views, el("p", { class: "settings" }, image.parameters), downloads));
  });
}

// A 16-bit depth PNG drawn with its range stretched to black..white (a model's depth often spans a fraction
// of the 16 bits; the browser decodes it to 8 bits, which is plenty to look at). The download keeps the data.
function depthView(src, label) {
  const canvas = el("canvas", { role: "img", "aria-label": label });
  const img = new Image();
  img.onload = () => {
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const g = canvas.getContext("2d", { willReadFrequently: true });
    g.drawImage(img, 0, 0);
    const pixels = g.getImageData(0, 0, canvas.width, canvas.height);
    const d = pixels.data;   // RGBA, grey: R = G = B
    let lo = 255, hi = 0;
    for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); }
    const scale = 255 / Math.max(1, hi - lo);
    for (let i = 0; i < d.length; i += 4) d[i] = d[i + 1] = d[i + 2] = (d[i] - lo) * scale;
    g.putImageData(pixels, 0, 0);
  };
  img.src = src;
  return canvas;
}

form.addEventListener("submit", generate);
$("cancel").addEventListener("click", cancel);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) form.requestSubmit();
});
init();
