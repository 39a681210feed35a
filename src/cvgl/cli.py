"""``cvgl`` command line: thin — parses arguments, calls the library, prints one-line errors."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from cvgl.errors import CvglError


class _Parser(argparse.ArgumentParser):
    """Every ``--help`` shows the defaults; a usage error is one line (``cvgl locate: error: ...``),
    not the usage block followed by the message."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _started(what: str) -> None:
    """One line on stderr before a slow start (loading a model takes seconds), so a user knows
    what the command is doing."""
    print(f"cvgl: {what}...", file=sys.stderr, flush=True)


def _size(text: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in text.lower().replace("x", ",").split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not H or H,W in pixels") from None
    size = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if len(parts) > 2 or any(v <= 0 or v % 14 for v in size):
        raise argparse.ArgumentTypeError(f"'{text}': sizes must be positive multiples of 14 (e.g. 224 or 154,770)")
    return size


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside [{low}, {high}]")
        return value

    return parse


def _scales(text: str) -> tuple[float, ...]:
    from cvgl.preprocess import MAX_SCALES

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of numbers (e.g. 0.6,0.8,1)") from None
    bad = [v for v in values if not (math.isfinite(v) and 0.0 < v <= 1.0)]
    if bad or not 1 <= len(values) <= MAX_SCALES:
        raise argparse.ArgumentTypeError(
            f"'{text}': give 1 to {MAX_SCALES} fractions of the photo's short side, each in (0, 1]"
        )
    return values


def _crs(text: str) -> str:
    from cvgl.data.raster import parse_crs
    from cvgl.geo import crs_key

    try:
        return crs_key(parse_crs(text))
    except CvglError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--crs ")) from None


def _latlon(text: str) -> tuple[float, float]:
    try:
        lat, lon = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not LAT,LON (e.g. 40.17,-105.1)") from None
    if not (-90 <= lat <= 90 and -180 <= lon <= 180):
        raise argparse.ArgumentTypeError(f"'{text}': latitude must be in [-90, 90] and longitude in [-180, 180]")
    return lat, lon


def _in_range(low: float, high: float):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"'{text}' is not a finite number")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value:g} is outside [{low:g}, {high:g}]")
        return value

    return parse


def _bands(text: str) -> tuple[int, ...]:
    return tuple(int(b) for b in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    from cvgl.alignment import DEFAULT_KIND
    from cvgl.data.views import VIEWS
    from cvgl.models.presets import DEFAULT_PRESET, PRESETS
    from cvgl.preprocess import MAX_HEADING_TOLERANCE_DEG, MAX_ROTATIONS

    parser = _Parser(prog="cvgl", description="Cross-view geo-localization.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def query_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--view", default="drone", choices=list(VIEWS), help="what the photos look like")
        p.add_argument("--heading", type=_in_range(-360.0, 720.0), default=None, help="camera heading, degrees clockwise from north")
        p.add_argument("--pitch", type=_in_range(0.0, 80.0), default=None, help="camera pitch from nadir, degrees (0 = straight down)")
        p.add_argument("--altitude", type=_in_range(0.1, 1e5), default=None, help="height above ground, metres")
        p.add_argument("--hfov", type=_in_range(1.0, 170.0), default=None, help="horizontal field of view, degrees")
        p.add_argument("--rotations", type=_int_in(1, MAX_ROTATIONS), default=16, help="heading hypotheses when the heading is unknown")
        p.add_argument(
            "--scales", type=_scales, default=(1.0,),
            help="footprint hypotheses when the altitude is unknown: fractions of the photo's short side, e.g. 0.6,0.8,1",
        )
        p.add_argument("--heading-tolerance", type=_in_range(0.0, MAX_HEADING_TOLERANCE_DEG), default=0.0,
                       help="also try heading +- this (degrees)")

    def refine_args(p: argparse.ArgumentParser) -> None:
        from cvgl.verify.options import DEFAULT_MATCHER, MATCHERS, REFINE_MODES  # light: no model, no index

        p.add_argument("--refine", default="auto", choices=REFINE_MODES,
                       help="geometric verification of the top candidates (local features + homography): auto = on, "
                            "with SIFT when the learned matcher's package is missing; on = the chosen matcher or an error")
        p.add_argument("--matcher", default=DEFAULT_MATCHER, choices=MATCHERS,
                       help="local-feature matcher of the verification stage")
        p.add_argument("--refine-k", type=_int_in(1, 100), default=10, help="retrieved tiles verified per photo")

    def locate_args(p: argparse.ArgumentParser) -> None:
        """What locate and track share: the photo, the search prior, the saved alignment, verification, the encoder."""
        query_args(p)
        p.add_argument("--query-alignment", type=Path, default=None, metavar="FILE",
                       help="a query-view alignment saved by cvgl align")
        p.add_argument("--near", type=_latlon, default=None, metavar="LAT,LON",
                       help="geographic prior: only consider tiles within --radius-km of this point")
        p.add_argument("--radius-km", type=_in_range(1e-3, 20_000.0), default=None, help="radius of --near, km")
        refine_args(p)
        encoder_args(p, None)

    def encoder_args(p: argparse.ArgumentParser, default_preset: str | None) -> None:
        p.add_argument("--encoder", default=default_preset, choices=sorted(PRESETS), help="zero-shot recipe")
        p.add_argument("--weights", default="embedded", help="embedded | PATH (.safetensors/.pth) | hub:<arch>")
        p.add_argument("--input-size", type=_size, default=None, help="H[,W] in pixels, multiples of 14 (None: the preset's, or the index's)")
        p.add_argument("--threads", type=_int_in(1, 1024), default=None, help="torch CPU threads (None: torch's choice)")
        p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                       help="encoder arithmetic: auto = bf16 for the ViT where the CPU multiplies bf16 natively "
                            "(AVX512_BF16/AMX) or on CUDA, else fp32; descriptors stay comparable either way")
        p.add_argument("--runtime", default="torch", choices=["auto", "torch", "openvino"],
                       help="torch (eager), openvino (compiled once per encoder, cached), or auto = OpenVINO when "
                            "installed and measured faster on this machine (measured once, recorded in the cache)")

    p = sub.add_parser("index", help="encode a GeoTIFF or a tile folder into a reference index")
    p.add_argument("source", type=Path, help="GeoTIFF, or a folder of tiles with tiles.csv (id,lat,lon)")
    p.add_argument("--out", type=Path, required=True, help="index folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an index at --out that was built with other settings")
    p.add_argument("--csv", type=Path, default=None, help="tile CSV when SOURCE is a folder")
    p.add_argument("--tile-m", type=_in_range(1e-3, 1e5), default=112.0, help="tile side on the ground, metres")
    p.add_argument("--stride-m", type=_in_range(1e-3, 1e5), default=56.0, help="distance between neighbouring tiles, metres")
    p.add_argument("--gsd", type=_in_range(1e-4, 1e4), default=0.5, help="target ground sample distance, metres")
    p.add_argument("--bands", type=_bands, default=None, help="1-based bands, e.g. 5,3,2 (None: the red, green, blue bands)")
    p.add_argument("--crs", type=_crs, default=None, metavar="EPSG:CODE",
                   help="the raster's CRS, replacing a wrong or missing one in the file (recorded in the index)")
    p.add_argument("--alignment", default=DEFAULT_KIND, choices=["none", "center", "pca-whiten"],
                   help="reference-side alignment fitted on the tiles")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="tiles per forward pass of the encoder")
    p.add_argument("--shard-size", type=_positive_int, default=128, help="tiles per shard (the unit of resume and of Ray work)")
    p.add_argument("--ray", default=None, metavar="auto|ADDRESS", help="embed on Ray: auto = local instance, or a cluster address")
    p.add_argument("--workers", type=_positive_int, default=2, help="model-holding Ray actors (with --ray)")
    p.add_argument("--index-type", default="auto", choices=["auto", "flat", "sq8", "ivfpq", "qdrant"],
                   help="vector index; auto picks by size")
    encoder_args(p, DEFAULT_PRESET)

    p = sub.add_parser("locate", help="locate photos against an index")
    p.add_argument("index", type=Path, help="index folder built by cvgl index")
    p.add_argument("images", type=Path, nargs="+", help="photos, or folders of photos")
    p.add_argument("--top-k", type=_positive_int, default=5, help="retrieved tiles reported per photo")
    p.add_argument("--json", type=Path, default=None, help="write the answers here as JSON Lines (else to stdout)")
    p.add_argument("--geojson", type=Path, default=None, help="write points, verified footprints and top-k tiles as GeoJSON")
    p.add_argument("--csv", type=Path, default=None, help="write one CSV row per photo")
    p.add_argument("--map", type=Path, default=None, help="write an offline HTML map here")
    p.add_argument("--grid", type=Path, default=None, help="write a PNG retrieval grid here")
    locate_args(p)

    p = sub.add_parser("track", help="locate the frames of one flight together: one answer per frame and the trajectory")
    p.add_argument("index", type=Path, help="index folder built by cvgl index")
    p.add_argument("frames", type=Path, nargs="+",
                   help="the flight's photos or folders of them (ordered by EXIF/XMP time, else file name), or one video file")
    p.add_argument("--method", default=None, choices=["shape", "particle", "hmm", "independent"],
                   help="decoder (None: shape offline, particle with --causal)")
    p.add_argument("--causal", action="store_true", help="use only past frames for each frame (what a drone has in flight)")
    p.add_argument("--fps", type=_in_range(1e-3, 1000.0), default=1.0, help="video frames per second to locate")
    p.add_argument("--max-frames", type=_positive_int, default=None, help="stop after this many video frames")
    p.add_argument("--interval", type=_in_range(1e-3, 3600.0), default=1.0,
                   help="seconds assumed between stills that carry no capture time")
    p.add_argument("--max-speed", type=_in_range(0.1, 500.0), default=20.0, help="fastest ground speed of the drone, m/s")
    p.add_argument("--no-odometry", action="store_true", help="do not register consecutive frames (speed bound only)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="retrieved tiles reported per frame")
    p.add_argument("--json", type=Path, default=None, help="write one answer per frame here as JSON Lines (else to stdout)")
    p.add_argument("--geojson", type=Path, default=None, help="write the trajectory (LineString) and the frames (points) as GeoJSON")
    p.add_argument("--map", type=Path, default=None, help="write an offline HTML map with the track here")
    locate_args(p)

    p = sub.add_parser("align", help="fit a query-view alignment on unlabelled photos and save it (for --query-alignment)")
    p.add_argument("index", type=Path, help="index folder built by cvgl index")
    p.add_argument("images", type=Path, nargs="+", help="unlabelled photos of the kind you will locate, or folders of them")
    p.add_argument("--kind", default="center", choices=["center", "coral"], help="what to fit (center: the query-view mean)")
    p.add_argument("--out", type=Path, required=True, help="alignment file to write (.npz)")
    query_args(p)
    encoder_args(p, None)

    p = sub.add_parser("serve", help="serve an index over HTTP: POST /locate, GET /health, a map page at /")
    p.add_argument("index", type=Path, help="index folder built by cvgl index")
    p.add_argument("--host", default="127.0.0.1", help="bind address (127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_in(1, 65535), default=8000, help="TCP port to listen on")
    p.add_argument("--max-upload-mb", type=_in_range(0.01, 1024.0), default=25.0, help="largest accepted photo")
    p.add_argument("--query-alignment", type=Path, default=None, metavar="FILE",
                   help="a query-view alignment saved by cvgl align")
    refine_args(p)
    encoder_args(p, None)

    p = sub.add_parser("bench", help="run benchmarks and write docs/benchmarks.md")
    p.add_argument("names", nargs="+", help="longmont | real-pairs | throughput | scale | ray-index | service | all")
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="markdown file to write")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--assemble", action="store_true", help="rebuild --out from the sections kept in bench_out/")
    p.add_argument("--fit", action="store_true", help="confidence: refit the shipped confidence models into the package")

    p = sub.add_parser("train", help="train GenGeo from a YAML config, or on your region's orthophotos (--region)")
    p.add_argument("config", type=Path, nargs="?", default=None, help="YAML training config (see configs/); omit with --region")
    p.add_argument("--region", type=Path, nargs="+", default=None, metavar="ORTHO",
                   help="two or more co-registered orthophotos (GeoTIFF) of your region: trains the small-data recipe on them")
    p.add_argument("--extra-pairs", type=Path, default=None, metavar="CSV",
                   help="with --region: your own photo/tile pairs (query,reference,lat,lon) added to the training pairs")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: the config's out_dir)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in the run folder")
    p.add_argument("--max-steps", type=_positive_int, default=None, help="stop (with a checkpoint) after this many steps")

    p = sub.add_parser("explain", help="draw what a trained SALAD head keeps (dustbin) and its cluster assignments")
    p.add_argument("model", type=Path, help="model.safetensors written by cvgl train")
    p.add_argument("query", type=Path, help="a query photo")
    p.add_argument("reference", type=Path, help="a reference tile")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")

    p = sub.add_parser("demo", help="index Longmont (WV3), locate simulated drone photos (WV2)")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the index, photos, answers and map")
    p.add_argument("--per-family", type=_int_in(1, 10_000), default=12, help="simulated drone photos per benchmark family")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulated photos")
    p.add_argument("--threads", type=_int_in(1, 1024), default=None, help="torch CPU threads (None: torch's choice)")
    return parser


def _encoder(args: argparse.Namespace, preset: str, view: str = "reference"):
    from cvgl.models.factory import create_encoder

    _started(f"loading the model ({preset}, weights {args.weights})")
    encoder = create_encoder(preset, args.weights, args.input_size, view=view, precision=args.precision, runtime=args.runtime)
    _started(f"encoder computes in {encoder.describe()}")
    return encoder


def _threads(args: argparse.Namespace) -> None:
    import torch

    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def cmd_index(args: argparse.Namespace) -> int:
    from cvgl.data.tiling import TilingSpec
    from cvgl.index.build import build_index
    from cvgl.index.ray_embed import RayOptions, check_reachable, import_ray
    from cvgl.models.factory import EncoderRecipe

    spec = TilingSpec(tile_m=args.tile_m, stride_m=args.stride_m, gsd_m=args.gsd, bands=args.bands, crs=args.crs)
    if args.source.is_file():  # georeferencing, tile size and grid memory, before the model loads
        from cvgl.data.tiling import grid_size

        grid_size(args.source, spec)
    if args.ray:  # "install cvgl[ray]" or "unreachable" before loading any model
        import_ray()
        if args.ray != "auto":
            check_reachable(args.ray)
    recipe = EncoderRecipe.capture(args.encoder, args.weights, args.input_size, precision=args.precision,
                                   runtime=args.runtime)  # Ray actors rebuild the same
    _started(f"loading the model ({args.encoder}, weights {args.weights})")
    encoder = recipe.build()
    ray = RayOptions(recipe, args.ray, args.workers) if args.ray else None
    out = build_index(
        args.source, args.out, encoder, spec, args.alignment, args.csv, args.batch_size, shard_size=args.shard_size, ray=ray,
        index_type=args.index_type, overwrite=args.overwrite,
    )
    print(f"indexed {args.source} -> {out}")
    return 0


def _index_and_encoder(args: argparse.Namespace):
    """Open ``args.index`` and build the encoder it was built with (its preset and input size
    unless ``--encoder``/``--input-size`` say otherwise); refuse a mismatch before any work."""
    from cvgl.index.store import open_index

    index = open_index(args.index)
    built = index.manifest.encoder
    if args.input_size is None:  # default to what the index was built with
        args.input_size = tuple(built.input_size)
    # Photos are the query view (a trained model with per-view heads encodes them with its query head).
    encoder = _encoder(args, args.encoder or built.preset, view="query")
    index.check_encoder(encoder.identity)
    return index, encoder


def _query_options(args: argparse.Namespace, encoder):
    """The photo options of the command line; photos are decoded and warped at the size the
    encoder needs (``model_size``), not at their own 12 MP."""
    from cvgl.preprocess import QueryOptions

    return QueryOptions(
        view=args.view, heading_deg=args.heading, pitch_deg=args.pitch, altitude_m=args.altitude, hfov_deg=args.hfov,
        rotations=args.rotations, scales=args.scales, heading_tolerance_deg=args.heading_tolerance,
        model_size=encoder.input_size,
    )


def cmd_locate(args: argparse.Namespace) -> int:
    import numpy as np

    from cvgl.answer import accuracy_summary, csv_text, geojson
    from cvgl.data.images import check_photos, load_image, photo_paths
    from cvgl.io import (
        check_output_path,
        dumps_json,
        write_json_atomic,
        write_jsonl_atomic,
        write_text_atomic,
    )
    from cvgl.locate import LocateOptions, locate_images
    from cvgl.report import write_visuals

    if (args.near is None) != (args.radius_km is None):
        raise CvglError("--near LAT,LON and --radius-km R go together")
    outputs = {"--json": args.json, "--geojson": args.geojson, "--csv": args.csv, "--map": args.map, "--grid": args.grid}
    for flag, path in outputs.items():
        if path is not None:
            check_output_path(path, flag)  # before minutes of work, not after
    photos = photo_paths(args.images)
    check_photos(photos)  # headers, before the model loads
    manifest_index, encoder = _index_and_encoder(args)
    options = LocateOptions(
        query=_query_options(args, encoder), top_k=args.top_k, near=args.near, radius_km=args.radius_km,
        query_alignment=_saved_alignment(args, manifest_index), refine=_refine_options(args),
    )
    answers, scores, _ = locate_images(photos, encoder, manifest_index, options)
    results = [a.to_dict() for a in answers]
    if args.json:
        write_jsonl_atomic(args.json, results)
    else:
        for result in results:
            print(dumps_json(result))
    if args.geojson:
        write_json_atomic(args.geojson, geojson(results, manifest_index.manifest.tile_side_m))
    if args.csv:
        write_text_atomic(args.csv, csv_text(results))
    if args.map or args.grid:
        images = [None if r["status"] == "skipped" else np.asarray(load_image(r["query"])) for r in results] if args.grid else None
        write_visuals(results, scores, manifest_index, images, map_path=args.map, grid_path=args.grid)
    failed = [r for r in results if r["status"] == "skipped"]
    for r in failed:
        print(f"skipped: {r['reason']}", file=sys.stderr)
    summary = accuracy_summary(results)
    if summary:
        print(summary, file=sys.stderr)
    return 0 if len(failed) < len(results) else 1


def cmd_track(args: argparse.Namespace) -> int:
    """Frames of one flight -> answers per frame (published schema) and the trajectory."""
    from dataclasses import replace

    from cvgl.data.images import check_photos
    from cvgl.io import (
        check_output_path,
        dumps_json,
        write_json_atomic,
        write_jsonl_atomic,
    )
    from cvgl.locate import LocateOptions
    from cvgl.report import write_visuals
    from cvgl.track import TrackOptions
    from cvgl.track.sequence import (
        SequenceOptions,
        locate_sequence,
        map_tracks,
        print_skipped,
        sequence_source,
        still_frames,
        summary_line,
        trajectory_geojson,
        video_frames,
    )

    if (args.near is None) != (args.radius_km is None):
        raise CvglError("--near LAT,LON and --radius-km R go together")
    for flag, path in {"--json": args.json, "--geojson": args.geojson, "--map": args.map}.items():
        if path is not None:
            check_output_path(path, flag)  # before minutes of work, not after
    kind, items = sequence_source(args.frames)
    order = None
    if kind == "stills":
        check_photos(items)  # headers, before the model loads
        order, frames = still_frames(items, args.interval)
        if order.note:
            print(f"cvgl track: {order.note}", file=sys.stderr)
    else:
        from cvgl.data.frames import probe_video

        probe_video(items[0])  # a one-line error for an unreadable video, before the model loads
        frames = video_frames(items[0], args.fps, args.max_frames)
    index, encoder = _index_and_encoder(args)
    locate = LocateOptions(
        query=_query_options(args, encoder), top_k=args.top_k, near=args.near, radius_km=args.radius_km,
        query_alignment=_saved_alignment(args, index), refine=_refine_options(args),
    )
    track = TrackOptions()
    track = replace(track, motion=replace(track.motion, max_speed_mps=args.max_speed))
    options = SequenceOptions(locate=locate, track=track, method=args.method, causal=args.causal, odometry=not args.no_odometry)
    result = locate_sequence(frames, encoder, index, options, order)
    if args.json:
        write_jsonl_atomic(args.json, result.answers)
    else:
        for answer in result.answers:
            print(dumps_json(answer))
    if args.geojson:
        write_json_atomic(args.geojson, trajectory_geojson(result.answers))
    if args.map and result.located:
        scores = [f.scores if f.evidence is not None else None for f in result.frames]
        write_visuals(result.answers, scores, index, map_path=args.map, tracks=map_tracks(result))
    failed = print_skipped(result.answers)
    print(summary_line(result), file=sys.stderr)
    return 0 if failed < len(result.answers) else 1


def _refine_options(args: argparse.Namespace):
    from cvgl.verify.options import RefineOptions

    return RefineOptions(mode=args.refine, matcher=args.matcher, top_k=args.refine_k)


def _saved_alignment(args: argparse.Namespace, index):
    if args.query_alignment is None:
        return None
    from cvgl.alignment import load_query_alignment

    return load_query_alignment(args.query_alignment, index.alignment_key(), index.manifest.dim)


def cmd_align(args: argparse.Namespace) -> int:
    """Encode unlabelled photos as locate would and fit the query-view statistics once."""
    import numpy as np

    from cvgl.alignment import fit_alignment
    from cvgl.data.images import check_photos, photo_paths
    from cvgl.io import check_output_path
    from cvgl.preprocess import prepare_query

    check_output_path(args.out, "--out")
    photos = photo_paths(args.images)
    check_photos(photos)  # headers, before the model loads
    index, encoder = _index_and_encoder(args)
    options = _query_options(args, encoder)
    descriptors, skipped = [], 0
    for path in photos:
        try:
            query = prepare_query(path, options, index.manifest.tile_m, index.manifest.gsd_m)
        except CvglError as exc:
            print(f"skipped: {exc}", file=sys.stderr)
            skipped += 1
            continue
        descriptors.append(encoder.encode([h.image for h in query.hypotheses]))
    if len(descriptors) < 2:
        raise CvglError(f"{len(descriptors)} usable photos: fitting query-view statistics needs at least 2 (16 or more is better)")
    alignment = fit_alignment(args.kind, index.raw, queries=np.concatenate(descriptors))
    alignment.fitted_on.update({"fitted_for": index.alignment_key(), "photos": len(descriptors), "index": index.path.name})
    alignment.save_file(args.out)
    print(f"fitted {args.kind} on {len(descriptors)} photos ({skipped} skipped) -> {args.out} (digest {alignment.digest()[:12]})")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cvgl.bench.run import BENCHMARKS, run_all

    names = list(BENCHMARKS) if args.names == ["all"] else args.names
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise CvglError(f"unknown benchmark {unknown}; choose from {sorted(BENCHMARKS)} or all")
    print(run_all(names, args.out, args.quick, args.assemble, fit=args.fit))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from cvgl.service import create_app
    except ImportError as exc:
        raise CvglError(f"cvgl serve needs the serve extra ({exc.name} is missing); pip install -e '.[serve]'") from None
    from cvgl.locate import LocateOptions
    from cvgl.preprocess import QueryOptions

    index, encoder = _index_and_encoder(args)
    options = LocateOptions(query=QueryOptions(model_size=encoder.input_size), query_alignment=_saved_alignment(args, index),
                            refine=_refine_options(args))
    app = create_app(index, encoder, max_upload_mb=args.max_upload_mb, options=options)
    print(f"serving {args.index} ({len(index)} tiles) on http://{args.host}:{args.port}/", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cvgl.errors import InputError
    from cvgl.train.config import SMALL_DATA_RECIPE, load_config
    from cvgl.train.trainer import Trainer

    if (args.config is None) == (args.region is None):
        raise InputError("give a YAML config or --region ORTHO ORTHO [...], not both and not neither")
    if args.extra_pairs is not None and args.region is None:
        raise InputError("--extra-pairs goes with --region (in a config it is data.extra_pairs)")
    if args.region is not None:
        region = [f"data.rasters={json.dumps([str(p) for p in args.region])}"]
        if args.extra_pairs is not None:
            region.append(f"data.extra_pairs={json.dumps(str(args.extra_pairs))}")
        config = load_config(SMALL_DATA_RECIPE, region + args.set)
    else:
        config = load_config(args.config, args.set)
    _started(f"building the model ({config.model.weights}) and the data")
    trainer = Trainer(config, args.out)
    result = trainer.fit(resume=not args.no_resume, stop_after_steps=args.max_steps)
    if trainer.world.is_main:
        print(json.dumps({"run": str(trainer.out), "step": trainer.state.step, **result}))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from cvgl.data.datasets.common import load_resized
    from cvgl.errors import WeightsError
    from cvgl.models.gengeo import load_trained
    from cvgl.models.weights import is_trained_export
    from cvgl.viz.assignments import write_assignment_figure

    if not is_trained_export(args.model):
        raise WeightsError(f"{args.model}: not a model written by cvgl train (model.safetensors in a run folder)")
    model, _, name = load_trained(args.model)
    query = load_resized(args.query, model.config.query_size)
    reference = load_resized(args.reference, model.config.reference_size)
    try:
        summary = write_assignment_figure(model, query, reference, args.out, title=f"{name}: {args.query.name} vs {args.reference.name}")
    except ValueError as exc:
        raise WeightsError(f"{args.model}: {exc}") from None
    print(f"wrote {args.out} (cluster overlap {summary['cluster_overlap']:.2f})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cvgl.demo import run_demo

    run_demo(args.out, per_family=args.per_family, seed=args.seed)
    return 0


def main(argv: list[str] | None = None) -> int:
    # Before torch loads: OpenMP threads that sleep when idle (spin-waiting on 2 busy cores made a
    # one-photo forward 15x slower: cvgl bench throughput).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    _threads(args)
    handlers = {"index": cmd_index, "locate": cmd_locate, "align": cmd_align, "bench": cmd_bench, "demo": cmd_demo, "train": cmd_train, "explain": cmd_explain, "serve": cmd_serve, "track": cmd_track}
    try:
        return handlers[args.command](args)
    except CvglError as exc:
        print(f"cvgl {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
