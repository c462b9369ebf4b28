"use strict";
// The nxtrec page: choose or drop images, each is sent to POST /v1/tag (concurrent requests
// are batched by the server), its labels are shown as probability bars. The threshold
// filters on the page; top-k and heat maps need a new request. A label that carries a
// `map` (a grid over the model's center crop, from maps=true) draws it over the image on hover.
// GET /v1/info says which model runs: the demo model's note is shown, and heat maps are
// switched off when the engine has none (ONNX). The results shown can be downloaded (CSV,
// JSON), one image's tags copied, and all of them cleared; a file already shown (same
// name, size and modification time) gets no second card.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "nxtrec-api-key";
const items = []; // {file, key, url, card, result, error, pending, removed}
const server = { model: null };

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

function plural(n, word) {
  return `${n} ${word}${n === 1 ? "" : "s"}`;
}

function topK() {
  const k = parseInt($("top-k").value, 10);
  return Number.isFinite(k) ? Math.min(100, Math.max(1, k)) : 10;
}

function threshold() {
  return parseFloat($("threshold").value);
}

async function tag(file) {
  const form = new FormData();
  form.append("files", file, file.name);
  const maps = $("maps").checked && !$("maps").disabled;
  const query = new URLSearchParams({ top_k: topK(), maps });
  const res = await fetch("/v1/tag?" + query, { method: "POST", body: form, headers: authHeaders() });
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!res.ok) throw new Error(typeof body.detail === "string" ? body.detail : `HTTP ${res.status}`);
  if (body.model) server.model = body.model;
  return body.results[0];
}

function newCard(item) {
  const card = $("card").content.firstElementChild.cloneNode(true);
  card.querySelector("img").src = item.url;
  card.querySelector(".name").textContent = item.file.name;
  card.querySelector(".copy").addEventListener("click", () => copyTags(item));
  $("results").append(card);
  return card;
}

function labelRow(card, label) {
  const row = document.createElement("li");
  row.className = "label";
  row.dataset.prob = label.prob;
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = name.title = label.label;
  const bar = document.createElement("span");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = (100 * label.prob).toFixed(2) + "%";
  bar.append(fill);
  const prob = document.createElement("span");
  prob.className = "prob";
  prob.textContent = label.prob.toFixed(4);
  row.append(name, bar, prob);
  if (label.map) {
    row.addEventListener("mouseenter", () => drawHeatMap(card, label));
    row.addEventListener("mouseleave", () => clearHeatMap(card));
  }
  return row;
}

function show(item) {
  const { card, result } = item;
  card.querySelector(".size").textContent = `${result.width} × ${result.height} px`;
  card.querySelector(".labels").replaceChildren(...result.labels.map((label) => labelRow(card, label)));
  card.querySelector(".error").textContent = "";
  applyThreshold();
}

function applyThreshold() {
  $("threshold-value").textContent = threshold().toFixed(3);
  for (const row of document.querySelectorAll(".label")) {
    row.classList.toggle("hidden", parseFloat(row.dataset.prob) < threshold());
  }
}

// The model sees the center square of the image (shorter side resized, then center-cropped):
// the grid covers that square of the displayed picture. Drawn as nxtrec.inference.heatmaps
// draws its overlays: the picture at full brightness, the min-max normalised grid upsampled
// bilinearly as a heat layer whose colour and opacity grow with the value, a contour at half
// the peak, the label and probability written on it, and the colour scale at its right edge.
const HEAT = ["#2c7bb6", "#00a6ca", "#00ccbc", "#90eb9d", "#ffff8c", "#f9d057", "#f29e2e", "#e76818", "#d7191c"]
  .map((c) => [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)));

function heatColour(v) {
  const pos = Math.min(Math.max(v, 0), 1) * (HEAT.length - 1);
  const lo = Math.min(Math.floor(pos), HEAT.length - 2), t = pos - lo;
  return HEAT[lo].map((a, i) => a * (1 - t) + HEAT[lo + 1][i] * t);
}

// Bilinear upsampling of a rows x cols grid to side x side pixels (pixel centres aligned).
function upsample(norm, rows, cols, side) {
  const out = new Float32Array(side * side);
  for (let y = 0; y < side; y++) {
    const gy = Math.min(Math.max((y + 0.5) * rows / side - 0.5, 0), rows - 1);
    const r0 = Math.floor(gy), r1 = Math.min(r0 + 1, rows - 1), ty = gy - r0;
    for (let x = 0; x < side; x++) {
      const gx = Math.min(Math.max((x + 0.5) * cols / side - 0.5, 0), cols - 1);
      const c0 = Math.floor(gx), c1 = Math.min(c0 + 1, cols - 1), tx = gx - c0;
      const top = norm[r0][c0] * (1 - tx) + norm[r0][c1] * tx;
      const bottom = norm[r1][c0] * (1 - tx) + norm[r1][c1] * tx;
      out[y * side + x] = top * (1 - ty) + bottom * ty;
    }
  }
  return out;
}

function heatLayer(ctx, grid, side) {
  const flat = grid.flat(), low = Math.min(...flat), high = Math.max(...flat);
  const norm = grid.map((row) => row.map((v) => (v - low) / (high - low + 1e-6)));
  const values = upsample(norm, grid.length, grid[0].length, side);
  const image = ctx.createImageData(side, side);
  const above = (x, y) => x >= 0 && y >= 0 && x < side && y < side && values[y * side + x] >= 0.5;
  for (let i = 0; i < side * side; i++) {
    const x = i % side, y = (i - x) / side, v = values[i];
    const near = [above(x - 2, y), above(x + 2, y), above(x, y - 2), above(x, y + 2)];
    const inner = above(x, y) && !near.every(Boolean), outer = !above(x, y) && near.some(Boolean);
    const [r, g, b] = inner ? [255, 255, 255] : outer ? [0, 0, 0] : heatColour(v);
    image.data.set([r, g, b, Math.round(255 * (inner || outer ? 1 : 0.7 * v ** 1.5))], 4 * i);
  }
  return { image, low, high };
}

function drawHeatMap(card, label) {
  const img = card.querySelector("img");
  const canvas = card.querySelector("canvas");
  const scale = window.devicePixelRatio || 1;
  canvas.width = img.clientWidth * scale;
  canvas.height = img.clientHeight * scale;
  const ctx = canvas.getContext("2d");
  const side = Math.round(Math.min(canvas.width, canvas.height));
  const x0 = Math.round((canvas.width - side) / 2), y0 = Math.round((canvas.height - side) / 2);
  const { image, low, high } = heatLayer(ctx, label.map, side);
  ctx.putImageData(image, x0, y0);
  const bar = Math.max(8, side / 30), top = y0 + side * 0.15, height = side * 0.7, left = x0 + side - bar - 4;
  for (let i = 0; i < height; i++) {
    ctx.fillStyle = `rgb(${heatColour(1 - i / height).join(",")})`;
    ctx.fillRect(left, top + i, bar, 1.5);
  }
  ctx.font = `${Math.round(11 * scale)}px sans-serif`;
  ctx.textAlign = "right";
  ctx.lineWidth = 3 * scale;
  for (const [text, y] of [[`${(100 * high).toFixed(1)}%`, top + 4 * scale], [`${(100 * low).toFixed(1)}%`, top + height]]) {
    ctx.strokeStyle = "black";
    ctx.strokeText(text, left - 3, y);
    ctx.fillStyle = "white";
    ctx.fillText(text, left - 3, y);
  }
  ctx.textAlign = "left";
  const title = `${label.label}  ${label.prob.toFixed(3)}`;
  ctx.font = `${Math.round(13 * scale)}px sans-serif`;
  ctx.fillStyle = "black";
  ctx.fillRect(x0 + 4, y0 + 4, ctx.measureText(title).width + 10 * scale, 20 * scale);
  ctx.fillStyle = "white";
  ctx.fillText(title, x0 + 4 + 5 * scale, y0 + 4 + 15 * scale);
}

function clearHeatMap(card) {
  const canvas = card.querySelector("canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

async function run(batch, note = "") {
  batch = batch.filter((item) => !item.removed);
  if (!batch.length) return;
  const start = performance.now();
  $("status").textContent = `Tagging ${plural(batch.length, "image")}…` + note;
  await Promise.all(batch.map(async (item) => {
    item.pending = true;
    try {
      const result = await tag(item.file);
      if (item.removed) return;
      Object.assign(item, { result, error: null });
      show(item);
    } catch (err) {
      if (item.removed) return;
      Object.assign(item, { result: null, error: err.message });
      item.card.querySelector(".labels").replaceChildren();
      item.card.querySelector(".error").textContent = err.message;
    } finally {
      item.pending = false;
      item.card.querySelector(".copy").disabled = !item.result;
    }
  }));
  if (batch.every((item) => item.removed)) return;
  $("status").textContent = `${plural(batch.length, "image")} in ${Math.round(performance.now() - start)} ms` + note;
  updateToolbar();
}

// One file, one card: a file is known by its name, size and modification time (a content
// hash would need crypto.subtle, which pages served over plain HTTP to another machine lack).
function fileKey(file) {
  return JSON.stringify([file.name, file.size, file.lastModified]);
}

function addFiles(files) {
  const batch = [], again = [];
  for (const file of files) {
    if (!(file.type.startsWith("image/") || file.type === "")) continue;
    const key = fileKey(file);
    const known = items.find((item) => item.key === key);
    if (known) {  // already shown: no second card; tagged again only if it had failed
      if (!again.includes(known)) again.push(known);
      if (!known.result && !known.pending && !batch.includes(known)) batch.push(known);
      continue;
    }
    const item = { file, key, url: URL.createObjectURL(file), result: null, error: null, pending: false, removed: false };
    item.card = newCard(item);
    items.push(item);
    batch.push(item);
  }
  for (const item of again) flash(item.card);
  const note = again.length ? ` (${plural(again.length, "file")} already shown: ${again.map((i) => i.file.name).join(", ")})` : "";
  updateToolbar();
  if (!batch.length && note) $("status").textContent = "Nothing new" + note;
  return run(batch, note);
}

function flash(card) {
  card.classList.remove("again");
  void card.offsetWidth; // restart the animation
  card.classList.add("again");
  card.scrollIntoView({ block: "nearest" });
}

function updateToolbar() {
  const done = items.filter((item) => item.result).length;
  $("toolbar").hidden = !items.length;
  $("count").textContent = `${plural(items.length, "image")}, ${done} tagged`;
  $("download-csv").disabled = $("download-json").disabled = !done;
}

// What is exported is what the page shows: each tagged image's labels at or above the threshold.
function shownLabels(item) {
  return item.result ? item.result.labels.filter((l) => l.prob >= threshold()).map(({ label, prob, confidence }) => (confidence === undefined ? { label, prob } : { label, prob, confidence })) : [];
}

function resultsJson() {
  const results = items.map((item) => item.result
    ? { file: item.file.name, width: item.result.width, height: item.result.height, labels: shownLabels(item) }
    : { file: item.file.name, error: item.error || "not tagged yet" });
  return JSON.stringify({ model: server.model, top_k: topK(), threshold: threshold(), results }, null, 2) + "\n";
}

function csvField(value) {
  let text = String(value);
  if (typeof value === "string" && /^[=+\-@\t\r]/.test(text)) text = "'" + text; // not a spreadsheet formula
  return /[",\r\n]/.test(text) ? '"' + text.replace(/"/g, '""') + '"' : text;
}

function resultsCsv() {
  const lines = [["file", "width", "height", "rank", "label", "prob"].join(",")];
  for (const item of items) {
    shownLabels(item).forEach((l, i) => {
      lines.push([item.file.name, item.result.width, item.result.height, i + 1, l.label, l.prob].map(csvField).join(","));
    });
  }
  return lines.join("\r\n") + "\r\n";
}

function download(name, type, text) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

async function copyTags(item) {
  const tags = shownLabels(item).map((l) => l.label);
  const status = item.card.querySelector(".copied");
  let copied = false;
  if (tags.length) {
    try {
      await navigator.clipboard.writeText(tags.join(", "));
      copied = true;
    } catch {
      copied = copyBySelection(tags.join(", ")); // no navigator.clipboard outside secure contexts
    }
  }
  status.textContent = !tags.length ? "No tags above the threshold"
    : copied ? `Copied ${plural(tags.length, "tag")}` : "Could not copy: select the labels instead";
  status.classList.toggle("ok", copied);
  clearTimeout(item.copyTimer);
  item.copyTimer = setTimeout(() => { status.textContent = ""; }, 4000);
}

function copyBySelection(text) {
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.style.position = "fixed";
  area.style.opacity = "0";
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch {
    copied = false;
  }
  area.remove();
  return copied;
}

function clearAll() {
  for (const item of items) {
    item.removed = true;
    URL.revokeObjectURL(item.url);
  }
  items.length = 0;
  $("results").replaceChildren();
  $("status").textContent = "Cleared";
  updateToolbar();
}

function setMaps(available, why) {
  $("maps").disabled = !available;
  if (!available) $("maps").checked = false;
  $("maps-label").classList.toggle("disabled", !available);
  $("maps-note").textContent = available ? "" : why;
}

async function showServer() {
  try {
    const [ready, info] = await Promise.all(["/readyz", "/v1/info"].map((path) => fetch(path, { headers: authHeaders() })));
    if (ready.status === 401 || info.status === 401) {
      $("key-box").hidden = false;
      setMaps(false, "Heat maps: enter the API key first");
      return;
    }
    const body = await ready.json().catch(() => ({}));
    $("model").textContent = body.model ? `model: ${body.model}` : "model not ready";
    const about = info.ok ? await info.json().catch(() => ({})) : {};
    server.model = about.model || body.model || null;
    $("notice").hidden = !about.note;
    $("notice-title").hidden = !about.demo;
    $("notice-text").textContent = about.note || "";
    if (typeof about.maps !== "boolean") setMaps(false, `Heat maps unavailable: /v1/info answered HTTP ${info.status}`);
    else setMaps(about.maps, "Heat maps are off: this server runs ONNX Runtime, which gives no attention maps; they need a PyTorch model (nxtrec serve --model)");
  } catch (err) {
    $("model").textContent = "server unreachable";
    setMaps(false, "Heat maps unavailable: the server did not answer");
  }
}

let rerunTimer = null;
function rerunAll() {
  clearTimeout(rerunTimer);
  rerunTimer = setTimeout(() => run(items), 300);
}

$("files").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
$("threshold").addEventListener("input", applyThreshold);
$("top-k").addEventListener("change", rerunAll);
$("maps").addEventListener("change", rerunAll);
$("download-csv").addEventListener("click", () => download("nxtrec-results.csv", "text/csv", resultsCsv()));
$("download-json").addEventListener("click", () => download("nxtrec-results.json", "application/json", resultsJson()));
$("clear").addEventListener("click", clearAll);
$("api-key").addEventListener("change", (e) => {
  sessionStorage.setItem(KEY_STORE, e.target.value);
  showServer();
  rerunAll();
});
applyThreshold();
showServer();
