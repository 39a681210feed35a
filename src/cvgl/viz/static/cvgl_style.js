// Colours and scales of cvgl's maps: one home for the offline map file (cvgl.viz.maps inlines this
// file) and the service page (served at /viz/cvgl_style.js), so both read the same way.
"use strict";
(function (global) {
  // Tile scores are cosine similarities in [-1, 1]. The colour scale is ABSOLUTE: the same score
  // is the same colour on every photo, every page and every map; it is never stretched to the
  // scores at hand (four near-equal scores must look near-equal, not like a sharp hotspot).
  // The range is where the default encoder's scores lie (embedded DINOv2 GeM, no alignment: real
  // drone photos against Longmont tiles score 0.86-0.98); scores outside it take the end colours.
  const SCORE_RANGE = [0.8, 1.0];
  const SCORE_RAMP = ["#30123b", "#4686fb", "#1ae4b6", "#a2fc3c", "#fabb39", "#e4460a", "#7a0403"]; // turbo

  // Confidence is a probability (of the truth lying within confidence_radius_m): fixed bins.
  const CONFIDENCE_BINS = [
    { min: 0.7, colour: "#1a9850", label: "confidence \u2265 0.7" },
    { min: 0.3, colour: "#f4a300", label: "confidence 0.3\u20130.7" },
    { min: -Infinity, colour: "#d73027", label: "confidence < 0.3" },
  ];
  const NO_CONFIDENCE = { colour: "#1f4e9e", label: "located (no confidence)" };
  const NOT_FOUND = { colour: "#7f7f7f", label: "not in this index (best guess)" };

  // Candidate tile outlines by rank (1 = red ... 8+ = grey).
  const RANK_COLOURS = ["#e41a1c", "#ff7f00", "#ffd92f", "#4daf4a", "#377eb8", "#984ea3", "#a65628", "#999999"];

  const COLOURS = {
    truth: "#00a651",
    error: "#00a651",
    footprint: "#ff00ff",
    camera: "#1f4e9e",
    track: "#1f4e9e",
    trackTruth: "#00a651",
    tileOutline: "#555555",
  };

  function clamp01(t) {
    return Math.min(Math.max(t, 0), 1);
  }

  // Where `score` lies on the fixed range, in [0, 1].
  function scoreFraction(score) {
    return clamp01((score - SCORE_RANGE[0]) / (SCORE_RANGE[1] - SCORE_RANGE[0]));
  }

  function scoreColour(score) {
    const x = scoreFraction(score) * (SCORE_RAMP.length - 1);
    const i = Math.min(Math.floor(x), SCORE_RAMP.length - 2);
    const f = x - i;
    const a = SCORE_RAMP[i], b = SCORE_RAMP[i + 1];
    const mix = (k) => Math.round(parseInt(a.slice(k, k + 2), 16) * (1 - f) + parseInt(b.slice(k, k + 2), 16) * f);
    return `rgb(${mix(1)}, ${mix(3)}, ${mix(5)})`;
  }

  function confidenceClass(status, confidence) {
    if (status === "not_found") return NOT_FOUND;
    if (confidence === null || confidence === undefined) return NO_CONFIDENCE;
    return CONFIDENCE_BINS.find((bin) => confidence >= bin.min);
  }

  function answerColour(status, confidence) {
    return confidenceClass(status, confidence).colour;
  }

  function rankColour(rank) {
    return RANK_COLOURS[Math.min(rank, RANK_COLOURS.length) - 1];
  }

  function rampCss() {
    return `linear-gradient(90deg, ${SCORE_RAMP.join(", ")})`;
  }

  global.cvglStyle = Object.freeze({
    SCORE_RANGE, SCORE_RAMP, CONFIDENCE_BINS, NO_CONFIDENCE, NOT_FOUND, RANK_COLOURS, COLOURS,
    scoreFraction, scoreColour, confidenceClass, answerColour, rankColour, rampCss,
  });
})(window);
