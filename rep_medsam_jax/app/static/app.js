// The Rep-MedSAM page: a canvas viewer that sends boxes to the local server and shows masks.
// No third-party code: every request goes to the server that served this page.
"use strict";

const TOKEN = document.querySelector("meta[name=token]").content;
const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
  [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212],
  [0, 128, 128], [170, 110, 40]];
const ALPHA = 0.45;

const $ = (id) => document.getElementById(id);
const canvas = $("view");
const ctx = canvas.getContext("2d");
const native = document.createElement("canvas");      // the slice at its own size
const nativeCtx = native.getContext("2d");

// Exposed for tests and for the curious: what the page last did.
const state = window.appState = {
  doc: null, z: 0, label: 1, labels: new Set([1]), scale: 1, grey: null, labelPixels: null,
  level: 128, width: 255, drag: null, lastBox: null, job: null, busy: 0, message: "",
};

function colour(label) { return PALETTE[(label - 1) % PALETTE.length]; }

function show(text, isError = false) {
  state.message = text;
  const box = $("message");
  box.textContent = text;
  box.className = isError ? "error" : "";
}

async function api(path, options = {}) {
  const init = { method: options.method || "GET", headers: { "X-Token": TOKEN } };
  if (options.json !== undefined) {
    init.method = options.method || "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(options.json);
  } else if (options.body !== undefined) {
    init.method = "POST";
    init.body = options.body;
  }
  state.busy += 1;
  try {
    const response = await fetch(path, init);
    if (!response.ok) {
      let text = `${response.status} ${response.statusText}`;
      try { text = (await response.json()).error || text; } catch (err) { /* not JSON */ }
      throw new Error(text);
    }
    return response;
  } finally {
    state.busy -= 1;
  }
}

async function pixelsOf(response) {
  const bitmap = await createImageBitmap(await response.blob());
  const scratch = document.createElement("canvas");
  scratch.width = bitmap.width;
  scratch.height = bitmap.height;
  const scratchCtx = scratch.getContext("2d");
  scratchCtx.drawImage(bitmap, 0, 0);
  return scratchCtx.getImageData(0, 0, bitmap.width, bitmap.height).data;
}

// ---- files ------------------------------------------------------------------------------

async function loadFiles() {
  const data = await (await api("/api/files")).json();
  const list = $("files");
  list.textContent = "";
  for (const entry of data.files) {
    const item = document.createElement("li");
    item.textContent = entry.name;
    item.title = entry.path;
    item.dataset.path = entry.path;
    item.addEventListener("click", () => openPath(entry.path));
    list.appendChild(item);
  }
  const presets = $("presets");
  presets.textContent = "";
  for (const [name, [level, width]] of Object.entries(data.presets)) {
    const button = document.createElement("button");
    button.textContent = `CT ${name}`;
    button.title = `level ${level} HU, width ${width} HU (the model sees this window too)`;
    button.addEventListener("click", () => ctWindow(level, width));
    presets.appendChild(button);
  }
}

async function openPath(path) {
  try {
    show(`opening ${path} ...`);
    const info = await (await api("/api/open", { json: { path } })).json();
    await setDoc(info);
  } catch (err) { show(err.message, true); }
}

async function upload(file) {
  try {
    show(`uploading ${file.name} ...`);
    const response = await api(`/api/upload?name=${encodeURIComponent(file.name)}`,
      { body: file });
    await setDoc(await response.json());
  } catch (err) { show(err.message, true); }
}

async function setDoc(info) {
  state.doc = info;
  state.z = info.is_3d ? Math.floor(info.depth / 2) : 0;
  state.labels = new Set([1, ...info.labels]);
  state.label = 1;
  state.lastBox = null;
  state.level = 128; state.width = 255;
  $("level").value = 128; $("width").value = 255;
  $("doc-panel").hidden = false;
  $("doc-name").textContent = info.name;
  $("doc-notes").textContent = info.notes.join(" ");
  $("volume-tools").hidden = !info.is_3d;
  $("presets").hidden = !info.can_window;
  $("slice").max = info.depth - 1;
  $("slice").value = state.z;
  const format = $("format");
  format.textContent = "";
  for (const name of info.formats) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    format.appendChild(option);
  }
  $("save").disabled = info.uploaded;
  fitCanvas();
  renderLabels();
  await loadSlice();
  show(`${info.name}: ${info.width} x ${info.height}` +
       (info.is_3d ? ` x ${info.depth} slices` : "") + ". Drag a box on the image.");
}

function updateInfo(info) {
  state.doc = info;
  for (const label of info.labels) state.labels.add(label);
  renderLabels();
}

// ---- drawing ----------------------------------------------------------------------------

function fitCanvas() {
  const doc = state.doc;
  const area = $("viewer").getBoundingClientRect();
  state.scale = Math.max(0.05, Math.min((area.width - 8) / doc.width,
                                        (area.height - 8) / doc.height));
  canvas.width = Math.round(doc.width * state.scale);
  canvas.height = Math.round(doc.height * state.scale);
  native.width = doc.width;
  native.height = doc.height;
}

async function loadSlice() {
  const doc = state.doc;
  const z = state.z;
  const [grey, labels] = await Promise.all([
    api(`/api/doc/${doc.id}/slice/${z}.png`).then(pixelsOf),
    api(`/api/doc/${doc.id}/labels/${z}.png`).then(pixelsOf)]);
  if (state.doc !== doc || state.z !== z) return;        // the user moved on meanwhile
  state.grey = grey;
  state.labelPixels = labels;
  $("slice-label").textContent = doc.is_3d ? `slice ${z} of 0..${doc.depth - 1}` : "";
  draw();
}

async function reloadLabels() {
  const response = await api(`/api/doc/${state.doc.id}/labels/${state.z}.png`);
  state.labelPixels = await pixelsOf(response);
  draw();
}

function draw() {
  const doc = state.doc;
  if (!doc || !state.grey) return;
  const image = nativeCtx.createImageData(doc.width, doc.height);
  const out = image.data;
  const grey = state.grey;
  const labels = state.labelPixels;
  const low = state.level - state.width / 2;
  const gain = 255 / state.width;
  for (let i = 0; i < out.length; i += 4) {
    for (let c = 0; c < 3; c += 1) {
      out[i + c] = (grey[i + c] - low) * gain;           // clamped by Uint8ClampedArray
    }
    const label = labels ? labels[i] : 0;
    if (label > 0) {
      const [r, g, b] = colour(label);
      out[i] = out[i] * (1 - ALPHA) + r * ALPHA;
      out[i + 1] = out[i + 1] * (1 - ALPHA) + g * ALPHA;
      out[i + 2] = out[i + 2] * (1 - ALPHA) + b * ALPHA;
    }
    out[i + 3] = 255;
  }
  nativeCtx.putImageData(image, 0, 0);
  ctx.imageSmoothingEnabled = false;
  ctx.drawImage(native, 0, 0, canvas.width, canvas.height);
  const box = state.drag ? dragBox() : null;
  if (box) {
    ctx.strokeStyle = `rgb(${colour(state.label).join(",")})`;
    ctx.lineWidth = 2;
    ctx.strokeRect(box[0] * state.scale, box[1] * state.scale,
                   (box[2] - box[0]) * state.scale, (box[3] - box[1]) * state.scale);
  }
}

function renderLabels() {
  const list = $("labels");
  list.textContent = "";
  for (const label of [...state.labels].sort((a, b) => a - b)) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${colour(label).join(",")})`;
    item.appendChild(swatch);
    item.appendChild(document.createTextNode(`label ${label}` +
      (state.doc && state.doc.labels.includes(label) ? "" : " (empty)")));
    item.dataset.label = label;
    if (label === state.label) item.className = "current";
    item.addEventListener("click", () => chooseLabel(label));
    list.appendChild(item);
  }
}

function chooseLabel(label) {
  state.label = label;
  state.labels.add(label);
  renderLabels();
}

// ---- boxes ------------------------------------------------------------------------------

function toImage(event) {
  const rect = canvas.getBoundingClientRect();
  const x = (event.clientX - rect.left) / state.scale;
  const y = (event.clientY - rect.top) / state.scale;
  return [Math.min(Math.max(x, 0), state.doc.width), Math.min(Math.max(y, 0), state.doc.height)];
}

function dragBox() {
  const [x0, y0] = state.drag.start;
  const [x1, y1] = state.drag.end;
  return [Math.round(Math.min(x0, x1)), Math.round(Math.min(y0, y1)),
          Math.round(Math.max(x0, x1)), Math.round(Math.max(y0, y1))];
}

canvas.addEventListener("mousedown", (event) => {
  if (!state.doc || event.button !== 0) return;
  state.drag = { start: toImage(event), end: toImage(event) };
});
window.addEventListener("mousemove", (event) => {
  if (!state.drag) return;
  state.drag.end = toImage(event);
  draw();
});
window.addEventListener("mouseup", async () => {
  if (!state.drag) return;
  const box = dragBox();
  state.drag = null;
  draw();
  if (box[2] - box[0] < 1 || box[3] - box[1] < 1) return;
  await sendBox(box);
});

async function sendBox(box) {
  const doc = state.doc;
  const z = state.z;
  const label = state.label;
  try {
    const started = performance.now();
    const response = await api(`/api/doc/${doc.id}/box`, { json: { z, label, box } });
    const pixels = await pixelsOf(response);
    state.lastBox = { doc: doc.id, z, label, box };
    if (state.doc === doc && state.z === z) { state.labelPixels = pixels; draw(); }
    if (!doc.labels.includes(label)) doc.labels.push(label);
    renderLabels();
    const ms = Math.round(performance.now() - started);
    show(`label ${label}, slice ${z}: box [${box.join(", ")}], ` +
         `score ${response.headers.get("X-Score")}, ${ms} ms`);
  } catch (err) { show(err.message, true); }
}

// ---- volumes ----------------------------------------------------------------------------

async function goToSlice(z) {
  const doc = state.doc;
  if (!doc) return;
  const clamped = Math.min(Math.max(z, 0), doc.depth - 1);
  if (clamped === state.z) return;
  state.z = clamped;
  $("slice").value = clamped;
  try { await loadSlice(); } catch (err) { show(err.message, true); }
}

async function propagate() {
  const last = state.lastBox;
  if (!state.doc || !state.doc.is_3d) return;
  if (!last || last.doc !== state.doc.id) { show("draw a box first", true); return; }
  const extent = Math.max(0, parseInt($("extent").value, 10) || 0);
  const body = { label: last.label, box: last.box, z0: last.z - extent, z1: last.z + extent };
  try {
    const { job } = await (await api(`/api/doc/${state.doc.id}/propagate`,
      { json: body })).json();
    state.job = { id: job, state: "running" };
    $("cancel").disabled = false;
    show(`propagating label ${last.label} over slices ${Math.max(body.z0, 0)}` +
         `..${Math.min(body.z1, state.doc.depth - 1)} ...`);
    await followJob(job, state.doc.id);
  } catch (err) { show(err.message, true); }
}

async function followJob(jobId, docId) {
  for (;;) {
    const job = await (await api(`/api/jobs/${jobId}`)).json();
    $("progress").max = Math.max(job.total, 1);
    $("progress").value = job.done;
    state.job = { id: jobId, ...job };
    if (job.state !== "running") {
      $("cancel").disabled = true;
      if (job.state === "failed") show(`propagation failed: ${job.error}`, true);
      else show(job.state === "done" ? "propagation done" : "propagation cancelled");
      if (state.doc && state.doc.id === docId) {         // still the file on screen
        updateInfo(await (await api(`/api/doc/${docId}`)).json());
        await reloadLabels();
      }
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 150));
  }
}

async function cancelJob() {
  if (state.job && state.job.state === "running") {
    await api(`/api/jobs/${state.job.id}/cancel`, { method: "POST" });
  }
}

// ---- edits, window, saving --------------------------------------------------------------

async function edit(path, json) {
  if (!state.doc) return;
  try {
    updateInfo(await (await api(`/api/doc/${state.doc.id}/${path}`, { json })).json());
    await reloadLabels();
  } catch (err) { show(err.message, true); }
}

async function ctWindow(level, width) {
  try {
    show(`CT window ${level} / ${width} HU ...`);
    updateInfo(await (await api(`/api/doc/${state.doc.id}/window`,
      { json: { level, width } })).json());
    await loadSlice();
    show(`CT window level ${level} HU, width ${width} HU (model input)`);
  } catch (err) { show(err.message, true); }
}

async function save(download) {
  if (!state.doc) return;
  const format = $("format").value;
  try {
    const response = await api(`/api/doc/${state.doc.id}/save`, { json: { format, download } });
    if (!download) {
      show(`saved ${(await response.json()).path}`);
      return;
    }
    const disposition = response.headers.get("Content-Disposition") || "";
    const match = /filename="([^"]+)"/.exec(disposition);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = match ? match[1] : "labels";
    link.click();
    URL.revokeObjectURL(link.href);
    show(`downloaded ${link.download}`);
  } catch (err) { show(err.message, true); }
}

// ---- controls and keys ------------------------------------------------------------------

$("upload").addEventListener("change", (event) => {
  if (event.target.files.length) upload(event.target.files[0]);
  event.target.value = "";
});
$("slice").addEventListener("input", (event) => goToSlice(parseInt(event.target.value, 10)));
$("new-label").addEventListener("click", () => chooseLabel(Math.max(...state.labels) + 1));
$("propagate").addEventListener("click", propagate);
$("cancel").addEventListener("click", cancelJob);
$("undo").addEventListener("click", () => edit("undo", {}));
$("delete-slice").addEventListener("click",
  () => edit("delete", { label: state.label, z: state.z }));
$("delete-label").addEventListener("click", () => edit("delete", { label: state.label, z: null }));
$("level").addEventListener("input", (e) => { state.level = +e.target.value; draw(); });
$("width").addEventListener("input", (e) => { state.width = +e.target.value; draw(); });
$("reset-window").addEventListener("click", resetWindow);
$("save").addEventListener("click", () => save(false));
$("download").addEventListener("click", () => save(true));
canvas.addEventListener("wheel", (event) => {
  event.preventDefault();
  goToSlice(state.z + (event.deltaY > 0 ? 1 : -1));
}, { passive: false });
window.addEventListener("resize", () => { if (state.doc) { fitCanvas(); draw(); } });

function resetWindow() {
  state.level = 128; state.width = 255;
  $("level").value = 128; $("width").value = 255;
  draw();
}

window.addEventListener("keydown", (event) => {
  const typing = ["INPUT", "SELECT", "TEXTAREA"].includes(document.activeElement.tagName) &&
    document.activeElement.type !== "range";
  if (event.key === "Escape") { cancelJob(); return; }
  if (typing || !state.doc) return;
  const key = event.key.toLowerCase();
  if ((event.ctrlKey || event.metaKey) && key === "z") { edit("undo", {}); }
  else if (event.ctrlKey || event.metaKey || event.altKey) { return; }
  else if (event.key === "ArrowUp") { goToSlice(state.z + 1); }
  else if (event.key === "ArrowDown") { goToSlice(state.z - 1); }
  else if (/^[1-9]$/.test(event.key)) { chooseLabel(parseInt(event.key, 10)); }
  else if (key === "n") { chooseLabel(Math.max(...state.labels) + 1); }
  else if (key === "p") { propagate(); }
  else if (key === "u") { edit("undo", {}); }
  else if (event.key === "Delete" || event.key === "Backspace") {
    edit("delete", { label: state.label, z: event.shiftKey ? null : state.z });
  }
  else if (key === "r") { resetWindow(); }
  else if (key === "s") { save(false); }
  else if (key === "d") { save(true); }
  else { return; }
  event.preventDefault();
});

loadFiles().catch((err) => show(err.message, true));
