// cvgl map page: drop a photo, POST it to /locate, draw the answer on the index's overview.
// Offline by design: no libraries, no tiles from the internet; the map is the index's own
// overview.png in an SVG whose coordinates are the overview's pixels (linear in lat/lon between
// its bounds, like cvgl.viz.maps' static preview). Everything from the server is inserted as
// text or attributes, never as HTML.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const RANK_COLOURS = ["#e41a1c", "#ff7f00", "#ffd92f", "#4daf4a", "#377eb8", "#984ea3", "#a65628", "#999999"];
const TURBO = ["#30123b", "#4686fb", "#1ae4b6", "#a2fc3c", "#fabb39", "#e4460a", "#7a0403"];
const MAP_WIDTH = 1000; // SVG user units across the map

const state = { meta: null, width: MAP_WIDTH, height: MAP_WIDTH, previewUrl: null };
const $ = (id) => document.getElementById(id);

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
  return node;
}

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = kind;
}

// lat/lon -> SVG user units over the map.
function project(lat, lon) {
  const [s, w, n, e] = state.meta.bounds;
  return [((lon - w) / (e - w)) * state.width, ((n - lat) / (n - s)) * state.height];
}

// Half a side of `metres` in SVG units (east-west and north-south), around `lat`.
function halfSide(lat, metres) {
  const [s, w, n, e] = state.meta.bounds;
  const dLat = metres / 2 / 111320;
  const dLon = dLat / Math.max(Math.cos((lat * Math.PI) / 180), 1e-6);
  return [(dLon / (e - w)) * state.width, (dLat / (n - s)) * state.height];
}

function turbo(t) {
  const x = Math.min(Math.max(t, 0), 1) * (TURBO.length - 1);
  const i = Math.min(Math.floor(x), TURBO.length - 2);
  const f = x - i;
  const a = TURBO[i], b = TURBO[i + 1];
  const mix = (k) => Math.round(parseInt(a.slice(k, k + 2), 16) * (1 - f) + parseInt(b.slice(k, k + 2), 16) * f);
  return `rgb(${mix(1)},${mix(3)},${mix(5)})`;
}

async function loadMeta() {
  const response = await fetch("/meta");
  if (!response.ok) throw new Error(`GET /meta: HTTP ${response.status}`);
  const meta = await response.json();
  state.meta = meta;
  const [s, w, n, e] = meta.bounds;
  const midLat = (s + n) / 2;
  // Keep ground proportions: metres per degree of longitude shrink with cos(latitude).
  const aspect = ((n - s) / ((e - w) * Math.cos((midLat * Math.PI) / 180)));
  state.height = Math.round(MAP_WIDTH * aspect);
  const map = $("map");
  map.setAttribute("viewBox", `0 0 ${state.width} ${state.height}`);
  const image = $("overview-image");
  image.setAttribute("width", state.width);
  image.setAttribute("height", state.height);
  image.setAttribute("preserveAspectRatio", "none");
  if (meta.overview) image.setAttribute("href", "/overview.png");
  $("index-info").textContent = `index ${meta.index}: ${meta.tiles} tiles of ${meta.tile_m ? Math.round(meta.tile_m) + " m" : "unknown size"}, encoder ${meta.encoder}`;
  const topK = document.querySelector('#options input[name="top_k"]');
  topK.value = meta.default_top_k;
}

function clearMap() {
  for (const id of ["heat", "candidates", "markers"]) $(id).replaceChildren();
}

function drawHeat(heat) {
  if (!heat || !heat.length) return;
  const scores = heat.map((h) => h.score);
  const hi = Math.max(...scores), lo = Math.min(...scores);
  $("legend-low").textContent = lo.toFixed(3);
  $("legend-high").textContent = hi.toFixed(3);
  const spacing = state.meta.stride_m || state.meta.tile_m || 50;
  const layer = $("heat");
  // Lowest first, so the strongest evidence is drawn on top.
  for (const h of [...heat].reverse()) {
    const t = hi > lo ? (h.score - lo) / (hi - lo) : 1;
    const [x, y] = project(h.lat, h.lon);
    const [hx, hy] = halfSide(h.lat, spacing);
    const rect = svg("rect", {
      x: x - hx, y: y - hy, width: 2 * hx, height: 2 * hy,
      fill: turbo(t), "fill-opacity": (0.08 + 0.42 * t * t).toFixed(3), class: "heat-tile",
    });
    rect.appendChild(svg("title")).textContent = `score ${h.score.toFixed(4)}`;
    layer.appendChild(rect);
  }
}

function drawCandidates(topK) {
  const layer = $("candidates");
  const side = state.meta.tile_m || 50;
  topK.forEach((tile, rank) => {
    const colour = RANK_COLOURS[Math.min(rank, RANK_COLOURS.length - 1)];
    const [x, y] = project(tile.lat, tile.lon);
    const [hx, hy] = halfSide(tile.lat, side);
    const group = svg("g", { class: "candidate", "data-rank": rank + 1 });
    group.appendChild(svg("rect", { x: x - hx, y: y - hy, width: 2 * hx, height: 2 * hy, fill: "none", stroke: colour, "stroke-width": rank === 0 ? 4 : 2.5 }));
    const label = svg("text", { x: x - hx + 4, y: y - hy + 17, fill: colour, "font-size": 17, "font-weight": "bold", stroke: "#000", "stroke-width": 3, "paint-order": "stroke" });
    label.textContent = `#${rank + 1}`;
    group.appendChild(label);
    group.appendChild(svg("title")).textContent = `#${rank + 1} ${tile.tile_id}: score ${tile.score.toFixed(4)}`;
    layer.appendChild(group);
  });
}

function drawMarkers(result) {
  const layer = $("markers");
  if (result.true_lat !== undefined && result.true_lon !== undefined) {
    const [tx, ty] = project(result.true_lat, result.true_lon);
    const truth = svg("g", { id: "truth", "data-lat": result.true_lat, "data-lon": result.true_lon });
    truth.appendChild(svg("circle", { cx: tx, cy: ty, r: 11, fill: "none", stroke: "#00a651", "stroke-width": 4 }));
    truth.appendChild(svg("title")).textContent = "photo GPS";
    layer.appendChild(truth);
  }
  const [x, y] = project(result.lat, result.lon);
  const marker = svg("g", { id: "prediction", "data-lat": result.lat, "data-lon": result.lon });
  marker.appendChild(svg("circle", { cx: x, cy: y, r: 9, fill: "#1f4e9e", stroke: "#fff", "stroke-width": 3 }));
  marker.appendChild(svg("line", { x1: x - 18, y1: y, x2: x + 18, y2: y, stroke: "#fff", "stroke-width": 2 }));
  marker.appendChild(svg("line", { x1: x, y1: y - 18, x2: x, y2: y + 18, stroke: "#fff", "stroke-width": 2 }));
  marker.appendChild(svg("title")).textContent = `prediction ${result.lat.toFixed(6)}, ${result.lon.toFixed(6)}`;
  layer.appendChild(marker);
}

function fact(list, name, value) {
  const dt = document.createElement("dt");
  dt.textContent = name;
  const dd = document.createElement("dd");
  dd.textContent = value;
  list.append(dt, dd);
}

function showAnswer(result) {
  const facts = $("facts");
  facts.replaceChildren();
  fact(facts, "photo", result.query);
  fact(facts, "lat, lon", `${result.lat.toFixed(6)}, ${result.lon.toFixed(6)}`);
  fact(facts, "confidence", result.confidence.toFixed(3));
  fact(facts, "heading", `${result.heading_deg.toFixed(0)}° (${result.heading_source})`);
  if (result.altitude_m !== null && result.altitude_m !== undefined) fact(facts, "altitude", `${result.altitude_m.toFixed(0)} m`);
  if (result.error_m !== undefined) fact(facts, "error vs GPS", `${result.error_m.toFixed(1)} m`);
  const list = $("topk");
  list.replaceChildren();
  result.top_k.forEach((tile, rank) => {
    const item = document.createElement("li");
    item.style.setProperty("--rank", RANK_COLOURS[Math.min(rank, RANK_COLOURS.length - 1)]);
    const thumb = document.createElement("img");
    thumb.alt = `tile ${tile.tile_id}`;
    thumb.loading = "lazy";
    if (result.top_k_rows) thumb.src = `/tiles/${result.top_k_rows[rank]}.png`;
    const caption = document.createElement("div");
    caption.textContent = `#${rank + 1}  score ${tile.score.toFixed(4)}`;
    item.append(thumb, caption);
    list.appendChild(item);
  });
  $("answer").hidden = false;
}

function formOptions() {
  const data = new FormData();
  for (const field of document.querySelectorAll("#options input, #options select")) {
    if (field.value !== "") data.append(field.name, field.value);
  }
  return data;
}

async function locate(file) {
  if (!state.meta) return;
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = URL.createObjectURL(file);
  const preview = $("preview");
  preview.src = state.previewUrl;
  preview.hidden = false;
  $("drop-text").textContent = file.name;
  if (file.size > state.meta.max_upload_bytes) {
    setStatus(`${file.name} is ${(file.size / 1e6).toFixed(1)} MB, over the ${(state.meta.max_upload_bytes / 1e6).toFixed(0)} MB limit`, "error");
    return;
  }
  clearMap();
  $("answer").hidden = true;
  setStatus(`Locating ${file.name}…`, "busy");
  const data = formOptions();
  data.append("image", file, file.name);
  const started = performance.now();
  let response;
  try {
    response = await fetch(`/locate?heatmap=${Math.min(state.meta.tiles, 20000)}`, { method: "POST", body: data });
  } catch (error) {
    setStatus(`Could not reach the server: ${error}`, "error");
    return;
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
    setStatus(`HTTP ${response.status}: ${detail}`, "error");
    return;
  }
  drawHeat(body.heatmap);
  drawCandidates(body.top_k);
  drawMarkers(body);
  showAnswer(body);
  setStatus(`Located in ${((performance.now() - started) / 1000).toFixed(1)} s.`, "done");
}

function wire() {
  const drop = $("drop");
  const input = $("file");
  input.addEventListener("change", () => input.files.length && locate(input.files[0]));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => {
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) locate(files[0]);
  });
}

wire();
loadMeta().then(
  () => { document.body.dataset.ready = "1"; },
  (error) => setStatus(`Could not load the index description: ${error.message}`, "error"),
);
