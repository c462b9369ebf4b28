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
    row.addEventListener("mouseenter", () => drawHeatMap(card, label.map));
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
// the grid covers that square of the displayed picture.
function drawHeatMap(card, grid) {
  const img = card.querySelector("img");
  const canvas = card.querySelector("canvas");
  const scale = window.devicePixelRatio || 1;
  canvas.width = img.clientWidth * scale;
  canvas.height = img.clientHeight * scale;
  const ctx = canvas.getContext("2d");
  const side = Math.min(canvas.width, canvas.height);
  const x0 = (canvas.width - side) / 2, y0 = (canvas.height - side) / 2;
  const rows = grid.length, cols = grid[0].length;
  const peak = Math.max(...grid.flat()) || 1;
  ctx.fillStyle = "rgba(0, 0, 0, 0.35)";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) {
      ctx.fillStyle = `rgba(255, 80, 0, ${(0.8 * grid[r][c] / peak).toFixed(3)})`;
      ctx.fillRect(x0 + (c * side) / cols, y0 + (r * side) / rows, side / cols + 0.5, side / rows + 0.5);
    }
  }
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
