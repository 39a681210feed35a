// The offline map file's page script: reads the data block cvgl.viz.maps wrote, draws it with
// cvglLayers (Leaflet inlined above it; nothing is fetched), and says so on <body data-ready>.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("cvgl-data").textContent);
  const map = L.map("map", { maxZoom: 22, zoomSnap: 0.25 });
  L.control.scale({ imperial: false }).addTo(map);
  const overlays = {};
  const base = cvglLayers.drawBasemap(data.basemap);
  if (base) overlays[cvglLayers.basemapLabel(data.basemap)] = base.addTo(map);
  const drawn = cvglLayers.drawLayers(data.layers);
  for (const [key, layer] of Object.entries(drawn)) overlays[cvglLayers.LABELS[key]] = layer.addTo(map);
  L.control.layers(null, overlays, { collapsed: false }).addTo(map);
  cvglLayers.legendControl(data.legend, data.layers).addTo(map);
  const [s, w, n, e] = data.bounds;
  map.fitBounds([[s, w], [n, e]]);
  window.cvglMap = { map, layers: drawn, data };
  document.body.dataset.ready = "1";
})();
