// The page at /: photos to POST /enhance, a before/after view, the factor map, videos to
// POST /jobs. Plain JS, no inline script (the page's Content-Security-Policy allows only
// files from this service). The API key, when the service asks for one (401), is kept in
// sessionStorage: for this tab only.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_NAME = "sgz-api-key";
const DEBOUNCE_MS = 350;
// Factor map colours, x_r from -1 to +1 (RdBu; the same stops as .ramp in page.css)
const RAMP = [[-1, [103, 0, 31]], [-0.5, [214, 96, 77]], [0, [247, 247, 247]],
              [0.5, [67, 147, 195]], [1, [5, 48, 97]]];

const photos = [];      // {file, name, before, result: {blob, factorId, timing, options}, li}
let current = null;     // the photo shown
let generation = 0;     // the latest enhance request: older answers are dropped
let inflight = null;    // its AbortController
let pendingRetry = null; // what to run again once a key is entered

// ---------- the API ----------

function apiKey() { return sessionStorage.getItem(KEY_NAME); }

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  const key = apiKey();
  if (key) headers.set("X-API-Key", key);
  return fetch(path, { ...init, headers });
}

class ApiFailure extends Error {
  constructor(status, text) { super(text); this.status = status; }
}

// An answer that is not 2xx, in words.
async function failure(response) {
  let detail = "";
  try {
    const body = await response.json();
    detail = body.detail || body.error || "";
    if (Array.isArray(detail)) detail = detail.map((d) => d.msg).join("; ");
  } catch (e) { /* not JSON */ }
  const s = response.status;
  const retry = response.headers.get("Retry-After");
  const words = {
    401: "This service needs an API key: enter it above.",
    413: "Too large for this service",
    415: "Not a file type this service reads",
    422: "A setting is out of range",
    503: "The service is busy or not ready" + (retry ? `; try again in ${retry} s` : "; try again soon"),
    504: "The service took too long (queue full); try again",
  }[s] || `The service answered ${s}`;
  return new ApiFailure(s, detail && s !== 401 ? `${words}: ${detail}` : words);
}

function showMessage(text) {
  const m = $("message");
  m.textContent = text || "";
  m.hidden = !text;
}

function handle(error, retry) {
  if (error.name === "AbortError") return;
  if (error instanceof ApiFailure && error.status === 401) {
    pendingRetry = retry;
    $("key-panel").hidden = false;
    $("api-key").focus();
  }
  showMessage(error instanceof ApiFailure ? error.message : `Could not reach the service: ${error.message}`);
}

function options() {
  const mode = $("exposure-mode").value;
  return {
    strength: $("strength").value,
    denoise: $("denoise").value,
    exposure: mode === "level" ? Number($("exposure-level").value).toFixed(2) : mode,
  };
}

function query(extra = {}) {
  return new URLSearchParams({ ...options(), ...extra }).toString();
}

// ---------- photos ----------

function bitmap(blob) {
  // exact pixels: no colour-space conversion, no premultiplying
  return createImageBitmap(blob, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
}

function draw(canvas, image) {
  canvas.width = image.width;
  canvas.height = image.height;
  canvas.getContext("2d").drawImage(image, 0, 0);
}

function addPhotos(files) {
  const images = [...files];
  if (!images.length) return;
  for (const file of images) {
    const li = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = file.name;
    const state = document.createElement("span");
    state.className = "state";
    li.append(button, state);
    $("photo-list").append(li);
    const photo = { file, name: file.name, before: null, result: null, li, state };
    button.addEventListener("click", () => select(photo));
    photos.push(photo);
  }
  select(photos[photos.length - images.length]);
  enhanceQueue(photos.slice(photos.length - images.length + 1));
}

// Photos after the first of a drop are enhanced one after another, in the background.
async function enhanceQueue(queue) {
  for (const photo of queue) {
    try {
      photo.state.textContent = " (working…)";
      photo.result = await requestEnhance(photo.file, options());
      photo.state.textContent = " (done)";
    } catch (e) {
      photo.state.textContent = " (failed)";
      if (e instanceof ApiFailure && e.status === 401) { handle(e, () => enhanceQueue(queue)); return; }
    }
  }
}

async function requestEnhance(file, opts, signal, format) {
  const params = new URLSearchParams({ ...opts, ...(format ? { format } : {}) });
  const response = await api(`/enhance?${params}`, {
    method: "POST", body: file, signal,
    headers: { "Content-Type": file.type || "application/octet-stream" },
  });
  if (!response.ok) throw await failure(response);
  return {
    blob: await response.blob(),
    factorId: response.headers.get("X-Factor-ID"),
    timing: response.headers.get("Server-Timing") || "",
    type: response.headers.get("Content-Type"),
    options: JSON.stringify(opts),
  };
}

async function select(photo) {
  current = photo;
  for (const p of photos) p.li.classList.toggle("selected", p === photo);
  $("viewer").hidden = false;
  if (!photo.before) {
    try { photo.before = await bitmap(photo.file); } catch (e) { photo.before = null; }
  }
  if (current !== photo) return;
  $("before").hidden = !photo.before;
  if (photo.before) draw($("before"), photo.before);
  if (photo.result && photo.result.options === JSON.stringify(options())) show(photo);
  else enhanceCurrent();
}

async function enhanceCurrent() {
  const photo = current;
  if (!photo) return;
  const mine = ++generation;
  if (inflight) inflight.abort();
  inflight = new AbortController();
  $("viewer").dataset.state = "working";
  setStatus(`Enhancing ${photo.name}…`);
  photo.state.textContent = " (working…)";
  try {
    const result = await requestEnhance(photo.file, options(), inflight.signal);
    if (mine !== generation) return;
    photo.result = result;
    photo.state.textContent = " (done)";
    showMessage("");
    await show(photo);
  } catch (e) {
    if (mine !== generation) return;
    photo.state.textContent = e.name === "AbortError" ? "" : " (failed)";
    $("viewer").dataset.state = "failed";
    setStatus("");
    handle(e, enhanceCurrent);
  }
}

async function show(photo) {
  const r = photo.result;
  const image = await bitmap(r.blob);
  if (current !== photo) return;
  draw($("after"), image);
  if (!photo.before) { $("before").width = image.width; $("before").height = image.height; }
  $("info-size").textContent = `${image.width} × ${image.height} px`;
  $("info-bytes").textContent = `${r.type}, ${(r.blob.size / 1024).toFixed(0)} kB`;
  $("info-timing").textContent = timingWords(r.timing);
  $("viewer").dataset.factorId = r.factorId || "";
  setSplit();
  setZoom();
  await drawFactor();
  $("viewer").dataset.state = "done";
  setStatus(`${photo.name}: done`);
}

function timingWords(header) {
  return header.split(",").map((part) => {
    const [name, ...params] = part.trim().split(";");
    const dur = params.map((p) => p.trim()).find((p) => p.startsWith("dur="));
    return dur ? `${name} ${Number(dur.slice(4)).toFixed(1)} ms` : name;
  }).filter(Boolean).join(", ") || "–";
}

function setStatus(text) { $("status").textContent = text; }

function setSplit() {
  const v = $("split").value;
  $("after").style.clipPath = `inset(0 0 0 ${v}%)`;
  $("split").setAttribute("aria-valuetext", `${v}% before, ${100 - v}% after`);
}

function setZoom() {
  const zoom = $("zoom").checked;
  $("stage").classList.toggle("zoomed", zoom);
  const c = $("after");
  // 100%: one image pixel to one screen pixel
  // fit: never larger than that, smaller when the screen is (max-width in page.css)
  $("frame").style.width = c.width ? `${c.width / devicePixelRatio}px` : "";
}

// ---------- the factor map ----------

function colour(x) {
  for (let i = 1; i < RAMP.length; i++) {
    const [x1, c1] = RAMP[i];
    if (x <= x1) {
      const [x0, c0] = RAMP[i - 1];
      const t = (x - x0) / (x1 - x0);
      return c0.map((v, k) => Math.round(v + (c1[k] - v) * t));
    }
  }
  return RAMP[RAMP.length - 1][1];
}

async function drawFactor() {
  const on = $("show-factor").checked;
  $("factor").hidden = !on;
  $("legend").hidden = !on;
  const r = current && current.result;
  if (!on || !r || !r.factorId || r.factorDrawn) {
    if (on && r && r.factorDrawn) paintFactor(r.factorDrawn);
    return;
  }
  try {
    const response = await api(`/factor/${encodeURIComponent(r.factorId)}?format=png`);
    if (!response.ok) throw await failure(response);
    const map = await bitmap(await response.blob());
    const scratch = document.createElement("canvas");
    draw(scratch, map);
    const data = scratch.getContext("2d").getImageData(0, 0, map.width, map.height);
    const lut = [];
    for (let g = 0; g < 256; g++) lut.push(colour(g / 127.5 - 1)); // picture: -1 black, +1 white
    const px = data.data;
    for (let i = 0; i < px.length; i += 4) {
      const c = lut[Math.round((px[i] + px[i + 1] + px[i + 2]) / 3)];
      px[i] = c[0]; px[i + 1] = c[1]; px[i + 2] = c[2]; px[i + 3] = 255;
    }
    r.factorDrawn = data;
    if (current && current.result === r) paintFactor(data);
  } catch (e) {
    handle(e, drawFactor);
  }
}

function paintFactor(data) {
  const c = $("factor");
  c.width = data.width;
  c.height = data.height;
  c.getContext("2d").putImageData(data, 0, 0);
  c.style.opacity = $("factor-opacity").value;
  $("viewer").dataset.factor = "shown";
}

// ---------- download ----------

const EXT = { png: "png", jpeg: "jpg", webp: "webp" };

async function download() {
  const photo = current;
  if (!photo || !photo.result) return;
  const format = $("download-format").value;
  const opts = JSON.parse(photo.result.options);
  setStatus(`Preparing ${format.toUpperCase()}…`);
  try {
    const r = photo.result.type === `image/${format}` ? photo.result
      : await requestEnhance(photo.file, opts, undefined, format);
    save(r.blob, `${photo.name.replace(/\.[^.]*$/, "")}-sgz.${EXT[format]}`);
    setStatus(`${photo.name}: downloaded as ${format.toUpperCase()}`);
  } catch (e) {
    setStatus("");
    handle(e, download);
  }
}

function save(blob, name) {
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 60000);
}

// ---------- video ----------

let videoUrl = null;

async function submitVideo(event) {
  if (event) event.preventDefault();
  const file = $("video-file").files[0];
  if (!file) return;
  $("video-result").hidden = true;
  $("video-progress").value = 0;
  $("video-status").textContent = `Uploading ${file.name}…`;
  try {
    const response = await api(`/jobs?${query()}`, {
      method: "POST", body: file,
      headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    if (!response.ok) throw await failure(response);
    await followJob(await response.json(), file.name);
  } catch (e) {
    $("video-status").textContent = "";
    handle(e, submitVideo);
  }
}

async function followJob(job, name) {
  for (;;) {
    const total = job.frames_total || (job.input && job.input.frames);
    if (total) $("video-progress").value = Math.min(1, job.frames_done / total);
    const eta = job.eta_s ? `, about ${Math.ceil(job.eta_s)} s left` : "";
    $("video-status").textContent = `${name}: ${job.state}` +
      (total ? ` (${job.frames_done} of ${total} frames${eta})` : "");
    if (job.state === "done") break;
    if (job.state === "failed" || job.state === "cancelled") {
      throw new Error(`the video job ${job.state}${job.error ? ": " + job.error : ""}`);
    }
    await new Promise((ok) => setTimeout(ok, 1000));
    const response = await api(`/jobs/${job.id}`);
    if (!response.ok) throw await failure(response);
    job = await response.json();
  }
  $("video-progress").value = 1;
  const response = await api(job.result);
  if (!response.ok) throw await failure(response);
  const blob = await response.blob();
  if (videoUrl) URL.revokeObjectURL(videoUrl);
  videoUrl = URL.createObjectURL(blob);
  $("video").src = videoUrl;
  const a = $("video-download");
  a.href = videoUrl;
  a.download = `${name.replace(/\.[^.]*$/, "")}-sgz.${blob.type === "video/webm" ? "webm" : "mp4"}`;
  $("video-result").hidden = false;
  $("video-status").textContent = `${name}: done (${(blob.size / 1048576).toFixed(1)} MB)`;
}

// ---------- wiring ----------

function debounce(fn, ms) {
  let timer = null;
  return () => { clearTimeout(timer); timer = setTimeout(fn, ms); };
}

function init() {
  const reEnhance = debounce(enhanceCurrent, DEBOUNCE_MS);
  const outputs = { strength: "strength-out", denoise: "denoise-out", "exposure-level": "exposure-out" };
  for (const [id, out] of Object.entries(outputs)) {
    $(id).addEventListener("input", () => {
      $(out).textContent = id === "exposure-level" ? Number($(id).value).toFixed(2) : $(id).value;
      reEnhance();
    });
  }
  $("exposure-mode").addEventListener("change", () => {
    $("exposure-level").disabled = $("exposure-mode").value !== "level";
    reEnhance();
  });
  $("file").addEventListener("change", (e) => { addPhotos(e.target.files); e.target.value = ""; });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    addPhotos(e.dataTransfer.files);
  });
  $("split").addEventListener("input", setSplit);
  $("zoom").addEventListener("change", setZoom);
  $("show-factor").addEventListener("change", drawFactor);
  $("factor-opacity").addEventListener("input", () => { $("factor").style.opacity = $("factor-opacity").value; });
  $("download").addEventListener("click", download);
  $("video-form").addEventListener("submit", submitVideo);
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY_NAME, $("api-key").value.trim());
    $("api-key").value = "";
    $("key-panel").hidden = true;
    showMessage("");
    const retry = pendingRetry;
    pendingRetry = null;
    if (retry) retry();
  });
  document.body.dataset.ready = "1";
}

init();
