"""The HTTP service behind ``cvgl serve``: one opened index, one encoder, a map page.

Endpoints:

``POST /locate``          multipart upload ``image`` (+ optional form fields ``heading``, ``pitch``,
                          ``altitude``, ``hfov``, ``top_k``, ``view``) -> exactly the JSON object
                          ``cvgl locate`` prints for that photo. ``?heatmap=N`` adds ``heatmap``
                          (the N best tiles: row, lat, lon, score) and ``top_k_rows``;
                          ``?layers=1`` adds ``map_layers`` (the answer as the map's GeoJSON
                          layers, :mod:`cvgl.viz.layers`) and ``top_k_rows``, for the page.
``GET /health``           ``{"status", "index", "tiles", "encoder"}``
``GET /meta``             what the page needs to draw the map (bounds, basemap, tile size, counts)
``GET /overview.png``     the index's north-up preview of its reference raster
``GET /tiles/{row}.jpg``  a reference tile's thumbnail (JPEG, at most 256 px), for the page
``GET /tiles/{row}.png``  a reference tile's full pixels, re-read from the source raster
``GET /viz/...``          the map's JavaScript: vendored Leaflet and cvgl's renderer (no CDN)
``GET /``                 the page (``static/``): drop a photo, see prediction, top-k and heatmap

A tile whose source raster or folder is gone (moved, deleted, unreadable) answers 404 / 503
with one line saying so, never grey pixels.

Why it is built this way:

* Uploads are read into memory with a hard cap (413 past it; a declared ``Content-Length`` over
  the cap is refused before any byte is read) and a time limit (408 when no byte comes for
  ``upload_idle_s`` or the body is not complete after ``upload_deadline_s``: a slow client never
  holds a worker for ever); a client that disconnects mid-upload ends the request quietly (no
  traceback in the log). Uploads are typed by their magic bytes (415 unless one of
  :data:`cvgl.data.images.PHOTO_FORMATS`: JPEG, PNG, TIFF, WebP) and decoded by
  :func:`cvgl.data.images.load_photo`, the photo rules ``cvgl locate`` applies too (422 with its
  one-line message: an animated PNG or WebP is refused by both, a GIF by both). Form values are
  parsed strictly (``top_k=²`` is a 422, not a 500).
* The client's file name is only ever reduced to a display basename (:func:`safe_name`). The
  locate pipeline reads photos from paths (pixels *and* EXIF/XMP), so the bytes go to a
  ``tempfile`` whose name the server picks, and every answer or error names the basename only.
* The model and the index's score cache are not made for concurrent use, and two parallel
  forwards on a 2-core box are no faster than one after the other: inference runs in the
  threadpool (the event loop keeps serving pages) under one lock.
* The page loads nothing from the internet: Leaflet is served from the package (``/viz``) and
  the page's Content-Security-Policy allows only this server.
"""

from __future__ import annotations

import asyncio
import functools
import io
import math
import re
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path, PurePosixPath

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from cvgl.data.views import VIEWS
from cvgl.errors import CvglError
from cvgl.index.search import ranked_tiles
from cvgl.index.store import ReferenceIndex
from cvgl.locate import LocateOptions, locate_images
from cvgl.models.encoder import Encoder
from cvgl.verify.refine import Refiner
from cvgl.viz.assets import STATIC as VIZ_STATIC
from cvgl.viz.basemap import (
    THUMBNAIL_PX,
    image_basemap,
    jpeg_bytes,
    mosaic_basemap,
    mosaic_rows,
)
from cvgl.viz.layers import answer_layers, heat_layer

#: Magic bytes -> file suffix. Only formats a camera or GIS export produces and Pillow decodes.
IMAGE_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)
MULTIPART_OVERHEAD = 64 * 1024  # boundaries, part headers and the small form fields
UPLOAD_IDLE_S = 20.0  # longest wait for the next chunk of an upload
UPLOAD_DEADLINE_S = 120.0  # longest whole upload: 25 MB in 120 s is 1.7 Mbit/s
_WHOLE_NUMBER = re.compile(r"[0-9]{1,7}")  # ASCII digits only: str.isdigit() accepts '²', which int() refuses
MAX_TOP_K = 1000
MAX_HEATMAP = 100_000
TILE_CACHE = 256  # encoded tiles kept in memory (the page asks for the same few again)
PAGE_HEAT_TILES = 1000  # ``?layers=1``: the photo's best tiles in the heat layer
#: The page may load scripts, styles and images from this server only (blob: is the dropped photo).
PAGE_CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'"
#: Form fields mirror ``cvgl locate``'s flags and ranges.
FLOAT_FIELDS: dict[str, tuple[str, float, float]] = {
    "heading": ("heading_deg", -360.0, 720.0),
    "pitch": ("pitch_deg", 0.0, 80.0),
    "altitude": ("altitude_m", 0.1, 1e5),
    "hfov": ("hfov_deg", 1.0, 170.0),
}
STATIC = resources.files("cvgl.service") / "static"


def detect_image_type(head: bytes) -> str | None:
    """The file suffix for ``head``'s magic bytes, or None when it is not an accepted image."""
    for magic, suffix in IMAGE_MAGIC:
        if head.startswith(magic):
            return suffix
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return None


def safe_name(client_name: str | None) -> str:
    """A display-only basename of a client-given file name (never used as a path).

    Both separators count (a Windows browser may send ``C:\\photos\\a.jpg``); control characters
    are dropped and the length is bounded, so the name is safe to echo in JSON and HTML.
    """
    base = PurePosixPath((client_name or "").replace("\\", "/")).name
    base = re.sub(r"[\x00-\x1f\x7f]", "", base).strip()
    if base in ("", ".", ".."):
        return "upload"
    return base[-120:]


@dataclass
class ServiceState:
    """What every request shares: the index, its encoder, and the one inference lock."""

    index: ReferenceIndex
    encoder: Encoder
    max_upload_bytes: int
    options: LocateOptions = field(default_factory=LocateOptions)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        # Tiles are asked for again and again: keep the last TILE_CACHE tiles' encoded bytes.
        # (A tile that fails raises, and exceptions are not cached: a source put back is seen.)
        self.tile_png = functools.lru_cache(maxsize=TILE_CACHE)(self._render_png)
        self.tile_jpeg = functools.lru_cache(maxsize=TILE_CACHE)(self._render_jpeg)
        self.row_of = {str(t): i for i, t in enumerate(self.index.tiles["tile_id"])}
        # One verification stage for the server's life: window features stay cached across requests.
        self.refiner = Refiner(self.index, self.options.refine) if self.options.refine.enabled else None
        self.street_reference = None  # street photos' tile products, made on the first street request

    def locate(self, data: bytes, suffix: str, name: str, options: LocateOptions) -> tuple[dict, np.ndarray | None]:
        """Run ``locate_images`` on the upload; the answer names ``name``, never the temp file."""
        with tempfile.TemporaryDirectory(prefix="cvgl-serve-") as folder:
            path = Path(folder) / f"upload{suffix}"  # server-chosen name
            path.write_bytes(data)
            with self.lock:
                refiner = self.refiner if options.refine == self.options.refine else None
                if options.query.view == "street" and self.street_reference is None:
                    from cvgl.street import StreetConfig, StreetReference, TokenExtractor

                    extractor = TokenExtractor.from_encoder(self.encoder, StreetConfig().layer)
                    self.street_reference = StreetReference(self.index, extractor)
                answers, scores, _ = locate_images([path], self.encoder, self.index, options, progress=False,
                                                   refiner=refiner, street_reference=self.street_reference)
        result = answers[0].to_dict()
        result["query"] = name
        if result["status"] == "skipped":
            result["reason"] = result["reason"].replace(str(path), name)
        return result, scores[0]

    def tile_problem(self) -> tuple[int, str] | None:
        """Why tile pixels cannot be shown, as (HTTP status, one line), or None when they can.

        Names the source by its name only: the server's own paths never reach a client."""
        source = self.index.manifest.source
        if source is None or not source.path:
            return 404, "this index does not record where its tiles came from: rebuild it to see tiles"
        if not Path(source.path).exists():
            return 404, f"the index's source {source.kind} '{source.name}' is missing on the server (moved or deleted)"
        return None

    def tile_pixels(self, row: int) -> np.ndarray:
        """One tile's pixels, or an HTTPException: 404 for a bad row or a missing source, 503 when
        the source is there but cannot be read."""
        if not 0 <= row < len(self.index):
            raise HTTPException(404, f"tile row {row} is outside [0, {len(self.index) - 1}]")
        problem = self.tile_problem()
        if problem is not None:
            raise HTTPException(*problem)
        try:
            return self.index.tile_image(row)
        except CvglError:
            source = self.index.manifest.source
            raise HTTPException(503, f"tile {row}: the index's source {source.kind} '{source.name}' could not be read") from None

    def _render_png(self, row: int) -> bytes:
        """One tile's full pixels as PNG bytes (through ``tile_png``, the cached entry point)."""
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(self.tile_pixels(row))).convert("RGB").save(buffer, format="PNG")
        return buffer.getvalue()

    def _render_jpeg(self, row: int) -> bytes:
        """One tile's thumbnail as JPEG bytes (through ``tile_jpeg``): ~15 kB, not a 2 MB PNG."""
        return jpeg_bytes(self.tile_pixels(row), THUMBNAIL_PX)

    def basemap(self) -> dict | None:
        """What the page draws under the answer: the overview, else the tiles at their coordinates
        (thumbnail URLs; outlines when the tile source is gone)."""
        if self.has_overview():
            return image_basemap("/overview.png", self.bounds())
        tiles = self.index.tiles
        problem = self.tile_problem()
        url_of = (lambda row: None) if problem else (lambda row: f"/tiles/{row}.jpg")
        rows = mosaic_rows(len(tiles))
        note = f"tile pixels unavailable: {problem[1]}" if problem else (
            f"{len(rows)} of {len(tiles)} tiles shown" if len(rows) < len(tiles) else None)
        return mosaic_basemap(tiles, rows, self.index.manifest.tile_side_m, url_of, note)

    def has_overview(self) -> bool:
        return (self.index.path / "overview.png").is_file() and bool(self.index.manifest.overview_bounds)

    def page_layers(self, result: dict, scores: np.ndarray | None) -> dict:
        """``?layers=1``: the answer as the map's layers (the same code as the map file) and the
        index rows of its top-k tiles (for their thumbnails)."""
        manifest = self.index.manifest
        layers = answer_layers([result], manifest.tile_side_m)
        if scores is not None:
            spacing = manifest.tiling.stride_m if manifest.tiling else manifest.tile_side_m
            layers["heat"] = heat_layer([result], [scores], self.index.tiles, spacing, PAGE_HEAT_TILES)
        return {"map_layers": layers, "top_k_rows": [self.row_of.get(t["tile_id"]) for t in result["top_k"]]}

    def bounds(self) -> tuple[float, float, float, float]:
        """(south, west, north, east) of the map: the overview's, else the tiles' plus a margin."""
        stored = self.index.manifest.overview_bounds
        if stored and (self.index.path / "overview.png").is_file():
            return tuple(float(b) for b in stored)  # type: ignore[return-value]
        lat, lon = self.index.tiles["lat"].to_numpy(), self.index.tiles["lon"].to_numpy()
        tile_m = self.index.manifest.tile_side_m
        dlat = tile_m / 111_320.0
        dlon = dlat / max(math.cos(math.radians(float(lat.mean()))), 1e-6)
        return float(lat.min() - dlat), float(lon.min() - dlon), float(lat.max() + dlat), float(lon.max() + dlon)


async def _read_capped(request: Request, limit: int, idle_s: float = UPLOAD_IDLE_S,
                       deadline_s: float = UPLOAD_DEADLINE_S) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all, and
    (408) an upload that stalls for ``idle_s`` or is not complete after ``deadline_s``. A client
    that disconnects mid-upload is a 400 that nobody receives, logged as nothing."""
    declared = request.headers.get("content-length")
    if declared is not None and _WHOLE_NUMBER.fullmatch(declared) and int(declared) > limit:
        raise HTTPException(413, f"upload is {int(declared) / 1e6:.1f} MB, over the {limit / 1e6:.0f} MB limit")
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    stream = request.stream().__aiter__()
    chunks, size = [], 0
    while True:
        remaining = end - loop.time()
        try:
            if remaining <= 0:
                raise asyncio.TimeoutError
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=min(idle_s, remaining))
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise HTTPException(408, f"upload too slow: {size / 1e6:.1f} MB received; it must not pause for "
                                     f"{idle_s:g} s nor take more than {deadline_s:g} s") from None
        except ClientDisconnect:
            raise HTTPException(400, "the client disconnected during the upload") from None
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"upload is over the {limit / 1e6:.0f} MB limit")
        chunks.append(chunk)
    return b"".join(chunks)


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _options(form: dict[str, str], base: LocateOptions) -> LocateOptions:
    """Locate options from the form fields, checked like ``cvgl locate``'s flags (422 when not)."""
    changes: dict = {}
    query_changes: dict = {}
    for key, (attr, low, high) in FLOAT_FIELDS.items():
        text = form.get(key, "").strip()
        if not text:
            continue
        try:
            value = float(text)
        except ValueError:
            raise HTTPException(422, f"{key}: {text[:40]!r} is not a number") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise HTTPException(422, f"{key}: {value:g} is outside [{low:g}, {high:g}]")
        query_changes[attr] = value
    top_k = form.get("top_k", "").strip()
    if top_k:
        if not _WHOLE_NUMBER.fullmatch(top_k) or not 1 <= int(top_k) <= MAX_TOP_K:
            raise HTTPException(422, f"top_k: {top_k[:40]!r} is not a whole number in [1, {MAX_TOP_K}]")
        changes["top_k"] = int(top_k)
    view = form.get("view", "").strip()
    if view:
        if view not in VIEWS:
            raise HTTPException(422, f"view: {view[:40]!r} is not one of {', '.join(VIEWS)}")
        query_changes["view"] = view
    try:  # QueryOptions checks the combination (and anything a field above lets through)
        return replace(base, query=replace(base.query, **query_changes), **changes)
    except (CvglError, ValueError) as exc:
        raise HTTPException(422, str(exc)) from None


def _heatmap(rows: np.ndarray, scores: np.ndarray, index: ReferenceIndex) -> list[dict]:
    lat, lon = index.tiles["lat"].to_numpy(), index.tiles["lon"].to_numpy()
    return [{"row": int(i), "lat": float(lat[i]), "lon": float(lon[i]), "score": float(scores[i])} for i in rows]


def create_app(
    index: ReferenceIndex,
    encoder: Encoder,
    max_upload_mb: float = 25.0,
    options: LocateOptions | None = None,
    upload_idle_s: float = UPLOAD_IDLE_S,
    upload_deadline_s: float = UPLOAD_DEADLINE_S,
) -> FastAPI:
    """The service for one opened index and the encoder it was built with.

    ``options`` are the server's locate defaults (as ``cvgl locate``'s flags would set them);
    each request may override heading, pitch, altitude, hfov, top_k and view. An upload may
    pause ``upload_idle_s`` at most and take ``upload_deadline_s`` in all (408 past either).
    """
    if not max_upload_mb > 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    if not (upload_idle_s > 0 and upload_deadline_s > 0):
        raise ValueError(f"upload time limits must be positive, got {upload_idle_s}, {upload_deadline_s}")
    index.check_encoder(encoder.identity)
    state = ServiceState(index, encoder, int(max_upload_mb * 1024 * 1024), options or LocateOptions())
    preset = encoder.identity.preset
    app = FastAPI(title="cvgl", summary="Cross-view geo-localization: locate a photo against an aerial index.")
    app.state.cvgl = state
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    app.mount("/viz", StaticFiles(directory=str(VIZ_STATIC)), name="viz")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"), headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "index": index.path.name, "tiles": len(index), "encoder": preset}

    @app.get("/meta")
    def meta() -> dict:
        problem = state.tile_problem()
        return {
            "index": index.path.name,
            "tiles": len(index),
            "encoder": preset,
            "tile_m": index.manifest.tile_m,
            "tile_m_estimated": index.manifest.tile_m_estimated,  # a tile folder: from centre spacing
            "stride_m": index.manifest.tiling.stride_m if index.manifest.tiling else None,
            "bounds": list(state.bounds()),  # south, west, north, east
            "overview": state.has_overview(),
            "basemap": state.basemap(),
            "tile_pixels": None if problem is None else problem[1],  # why tiles cannot be shown, when not
            "max_upload_bytes": state.max_upload_bytes,
            "views": list(VIEWS),
            "default_top_k": state.options.top_k,
        }

    @app.get("/overview.png", include_in_schema=False)
    def overview() -> FileResponse:
        path = index.path / "overview.png"
        if not path.is_file():
            raise HTTPException(404, "this index has no overview image (built from a tile folder)")
        return FileResponse(path, media_type="image/png")

    @app.get("/tiles/{row}.png", include_in_schema=False)
    def tile(row: int) -> Response:
        return Response(state.tile_png(row), media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.get("/tiles/{row}.jpg", include_in_schema=False)
    def tile_thumbnail(row: int) -> Response:
        return Response(state.tile_jpeg(row), media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.post("/locate")
    async def locate(request: Request, heatmap: int = 0, layers: bool = False) -> dict:
        if not 0 <= heatmap <= MAX_HEATMAP:
            raise HTTPException(422, f"heatmap: {heatmap} is outside [0, {MAX_HEATMAP}]")
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            raise HTTPException(415, "send the photo as multipart/form-data with a field named 'image'")
        body = await _read_capped(request, state.max_upload_bytes + MULTIPART_OVERHEAD, upload_idle_s, upload_deadline_s)
        parser = MultiPartParser(request.headers, _once(body), max_files=1, max_fields=16)
        parser.spool_max_size = len(body) + 1  # keep the upload in memory, never on disk
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise HTTPException(400, f"malformed multipart body: {exc}") from None
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise HTTPException(422, "no file in the form field 'image'")
        data = await upload.read()
        name = safe_name(upload.filename)
        if len(data) > state.max_upload_bytes:
            raise HTTPException(413, f"{name}: {len(data) / 1e6:.1f} MB, over the {state.max_upload_bytes / 1e6:.0f} MB limit")
        suffix = detect_image_type(data[:16])
        if suffix is None:
            raise HTTPException(415, f"{name}: not a JPEG, PNG, TIFF or WebP image")
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        options = _options(fields, state.options)
        result, scores = await run_in_threadpool(state.locate, data, suffix, name, options)
        if result["status"] == "skipped":
            raise HTTPException(422, result["reason"])
        if heatmap and scores is not None:
            # The ranking ``answer`` used for top_k: scored tiles only (a searched index leaves the
            # others at -inf, which JSON cannot carry), sorted once.
            ranked, _ = ranked_tiles(scores)
            result["heatmap"] = _heatmap(ranked[:heatmap], scores, index)
            result["top_k_rows"] = [int(i) for i in ranked[: len(result["top_k"])]]
        if layers:
            result.update(state.page_layers(result, scores))
        return result

    return app
