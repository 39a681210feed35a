"""Benchmark ``refine``: retrieval alone vs retrieval + geometric verification, side by side.

What ``cvgl locate`` answers with ``--refine off`` and with the verification stage on
(:mod:`cvgl.verify.refine`: local features + robust homography on the top-K retrieved tiles),
on the same photos in one run, through the product itself (:func:`cvgl.locate.locate_images`
on an index built by :func:`cvgl.index.build.build_index`):

* **Longmont drone protocol** (:mod:`cvgl.evaluate.longmont`): WV2 photos of the east half (the
  test side of the spatial split, same seeds as ``cvgl bench longmont``) against the WV3 index
  (112 m tiles, stride 56 m). Families: nadir, oblique 30/45/60 and oblique + photometric change,
  heading known (compass +-10 deg) and unknown; plus *oblique, pitch unknown*: the heading-known
  oblique photos written again without the gimbal pitch (the verification then matches the raw
  photo first, then pitch hypotheses). Truth = the ground point at the photo centre and the
  camera yaw.
* **Real drone photos** (``../shared/real_pairs``, read in place, loaded by
  :func:`cvgl.bench.real_pairs.load_tasks`): a tile-folder index of every orthophoto/satellite
  image of the drone task (OrthoLoC DOP + other-date xDOP of ``urban_residential``, the three L08
  DOPs, SUES-200 ``s0``) plus Longmont WV3 distractor tiles. The photos carry no metadata: heading,
  pitch and altitude unknown. OrthoLoC ``urban_residential`` has a metric truth made by hand (see
  :data:`ORTHOLOC_HAND_TRUTH`); the other real photos are right when answered with (verified on)
  one of their own images. SUES-200 ``unpaired_other_site`` frames show ground that is not in the
  index: any verification of them is false.

Metrics per family and mode: R@1 at 50/20/5 m (the answer's ground point within that distance of
the truth), median and p90 error, median heading error, the share verified, the
false-verification rate (verified but > 50 m off, or on a wrong image), the retrieval ceiling
(a tile within the tile half-diagonal in the top K that verification sees) and seconds per
photo. Then seconds per photo of the verification stage for K = 5/10/20 and each matcher on a
small subset, and the issue's targets, each met or missed and by how much.

Fixed seeds: accuracy numbers repeat on rerun; timings vary with the machine's load (recorded).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from cvgl.bench.common import emit_section, log, machine_line, markdown_table

FALSE_M = 50.0  # verified but further than this from the truth: a false verification
RADII_M = (50.0, 20.0, 5.0)
TIMING_K = (5, 10, 20)
MATCHER_NAMES = ("aliked-lightglue", "xfeat-lighterglue", "sift")
PITCH_UNKNOWN = "oblique 30/45/60, pitch unknown"
#: OrthoLoC ``urban_residential``: the photo centre in the DOP's local metric frame (east, north)
#: and the heading, from a homography through five ground features picked by eye (3x zoom, 20 px
#: grid): field/track inner corner, two goal posts by the sand, two court corners; residuals
#: 0.6-4.2 px (the movable goal the worst). Photo centre (511.5, 383.5) -> DOP px (416.1, 576.7).
ORTHOLOC_HAND_TRUTH = {"east_m": -17.84, "north_m": -11.06, "heading_deg": 84.3}
#: The OrthoLoC GeoTIFFs are local metres tagged WGS84: their local (0, 0) is placed here (a
#: stand-in, not the real place). Every other gallery image sits on a grid south of it whose
#: spacing is the DOP's ground width: a tile folder does not say how big its tiles are, the
#: index takes the median spacing of the tile centres (:func:`cvgl.geo.typical_spacing_m`), and
#: the verification windows are placed at that size.
STAND_IN_ORIGIN = (48.0, 11.0)
GRID_COLUMNS = 4


# ------------------------------------------------------------------------------------------------
# truth, outcomes and their summary (pure functions: the tested part)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Truth:
    """What is known about one benchmark photo.

    ``lat``/``lon``: the ground point at the photo centre (None: only its images are known);
    ``positives``: index tile ids that show it (None: judged in metres only; empty: the photo's
    ground is not in the index, so no answer is right and any verification is false)."""

    family: str
    lat: float | None = None
    lon: float | None = None
    heading_deg: float | None = None
    positives: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Outcome:
    """One photo's answer scored against its truth."""

    family: str
    error_m: float  # nan: no metric truth; inf: skipped
    heading_error_deg: float  # nan: heading truth unknown (or skipped)
    verified: bool
    correct: bool  # within FALSE_M of the truth, or answered with one of its images
    ceiling: bool  # a right tile was among the candidates verification saw (top K of retrieval)
    seconds: float  # verification seconds (0 with refine off)


def heading_error(a: float, b: float) -> float:
    """Absolute difference of two headings in degrees, in [0, 180]."""
    return abs((float(a) - float(b) + 180.0) % 360.0 - 180.0)


def answered_tile(answer: dict) -> str | None:
    """The tile an answer stands on: the verified one, else retrieval's top-1."""
    verification = answer.get("verification") or {}
    if verification.get("verified"):
        return verification.get("tile_id")
    top = answer.get("top_k") or []
    return top[0]["tile_id"] if top else None


def score_answer(answer: dict, truth: Truth, ceiling: bool = False) -> Outcome:
    """Score one published answer (``Answer.to_dict()``) against the photo's truth."""
    from cvgl.geo import geodesic_distance_m

    verification = answer.get("verification") or {}
    verified = bool(verification.get("verified"))
    seconds = float(verification.get("seconds") or 0.0)
    if answer.get("status") != "located" or answer.get("lat") is None:
        return Outcome(truth.family, math.inf if truth.lat is not None else math.nan, math.nan, False, False, ceiling, seconds)
    error = math.nan
    if truth.lat is not None:
        error = float(geodesic_distance_m(answer["lat"], answer["lon"], truth.lat, truth.lon))
    if truth.positives is not None:
        correct = answered_tile(answer) in truth.positives and (truth.lat is None or error <= FALSE_M)
    else:
        correct = error <= FALSE_M
    head = math.nan if truth.heading_deg is None else heading_error(answer["heading_deg"], truth.heading_deg)
    return Outcome(truth.family, error, head, verified, bool(correct), ceiling, seconds)


def summarise(outcomes: Sequence[Outcome]) -> dict[str, float]:
    """R@1 at each radius, median/p90 metres, median heading error, shares and seconds."""
    from cvgl.evaluate.locate_protocol import summarise_errors

    n = len(outcomes)
    errors = np.array([o.error_m for o in outcomes if not math.isnan(o.error_m)], dtype=float)
    out: dict[str, float] = {"photos": float(n), "metric_photos": float(errors.size)}
    summary = summarise_errors(errors)  # R@1(50m/20m/5m), median_m, p90_m
    out.update({f"R@1({r:g}m)": summary[f"R@1({r:g}m)"] for r in RADII_M})
    out["median_m"], out["p90_m"] = summary["median_m"], summary["p90_m"]
    headings = np.array([o.heading_error_deg for o in outcomes if math.isfinite(o.heading_error_deg)])
    out["heading_median_deg"] = float(np.median(headings)) if headings.size else math.nan
    out["right"] = float(np.mean([o.correct for o in outcomes])) if n else math.nan
    out["verified"] = float(np.mean([o.verified for o in outcomes])) if n else math.nan
    out["false_verified"] = float(np.mean([o.verified and not o.correct for o in outcomes])) if n else math.nan
    out["false_count"] = float(sum(o.verified and not o.correct for o in outcomes))
    out["ceiling"] = float(np.mean([o.ceiling for o in outcomes])) if n else math.nan
    out["seconds"] = float(np.mean([o.seconds for o in outcomes])) if n else math.nan
    return out


def _f(x: float, digits: int = 2) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _m(x: float) -> str:
    if x is None or math.isnan(x):
        return "–"
    return "∞" if math.isinf(x) else (f"{x:.1f}" if x < 100 else f"{x:.0f}")


def family_rows(results: dict[str, dict[str, dict[str, float]]], metric: bool = True) -> list[list[str]]:
    """Table rows: one per (family, mode) of ``{family: {"off"|"on": summary}}``."""
    rows = []
    for family, modes in results.items():
        for mode, s in modes.items():
            cells = [family, mode, f"{int(s['photos'])}"]
            if metric:
                cells += [" / ".join(_f(s[f"R@1({r:g}m)"]) for r in RADII_M), _m(s["median_m"]), _m(s["p90_m"])]
            else:
                cells += [_f(s["right"]), _m(s["median_m"]) if s["metric_photos"] else "–"]
            cells += [_f(s["heading_median_deg"], 1), _f(s["verified"]), f"{_f(s['false_verified'])} ({int(s['false_count'])})",
                      _f(s["ceiling"]), _f(s["seconds"], 2) if mode != "off" else "–", _f(s.get("wall_s_per_photo", math.nan), 2)]
            rows.append(cells)
    return rows


LONGMONT_HEADERS = ["family", "refine", "photos", "R@1 50 / 20 / 5 m", "median m", "p90 m", "heading err ° (median)",
                    "verified", "false verif. (n)", "right tile in top-K", "verify s/photo", "locate s/photo"]
REAL_HEADERS = ["photos", "refine", "n", "right @1", "error m", "heading err ° (median)", "verified", "false verif. (n)",
                "right image in top-K", "verify s/photo", "locate s/photo"]


@dataclass(frozen=True)
class Target:
    name: str
    goal: str
    value: float | None  # None: not measured in this run
    met: bool | None
    margin: str  # by how much (signed, in the target's unit)
    why: str


def target_rows(targets: Sequence[Target]) -> list[list[str]]:
    rows = []
    for t in targets:
        status = "not measured" if t.met is None else ("**met**" if t.met else "**missed**")
        rows.append([t.name, t.goal, "–" if t.value is None else f"{t.value:.3g}", status, t.margin, t.why])
    return rows


def _why_accuracy(s: dict[str, float]) -> str:
    return (f"verified {s['verified']:.2f} of the photos; a right tile was in the verified top-K for {s['ceiling']:.2f}"
            " (the retrieval ceiling); unverified photos keep the retrieval answer (a tile centre)")


def evaluate_targets(longmont: dict, real: dict, timing: dict, k_default: int, matcher_default: str,
                     real_note: str = "real photos not run") -> list[Target]:
    """The issue's targets from the measured summaries (``on`` rows); missing parts -> not measured."""
    out: list[Target] = []
    nadir = longmont.get("nadir, heading known", {}).get("on")
    if nadir:
        med, r50 = nadir["median_m"], nadir["R@1(50m)"]
        ok = med <= 5.0 and r50 >= 0.95
        out.append(Target("Longmont nadir, heading known", "median ≤ 5 m and R@1(50 m) ≥ 0.95", med, ok,
                          f"median {med - 5.0:+.1f} m vs 5 m; R@1(50 m) {r50 - 0.95:+.2f} vs 0.95",
                          "" if ok else _why_accuracy(nadir)))
    else:
        out.append(Target("Longmont nadir, heading known", "median ≤ 5 m and R@1(50 m) ≥ 0.95", None, None, "–", "family not run"))
    for base in ("nadir", "oblique 30/45/60", "oblique + photometric"):
        known = longmont.get(f"{base}, heading known", {}).get("on")
        unknown = longmont.get(f"{base}, heading unknown", {}).get("on")
        if not (known and unknown):
            continue
        gap = known["R@1(50m)"] - unknown["R@1(50m)"]
        ok = gap <= 0.05
        out.append(Target(f"{base}: heading unknown vs known", "R@1(50 m) within 0.05", gap, ok,
                          f"gap {gap:+.2f} (known {known['R@1(50m)']:.2f}, unknown {unknown['R@1(50m)']:.2f}); allowed 0.05",
                          "" if ok else "heading unknown: " + _why_accuracy(unknown)))
    ortho = real.get("OrthoLoC urban_residential (hand truth)", {}).get("on")
    if ortho:
        err = ortho["median_m"]
        ok = bool(err <= 5.0)
        out.append(Target("OrthoLoC urban_residential", "error ≤ 5 m", err, ok, f"{err - 5.0:+.1f} m vs 5 m",
                          "" if ok else ("not verified: the retrieval answer is a tile centre" if ortho["verified"] < 1 else "verified but off")))
    else:
        out.append(Target("OrthoLoC urban_residential", "error ≤ 5 m", None, None, "–", real_note))
    seconds = timing.get((matcher_default, k_default))
    if seconds is not None:
        ok = seconds <= 1.0
        out.append(Target(f"verification time, K={k_default}, {matcher_default}", "≤ 1 s per photo (2 threads)", seconds, ok,
                          f"{seconds - 1.0:+.2f} s vs 1 s",
                          "" if ok else f"measured with a load average of {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores:"
                          " wall seconds of a contended process, see the timing table"))
    else:
        out.append(Target(f"verification time, K={k_default}", "≤ 1 s per photo", None, None, "–", "timing not run"))
    everything = [m["on"] for group in (longmont, real) for m in group.values() if "on" in m]
    if everything:
        n = sum(s["photos"] for s in everything)
        bad = sum(s["false_count"] for s in everything)
        rate = bad / n if n else math.nan
        ok = rate <= 0.01
        out.append(Target("false verifications (all photos, refine on)", "≤ 1 %", 100 * rate, ok,
                          f"{int(bad)} of {int(n)} = {100 * rate:.1f} % vs 1 %",
                          "" if ok else "verified answers > 50 m off or on a wrong image: see the families' false-verif. column"))
    return out


# ------------------------------------------------------------------------------------------------
# running the product
# ------------------------------------------------------------------------------------------------


def _ceilings(scores: list, truths: Sequence[Truth], index, k: int, radius_m: float) -> list[bool]:
    """Per photo: whether a right tile is in the top ``k`` of retrieval (what verification can find)."""
    from cvgl.geo import geodesic_distance_m
    from cvgl.index.search import ranked_tiles

    lat, lon = index.tiles["lat"].to_numpy(), index.tiles["lon"].to_numpy()
    ids = index.tiles["tile_id"].astype(str).to_numpy()
    out = []
    for s, truth in zip(scores, truths):
        if s is None:
            out.append(False)
            continue
        top = ranked_tiles(s)[0][:k]
        if truth.positives is not None:
            out.append(bool(set(ids[top]) & set(truth.positives)))
        else:
            out.append(bool((geodesic_distance_m(lat[top], lon[top], truth.lat, truth.lon) <= radius_m).any()))
    return out


def record_seconds(refiner) -> list[float]:
    """Make ``refiner`` note each verification's seconds in the returned list: answers carry
    no timing (an answer depends only on the photo, the index, the model and the options)."""
    seconds: list[float] = []
    original = type(refiner).refine.__get__(refiner)

    def refine(*args, **kwargs):  # whatever locate passes (photo view, rows, heading hints)
        result = original(*args, **kwargs)
        seconds.append(result.seconds)
        return result

    refiner.refine = refine
    return seconds


def compare(paths: list[Path], truths: list[Truth], encoder, index, refiner, radius_m: float, label: str) -> tuple[dict[str, dict[str, float]], list]:
    """``{"off": summary, "on": summary}`` of one family (the same photos located both ways) and
    each photo's per-tile retrieval scores. ``refiner``: the verification stage (:class:`Refiner`)
    shared by every family of one index, so a window's features are extracted once per run, as
    in one ``cvgl locate`` batch; the answers do not depend on it (features are deterministic)."""
    from cvgl.answer import Skipped
    from cvgl.locate import LocateOptions, locate_images
    from cvgl.verify.refine import RefineOptions

    out: dict[str, dict[str, float]] = {}
    ceiling: list[bool] = []
    retrieval: list = []
    for mode, options in (("off", RefineOptions(mode="off")), ("on", refiner.options)):
        verify_seconds = record_seconds(refiner)
        started = time.perf_counter()
        answers, scores, _ = locate_images(paths, encoder, index, LocateOptions(refine=options), progress=False,
                                           refiner=refiner if mode == "on" else None)
        wall = time.perf_counter() - started
        for answer in answers:  # a skipped photo scores as a miss: say why
            if isinstance(answer, Skipped):
                log(f"refine: {label} [{mode}] skipped: {answer.error}")
        if mode == "off":  # the same retrieval both ways: the ceiling is the top K the "on" run verifies
            ceiling = _ceilings(scores, truths, index, refiner.options.top_k, radius_m)
            retrieval = scores
        summary = summarise([score_answer(a.to_dict(), t, c) for a, t, c in zip(answers, truths, ceiling)])
        summary["wall_s_per_photo"] = wall / max(len(paths), 1)
        summary["seconds"] = sum(verify_seconds) / max(len(paths), 1) if mode == "on" else 0.0
        out[mode] = summary
        log(f"refine: {label} [{mode}] R@1(50m) {summary['R@1(50m)']:.2f} median {summary['median_m']:.1f} m"
            f" verified {summary['verified']:.2f} right {summary['right']:.2f} in {wall:.0f} s")
    return out, retrieval


def _write_without_pitch(query, folder: Path) -> Path:
    """The photo with its EXIF/XMP but no gimbal pitch: an oblique photo whose pitch is unknown."""
    from PIL import Image

    from cvgl.data.metadata import CameraMetadata, write_camera_metadata

    f35 = 36.0 / (2 * math.tan(math.radians(query.hfov_deg) / 2))
    meta = CameraMetadata(gps_lat=query.camera_lat, gps_lon=query.camera_lon, relative_altitude_m=query.altitude_m,
                          gimbal_pitch_deg=None, gimbal_yaw_deg=query.heading_written, focal_length_35mm=f35)
    path = Path(folder) / f"{query.name}-nopitch.jpg"
    write_camera_metadata(Image.fromarray(query.image), path, meta)
    return path


def longmont_photos(folder: Path, per_family: int, seed: int, names: Sequence[str] | None = None) -> dict[str, tuple[list[Path], list[Truth]]]:
    """The drone protocol's east-half photos per family (seeds as ``cvgl bench longmont``), written as JPEGs."""
    from cvgl.data.samples import longmont_scene
    from cvgl.data.synthetic import make_queries, write_query_photo
    from cvgl.evaluate.longmont import east_west, families

    _, mid, right = east_west()
    out: dict[str, tuple[list[Path], list[Truth]]] = {}
    for k, family in enumerate(families()):
        wanted = names is None or family.name in names
        pitchless = family.name == "oblique 30/45/60, heading known" and (names is None or PITCH_UNKNOWN in names)
        if not (wanted or pitchless):
            continue
        queries = make_queries(longmont_scene("wv2"), per_family, family, seed=seed * 100 + k, x_range=(mid, right))
        sub = folder / f"family{k}"
        sub.mkdir(parents=True, exist_ok=True)
        truths = [Truth(family.name, q.center_lat, q.center_lon, q.yaw_deg) for q in queries]
        if wanted:
            out[family.name] = ([write_query_photo(q, sub) for q in queries], truths)
        if pitchless:
            out[PITCH_UNKNOWN] = ([_write_without_pitch(q, sub) for q in queries], [replace(t, family=PITCH_UNKNOWN) for t in truths])
    return out


def timing_table(paths: list[Path], truths: list[Truth], scores: list, encoder, index, matchers: Sequence[str],
                 ks: Sequence[int], caches: dict[str, dict] | None = None) -> tuple[list[list[str]], dict[tuple[str, int], float]]:
    """Verification seconds per photo (and what it found) for each matcher and K on ``paths``.

    Per matcher, the window features of every tile the photos' top max(K) could reach are
    extracted first (timed apart, as seconds per window: a cold run pays them once per window)
    or taken from ``caches`` (the main run's, same matcher and settings); each K row then times
    what every photo pays: its own features, the matching and the fits. Model loading is not
    per photo and is left out."""
    from cvgl.index.search import ranked_tiles
    from cvgl.locate import LocateOptions, locate_images
    from cvgl.verify.refine import RefineOptions, Refiner
    from cvgl.verify.stage import candidate_features

    rows, seconds = [], {}
    reach = sorted({int(r) for s in scores if s is not None for r in ranked_tiles(s)[0][: max(ks)]})
    for name in matchers:
        try:
            refiner = Refiner(index, RefineOptions(mode="on", matcher=name, top_k=max(ks)))
        except Exception as exc:  # noqa: BLE001 - a missing matcher package is a row, not a crash
            rows.append([name, "–", "–", "–", "–", "–", "–", f"unavailable: {str(exc).splitlines()[0]}"])
            continue
        if caches and name in caches:
            refiner.cache = caches[name]
        candidates = refiner.candidates(reach)
        missing = [c for c in candidates if c.candidate_id not in refiner.cache]
        started = time.perf_counter()
        cpu = time.process_time()
        for c in missing:  # one at a time, as verification with an early stop extracts them
            candidate_features(refiner.matcher, [c], refiner.cache)
        per_window = (time.perf_counter() - started) / len(missing) if missing else math.nan
        per_window_cpu = (time.process_time() - cpu) / len(missing) if missing else math.nan
        for k in ks:
            options = RefineOptions(mode="on", matcher=name, top_k=k)
            timed = refiner if k == max(ks) else Refiner(index, options)
            timed.matcher, timed.windows, timed.cache = refiner.matcher, refiner.windows, refiner.cache  # only K differs
            verify_seconds = record_seconds(timed)
            cpu = time.process_time()
            answers, _, _ = locate_images(paths, encoder, index, LocateOptions(refine=options), progress=False, refiner=timed)
            cpu = time.process_time() - cpu
            summary = summarise([score_answer(a.to_dict(), t) for a, t in zip(answers, truths)])
            summary["seconds"] = sum(verify_seconds) / len(paths)
            seconds[(name, k)] = summary["seconds"]
            rows.append([name, str(k), f"{summary['seconds']:.2f}", f"{cpu / len(paths):.2f}", _f(summary["verified"]),
                         _m(summary["median_m"]), f"{_f(per_window)} ({_f(per_window_cpu)} CPU)", f"{os.getloadavg()[0]:.1f}"])
            log(f"refine: timing {name} K={k}: {summary['seconds']:.2f} s/photo verified {summary['verified']:.2f}")
    return rows, seconds


# ------------------------------------------------------------------------------------------------
# real drone photos
# ------------------------------------------------------------------------------------------------


def _local_centre(tif: Path) -> tuple[float, float, float]:
    """(east, north) of a local-metre GeoTIFF's centre and its side in metres."""
    import rasterio

    with rasterio.open(tif) as ds:
        t, w, h = ds.transform, ds.width, ds.height
    return t.c + t.a * w / 2.0, t.f + t.e * h / 2.0, abs(t.a) * w


def real_gallery(root: Path, folder: Path, distractors: int, seed: int, sues: int | None = None, others: int | None = None):
    """A tile folder (symlinks to the real images, in place) + Longmont distractors, its tile side
    (the OrthoLoC DOP's ground width) and the drone-task photos with their truth: every OrthoLoC
    photo, ``sues`` SUES-200 frames spread over the altitudes and the first ``others`` frames of
    the other site (None: all)."""
    from PIL import Image

    from cvgl.bench.real_pairs import DRONE, load_tasks
    from cvgl.data.samples import longmont_scene
    from cvgl.data.tiling import TilingSpec, iter_tiles
    from cvgl.geo import offset_latlon, typical_spacing_m

    task = next((t for t in load_tasks(root) if t.name == DRONE), None)
    if task is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    lat0, lon0 = STAND_IN_ORIGIN
    georeferenced = [g for g in task.gallery if g.path.suffix.lower() in (".tif", ".tiff")]  # OrthoLoC DOP/xDOP
    side_m = _local_centre(georeferenced[0].path)[2] if georeferenced else 184.0
    cells = iter(range(10**6))

    def grid_cell() -> tuple[float, float]:  # row-major, starting one cell south of the DOP
        k = next(cells)
        return offset_latlon(lat0, lon0, side_m * (k % GRID_COLUMNS), -side_m * (1 + k // GRID_COLUMNS))

    rows, tile_of = ["id,lat,lon"], {}
    for i, item in enumerate(task.gallery):
        name = f"real{i:02d}{item.path.suffix.lower()}"
        (folder / name).symlink_to(item.path.resolve())
        if item in georeferenced:  # local metres, one frame for the DOP and the xDOP
            east, north, _ = _local_centre(item.path)
            lat, lon = offset_latlon(lat0, lon0, east, north)
        else:
            lat, lon = grid_cell()
        rows.append(f"{name},{float(lat):.9f},{float(lon):.9f}")
        tile_of[item.id] = name
    spec = TilingSpec(tile_m=side_m, stride_m=side_m, gsd_m=side_m / 512)
    tiles = list(iter_tiles(longmont_scene("wv3"), spec)) if distractors > 0 else []
    rng = np.random.default_rng(seed)
    for j in sorted(rng.choice(len(tiles), size=min(distractors, len(tiles)), replace=False)) if tiles else []:
        name = f"longmont{j:03d}.png"
        Image.fromarray(tiles[j].image).save(folder / name)
        lat, lon = grid_cell()
        rows.append(f"{name},{float(lat):.9f},{float(lon):.9f}")
    (folder / "tiles.csv").write_text("\n".join(rows) + "\n")
    centres = np.array([[float(v) for v in r.split(",")[1:]] for r in rows[1:]])
    if len(centres) > 1 and abs(typical_spacing_m(centres[:, 0], centres[:, 1]) - side_m) > 0.01 * side_m:
        raise ValueError(f"{folder}: the tile spacing would not be the DOP's {side_m:.1f} m (too few grid tiles; add distractors)")

    truth_lat, truth_lon = offset_latlon(lat0, lon0, ORTHOLOC_HAND_TRUTH["east_m"], ORTHOLOC_HAND_TRUTH["north_m"])
    groups: dict[str, tuple[list[Path], list[Truth]]] = {}

    def add(group: str, path: Path, truth: Truth) -> None:
        groups.setdefault(group, ([], []))
        groups[group][0].append(path)
        groups[group][1].append(truth)

    paired_sues = [q for q in task.queries if q.positives and q.source.startswith("sues")]
    if sues is not None:  # evenly over the list (lowest altitude first), starting from the highest
        keep = {int(np.rint(i)) for i in np.linspace(len(paired_sues) - 1, 0, sues)} if sues > 0 else set()
        paired_sues = [q for i, q in enumerate(paired_sues) if i in keep]
    unpaired = [q for q in task.queries if not q.positives][: others]
    chosen = {q.id for q in paired_sues + unpaired}
    for q in task.queries:
        positives = tuple(tile_of[g] for g in q.positives)
        if q.source.startswith("sues") and q.id not in chosen:
            continue
        if not positives:
            add("SUES-200 other site (not in the index)", q.path, Truth("not in index", positives=()))
        elif q.id.endswith("urban_residential_query.jpg"):
            g = "OrthoLoC urban_residential (hand truth)"
            add(g, q.path, Truth(g, float(truth_lat), float(truth_lon), ORTHOLOC_HAND_TRUTH["heading_deg"], positives))
        elif q.source.startswith("ortholoc"):
            add("OrthoLoC L08 (own DOP)", q.path, Truth("ortholoc-l08", positives=positives))
        else:
            add("SUES-200 (s0)", q.path, Truth("sues", positives=positives))
    return folder, spec, groups, len(task.gallery)


# ------------------------------------------------------------------------------------------------
# the section
# ------------------------------------------------------------------------------------------------


def real_section(results: dict[str, dict], note: str, seconds: float) -> str:
    """The real-photo table and its targets alone (``--real-md``: a run of the real photos by themselves)."""
    from cvgl.verify.options import DEFAULT_MATCHER

    targets = [t for t in evaluate_targets({}, results, {}, 10, DEFAULT_MATCHER, note) if t.value is not None]
    lines = [
        "### Real drone photos, run by themselves (no metadata: heading, pitch and altitude unknown)",
        "",
        (f"`python -m cvgl.bench.refine --real-md FILE` · {machine_line()} · {seconds:.0f} s · load average"
        f" {os.getloadavg()[0]:.1f} at the end."),
        "",
        note,
        "",
        *markdown_table(REAL_HEADERS, family_rows(results, metric=False)),
        "",
        *markdown_table(["target", "goal", "measured", "status", "by how much", "why (when missed)"], target_rows(targets)),
    ]
    return "\n".join(lines) + "\n"


def real_part(root: Path | None, distractors: int, seed: int, sues: int | None, others: int | None,
              folder: Path) -> tuple[dict[str, dict], str]:
    """The real drone photos located both ways: ``({group: {"off"|"on": summary}}, note)``."""
    from cvgl.bench.real_pairs import resolve_root
    from cvgl.index.build import build_index
    from cvgl.index.store import open_index
    from cvgl.models.factory import create_encoder
    from cvgl.models.presets import DEFAULT_PRESET
    from cvgl.verify.refine import RefineOptions, Refiner

    real_root, shown = resolve_root(root)
    built = real_gallery(real_root, folder / "real_tiles", distractors, seed, sues, others) if real_root.is_dir() else None
    if built is None:
        return {}, f"`{shown}` not found (or holds no drone pairs): the real drone photos were skipped."
    tiles, spec, groups, n_real = built
    encoder = create_encoder(DEFAULT_PRESET, weights="embedded")
    real_index = open_index(build_index(tiles, folder / "real_index", encoder, spec, progress=False), encoder.identity)
    real_refiner = Refiner(real_index, RefineOptions(mode="on"))
    results = {}
    for name, (paths, truths) in groups.items():
        results[name], _ = compare(paths, truths, encoder, real_index, real_refiner, spec.tile_m / math.sqrt(2), name)
    note = (f"Index: a tile folder of the {n_real} real orthophoto/satellite images of the drone task"
            f" (symlinks into `{shown}`, read in place) + {distractors} Longmont WV3 tiles of the same"
            f" {spec.tile_m:.1f} m side as distractors (tile side = the OrthoLoC DOP's ground width);"
            " windows are the tile images themselves. Photos: every OrthoLoC photo, "
            + ("all SUES-200 frames" if sues is None else f"{sues} SUES-200 frame(s) spread over the altitudes")
            + ", " + ("all" if others is None else f"{others}") + " frame(s) of the SUES-200 site that is not in the index."
            " Run in a second process alongside the Longmont part.")
    return results, note


DEFAULT_FAMILIES = ("nadir, heading known", "nadir, heading unknown", "oblique 30/45/60, heading known",
                    "oblique 30/45/60, heading unknown", PITCH_UNKNOWN)
TIMING_FAMILIES = ("nadir, heading known", "oblique 30/45/60, heading known")


def run(per_family: int = 4, timing_photos: int = 2, seed: int = 0, families: Sequence[str] | None = DEFAULT_FAMILIES,
        matchers: Sequence[str] = MATCHER_NAMES, ks: Sequence[int] = TIMING_K, real: bool = True,
        distractors: int = 6, sues: int | None = 1, others: int | None = 1, root: Path | None = None,
        index_dir: Path | None = None) -> str:
    import torch

    from cvgl.data.samples import longmont_scene
    from cvgl.evaluate.longmont import RADIUS_M, SPEC
    from cvgl.index.build import build_index
    from cvgl.index.store import open_index
    from cvgl.models.factory import create_encoder
    from cvgl.models.presets import DEFAULT_PRESET
    from cvgl.verify.options import DEFAULT_MATCHER, RefineOptions
    from cvgl.verify.refine import Refiner

    started = time.time()
    load_start = os.getloadavg()
    refine = RefineOptions(mode="on")  # the product's defaults: aliked-lightglue, K=10
    encoder = create_encoder(DEFAULT_PRESET, weights="embedded")
    longmont: dict[str, dict] = {}
    real_results: dict[str, dict] = {}
    timing_rows: list[list[str]] = []
    timing: dict = {}
    timing_text = ""
    real_note = "Not run (`--no-real`)."
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        child, real_json = None, tmp_path / "real.json"
        if real:  # independent of Longmont: a second process (same threads each) runs it meanwhile
            command = [sys.executable, "-m", "cvgl.bench.refine", "--real-json", str(real_json), "--threads", str(torch.get_num_threads()),
                       "--seed", str(seed), "--distractors", str(distractors), "--sues", str(-1 if sues is None else sues),
                       "--others", str(-1 if others is None else others)] + ([] if root is None else ["--root", str(root)])
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        if index_dir is None:
            log("refine: indexing Longmont WV3")
            index_dir = build_index(longmont_scene("wv3"), tmp_path / "index", encoder, SPEC, progress=False)
        index = open_index(Path(index_dir), encoder.identity)
        tiling = index.manifest.tiling
        if tiling is None or (tiling.tile_m, tiling.stride_m, tiling.gsd_m) != (SPEC.tile_m, SPEC.stride_m, SPEC.gsd_m):
            raise ValueError(f"{index_dir}: not an index of the Longmont WV3 scene with the protocol's tiling")
        refiner = Refiner(index, refine)
        photos = longmont_photos(tmp_path / "photos", per_family, seed, families)
        retrieval: dict[str, list] = {}
        for name, (paths, truths) in photos.items():
            longmont[name], retrieval[name] = compare(paths, truths, encoder, index, refiner, RADIUS_M, name)
        chosen = [f for f in TIMING_FAMILIES if f in photos] or list(photos)[:1]
        each = max(1, timing_photos // len(chosen))
        t_paths = [p for f in chosen for p in photos[f][0][:each]]
        t_truths = [t for f in chosen for t in photos[f][1][:each]]
        t_scores = [s for f in chosen for s in retrieval[f][:each]]
        if t_paths and matchers and ks:
            timing_rows, timing = timing_table(t_paths, t_truths, t_scores, encoder, index, matchers, ks,
                                               caches={refiner.matcher_name: refiner.cache})
            timing_text = f"{len(t_paths)} photos: the first {each} of " + " and ".join(f"*{f}*" for f in chosen)
        if child is not None:
            child.wait()
            if child.returncode == 0 and real_json.is_file():
                real_results, real_note = json.loads(real_json.read_text())
            else:
                real_note = f"The real-photo process failed (exit {child.returncode}); see its messages above."
    load_end = os.getloadavg()
    threads = torch.get_num_threads()
    lines = [
        "## Benchmark `refine` (retrieval vs retrieval + geometric verification)",
        "",
        (f"`cvgl bench refine` (per family {per_family}) · {machine_line()} · {time.time() - started:.0f} s · load average"
        f" {load_start[0]:.1f} at the start, {load_end[0]:.1f} at the end ({os.cpu_count()} cores, {threads} torch threads)."),
        "Fixed seeds, accuracy repeats exactly on rerun; timings vary with the machine's load.",
        (f"Both modes run `cvgl locate` (`locate_images`) on the same photos; *on* = the defaults ({refine.matcher}, K={refine.top_k},"
        f" min {refine.min_inliers} inliers, stop at {refine.stop_at_inliers}). Truth: the ground point at the photo centre and"
        f" the camera yaw. False verification = verified but > {FALSE_M:g} m off (or on a wrong image). *Right tile in top-K* ="
        f" a tile within {RADIUS_M:.0f} m (the tile half-diagonal) among the K retrieved tiles verification sees: the most it can"
        " recover. *verify s/photo*: the verification stage's own seconds, with one stage per index for the whole run (window"
        " features extracted once, as in one `cvgl locate` batch); *locate s/photo*: wall seconds of the whole locate call."),
        "",
        f"### Longmont drone protocol (east half = test, WV2 photos vs WV3 index of {SPEC.tile_m:g} m tiles)",
        "",
        *markdown_table(LONGMONT_HEADERS, family_rows(longmont)),
        "",
        f"*{PITCH_UNKNOWN}*: the heading-known oblique photos again, written without the gimbal pitch.",
        "",
        "### Real drone photos (no metadata: heading, pitch and altitude unknown)",
        "",
        real_note,
    ]
    if real_results:
        lines += [
            "",
            *markdown_table(REAL_HEADERS, family_rows(real_results, metric=False)),
            "",
            ("*right @1*: answered with one of the photo's own images (and, with a metric truth, within 50 m). OrthoLoC"
            " urban_residential's truth was made by hand: a homography through five ground features picked by eye"
            " (track corner, two goal posts, two court corners; residuals 0.6-4.2 px) maps the photo centre to DOP local"
            f" ({ORTHOLOC_HAND_TRUTH['east_m']}, {ORTHOLOC_HAND_TRUTH['north_m']}) m, heading {ORTHOLOC_HAND_TRUTH['heading_deg']}°."
            " Its DOP and the other-date xDOP are both right. The OrthoLoC frame (local metres tagged WGS84) is placed at a"
            " stand-in origin; the SUES-200 and L08 images have no metric truth (right image only), and their metres assume"
            " the DOP's tile side."),
        ]
    if timing_rows:
        lines += [
            "",
            f"### Verification time per photo ({timing_text}; {threads} torch threads)",
            "",
            *markdown_table(["matcher", "K", "verify s/photo", "process CPU s/photo", "verified", "median m",
                             "s per new window (extraction)", "load"], timing_rows),
            "",
            ("Per matcher the windows the photos' top-20 reach are extracted first (last-but-one column, per window; a cold run"
            " pays it once per window it has not seen), so each row times what every photo pays: its own features, matching"
            f" and fits. Verification stops once a candidate has {refine.stop_at_inliers} inliers, so K bounds the work of photos"
            " that do not verify. *load* = the 1-minute load average after the row."),
        ]
    targets = evaluate_targets(longmont, real_results, timing, refine.top_k, DEFAULT_MATCHER, real_note)
    lines += ["", "### Targets (issue 10; refine on)", "",
              *markdown_table(["target", "goal", "measured", "status", "by how much", "why (when missed)"], target_rows(targets))]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-family", type=int, default=4, help="Longmont photos per family")
    parser.add_argument("--photometric", action="store_true", help="also the two oblique + photometric families")
    parser.add_argument("--timing-photos", type=int, default=2, help="photos of the matcher x K timing table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distractors", type=int, default=6, help="Longmont tiles added to the real photos' index")
    parser.add_argument("--sues", type=int, default=1, help="SUES-200 frames (of 12, spread over the altitudes; -1: all)")
    parser.add_argument("--others", type=int, default=1, help="frames of the SUES-200 site not in the index (of 3; -1: all)")
    parser.add_argument("--root", type=Path, default=None, help="real_pairs folder (default $CVGL_REAL_PAIRS or ../shared/real_pairs)")
    parser.add_argument("--no-real", action="store_true", help="skip the real drone photos")
    parser.add_argument("--threads", type=int, default=2, help="torch (and OpenCV) threads")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 nadir photo, SIFT timing at K=5, no real photos")
    parser.add_argument("--real-json", type=Path, default=None, help=argparse.SUPPRESS)  # the real-photo child process
    parser.add_argument("--index", type=Path, default=None, help="a Longmont WV3 index already built with the protocol's tiling")
    parser.add_argument("--families", default=None, help="';'-separated Longmont families (default: the five above)")
    parser.add_argument("--real-md", type=Path, default=None, help="only the real drone photos: write their table here")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    import cv2
    import torch

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    if args.real_md is not None:
        started = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            results, note = real_part(args.root, args.distractors, args.seed, None if args.sues < 0 else args.sues,
                                      None if args.others < 0 else args.others, Path(tmp))
        return emit_section(real_section(results, note, time.time() - started), args.real_md)
    if args.real_json is not None:
        with tempfile.TemporaryDirectory() as tmp:
            result = real_part(args.root, args.distractors, args.seed, None if args.sues < 0 else args.sues,
                               None if args.others < 0 else args.others, Path(tmp))
        args.real_json.write_text(json.dumps(result))
        return 0
    if args.quick:
        text = run(per_family=1, timing_photos=1, seed=args.seed, families=["nadir, heading known"], matchers=("sift",),
                   ks=(5,), real=False)
    else:
        families = args.families.split(";") if args.families else (None if args.photometric else DEFAULT_FAMILIES)
        text = run(args.per_family, args.timing_photos, args.seed, families, real=not args.no_real, index_dir=args.index,
                   distractors=args.distractors, sues=None if args.sues < 0 else args.sues,
                   others=None if args.others < 0 else args.others, root=args.root)
    return emit_section(text, args.out)


if __name__ == "__main__":
    sys.exit(main())
