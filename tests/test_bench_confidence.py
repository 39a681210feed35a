"""The confidence benchmark's pieces and the shipped calibrated models it writes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from cvgl.bench.confidence import (
    EAST_HOLE,
    HOLE_MARGIN_M,
    HOLES,
    IN_MARGIN_M,
    MAX_NOT_FOUND_BELOW,
    MODELS,
    WEST_HOLE,
    blank_photos,
    not_found_threshold,
)
from cvgl.confidence import (
    RETRIEVAL_FEATURES,
    VERIFIED_FEATURES,
    ConfidenceModel,
    shipped_model,
)
from cvgl.preprocess import content_problem


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans(), st.booleans()), min_size=1, max_size=50),
       st.sampled_from([0.0, 0.05, 0.2]))
def test_not_found_threshold_is_the_largest_keeping_the_target(rows, target):
    p = np.array([r[0] for r in rows])
    correct = np.array([r[1] for r in rows])
    verified = np.array([r[2] for r in rows])
    t = not_found_threshold(p, correct, verified, target)
    allowed = math.floor(target * correct.sum())

    def flagged(threshold: float) -> int:  # a plain loop over the rule finalise_confidence applies
        return sum(1 for pi, ci, vi in zip(p, correct, verified) if ci and not vi and pi < threshold)

    assert 0.0 <= t <= MAX_NOT_FOUND_BELOW
    assert flagged(t) <= allowed
    if t < MAX_NOT_FOUND_BELOW:  # any larger threshold (up to the next value) flags one more
        assert flagged(np.nextafter(t, 1.0)) > allowed


def test_says_not_found_follows_the_threshold_and_spares_verified_answers():
    model = ConfidenceModel("m", ("a",), (0.0,), (1.0,), (1.0,), 0.0, {"not_found_below": 0.3})
    assert model.says_not_found(0.29, verified=False)
    assert not model.says_not_found(0.29, verified=True)
    assert not model.says_not_found(0.31, verified=False)
    assert not ConfidenceModel("m", ("a",), (0.0,), (1.0,), (1.0,), 0.0).says_not_found(0.0, verified=False)


def test_holes_lie_in_their_halves_and_leave_room_for_photos():
    x1 = WEST_HOLE[2]
    assert x1 < 0.5 and EAST_HOLE[0] > 0.5 and HOLES == [WEST_HOLE, EAST_HOLE]
    for rect in HOLES:
        width_m = (rect[2] - rect[0]) * 1000.0  # the scene is about 1 km wide
        assert width_m > 2 * HOLE_MARGIN_M + 100 and IN_MARGIN_M > 0


def test_blank_set_holds_refused_and_near_blank_images(tmp_path):
    paths = blank_photos(tmp_path)
    problems = {p.stem: content_problem(np.asarray(Image.open(p).convert("RGB"))) for p in paths}
    assert all(problems[k] for k in ("uniform-grey", "black", "one-pixel-resample"))
    # near-content-free but not refused: the calibrated confidence has to deal with these
    assert problems["smooth-gradient"] is None and problems["faint-smooth-noise"] is None


@pytest.mark.parametrize("name", list(MODELS))
def test_shipped_models_are_fitted_documented_and_monotone(name):
    model = shipped_model(name)
    features = RETRIEVAL_FEATURES if name == "retrieval-v1" else RETRIEVAL_FEATURES + VERIFIED_FEATURES
    assert model.name == name and model.features == features
    meta = model.fitted_on
    for key in ("what", "data", "photos", "correct", "west_hole_photos", "not_found_below", "not_found_rule", "seed"):
        assert key in meta, key
    assert 0 < meta["correct"] < meta["photos"] and 0.0 <= meta["not_found_below"] <= MAX_NOT_FOUND_BELOW
    assert "date" not in json_text(model)
    # at the fitted mean of the retrieval evidence: a stronger z-score and margin raise the
    # probability, and so does a verification with many consistent inliers
    base = dict(zip(model.features, model.mean))
    bolder = {**base, "z_score": base["z_score"] + model.scale[0], "margin": base["margin"] + model.scale[1]}
    assert model.probability(base) < model.probability(bolder)
    if name == "refined-v1":
        failed = {**base, "verified": 0.0, "log_inliers": 0.0, "inlier_ratio": 0.0}
        verified = {**base, "verified": 1.0, "log_inliers": math.log1p(200), "inlier_ratio": 0.6}
        assert model.probability(failed) < 0.5 < model.probability(verified)
    assert 0.0 <= model.probability(base) <= 1.0


def json_text(model: ConfidenceModel) -> str:
    import json
    from dataclasses import asdict

    return json.dumps(asdict(model))


def test_answers_carry_the_shipped_model_names(tmp_path, tiny_encoder):
    """retrieval-v1 when verification is off, refined-v1 when it ran; the published confidence is
    the shipped model's probability of the answer's evidence."""
    from affine import Affine
    from conftest import X0, Y0, textured_ground, write_geotiff

    from cvgl.data.synthetic import QueryFamily, make_queries, write_query_photo
    from cvgl.data.tiling import TilingSpec
    from cvgl.index.build import build_index
    from cvgl.index.store import open_index
    from cvgl.locate import LocateOptions, locate_images
    from cvgl.verify.refine import RefineOptions

    raster = write_geotiff(tmp_path / "g.tif", np.moveaxis(textured_ground(3, 512), 2, 0), transform=Affine(0.5, 0, X0, 0, -0.5, Y0))
    encoder = tiny_encoder()
    index = open_index(build_index(raster, tmp_path / "index", encoder, TilingSpec(tile_m=96.0, stride_m=48.0, gsd_m=0.5), progress=False))
    queries = make_queries(raster, 2, QueryFamily("nadir", footprint_m=80.0), seed=1, x_range=(X0 + 70, X0 + 186), y_range=(Y0 - 186, Y0 - 70))
    photos = [write_query_photo(q, tmp_path) for q in queries]
    for mode, name in (("off", "retrieval-v1"), ("on", "refined-v1")):
        options = LocateOptions(refine=RefineOptions(mode=mode, matcher="sift", top_k=3))
        answers, _, _ = locate_images(photos, encoder, index, options, progress=False)
        model = shipped_model(name)
        for answer in answers:
            published = answer.to_dict()
            assert published["confidence_model"] == name
            assert published["confidence"] == pytest.approx(model.probability(answer.evidence))
            assert published["confidence_radius_m"] == published["uncertainty_m"]
            verified = published["position_source"] == "verified"
            assert (published["status"] == "not_found") == model.says_not_found(published["confidence"], verified)


def _fake_cases(seed: int = 0):
    """Cases with known evidence and truth, as locate_cases leaves them (no model, no index)."""
    from pathlib import Path

    from cvgl.bench.confidence import Case
    from cvgl.evaluate.locate_protocol import LabelledPhoto
    from cvgl.geo import offset_latlon

    rng = np.random.default_rng(seed)
    groups = ["nadir, heading known", "oblique 30/45/60, heading known", "west hole", "east hole", "other place", "blank"]
    cases = []
    for i in range(240):
        group = groups[i % len(groups)]
        side = "west" if group == "west hole" or (group not in ("east hole", "other place", "blank") and i % 2) else "east"
        truth = None if group in ("other place", "blank") else LabelledPhoto(Path(f"p{i}.jpg"), group, 40.0, -105.0, 0.0, 0.0)
        good = group not in ("west hole", "east hole", "other place", "blank") and rng.uniform() < 0.7
        z = rng.normal(4.0 if good else 2.0, 0.7)
        verified = good and rng.uniform() < 0.6
        error = rng.uniform(0, 30) if good else rng.uniform(100, 400)
        lat, lon = offset_latlon(40.0, -105.0, error, 0.0)
        answer = {"lat": float(lat), "lon": float(lon), "uncertainty_m": 79.0,
                  "position_source": "verified" if verified else "retrieval", "confidence": 0.5}
        plain = {**answer, "position_source": "retrieval"}
        ev = {"z_score": float(z), "margin": float(0.02 * z), "mass": float(1 / (1 + np.exp(-(z - 3))))}
        refined_ev = {**ev, "verified": float(verified), "log_inliers": float(np.log1p(80 if verified else 10)),
                      "inlier_ratio": 0.5 if verified else 0.1}
        skipped = group == "blank" and i % 4 == 0
        case = Case(Path(f"p{i}.jpg"), group, side, truth)
        if skipped:
            case.skipped = "refused"
        else:
            case.plain, case.refined, case.plain_evidence, case.refined_evidence = plain, answer, ev, refined_ev
        cases.append(case)
    return cases


def test_fit_and_tables_on_known_evidence():
    from cvgl.bench.confidence import Sizes, auroc_lines, calibration_lines, fit_models

    cases = _fake_cases()
    models = fit_models(cases, 0, Sizes())
    assert set(models) == set(MODELS)
    for name, model in models.items():
        meta = model.fitted_on
        assert meta["photos"] == len([c for c in cases if c.side == "west" and c.plain is not None])
        assert meta["fit_false_not_found"] <= 0.05 + 1e-9  # the rule the threshold was chosen by
        assert meta["fit_ece"] < 0.15
        text = "\n".join(calibration_lines(cases, model, MODELS[name][0]))
        assert "all east" in text and "east hole" in text and "| blank |" in text
    table = "\n".join(auroc_lines(cases, models))
    # the evidence separates the in-index photos from the rest by construction: a high AUROC
    value = float(table.splitlines()[2].split("|")[-3])  # "vs all out-of-index"
    assert value > 0.8
