// Draws cvgl's GeoJSON layers (made by cvgl.viz.layers) and basemaps (cvgl.viz.basemap) with
// Leaflet: one renderer for the offline map file and the service page. Text from the data is
// only ever inserted as text (textContent), never parsed as HTML. Every drawn path carries a
// class "cvgl-<kind>" so a page (or a test) can find what is on the map.
"use strict";
(function (global) {
  const S = global.cvglStyle;

  const LABELS = {
    basemap: "orthophoto",
    mosaic: "index tiles",
    heat: "tile scores (selected photo)",
    top_k: "top-k tiles",
    footprints: "verified footprints",
    uncertainty: "uncertainty radius",
    errors: "error lines",
    truth: "truth (photo GPS)",
    cameras: "camera positions",
    predictions: "predictions",
    tracks: "tracks",
  };

  function fmt(value, digits, unit) {
    if (value === null || value === undefined || !Number.isFinite(Number(value))) return "n/a";
    return `${Number(value).toFixed(digits)}${unit || ""}`;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A two-column table of [name, value] rows, as DOM (safe for any text).
  function factsTable(rows) {
    const table = element("table", "cvgl-facts");
    for (const [name, value] of rows) {
      const tr = table.insertRow();
      tr.appendChild(element("th", "", name));
      tr.appendChild(element("td", "", value));
    }
    return table;
  }

  function predictionFacts(p) {
    const rows = [
      ["photo", p.path || p.name],
      ["status", p.status === "not_found" ? "not in this index (best guess)" : p.status],
      ["lat, lon", `${fmt(p.lat, 6)}, ${fmt(p.lon, 6)}`],
      ["confidence", p.confidence === null || p.confidence === undefined ? "n/a"
        : `${fmt(p.confidence, 3)} (within ${fmt(p.confidence_radius_m, 0, " m")})`],
      ["uncertainty", fmt(p.uncertainty_m, 0, " m")],
      ["position from", p.position_source || "n/a"],
      ["heading", p.heading_deg === null || p.heading_deg === undefined ? "n/a" : `${fmt(p.heading_deg, 1, "\u00b0")} (${p.heading_source})`],
    ];
    if (p.error_m !== null && p.error_m !== undefined) rows.push(["error vs GPS", fmt(p.error_m, 1, " m")]);
    if (p.tile_id) rows.push(["top-1 tile", `${p.tile_id} (score ${fmt(p.score, 4)})`]);
    if (p.reason) rows.push(["reason", p.reason]);
    for (const [key, value] of Object.entries(p.labels || {})) rows.push([key, String(value)]);
    return rows;
  }

  function tooltip(layer, text) {
    layer.bindTooltip(text, { sticky: true });
    return layer;
  }

  // How each layer's features are drawn: `point` for Point features, `style` for lines and
  // polygons, `tip` (text) and `popup` (DOM) when given.
  const SPECS = {
    heat: {
      // A cell of the tile spacing around the tile centre (a dot when the spacing is unknown).
      point: (p, ll) => (p.cell_m
        ? L.rectangle(ll.toBounds(p.cell_m), { stroke: false, fillColor: S.scoreColour(p.score), fillOpacity: 0.4, className: "cvgl-heat" })
        : L.circleMarker(ll, { radius: 6, stroke: false, fillColor: S.scoreColour(p.score), fillOpacity: 0.6, className: "cvgl-heat" })),
      tip: (p) => `tile ${p.tile_id}: score ${fmt(p.score, 4)}`,
    },
    top_k: {
      style: (p) => ({ color: S.rankColour(p.rank), weight: p.rank === 1 ? 3 : 2, fill: true, fillOpacity: 0.04, className: "cvgl-candidate" }),
      point: (p, ll) => L.circleMarker(ll, { radius: p.rank === 1 ? 7 : 5, color: S.rankColour(p.rank), weight: 2, fillOpacity: 0.3, className: "cvgl-candidate" }),
      tip: (p) => `#${p.rank} tile ${p.tile_id}: score ${fmt(p.score, 4)}`,
    },
    footprints: {
      style: () => ({ color: S.COLOURS.footprint, weight: 2.5, fillOpacity: 0.08, className: "cvgl-footprint" }),
      tip: (p) => `verified footprint${p.tile_id ? ` on tile ${p.tile_id}` : ""}${p.inliers !== null && p.inliers !== undefined ? `, ${p.inliers} inliers` : ""}`,
    },
    uncertainty: {
      point: (p, ll) => L.circle(ll, {
        radius: p.radius_m, color: S.answerColour(p.status, p.confidence), weight: 1.5, dashArray: "5 4",
        fillOpacity: 0.06, interactive: false, className: "cvgl-uncertainty",
      }),
    },
    errors: {
      style: () => ({ color: S.COLOURS.error, weight: 3, dashArray: "6 6", className: "cvgl-error" }),
      tip: (p) => `error ${fmt(p.error_m, 1, " m")}`,
    },
    truth: {
      point: (p, ll) => p.kind === "gps"
        ? L.circleMarker(ll, { radius: 6, color: "#fff", weight: 2, fillColor: S.COLOURS.truth, fillOpacity: 1, className: "cvgl-truth" })
        : L.circleMarker(ll, { radius: 6, color: S.COLOURS.truth, weight: 2, fill: false, dashArray: "2 2", className: "cvgl-truth-centre" }),
      tip: (p) => (p.kind === "gps" ? `GPS of ${p.name}` : `ground point at the centre of ${p.name}`),
    },
    cameras: {
      point: (p, ll) => L.circleMarker(ll, { radius: 6, color: S.COLOURS.camera, weight: 3, fill: false, className: "cvgl-camera" }),
      style: () => ({ color: S.COLOURS.camera, weight: 1.5, dashArray: "2 4", className: "cvgl-sight" }),
      tip: (p) => (p.kind === "camera" ? `camera of ${p.name}` : "camera to photo centre"),
    },
    predictions: {
      point: (p, ll) => L.circleMarker(ll, {
        radius: 8, color: "#fff", weight: 2, fillColor: S.answerColour(p.status, p.confidence), fillOpacity: 1,
        className: `cvgl-prediction cvgl-status-${p.status}`,
      }),
      tip: (p) => `${p.query + 1}. ${p.name} (confidence ${fmt(p.confidence, 2)})`,
      popup: (p, ll) => factsTable(predictionFacts({ ...p, lat: ll.lat, lon: ll.lng })),
    },
    tracks: {
      style: (p) => (p.kind === "track"
        ? { color: S.COLOURS.track, weight: 3, className: "cvgl-track" }
        : { color: S.COLOURS.trackTruth, weight: 2.5, dashArray: "6 5", className: "cvgl-track-truth" }),
      tip: (p) => `${p.name}: ${p.kind === "track" ? "estimate" : "truth"} (${p.frames} frames)`,
    },
  };

  function geoJsonLayer(key, collection) {
    const spec = SPECS[key];
    return L.geoJSON(collection, {
      // Leaflet applies `style` to every vector layer, circle markers included: lines and polygons only.
      style: (f) => (spec.style && f.geometry.type !== "Point" ? spec.style(f.properties) : {}),
      pointToLayer: (f, ll) => (spec.point ? spec.point(f.properties, ll) : L.circleMarker(ll, { radius: 4 })),
      onEachFeature: (f, layer) => {
        if (spec.tip) tooltip(layer, spec.tip(f.properties));
        if (spec.popup) layer.bindPopup(() => spec.popup(f.properties, layer.getLatLng()), { maxWidth: 460 });
      },
    });
  }

  // Heat of one photo at a time: the selected one (the first, until a prediction is clicked).
  function heatLayer(collection) {
    const byQuery = new Map();
    for (const f of collection.features) {
      const q = f.properties.query;
      if (!byQuery.has(q)) byQuery.set(q, { type: "FeatureCollection", features: [] });
      byQuery.get(q).features.push(f);
    }
    const container = L.featureGroup();
    const drawn = new Map();
    container.selectQuery = (q) => {
      container.clearLayers();
      if (!byQuery.has(q)) return;
      if (!drawn.has(q)) drawn.set(q, geoJsonLayer("heat", byQuery.get(q)));
      container.addLayer(drawn.get(q));
    };
    if (byQuery.size) container.selectQuery(byQuery.keys().next().value);
    return container;
  }

  // {key: FeatureCollection} -> {key: Leaflet layer}, only for non-empty layers, in the given order.
  function drawLayers(layers) {
    const out = {};
    for (const [key, collection] of Object.entries(layers)) {
      if (!collection || !collection.features.length || !SPECS[key]) continue;
      out[key] = key === "heat" ? heatLayer(collection) : geoJsonLayer(key, collection);
    }
    if (out.heat && out.predictions) {
      out.predictions.eachLayer((layer) => layer.on("click", () => out.heat.selectQuery(layer.feature.properties.query)));
    }
    return out;
  }

  // The basemap: an orthophoto overlay, or the index's tiles at their coordinates.
  function drawBasemap(basemap) {
    if (!basemap) return null;
    if (basemap.kind === "image") {
      return L.imageOverlay(basemap.url, basemap.bounds, { className: "cvgl-orthophoto", interactive: false });
    }
    const group = L.featureGroup();
    for (const f of basemap.tiles.features) {
      const p = f.properties;
      const bounds = L.geoJSON(f).getBounds();
      const layer = p.url
        ? L.imageOverlay(p.url, bounds, { className: "cvgl-tile", interactive: true, alt: `tile ${p.tile_id}` })
        : L.rectangle(bounds, { color: S.COLOURS.tileOutline, weight: 1, fillOpacity: 0.05, className: "cvgl-tile-outline" });
      group.addLayer(tooltip(layer, `tile ${p.tile_id}`));
    }
    return group;
  }

  function basemapLabel(basemap) {
    return basemap && basemap.kind === "mosaic" ? LABELS.mosaic : LABELS.basemap;
  }

  function swatch(css) {
    const node = element("span", "cvgl-swatch");
    Object.assign(node.style, css);
    return node;
  }

  function entry(list, key, css, text) {
    const row = element("div", "cvgl-legend-entry");
    row.dataset.key = key;
    row.append(swatch(css), element("span", "", text));
    list.appendChild(row);
  }

  function tileSizeText(legend) {
    if (!legend.tile_m) return null;
    return legend.tile_m_estimated
      ? `tiles \u2248${Math.round(legend.tile_m)} m (estimated from tile spacing)`
      : `tiles ${Math.round(legend.tile_m)} m`;
  }

  // The legend, as a DOM element: what each colour means, for the layers that are present.
  function legendElement(legend, layers) {
    const box = element("div", "cvgl-legend");
    box.id = "cvgl-legend";
    if (legend.title) box.appendChild(element("div", "cvgl-legend-title", legend.title));
    const c = legend.counts;
    if (c) {
      const parts = [`${c.located} located`];
      if (c.not_found) parts.push(`${c.not_found} not in this index`);
      if (c.skipped) parts.push(`${c.skipped} skipped`);
      box.appendChild(element("div", "cvgl-legend-counts", `${c.located + c.not_found + c.skipped} photos: ${parts.join(", ")}`));
    }
    const has = (key) => layers[key] && layers[key].features.length > 0;
    const list = element("div", "cvgl-legend-list");
    if (has("predictions")) {
      for (const bin of [...S.CONFIDENCE_BINS, S.NO_CONFIDENCE, S.NOT_FOUND]) {
        entry(list, "predictions", { background: bin.colour, borderRadius: "50%" }, bin.label);
      }
    }
    if (has("uncertainty")) entry(list, "uncertainty", { border: "1.5px dashed #555", borderRadius: "50%" }, "uncertainty radius of the answer");
    if (has("top_k")) {
      const row = element("div", "cvgl-legend-entry");
      row.dataset.key = "top_k";
      row.appendChild(element("span", "", "top-k tiles by rank:"));
      S.RANK_COLOURS.forEach((colour, i) => {
        row.append(swatch({ border: `2px solid ${colour}` }), element("span", "", `${i + 1}${i === S.RANK_COLOURS.length - 1 ? "+" : ""}`));
      });
      list.appendChild(row);
    }
    if (has("heat")) {
      const row = element("div", "cvgl-legend-entry");
      row.dataset.key = "heat";
      const [lo, hi] = S.SCORE_RANGE;
      row.append(element("span", "", "tile score"), element("span", "cvgl-legend-score", lo.toFixed(2)));
      row.appendChild(swatch({ background: S.rampCss(), width: "90px" }));
      row.append(element("span", "cvgl-legend-score", `${hi.toFixed(2)} (cosine, fixed scale)`));
      list.appendChild(row);
    }
    if (has("footprints")) entry(list, "footprints", { border: `2px solid ${S.COLOURS.footprint}` }, "verified footprint (photo corners on the ground)");
    if (has("truth")) entry(list, "truth", { background: S.COLOURS.truth, borderRadius: "50%" }, "truth: photo GPS (dashed ring: photo centre)");
    if (has("errors")) entry(list, "errors", { borderTop: `3px dashed ${S.COLOURS.error}`, height: "0" }, "error line (answer to GPS)");
    if (has("cameras")) entry(list, "cameras", { border: `3px solid ${S.COLOURS.camera}`, borderRadius: "50%" }, "camera position (oblique photo)");
    if (has("tracks")) {
      entry(list, "tracks", { borderTop: `3px solid ${S.COLOURS.track}`, height: "0" }, "track: estimated positions");
      if (layers.tracks.features.some((f) => f.properties.kind === "track-truth")) {
        entry(list, "tracks", { borderTop: `3px dashed ${S.COLOURS.trackTruth}`, height: "0" }, "track: truth");
      }
    }
    box.appendChild(list);
    const size = tileSizeText(legend);
    if (size) box.appendChild(element("div", "cvgl-legend-note", size));
    if (legend.note) box.appendChild(element("div", "cvgl-legend-note", legend.note));
    if (legend.skipped && legend.skipped.length) {
      box.appendChild(element("div", "cvgl-legend-skipped-title", `skipped photos (${legend.skipped.length}):`));
      const ul = element("ul", "cvgl-legend-skipped");
      for (const s of legend.skipped) {
        const li = element("li");
        li.append(element("b", "", s.name), document.createTextNode(`: ${s.reason}`));
        ul.appendChild(li);
      }
      box.appendChild(ul);
    }
    return box;
  }

  function legendControl(legend, layers) {
    const control = L.control({ position: "bottomleft" });
    control.onAdd = () => {
      const box = legendElement(legend, layers);
      L.DomEvent.disableClickPropagation(box);
      L.DomEvent.disableScrollPropagation(box);
      return box;
    };
    return control;
  }

  global.cvglLayers = Object.freeze({
    LABELS, fmt, factsTable, predictionFacts, drawLayers, drawBasemap, basemapLabel, legendElement, legendControl, tileSizeText,
  });
})(window);
