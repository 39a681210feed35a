// cvgl service page: drop a photo, POST it to /locate?layers=1, draw the answer on the index's
// orthophoto (or its tiles at their coordinates) with the same renderer as the offline map file
// (cvglLayers, over the vendored Leaflet served from /viz; nothing comes from the internet).
// Everything from the server is inserted as text or attributes, never as HTML.
"use strict";

const state = { meta: null, map: null, answer: null, answerLayers: [], legend: null, previewUrl: null };
window.cvglPage = state; // for a look from the console (and the browser tests)
const $ = (id) => document.getElementById(id);

function setStatus(text, kind) {
  const status = $("status");
  status.textContent = text;
  status.dataset.state = kind;
}

function tileSize(meta) {
  if (!meta.tile_m) return "unknown size";
  return meta.tile_m_estimated ? `\u2248${Math.round(meta.tile_m)} m (estimated from tile spacing)` : `${Math.round(meta.tile_m)} m`;
}

function showLegend(layers) {
  if (state.legend) state.legend.remove();
  const meta = state.meta;
  const note = meta.basemap && meta.basemap.note ? meta.basemap.note : null;
  state.legend = cvglLayers.legendControl({ tile_m: meta.tile_m, tile_m_estimated: meta.tile_m_estimated, note }, layers).addTo(state.map);
}

async function loadMeta() {
  const response = await fetch("/meta");
  if (!response.ok) throw new Error(`GET /meta: HTTP ${response.status}`);
  const meta = await response.json();
  state.meta = meta;
  const map = L.map("map", { maxZoom: 22, zoomSnap: 0.25 });
  state.map = map;
  L.control.scale({ imperial: false }).addTo(map);
  const base = cvglLayers.drawBasemap(meta.basemap);
  if (base) base.addTo(map);
  const [s, w, n, e] = meta.bounds;
  map.fitBounds([[s, w], [n, e]]);
  showLegend({});
  $("index-info").textContent = `index ${meta.index}: ${meta.tiles} tiles of ${tileSize(meta)}, encoder ${meta.encoder}`;
  document.querySelector('#options input[name="top_k"]').value = meta.default_top_k;
}

function clearAnswer() {
  for (const layer of state.answerLayers) layer.remove();
  state.answerLayers = [];
}

// Ids and coordinates on the drawn markers, so the page (and its tests) can find them.
function tagMarkers(drawn) {
  for (const [key, id] of [["predictions", "prediction"], ["truth", "truth"]]) {
    if (!drawn[key]) continue;
    drawn[key].eachLayer((layer) => {
      if (layer.feature.properties.kind === "centre") return;
      const node = layer.getElement();
      const at = layer.getLatLng();
      node.id = id;
      node.dataset.lat = at.lat;
      node.dataset.lon = at.lng;
    });
  }
}

function drawAnswer(body) {
  clearAnswer();
  const drawn = cvglLayers.drawLayers(body.map_layers);
  for (const layer of Object.values(drawn)) state.answerLayers.push(layer.addTo(state.map));
  tagMarkers(drawn);
  showLegend(body.map_layers);
}

function topKItem(tile, row) {
  const item = document.createElement("li");
  item.className = "topk-tile";
  item.style.setProperty("--rank", cvglStyle.rankColour(tile.rank));
  const thumb = document.createElement("img");
  thumb.alt = `tile ${tile.tile_id}`;
  thumb.loading = "lazy";
  if (row !== null && row !== undefined && !state.meta.tile_pixels) {
    thumb.src = `/tiles/${row}.jpg`;
    thumb.addEventListener("error", () => item.classList.add("no-pixels"));
  } else {
    item.classList.add("no-pixels");
  }
  const caption = document.createElement("div");
  caption.className = "topk-caption";
  const lines = [
    `#${tile.rank}  ${tile.tile_id}`,
    `score ${tile.score.toFixed(4)}`,
    `${tile.lat.toFixed(5)}, ${tile.lon.toFixed(5)}`,
  ];
  for (const line of lines) caption.appendChild(document.createElement("div")).textContent = line;
  item.append(thumb, caption);
  return item;
}

function showAnswer(body) {
  const prediction = body.map_layers.predictions.features[0];
  const facts = cvglLayers.predictionFacts({ ...prediction.properties, lat: body.lat, lon: body.lon });
  if (body.altitude_m !== null && body.altitude_m !== undefined) facts.push(["altitude", `${body.altitude_m.toFixed(0)} m`]);
  if (body.verification) {
    const v = body.verification;
    facts.push(["verification", v.verified ? `verified (${v.inliers} inliers, ${v.matcher})` : `not verified (${v.matcher})`]);
  }
  $("facts").replaceChildren(cvglLayers.factsTable(facts));
  const note = $("tile-note");
  note.hidden = !state.meta.tile_pixels;
  note.textContent = state.meta.tile_pixels ? `Tile pixels unavailable: ${state.meta.tile_pixels}` : "";
  $("topk").replaceChildren(...body.top_k.map((tile, i) => topKItem(tile, body.top_k_rows[i])));
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
  clearAnswer();
  $("answer").hidden = true;
  setStatus(`Locating ${file.name}\u2026`, "busy");
  const data = formOptions();
  data.append("image", file, file.name);
  const started = performance.now();
  let response;
  try {
    response = await fetch("/locate?layers=1", { method: "POST", body: data });
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
  state.answer = body;
  drawAnswer(body);
  showAnswer(body);
  const where = body.status === "not_found" ? "Probably not in this index (best guess shown)" : "Located";
  setStatus(`${where} in ${((performance.now() - started) / 1000).toFixed(1)} s.`, "done");
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
