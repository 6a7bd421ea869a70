// sagrt serve's page: plain JavaScript over the service's own API (GET /v1/status, POST /v1/generate as
// server-sent events with SAG masks, POST /v1/jobs/{id}/cancel). No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "sagrt-page-v1";
const FIELDS = ["prompt", "negative_prompt", "width", "height", "num_inference_steps", "n", "scheduler",
  "karras_sigmas", "guidance_scale", "sag_scale", "sag_threshold", "sag_blur_sigma", "sag_blur_kernel",
  "sag_window_start", "sag_window_end", "seed", "compare_scales"];
const MAX_RUNS = 30;  // older runs are dropped from the page (their images stay downloadable until then)

const page = { status: null, configured: false, jobs: [], aborts: [], busy: false, lastSeed: null };

// ---- service state --------------------------------------------------------------------------------------
async function refreshStatus() {
  try {
    const response = await fetch("/v1/status", { cache: "no-store" });
    const status = await response.json();
    showStatus(status);
    return status.ready;
  } catch (err) {
    showStatus(null);
    return null;
  }
}

async function pollStatus() {
  const ready = await refreshStatus();
  setTimeout(pollStatus, ready ? 2000 : ready === false ? 700 : 3000);
}

function showStatus(status) {
  const pill = $("state");
  if (!status) {
    pill.dataset.state = "unreachable";
    pill.textContent = "service unreachable";
    return;
  }
  page.status = status;
  pill.dataset.state = status.state;
  pill.textContent = status.state;
  pill.title = status.replica ? `replica ${status.replica}, up ${Math.round(status.uptime_s)} s` : "";
  $("model").textContent = status.model;
  $("backend").textContent = status.backend;
  $("queue").textContent = `${status.queue_depth} / ${status.max_queue}`;
  $("running").textContent = String(status.running.length);
  if (status.ready && !page.configured) configureForm(status);
}

function configureForm(status) {
  // Bounds from the service; the service still checks every field and its message is what the page shows.
  page.configured = true;
  for (const id of ["width", "height"]) {
    const input = $(id);
    input.step = status.size_multiple;
    input.min = status.min_size;
    input.max = status.max_size[id];
    if (input.value === "") input.value = status.default_size;
  }
  $("num_inference_steps").max = status.max_steps;
  $("n").max = status.max_images;
  const select = $("scheduler");
  const chosen = select.value || select.dataset.restore || "";
  select.options[0].textContent = `default (${status.default_scheduler})`;
  for (const name of status.schedulers) select.add(new Option(name, name));
  select.value = status.schedulers.includes(chosen) ? chosen : "";
}

// ---- form -----------------------------------------------------------------------------------------------
function numberOf(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function requestBody() {
  // The request as the service's /v1/generate takes it; empty fields are left to the service's defaults.
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value.trim() || null,
    width: numberOf("width"), height: numberOf("height"),
    num_inference_steps: numberOf("num_inference_steps"), n: numberOf("n"),
    scheduler: $("scheduler").value || null, karras_sigmas: $("karras_sigmas").checked,
    guidance_scale: numberOf("guidance_scale"), sag_scale: numberOf("sag_scale"),
    sag_threshold: numberOf("sag_threshold"), sag_blur_sigma: numberOf("sag_blur_sigma"),
    sag_blur_kernel: numberOf("sag_blur_kernel"),
    sag_window: [numberOf("sag_window_start") ?? 0, numberOf("sag_window_end") ?? 1],
    seed: numberOf("seed"), return_masks: true,
  };
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  return body;
}

function saveForm() {
  const values = {};
  for (const id of FIELDS) values[id] = $(id).type === "checkbox" ? $(id).checked : $(id).value;
  try { localStorage.setItem(STORE, JSON.stringify(values)); } catch (err) { /* storage off: nothing kept */ }
}

function restoreForm() {
  let values = null;
  try { values = JSON.parse(localStorage.getItem(STORE) || "null"); } catch (err) { values = null; }
  if (!values) return;
  for (const id of FIELDS) {
    if (!(id in values)) continue;
    if ($(id).type === "checkbox") $(id).checked = Boolean(values[id]);
    else if (id === "scheduler") $(id).dataset.restore = values[id];
    else $(id).value = values[id];
  }
  $("sag_scale_range").value = $("sag_scale").value;
}

// ---- errors next to their field or the buttons --------------------------------------------------------
class ApiError extends Error {
  constructor(status, message, fields) {
    super(message);
    this.status = status;
    this.fields = fields || {};  // {field id: the service's message}
  }
}

async function apiError(response) {
  let body = null;
  try { body = await response.json(); } catch (err) { body = null; }
  const detail = body && body.detail;
  if (Array.isArray(detail)) {  // 422: [{loc: ["body", field, ...], msg}]
    const fields = {};
    for (const item of detail) {
      const loc = (item.loc || []).filter((part) => typeof part === "string" && part !== "body");
      const field = loc.find((name) => document.querySelector(`.error[data-for="${name}"]`)) || "";
      const text = field ? item.msg : `${loc.join(".") || "request"}: ${item.msg}`;
      fields[field] = fields[field] ? `${fields[field]}; ${text}` : text;
    }
    const general = fields[""];
    delete fields[""];
    return new ApiError(response.status, general || "", fields);
  }
  const message = typeof detail === "string" ? detail : `${response.status} ${response.statusText}`;
  return new ApiError(response.status, message);
}

function clearErrors() {
  for (const slot of document.querySelectorAll(".error")) slot.textContent = "";
  for (const input of document.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  setMessage("", "");
}

function showFieldError(field, message) {
  const slot = document.querySelector(`.error[data-for="${field}"]`);
  slot.textContent = message;
  const inputs = field === "sag_window" ? [$("sag_window_start"), $("sag_window_end")] : [$(field)];
  for (const input of inputs) if (input) input.setAttribute("aria-invalid", "true");
  if (slot.closest("details")) slot.closest("details").open = true;
  const first = inputs[0];
  if (first && document.activeElement !== first) first.focus({ preventScroll: false });
}

function showError(err) {
  if (err instanceof ApiError) {
    const fields = Object.entries(err.fields);
    for (const [field, message] of [...fields].reverse()) showFieldError(field, message);  // focus ends on the first
    if (err.message) setMessage(err.message, "error");
    else if (fields.length) {
      const names = fields.map(([field]) => fieldLabel(field)).join(", ");
      setMessage(`The service refused ${names}: see the field.`, "error");
    }
  } else {
    setMessage(`Could not reach the service: ${err.message || err}`, "error");
  }
}

function fieldLabel(field) {
  const label = document.querySelector(`label[for="${field === "sag_window" ? "sag_window_start" : field}"]`);
  return label ? label.firstChild.textContent.trim().toLowerCase() : field;
}

function setMessage(text, kind) {
  const message = $("run-message");
  message.textContent = text;
  message.dataset.kind = kind;
}

// ---- a job as server-sent events ----------------------------------------------------------------------
async function streamJob(body, onEvent, signal) {
  // POST /v1/generate with Accept: text/event-stream; resolves with the result event, throws ApiError.
  const response = await fetch("/v1/generate", {
    method: "POST", signal, body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
  });
  if (!response.ok) throw await apiError(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (!data) continue;  // a comment (": keep-alive") or an empty block
      const payload = JSON.parse(data);
      if (event === "result") return payload;
      if (event === "error") throw new ApiError(payload.status, payload.message);
      onEvent(event, payload);
    }
  }
  throw new ApiError(0, "the service closed the stream without a result");
}

// ---- runs: one or several jobs, one progress bar -------------------------------------------------------
function setBusy(busy) {
  page.busy = busy;
  $("generate").disabled = busy;
  $("compare").disabled = busy;
  $("cancel").disabled = !busy;
  document.body.dataset.busy = busy ? "yes" : "no";
}

function showProgress(tracks) {
  const steps = tracks.reduce((sum, t) => sum + t.steps, 0);
  const done = tracks.reduce((sum, t) => sum + t.step, 0);
  const bar = $("progress");
  bar.max = Math.max(steps, 1);
  bar.value = done;
  const queued = tracks.filter((t) => t.state === "queued");
  let label;
  if (queued.length === tracks.length) {
    label = `queued (position ${Math.min(...queued.map((t) => t.position)) + 1})`;
  } else {
    label = `step ${done} / ${steps}`;
    const now = performance.now();
    if (!page.firstStep && done > 0) page.firstStep = { time: now, done };
    const first = page.firstStep;
    if (first && done > first.done && done < steps) {  // time left at the pace since the first step
      label += ` · ${(((steps - done) * (now - first.time)) / (done - first.done) / 1000).toFixed(1)} s left`;
    }
  }
  $("progress-label").textContent = label;
}

async function watchQueue(tracks) {
  // A queued job's place moves as the jobs ahead of it finish: GET /v1/jobs/{id} says where it is now.
  for (const track of tracks.filter((t) => t.state === "queued" && t.id)) {
    try {
      const response = await fetch(`/v1/jobs/${encodeURIComponent(track.id)}`, { cache: "no-store" });
      if (!response.ok) continue;
      const job = await response.json();
      if (track.state === "queued" && job.position !== null) track.position = job.position;
    } catch (err) {
      continue;  // the stream reports a service that went away
    }
  }
  if (tracks.length && page.jobs === tracks) showProgress(tracks);
}

async function run(bodies, kind) {
  // Sends every body as its own streamed job, at once (the service batches what can share a call).
  clearErrors();
  const tracks = bodies.map((body) => ({
    id: null, state: "queued", position: 0, step: 0, steps: body.num_inference_steps || 20, masks: [],
  }));
  page.jobs = tracks;
  page.firstStep = null;
  page.aborts = bodies.map(() => new AbortController());
  setBusy(true);
  showProgress(tracks);
  const started = performance.now();
  const watch = setInterval(() => watchQueue(tracks), 1000);
  const outcomes = await Promise.allSettled(bodies.map((body, i) => streamJob(body, (event, data) => {
    const track = tracks[i];
    if (event === "queued") Object.assign(track, { id: data.id, position: data.position });
    if (event === "started") Object.assign(track, { state: "running", steps: data.steps });
    if (event === "step") {
      Object.assign(track, { state: "running", step: data.step, steps: data.steps });
      if (data.masks) track.masks[data.step] = data.masks;  // one PNG per image of the job
    }
    showProgress(tracks);
  }, page.aborts[i].signal)));
  clearInterval(watch);
  const cancelled = page.cancelled;
  page.jobs = [];
  page.aborts = [];
  page.cancelled = false;
  setBusy(false);
  refreshStatus();
  const failed = outcomes.filter((o) => o.status === "rejected").map((o) => o.reason);
  if (cancelled && failed.length) {
    const step = Math.max(...tracks.map((t) => t.step));
    setMessage(`Cancelled at step ${step} of ${tracks[0].steps}.`, "info");
    $("progress-label").textContent = "cancelled";
  } else if (failed.length) {
    showError(failed[0]);
    const count = bodies.length - failed.length;
    $("progress-label").textContent = count ? `${count} of ${bodies.length} done` : "failed";
  } else {
    $("progress-label").textContent = `done in ${((performance.now() - started) / 1000).toFixed(1)} s`;
  }
  // what finished is shown, also when other jobs of the run failed
  const made = outcomes.map((outcome, i) => ({ outcome, body: bodies[i], track: tracks[i] }))
    .filter(({ outcome }) => outcome.status === "fulfilled");
  if (made.length) {
    addRun(kind, made.map(({ body }) => body),
      made.map(({ outcome, track }) => ({ ...outcome.value, masks: track.masks, steps: track.steps })));
  }
}

function generate() {
  if (page.busy) return;
  saveForm();
  run([requestBody()], "generate");
}

function compare() {
  if (page.busy) return;
  saveForm();
  clearErrors();
  const tokens = $("compare_scales").value.split(/[\s,;]+/).filter(Boolean);
  const scales = tokens.map(Number);
  if (scales.length < 2 || scales.some((s) => !Number.isFinite(s) || s < 0)) {
    showFieldError("compare_scales", "give two or more SAG scales >= 0, e.g. 0, 0.75");
    return;
  }
  const base = requestBody();
  if (base.seed === undefined || base.seed < 0) base.seed = Math.floor(Math.random() * 2 ** 32);  // one seed for all
  base.n = 1;
  run(scales.map((scale) => ({ ...base, sag_scale: scale })), "compare");
}

async function cancel() {
  if (!page.busy) return;
  page.cancelled = true;
  $("progress-label").textContent = "cancelling";
  await Promise.all(page.jobs.map(async (track, i) => {
    if (!track.id) { page.aborts[i].abort(); return; }  // not queued yet: closing the stream cancels it
    try {
      const response = await fetch(`/v1/jobs/${encodeURIComponent(track.id)}/cancel`, { method: "POST" });
      if (!response.ok && response.status !== 404) showError(await apiError(response));
    } catch (err) {
      page.aborts[i].abort();
    }
  }));
}

// ---- images -------------------------------------------------------------------------------------------
function addRun(kind, bodies, results) {
  $("empty").hidden = true;
  const first = results[0];
  const body = bodies[0];
  const article = document.createElement("article");
  article.className = `run ${kind}`;
  const title = document.createElement("h2");
  title.textContent = body.prompt;
  const meta = document.createElement("p");
  meta.className = "meta";
  const scheduler = body.scheduler || (page.status && page.status.default_scheduler) || "default";
  const sag = kind === "compare" ? `seed ${first.seeds[0]}, SAG ${bodies.map((b) => b.sag_scale).join(" vs ")}`
    : `SAG ${body.sag_scale}`;
  meta.textContent = [`${first.width}x${first.height}`, `${first.steps} steps`,
    scheduler + (body.karras_sigmas ? " karras" : ""), `CFG ${body.guidance_scale}`, sag,
    `queue ${Math.round(first.queue_ms)} ms, run ${Math.round(first.run_ms)} ms`].join(" · ");
  const grid = document.createElement("div");
  grid.className = "images";
  results.forEach((result, r) => result.images.forEach((b64, i) => grid.append(card(result, i, bodies[r], kind))));
  article.append(title, meta, grid);
  $("runs").prepend(article);
  while ($("runs").children.length > MAX_RUNS) $("runs").lastElementChild.remove();
  page.lastSeed = first.seeds[0];
  $("last-seed").disabled = false;
  const steps = Math.max(...results.map((result) => result.steps));
  const slider = $("mask-step");
  slider.disabled = false;
  slider.max = steps;
  if (Number(slider.value) > steps || !slider.dataset.touched) slider.value = steps;
  drawMasks();
  if (article.getBoundingClientRect().top > window.innerHeight) {  // one column (a phone): bring the images up
    article.scrollIntoView({ behavior: "smooth", block: "start" });
  }
}

function card(result, index, body, kind) {
  const seed = result.seeds[index];
  const figure = document.createElement("figure");
  figure.className = "card";
  const frame = document.createElement("div");
  frame.className = "frame";
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${result.images[index]}`;
  img.width = result.width;
  img.height = result.height;
  img.alt = `${body.prompt} (seed ${seed}, SAG ${body.sag_scale})`;
  if (result.width < 256) img.classList.add("small");
  const overlay = document.createElement("canvas");
  overlay.className = "mask";
  overlay.hidden = true;
  frame.append(img, overlay);
  // masks[step] = this image's mask PNG at that step (only steps where SAG ran)
  figure.masks = result.masks.map((perImage) => perImage && perImage[index]);
  figure.sagScale = body.sag_scale;
  figure.steps = result.steps;

  const caption = document.createElement("figcaption");
  const label = document.createElement("span");
  label.className = "label";
  label.textContent = kind === "compare" ? (body.sag_scale > 0 ? `SAG ${body.sag_scale}` : "SAG off") : `seed ${seed}`;
  const note = document.createElement("span");
  note.className = "mask-note";
  const download = document.createElement("a");
  download.href = img.src;
  download.download = `sagrt-${seed}-sag${body.sag_scale}.png`;
  download.textContent = "PNG";
  download.title = "Download the PNG (its parameters are in its text chunk, as AUTOMATIC1111 writes them)";
  const reuse = document.createElement("button");
  reuse.type = "button";
  reuse.textContent = "use seed";
  reuse.title = `Put seed ${seed} in the seed field`;
  reuse.addEventListener("click", () => { $("seed").value = seed; saveForm(); });
  caption.append(label, download, reuse, note);
  const details = document.createElement("details");
  const summary = document.createElement("summary");
  summary.textContent = "parameters";
  const pre = document.createElement("pre");
  pre.textContent = result.parameters[index];
  details.append(summary, pre);
  figure.append(frame, caption, details);
  return figure;
}

function drawMasks() {
  const show = $("show-mask").checked;
  const step = Number($("mask-step").value);
  $("mask-step-label").textContent = $("mask-step").disabled ? "-" : String(step);
  for (const figure of document.querySelectorAll(".card")) {
    const overlay = figure.querySelector("canvas.mask");
    const note = figure.querySelector(".mask-note");
    const mask = figure.masks && figure.masks[step];
    overlay.hidden = !show || !mask;
    note.textContent = !show ? "" : mask ? `mask of step ${step}` : !(figure.sagScale > 0) ? "no mask: SAG off"
      : step > figure.steps ? `made in ${figure.steps} steps` : `no SAG at step ${step}`;
    if (show && mask) paintMask(overlay, mask);
  }
}

function paintMask(canvas, b64) {
  // The mask comes at latent resolution (255 where SAG blurs): red, half transparent, scaled up without smoothing.
  if (canvas.dataset.mask === b64) return;
  const image = new Image();
  image.onload = () => {
    if (canvas.dataset.pending !== b64) return;
    canvas.width = image.width;
    canvas.height = image.height;
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.clearRect(0, 0, image.width, image.height);
    context.drawImage(image, 0, 0);
    const pixels = context.getImageData(0, 0, image.width, image.height);
    for (let p = 0; p < pixels.data.length; p += 4) {
      const on = pixels.data[p] > 127;
      pixels.data.set(on ? [255, 40, 70, 130] : [0, 0, 0, 0], p);
    }
    context.putImageData(pixels, 0, 0);
    canvas.dataset.mask = b64;
  };
  canvas.dataset.pending = b64;
  image.src = `data:image/png;base64,${b64}`;
}

// ---- settings from a PNG (its "parameters" text chunk) ------------------------------------------------
async function pngText(buffer, keyword) {
  // The text of `keyword` in a PNG's tEXt or iTXt chunk; null when the file has none. Throws if not a PNG.
  const bytes = new Uint8Array(buffer);
  const view = new DataView(buffer);
  if (![137, 80, 78, 71, 13, 10, 26, 10].every((b, i) => bytes[i] === b)) throw new Error("this file is not a PNG");
  const latin1 = new TextDecoder("latin1");
  for (let at = 8; at + 8 <= bytes.length;) {
    const length = view.getUint32(at);
    const type = latin1.decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    at += 12 + length;  // length, type, data, CRC
    if (type === "IEND") break;
    if (type !== "tEXt" && type !== "iTXt") continue;
    const zero = data.indexOf(0);
    if (latin1.decode(data.subarray(0, zero)) !== keyword) continue;
    if (type === "tEXt") return latin1.decode(data.subarray(zero + 1));
    // iTXt: keyword, 0, compressed?, method, language, 0, translated keyword, 0, UTF-8 text
    const compressed = data[zero + 1] === 1;
    const start = data.indexOf(0, data.indexOf(0, zero + 3) + 1) + 1;
    const text = data.subarray(start);
    if (!compressed) return new TextDecoder().decode(text);
    return new Response(new Blob([text]).stream().pipeThrough(new DecompressionStream("deflate"))).text();
  }
  return null;
}

async function loadPng(file) {
  clearErrors();
  try {
    const text = await pngText(await file.arrayBuffer(), "parameters");
    if (text === null) {
      setMessage(`${file.name} has no "parameters" text: it was not made by sagrt or AUTOMATIC1111`, "error");
      return;
    }
    const response = await fetch("/v1/page/parameters", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ parameters: text }),
    });
    if (!response.ok) throw await apiError(response);
    const { fields, ignored } = await response.json();
    fillForm(fields);
    const unused = ignored.length ? ` (not used here: ${ignored.join(", ")})` : ".";
    setMessage(`Settings of ${file.name} loaded${unused}`, "ok");
  } catch (err) {
    if (err instanceof ApiError) showError(err);
    else setMessage(`${file.name}: ${err.message || err}`, "error");
  }
}

function fillForm(fields) {
  for (const [key, value] of Object.entries(fields)) {
    if (key === "sag_window") {
      [$("sag_window_start").value, $("sag_window_end").value] = value;
      continue;
    }
    const input = $(key);
    if (!input) continue;
    if (input.type === "checkbox") input.checked = Boolean(value);
    else if (key === "scheduler") {
      if ([...input.options].some((option) => option.value === value)) input.value = value;
    } else input.value = value ?? "";
  }
  $("sag_scale_range").value = $("sag_scale").value;
  saveForm();
}

// ---- wiring -------------------------------------------------------------------------------------------
function wire() {
  $("controls").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  $("prompt").addEventListener("keydown", (event) => {  // Enter generates, Shift+Enter is a new line
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); generate(); }
  });
  $("negative_prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); generate(); }
  });
  $("compare_scales").addEventListener("keydown", (event) => {
    if (event.key === "Enter") { event.preventDefault(); compare(); }
  });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape" && page.busy) cancel(); });
  $("compare").addEventListener("click", compare);
  $("cancel").addEventListener("click", cancel);
  $("random-seed").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 32);
    saveForm();
  });
  $("last-seed").addEventListener("click", () => {
    if (page.lastSeed === null) return;
    $("seed").value = page.lastSeed;
    saveForm();
  });
  $("swap").addEventListener("click", () => {
    [$("width").value, $("height").value] = [$("height").value, $("width").value];
    saveForm();
  });
  $("sag_scale_range").addEventListener("input", () => { $("sag_scale").value = $("sag_scale_range").value; });
  $("sag_scale").addEventListener("input", () => { $("sag_scale_range").value = $("sag_scale").value; });
  $("controls").addEventListener("change", saveForm);
  $("controls").addEventListener("input", (event) => {  // editing a field clears the service's complaint about it
    const field = event.target.id.startsWith("sag_window") ? "sag_window" : event.target.id;
    const slot = document.querySelector(`.error[data-for="${field}"]`);
    if (slot) slot.textContent = "";
    event.target.removeAttribute("aria-invalid");
  });
  $("load-png").addEventListener("change", () => {
    if ($("load-png").files[0]) loadPng($("load-png").files[0]);
    $("load-png").value = "";
  });
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    document.body.classList.add("dropping");
  });
  document.addEventListener("dragleave", () => document.body.classList.remove("dropping"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    document.body.classList.remove("dropping");
    const file = [...event.dataTransfer.files].find((f) => f.type === "image/png" || f.name.endsWith(".png"));
    if (file) loadPng(file);
  });
  $("show-mask").addEventListener("change", drawMasks);
  $("mask-step").addEventListener("input", () => { $("mask-step").dataset.touched = "yes"; drawMasks(); });
}

restoreForm();
wire();
pollStatus();
