"""A reference index is a folder, written atomically:

``manifest.json``   format version, encoder identity, alignment description, tiling, counts
``vectors.faiss``   exact inner-product index over the *aligned* reference descriptors
``raw.npy``         the unaligned descriptors (refit an alignment without re-encoding)
``tiles.parquet``   tile_id, lat, lon, x, y, crs, source, window, gsd
``alignment.npz``   the fitted alignment (per-view mean + matrix)
``overview.png``    optional north-up preview of the reference raster for maps (+ bounds in manifest)

The folder is assembled under a temporary sibling name and renamed into place at the end, so a
crash never leaves a half-written index where a previous good one was.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
from PIL import Image

from cvgl.errors import IndexFormatError, IndexMismatchError
from cvgl.zeroshot.alignment import Alignment

FORMAT_VERSION = 1
FILES = ("manifest.json", "vectors.faiss", "raw.npy", "tiles.parquet", "alignment.npz")
INDEX_TYPES = ("auto", "flat", "sq8", "ivfpq", "qdrant")
IDENTITY_KEYS = ("arch", "weights_sha256", "input_size", "mean", "std", "head")


@dataclass
class ReferenceIndex:
    """An opened index: search it with query descriptors (already encoded, not yet aligned)."""

    path: Path
    manifest: dict
    tiles: pd.DataFrame
    raw: np.ndarray
    alignment: Alignment
    faiss_index: faiss.Index
    _aligned: tuple[Alignment, np.ndarray] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def reference(self) -> np.ndarray:
        """Aligned reference vectors ``[N, D]`` (reconstructed from the flat index)."""
        return self.faiss_index.reconstruct_n(0, self.faiss_index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, row indices) for raw query descriptors ``[Q, D]``."""
        aligned = self.alignment.apply(queries, "query")
        k = min(k, len(self))
        return self.faiss_index.search(np.ascontiguousarray(aligned), k)

    def scores(self, queries: np.ndarray, alignment: Alignment | None = None) -> np.ndarray:
        """Similarity of each raw query descriptor to every tile ``[Q, N]``.

        ``alignment`` replaces the stored one (e.g. fitted on a batch of photos at locate time);
        the aligned reference is cached for the alignment last used.
        """
        alignment = alignment or self.alignment
        if self._aligned is None or self._aligned[0] is not alignment:
            self._aligned = (alignment, alignment.apply(self.raw, "reference"))
        return alignment.apply(queries, "query") @ self._aligned[1].T

    def overview(self) -> tuple[np.ndarray, tuple[float, float, float, float]] | None:
        path = self.path / "overview.png"
        bounds = self.manifest.get("overview_bounds")
        if not path.is_file() or not bounds:
            return None
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB")), tuple(bounds)

    def check_encoder(self, identity: dict) -> None:
        """Refuse an encoder whose identity differs from the one that built this index."""
        built = self.manifest["encoder"]
        diffs = [key for key in IDENTITY_KEYS if _canon(built.get(key)) != _canon(identity.get(key))]
        if diffs:
            detail = ", ".join(f"{k}: index={_short(built.get(k))} vs encoder={_short(identity.get(k))}" for k in diffs)
            raise IndexMismatchError(
                f"{self.path}: index was built with encoder '{built.get('preset')}' and differs in {detail}; "
                f"re-index with this encoder or locate with --encoder {built.get('preset')} and the same weights"
            )


def _canon(value) -> str:
    return json.dumps(value, sort_keys=True)


def _short(value) -> str:
    text = _canon(value)
    return text if len(text) <= 24 else text[:21] + "..."


def write_index(
    out_dir: Path,
    raw: np.ndarray,
    tiles: pd.DataFrame,
    encoder_identity: dict,
    alignment: Alignment,
    extra: dict | None = None,
    overview: tuple[np.ndarray, tuple[float, float, float, float]] | None = None,
    index_type: str = "auto",
) -> Path:
    """Write an index folder atomically (build in a temp sibling, then rename into place).

    ``index_type``: "auto", "flat", "sq8", "ivfpq" or "qdrant" (see ``cvgl.index.backends``).
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
        flat = faiss.IndexFlatIP(aligned.shape[1])
        flat.add(aligned)
        faiss.write_index(flat, str(tmp / "vectors.faiss"))
        np.save(tmp / "raw.npy", raw)
        tiles.reset_index(drop=True).to_parquet(tmp / "tiles.parquet", index=False)
        alignment.save(tmp / "alignment.npz")
        manifest = {
            "format_version": FORMAT_VERSION,
            "created_unix": int(time.time()),
            "count": int(len(raw)),
            "dim": int(aligned.shape[1]),
            "encoder": encoder_identity,
            "alignment": alignment.describe(),
            "index_type": "flat-ip",
            **(extra or {}),
        }
        if overview is not None:
            Image.fromarray(overview[0]).save(tmp / "overview.png")
            manifest["overview_bounds"] = [float(b) for b in overview[1]]
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
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


def open_index(path: Path, encoder_identity: dict | None = None) -> ReferenceIndex:
    """Open an index folder; with ``encoder_identity``, refuse a different encoder."""
    path = Path(path)
    if not path.is_dir():
        raise IndexFormatError(f"{path}: no such index folder; build one with `cvgl index SOURCE --out {path}`")
    missing = [name for name in FILES if not (path / name).is_file()]
    if missing:
        raise IndexFormatError(f"{path}: incomplete index (missing {', '.join(missing)}); rebuild it")
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{path}/manifest.json: unreadable ({exc}); rebuild the index") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise IndexFormatError(
            f"{path}: index format {manifest.get('format_version')} but this cvgl reads {FORMAT_VERSION}; rebuild it"
        )
    readers = {
        "tiles.parquet": lambda p: pd.read_parquet(p),
        "raw.npy": lambda p: np.load(p),
        "alignment.npz": lambda p: Alignment.load(p),
        "vectors.faiss": lambda p: faiss.read_index(str(p)),
    }
    parts = {}
    for name, reader in readers.items():
        try:
            parts[name] = reader(path / name)
        except Exception as exc:  # noqa: BLE001 - any reader failure means a corrupt file
            raise IndexFormatError(f"{path / name}: corrupt ({type(exc).__name__}); rebuild the index") from None
    index = ReferenceIndex(
        path=path,
        manifest=manifest,
        tiles=parts["tiles.parquet"],
        raw=parts["raw.npy"],
        alignment=parts["alignment.npz"],
        faiss_index=parts["vectors.faiss"],
    )
    if not (len(index.tiles) == len(index.raw) == index.faiss_index.ntotal == manifest.get("count")):
        raise IndexFormatError(f"{path}: tiles, vectors and manifest disagree on the count; rebuild the index")
    if encoder_identity is not None:
        index.check_encoder(encoder_identity)
    return index
