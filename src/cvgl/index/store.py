"""A reference index is a folder, written atomically:

``manifest.json``   format version, encoder identity, alignment description, tiling, counts
``vectors.faiss``   faiss index over the *aligned* reference descriptors (flat, SQ8 or IVF-PQ;
                    see :mod:`cvgl.index.backends`) — or ``qdrant/`` (Qdrant local mode), or
                    nothing when the collection lives on a Qdrant server (``CVGL_QDRANT_URL``)
``raw.npy``         the unaligned descriptors (refit an alignment without re-encoding; exact
                    re-rank of approximate candidates; memory-mapped when large)
``tiles.parquet``   tile_id, lat, lon, x, y, crs, source, window, gsd
``alignment.npz``   the fitted alignment (per-view mean + matrix)
``overview.png``    optional north-up preview of the reference raster for maps (+ bounds in manifest)

The folder is assembled under a temporary sibling name and renamed into place at the end, so a
crash never leaves a half-written index where a previous good one was.

The manifest records ``index_type`` and ``backend`` (its parameters). Indexes written before
backends existed say ``"index_type": "flat-ip"`` and are read as flat: same format version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from cvgl.alignment import Alignment
from cvgl.budget import available_ram_bytes
from cvgl.data.tiling import TileSource, TilingSpec
from cvgl.errors import IndexFormatError, IndexMismatchError, InputError
from cvgl.geo import geodesic_distance_m
from cvgl.index.backends import (
    FAISS_BACKENDS,
    FAISS_FILE,
    KINDS,
    build_backend,
    open_backend,
)
from cvgl.index.manifest import FORMAT_VERSION, MANIFEST, IndexManifest, read_manifest
from cvgl.index.vectors import VectorBackend, rerank_exact
from cvgl.models.identity import EncoderIdentity

FILES = ("manifest.json", "vectors.faiss", "raw.npy", "tiles.parquet", "alignment.npz")  # a flat/faiss index
COMMON_FILES = ("manifest.json", "raw.npy", "tiles.parquet", "alignment.npz")
RERANK_POOL = 256  # backend candidates re-scored exactly when the alignment differs from the stored one
MMAP_RAM_FRACTION = 0.5  # auto mmap: when raw.npy + the index file exceed this share of available RAM
INDEX_TYPES = ("auto", *KINDS)


@dataclass
class ReferenceIndex:
    """An opened index: search it with query descriptors (already encoded, not yet aligned)."""

    path: Path
    manifest: IndexManifest
    tiles: pd.DataFrame
    raw: np.ndarray  # [N, D] float32; a read-only np.memmap when opened memory-mapped
    alignment: Alignment
    backend: VectorBackend
    _aligned: tuple[Alignment, np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def index_type(self) -> str:
        return self.backend.kind

    @property
    def crs(self) -> str | None:
        """The CRS of the source raster (tile ``x``/``y``), or None for a tile folder (lat/lon only)."""
        if "crs" not in self.tiles.columns or not len(self.tiles):
            return None
        value = self.tiles["crs"].iloc[0]
        return str(value) if isinstance(value, str) and value else None

    @property
    def reference(self) -> np.ndarray:
        """Aligned reference vectors ``[N, D]`` (exact, from raw.npy)."""
        return self.alignment.apply(self.raw, "reference")

    def allowed_rows(self, near: tuple[float, float], radius_km: float) -> np.ndarray:
        """Rows whose tile centre lies within ``radius_km`` (geodesic) of ``near`` = (lat, lon).

        A lat/lon box a little larger than the circle preselects, so only a few geodesic
        distances are computed on large indexes."""
        lat0, lon0 = float(near[0]), float(near[1])
        if not (-90 <= lat0 <= 90 and -180 <= lon0 <= 180) or not radius_km > 0:
            raise InputError(f"geographic prior {near} within {radius_km} km: need lat in [-90, 90], lon in [-180, 180], radius > 0")
        lat, lon = self.tiles["lat"].to_numpy(np.float64), self.tiles["lon"].to_numpy(np.float64)
        dlat = 1.01 * radius_km / 110.574 + 1e-9
        dlon = 1.01 * radius_km / max(111.320 * np.cos(np.radians(min(abs(lat0) + dlat, 89.9))), 1e-6) + 1e-9
        box = np.flatnonzero((np.abs(lat - lat0) <= dlat) & ((np.abs(lon - lon0) <= dlon) | (dlon >= 180)))
        dist = geodesic_distance_m(lat0, lon0, lat[box], lon[box])
        return box[np.asarray(dist) <= radius_km * 1000.0].astype(np.int64)

    def prior(self, near: tuple[float, float] | None, radius_km: float | None
              ) -> tuple[np.ndarray | None, tuple[float, float, float] | None]:
        """A geographic prior in the backend's terms: ``(allowed rows, None)`` for faiss,
        ``(None, (lat, lon, radius_m))`` for a backend that filters natively (Qdrant), and
        ``(None, None)`` without one. Compute it once to search many times with it."""
        if (near is None) != (radius_km is None):
            raise InputError("a geographic prior needs both near=(lat, lon) and radius_km")
        if near is None:
            return None, None
        if self.backend.native_geo:
            return None, (float(near[0]), float(near[1]), float(radius_km) * 1000.0)
        return self.allowed_rows(near, radius_km), None

    def search(self, queries: np.ndarray, k: int, near: tuple[float, float] | None = None,
               radius_km: float | None = None, alignment: Alignment | None = None,
               prior: tuple[np.ndarray | None, tuple[float, float, float] | None] | None = None,
               pool: int = RERANK_POOL) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, rows) for raw query descriptors ``[Q, D]`` (rows -1 when fewer qualify).

        ``near`` + ``radius_km``: only tiles within that radius (Qdrant: its GeoRadius payload
        filter; faiss: the allowed rows); ``prior``: the same, already computed by :meth:`prior`.
        ``alignment`` other than the stored one (e.g. a query-view alignment fitted on the
        user's photos): the backend proposes ``max(k, pool)`` candidates under the stored
        alignment and :meth:`exact_scores` re-ranks them (:func:`rerank_exact`)."""
        k = min(k, len(self))  # never more columns than tiles; -1 padding only when a filter leaves fewer
        if alignment is None or alignment is self.alignment:
            return self.candidates(queries, k, prior, near, radius_km)
        _, candidates = self.candidates(queries, max(k, pool), prior, near, radius_km)
        return rerank_exact(alignment.apply(queries, "query"), candidates,
                            lambda rows: alignment.apply(self.raw[rows], "reference"), k)

    def candidates(self, queries: np.ndarray, k: int,
                   prior: tuple[np.ndarray | None, tuple[float, float, float] | None] | None = None,
                   near: tuple[float, float] | None = None, radius_km: float | None = None,
                   ) -> tuple[np.ndarray, np.ndarray]:
        """The backend's own top-k under the stored alignment (the candidates of a re-rank)."""
        allowed, geo = prior if prior is not None else self.prior(near, radius_km)
        aligned = np.ascontiguousarray(self.alignment.apply(queries, "query"))
        return self.backend.search(aligned, min(k, len(self)), allowed=allowed, geo=geo)

    def exact_scores(self, queries: np.ndarray, rows: np.ndarray | None = None, alignment: Alignment | None = None) -> np.ndarray:
        """Exact similarity of raw query descriptors to tiles ``rows`` (all tiles when None): ``[Q, R]``.

        ``alignment`` replaces the stored one; the aligned reference of every tile is cached for
        the alignment last used (dense scoring of a small index), a subset is aligned on demand.
        """
        alignment = alignment or self.alignment
        if rows is None:
            if self._aligned is None or self._aligned[0] is not alignment:
                self._aligned = (alignment, alignment.apply(self.raw, "reference"))
            reference = self._aligned[1]
        else:
            reference = alignment.apply(self.raw[np.asarray(rows)], "reference")
        return alignment.apply(queries, "query") @ reference.T

    def alignment_key(self) -> str:
        """What a saved query-view alignment must have been fitted for: this index (its reference
        statistics) and its encoder. Rebuilding the index changes it."""
        identity = json.dumps(self.manifest.encoder.to_dict(), sort_keys=True)
        text = f"{self.manifest.count}:{self.manifest.dim}:{self.manifest.created_unix}:{identity}"
        return hashlib.sha256(text.encode()).hexdigest()

    def tile_source(self) -> TileSource:
        """Where this index's tile pixels are (raises :class:`InputError` when that is unknown)."""
        source = self.manifest.source
        if source is None or not source.path:
            raise InputError(f"{self.path}: the index does not record where its tiles came from; rebuild it to see tiles")
        tiling = self.manifest.tiling
        spec = None if tiling is None else TilingSpec(tiling.tile_m, tiling.stride_m, tiling.gsd_m, tiling.bands, crs=tiling.crs)
        return TileSource(source.path, source.kind, spec)

    def tile_image(self, row: int) -> np.ndarray:
        """Re-read one tile's pixels from its source (an index keeps vectors, not pixels).

        Raises :class:`InputError` naming the file when the source was moved or is unreadable,
        so a map or a grid can say so instead of showing black tiles.
        """
        source = self.tile_source()
        if not Path(source.path).exists():
            raise InputError(f"{source.path}: the index's source {source.kind} is missing (moved or deleted); tiles cannot be shown")
        tile = self.tiles.iloc[int(row)]
        if source.kind == "tile-folder":
            inside = tile["path_in_folder"] if "path_in_folder" in tile else tile["source"]
            return source.read(path_in_folder=str(inside))
        return source.read(float(tile["x"]), float(tile["y"]))

    def overview(self) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
        path = self.path / "overview.png"
        bounds = self.manifest.overview_bounds
        if not path.is_file() or not bounds:
            return None
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")), tuple(bounds)

    def check_encoder(self, identity: EncoderIdentity) -> None:
        """Refuse an encoder whose identity differs from the one that built this index."""
        built = self.manifest.encoder
        if built.differences(identity):
            raise IndexMismatchError(
                f"{self.path}: index was built with encoder '{built.preset}' and differs in {built.describe_differences(identity)}; "
                f"re-index with this encoder or locate with --encoder {built.preset} and the same weights"
            )


def write_index(
    out_dir: Path,
    raw: np.ndarray,
    tiles: pd.DataFrame,
    encoder_identity: EncoderIdentity,
    alignment: Alignment,
    extra: dict | None = None,
    overview: tuple[np.ndarray, tuple[float, float, float, float]] | None = None,
    index_type: str = "auto",
    backend_params: dict | None = None,
) -> Path:
    """Write an index folder atomically (build in a temp sibling, then rename into place).

    ``index_type``: "auto" (by size, see :func:`cvgl.index.backends.choose_index_type`), "flat",
    "sq8", "ivfpq" or "qdrant"; ``backend_params`` overrides the type's defaults (e.g. IVF-PQ
    ``nprobe``). The type and its parameters are recorded in the manifest.
    """
    out_dir = Path(out_dir)
    if index_type not in INDEX_TYPES:
        raise ValueError(f"index_type {index_type!r}: expected one of {', '.join(INDEX_TYPES)}")
    if len(raw) != len(tiles):
        raise ValueError(f"{len(raw)} descriptors for {len(tiles)} tiles")
    if len(raw) == 0:
        raise ValueError("no tiles to index")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        raw = np.ascontiguousarray(raw, dtype=np.float32)
        aligned = alignment.apply(raw, "reference")
        geo = {"lat": tiles["lat"].to_numpy(), "lon": tiles["lon"].to_numpy()} if index_type == "qdrant" else {}
        backend = build_backend(index_type, aligned, folder=tmp, **geo, **(backend_params or {}))
        backend.save(tmp)
        dim = int(aligned.shape[1])
        del aligned  # the backend holds what it needs; free the copy before saving raw
        np.save(tmp / "raw.npy", raw)
        tiles.reset_index(drop=True).to_parquet(tmp / "tiles.parquet", index=False)
        alignment.save(tmp / "alignment.npz")
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_unix": int(time.time()),
            "count": len(raw),
            "dim": dim,
            "encoder": encoder_identity.to_dict(),
            "alignment": alignment.describe(),
            "index_type": backend.kind,
            "backend": backend.describe(),
            **(extra or {}),
        }
        if overview is not None:
            Image.fromarray(overview[0]).save(tmp / "overview.png")
            manifest["overview_bounds"] = [float(b) for b in overview[1]]
        typed = IndexManifest.from_dict(manifest, str(out_dir / MANIFEST))  # what open_index will read back
        (tmp / MANIFEST).write_text(json.dumps(typed.to_dict(), indent=2))
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _is_index_folder(path: Path) -> bool:
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "format_version" in manifest and "encoder" in manifest


def check_output_folder(out_dir: Path) -> None:
    """Refuse to replace anything but nothing, an empty folder, or a cvgl index."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise IndexFormatError(f"{out_dir}: exists and is a file; choose another --out")
    if any(out_dir.iterdir()) and not _is_index_folder(out_dir):
        raise IndexFormatError(f"{out_dir}: exists and is not a cvgl index; refusing to overwrite it")


def _swap_into_place(tmp: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``tmp``; the old index survives until the new one is in place."""
    check_output_folder(out_dir)
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _available_ram() -> int:
    """Bytes of RAM available now (:func:`cvgl.budget.available_ram_bytes`)."""
    return available_ram_bytes()


#: Rows of raw.npy checked for NaN/inf when it is memory-mapped (all rows when it is read).
MMAP_FINITE_SAMPLE = 4096
_FINITE_CHUNK = 65536


def validate_vectors(raw: np.ndarray, manifest: IndexManifest, where: Path) -> None:
    """raw.npy must be ``[count, dim]`` float32 of finite numbers (a NaN row scores NaN against
    every query and poisons the ranking). A memory-mapped file is sampled, not read whole."""
    if raw.ndim != 2 or raw.shape[1] != manifest.dim or raw.dtype != np.float32:
        raise IndexFormatError(f"{where}: holds a {raw.dtype} array of shape {list(raw.shape)} but the manifest says "
                               f"[{manifest.count}, {manifest.dim}] float32; rebuild the index")
    rows = np.arange(len(raw))
    if isinstance(raw, np.memmap) and len(raw) > MMAP_FINITE_SAMPLE:
        rows = np.unique(np.linspace(0, len(raw) - 1, MMAP_FINITE_SAMPLE).astype(np.int64))
    bad = 0
    for start in range(0, len(rows), _FINITE_CHUNK):
        block = raw[rows[start : start + _FINITE_CHUNK]]
        bad += int((~np.isfinite(block).all(axis=1)).sum())
    if bad:
        checked = "" if len(rows) == len(raw) else f" of {len(rows)} sampled"
        raise IndexFormatError(f"{where}: {bad}{checked} descriptor rows hold NaN or infinity; rebuild the index")


def validate_tiles(tiles: pd.DataFrame, manifest: IndexManifest, where: Path) -> None:
    """tiles.parquet must name every tile and place it: ``tile_id``, finite ``lat``/``lon`` in
    range, and (GeoTIFF sources) finite ``x``/``y`` to re-read its pixels."""
    needed = ["tile_id", "lat", "lon"]
    source = manifest.source
    if source is not None and source.kind == "geotiff":
        needed += ["x", "y"]
    missing = [c for c in needed if c not in tiles.columns]
    if missing:
        raise IndexFormatError(f"{where}: no '{missing[0]}' column (columns: {', '.join(map(str, tiles.columns))}); rebuild the index")
    for column in needed[1:]:
        values = pd.to_numeric(tiles[column], errors="coerce").to_numpy(np.float64)
        bad = ~np.isfinite(values)
        if column == "lat":
            bad |= np.abs(values) > 90
        elif column == "lon":
            bad |= np.abs(values) > 180
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise IndexFormatError(f"{where}: {int(bad.sum())} tiles have no valid '{column}' (first: row {row}, "
                                   f"{tiles[column].iloc[row]!r}); rebuild the index")


def should_mmap(path: Path) -> bool:
    """Memory-map when raw.npy plus the index file exceed ``MMAP_RAM_FRACTION`` of available RAM."""
    size = sum((path / name).stat().st_size for name in ("raw.npy", FAISS_FILE) if (path / name).is_file())
    return size > MMAP_RAM_FRACTION * _available_ram()


def open_index(path: Path, encoder_identity: EncoderIdentity | None = None, mmap: bool | None = None) -> ReferenceIndex:
    """Open an index folder; with ``encoder_identity``, refuse a different encoder.

    ``mmap``: memory-map raw.npy and the faiss file (``IO_FLAG_MMAP_IFC`` for flat/SQ8 codes,
    ``IO_FLAG_MMAP`` for IVF lists) instead of reading them; ``None`` decides by size
    (:func:`should_mmap`). Answers are identical either way; the OS pages in what is touched.
    """
    path = Path(path)
    if not path.is_dir():
        raise IndexFormatError(f"{path}: no such index folder; build one with `cvgl index SOURCE --out {path}`")
    missing = [name for name in COMMON_FILES if not (path / name).is_file()]
    if missing:
        raise IndexFormatError(f"{path}: incomplete index (missing {', '.join(missing)}); rebuild it")
    manifest = read_manifest(path)
    kind = manifest.index_type
    if kind not in KINDS:
        raise IndexFormatError(f"{path}: unknown index type {kind!r} in manifest.json; rebuild it")
    if kind in FAISS_BACKENDS and not (path / FAISS_FILE).is_file():
        raise IndexFormatError(f"{path}: incomplete index (missing {FAISS_FILE}); rebuild it")
    mmap = should_mmap(path) if mmap is None else mmap
    readers = {
        "tiles.parquet": lambda p: pd.read_parquet(p),
        "raw.npy": lambda p: np.load(p, mmap_mode="r" if mmap else None),
        "alignment.npz": lambda p: Alignment.load(p),
    }
    parts = {}
    for name, reader in readers.items():
        try:
            parts[name] = reader(path / name)
        except Exception as exc:  # noqa: BLE001 - any reader failure means a corrupt file
            raise IndexFormatError(f"{path / name}: corrupt ({type(exc).__name__}); rebuild the index") from None
    raw, alignment = parts["raw.npy"], parts["alignment.npz"]
    validate_vectors(raw, manifest, path / "raw.npy")
    shapes = [np.shape(a) for a in (alignment.query_mean, alignment.reference_mean, alignment.query_matrix, alignment.reference_matrix)]
    if any(shape[-1:] != (manifest.dim,) for shape in shapes) or any(shape[:1] != (manifest.dim,) for shape in shapes[2:]):
        raise IndexFormatError(f"{path / 'alignment.npz'}: arrays of shapes {[list(s) for s in shapes]} do not fit "
                               f"{manifest.dim}-d descriptors; rebuild the index")
    validate_tiles(parts["tiles.parquet"], manifest, path / "tiles.parquet")

    def vectors(rows: np.ndarray) -> np.ndarray:
        return alignment.apply(raw[rows], "reference")

    try:
        backend = open_backend(kind, path, mmap, dict(manifest.backend), vectors)
    except Exception as exc:  # noqa: BLE001 - any reader failure means a corrupt or unreachable index
        where = path / (FAISS_FILE if kind in FAISS_BACKENDS else "qdrant")
        raise IndexFormatError(f"{where}: unreadable {kind} index ({type(exc).__name__}); rebuild the index") from None
    index = ReferenceIndex(path=path, manifest=manifest, tiles=parts["tiles.parquet"], raw=raw,
                           alignment=alignment, backend=backend)
    if not (len(index.tiles) == len(index.raw) == len(backend) == manifest.count):
        raise IndexFormatError(f"{path / MANIFEST}: says {manifest.count} tiles but tiles.parquet has {len(index.tiles)}, "
                               f"raw.npy {len(index.raw)} and the vector index {len(backend)}; rebuild the index")
    if encoder_identity is not None:
        index.check_encoder(encoder_identity)
    return index
