"use strict";
// The nxtrec page: choose or drop images, each is sent to POST /v1/tag (concurrent requests
// are batched by the server), its labels are shown as probability bars. The threshold
// filters on the page; top-k and heat maps need a new request. A label that carries a
// `map` (a grid over the model's center crop, from maps=true) draws it over the image on hover.

const $ = (id) => document.getElementById(id);
const KEY_STORE = "nxtrec-api-key";
const items = []; // {file, card, result}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { Authorization: "Bearer " + key } : {};
}

function topK() {
  const k = parseInt($("top-k").value, 10);
  return Number.isFinite(k) ? Math.min(100, Math.max(1, k)) : 10;
}

async function tag(file) {
  const form = new FormData();
  form.append("files", file, file.name);
  const query = new URLSearchParams({ top_k: topK(), maps: $("maps").checked });
  const res = await fetch("/v1/tag?" + query, { method: "POST", body: form, headers: authHeaders() });
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) {
    $("key-box").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!res.ok) throw new Error(typeof body.detail === "string" ? body.detail : `HTTP ${res.status}`);
  return body.results[0];
}

function newCard(file) {
  const card = $("card").content.firstElementChild.cloneNode(true);
  card.querySelector("img").src = URL.createObjectURL(file);
  card.querySelector(".name").textContent = file.name;
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
  const threshold = parseFloat($("threshold").value);
  $("threshold-value").textContent = threshold.toFixed(3);
  for (const row of document.querySelectorAll(".label")) {
    row.classList.toggle("hidden", parseFloat(row.dataset.prob) < threshold);
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

async function run(batch) {
  if (!batch.length) return;
  const start = performance.now();
  $("status").textContent = `Tagging ${batch.length} image${batch.length > 1 ? "s" : ""}…`;
  await Promise.all(batch.map(async (item) => {
    try {
      item.result = await tag(item.file);
      show(item);
    } catch (err) {
      item.card.querySelector(".labels").replaceChildren();
      item.card.querySelector(".error").textContent = err.message;
    }
  }));
  $("status").textContent = `${batch.length} image${batch.length > 1 ? "s" : ""} in ${Math.round(performance.now() - start)} ms`;
}

function addFiles(files) {
  const batch = [...files].filter((f) => f.type.startsWith("image/") || f.type === "")
    .map((file) => ({ file, card: newCard(file), result: null }));
  items.push(...batch);
  return run(batch);
}

async function showModel() {
  const res = await fetch("/readyz", { headers: authHeaders() });
  if (res.status === 401) { $("key-box").hidden = false; return; }
  const body = await res.json().catch(() => ({}));
  $("model").textContent = body.model ? `model: ${body.model}` : "model not ready";
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
$("api-key").addEventListener("change", (e) => {
  sessionStorage.setItem(KEY_STORE, e.target.value);
  showModel();
  rerunAll();
});
applyThreshold();
showModel();
