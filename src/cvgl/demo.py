"""``make demo``: the whole product on the embedded defaults, end to end, in a few minutes.

1. index the WV3 Longmont orthophoto (dgsamples) with the default encoder (embedded DINOv2);
2. make drone photos from the WV2 scene (another sensor and date): random position and yaw,
   nadir and oblique pitch, scale jitter; half carry a noisy compass heading, half none; truth
   written into EXIF GPS + DJI XMP like a real drone;
3. ``locate`` them exactly as a user would (from the JPEG files, retrieval then geometric
   verification of the top 10), print R@1/5/10 (retrieval), errors and the share verified;
4. write ``results.jsonl`` (one answer per photo), ``summary.json``, ``map.html`` and ``grid.png``.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from cvgl.data.samples import longmont_scene
from cvgl.data.synthetic import QueryFamily, make_queries, write_query_photo
from cvgl.data.tiling import TilingSpec
from cvgl.evaluate import recall_at_k_by_distance
from cvgl.index.build import build_index
from cvgl.index.store import open_index
from cvgl.io import write_json_atomic, write_jsonl_atomic
from cvgl.locate import LocateOptions, locate_images
from cvgl.models.factory import create_encoder
from cvgl.models.presets import DEFAULT_PRESET
from cvgl.report import write_visuals

DEMO_FAMILIES = (
    QueryFamily("nadir-heading", pitches=(0.0,), heading_known=True, scale_jitter=(0.8, 1.25)),
    QueryFamily("oblique-heading", pitches=(30.0, 45.0), heading_known=True, scale_jitter=(0.8, 1.25)),
    QueryFamily("nadir-noheading", pitches=(0.0,), heading_known=False, scale_jitter=(0.8, 1.25)),
    QueryFamily("oblique-noheading", pitches=(30.0, 45.0), heading_known=False, scale_jitter=(0.8, 1.25)),
)


def run_demo(out: Path, per_family: int = 12, seed: int = 0, preset: str = DEFAULT_PRESET) -> dict:
    out = Path(out)
    (out / "queries").mkdir(parents=True, exist_ok=True)
    started = time.time()
    encoder = create_encoder(preset, "embedded")
    spec = TilingSpec(tile_m=112.0, stride_m=56.0, gsd_m=0.5)

    print(f"[1/3] indexing {longmont_scene('wv3').name} (WorldView-3, 2014-10) ...")
    build_index(longmont_scene("wv3"), out / "index", encoder, spec)
    index = open_index(out / "index", encoder.identity)

    print(f"[2/3] making {per_family * len(DEMO_FAMILIES)} drone photos from WorldView-2 (2014-06) ...")
    queries = []
    for k, family in enumerate(DEMO_FAMILIES):
        queries += make_queries(longmont_scene("wv2"), per_family, family, seed=seed * 100 + k)
    paths = [write_query_photo(q, out / "queries") for q in queries]

    print("[3/3] locating them ...")
    options = LocateOptions(top_k=10)
    answers, scores, _ = locate_images(paths, encoder, index, options)
    truth = {q.name: q for q in queries}
    for answer in answers:
        q = truth[Path(answer.query).stem]
        answer.labels["family"] = q.family
        if answer.truth is not None:  # the synthetic photo's true centre, besides its EXIF GPS
            answer.truth = replace(answer.truth, center_lat=q.center_lat, center_lon=q.center_lon)
    results = [a.to_dict() for a in answers]
    table = summarize_demo(results, radius_m=index.manifest.correct_radius_m)
    write_jsonl_atomic(out / "results.jsonl", results)
    write_json_atomic(out / "summary.json", {"summary": table, "encoder": encoder.identity.to_dict()})
    write_visuals(results, scores, index, [np.asarray(q.image) for q in queries], out / "map.html", out / "grid.png")
    print_table(table)
    print(f"wrote {out/'results.jsonl'}, {out/'summary.json'}, {out/'map.html'}, {out/'grid.png'} in {time.time() - started:.0f} s")
    return table


def summarize_demo(results: list[dict], radius_m: float) -> dict:
    """R@1/5/10 (a top-k tile centre within the tile half-diagonal of the true photo centre) and
    errors in metres, per query family and overall."""
    table: dict = {}
    located = [r for r in results if r["status"] != "skipped"]
    families = sorted({r["labels"]["family"] for r in located})
    for family in families + ["all"]:
        rows = [r for r in located if family == "all" or r["labels"]["family"] == family]
        k = min(len(r["top_k"]) for r in rows)
        topk_lat = np.array([[t["lat"] for t in r["top_k"][:k]] for r in rows])
        topk_lon = np.array([[t["lon"] for t in r["top_k"][:k]] for r in rows])
        recall = recall_at_k_by_distance(
            topk_lat, topk_lon,
            np.array([r["truth"]["center_lat"] for r in rows]), np.array([r["truth"]["center_lon"] for r in rows]),
            radius_m, ks=tuple(x for x in (1, 5, 10) if x <= k),
        )
        errors = np.array([r["truth"]["error_m"] for r in rows])
        table[family] = {
            "n": len(rows),
            **{f"R@{key}": float(value) for key, value in recall.items()},
            "median_error_m": float(np.median(errors)),
            "within_50m": float((errors <= 50).mean()),
            "within_5m": float((errors <= 5).mean()),
            "verified": float(np.mean([bool((r.get("verification") or {}).get("verified")) for r in rows])),
            "mean_confidence": float(np.mean([r["confidence"] for r in rows])),
        }
    return table


def print_table(table: dict) -> None:
    print(f"\n{'family':<20}{'n':>4}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'med err m':>11}{'<=50m':>7}{'<=5m':>7}{'verified':>10}{'conf':>7}")
    for family, row in table.items():
        print(
            f"{family:<20}{row['n']:>4}{row.get('R@1', float('nan')):>7.2f}{row.get('R@5', float('nan')):>7.2f}"
            f"{row.get('R@10', float('nan')):>7.2f}{row['median_error_m']:>11.1f}{row['within_50m']:>7.2f}"
            f"{row['within_5m']:>7.2f}{row['verified']:>10.2f}{row['mean_confidence']:>7.2f}"
        )
    print()


__all__ = ["run_demo", "summarize_demo"]
