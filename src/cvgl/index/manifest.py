"""``manifest.json``: what an index folder holds, typed and validated when the index is opened.

Every reader of an index goes through :class:`IndexManifest` (no string keys elsewhere), so a
manifest that is not a mapping, lacks the encoder, or carries a non-positive tile size is
refused at open time with one line naming the file, instead of failing later in a search.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from cvgl.errors import IndexFormatError, InputError
from cvgl.geo import tile_half_diagonal_m
from cvgl.models.identity import EncoderIdentity
from cvgl.models.weights import check_input_size
from cvgl.typed import from_dict

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SOURCE_KINDS = ("geotiff", "tile-folder")
DEFAULT_TILE_M = 100.0  # only for a one-tile folder index, where no spacing can be measured


@dataclass(frozen=True)
class SourceInfo:
    """Where the reference pixels came from (to re-read tiles for maps, grids and verification)."""

    kind: str  # geotiff | tile-folder
    name: str
    path: str | None = None  # absolute path on the machine that built the index; not needed to search
    count: int | None = None  # tile folders: how many tiles


@dataclass(frozen=True)
class ComputedWith:
    """How the index's descriptors were computed (``--precision`` / ``--runtime`` of ``cvgl index``).

    A record, not part of the encoder identity: bf16 and fp32 descriptors of one encoder agree to a
    cosine of 0.9999+ with the same top-1 (``cvgl bench throughput``), so a query computed in
    another precision or runtime is accepted; the record says what an index's numbers came from.
    """

    precision: str
    runtime: str


@dataclass(frozen=True)
class TilingInfo:
    """How a GeoTIFF was cut into tiles (see :class:`cvgl.data.tiling.TilingSpec`)."""

    tile_m: float
    stride_m: float
    gsd_m: float | None = None
    bands: tuple[int, ...] | None = None
    crs: str | None = None  # the CRS given with ``cvgl index --crs`` (None: the raster's own)


@dataclass(frozen=True)
class IndexManifest:
    format_version: int
    count: int
    dim: int
    encoder: EncoderIdentity
    alignment: dict
    index_type: str
    backend: dict
    created_unix: int = 0
    source: SourceInfo | None = None
    tiling: TilingInfo | None = None
    tile_m: float | None = None  # tile side on the ground (estimated from centre spacing for folders)
    tile_m_estimated: bool = False
    overview_bounds: tuple[float, float, float, float] | None = None  # south, west, north, east
    computed_with: ComputedWith | None = None  # absent in indexes built before it was recorded

    @property
    def tile_side_m(self) -> float:
        """The tile side used for answers: ``tile_m``, or :data:`DEFAULT_TILE_M` for a one-tile folder."""
        return self.tile_m or DEFAULT_TILE_M

    @property
    def correct_radius_m(self) -> float:
        """An answer within the tile half-diagonal of the truth is inside the right tile."""
        return tile_half_diagonal_m(self.tile_side_m)

    @property
    def gsd_m(self) -> float | None:
        return self.tiling.gsd_m if self.tiling is not None else None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["encoder"] = self.encoder.to_dict()
        return json.loads(json.dumps({k: v for k, v in data.items() if v is not None}))

    @classmethod
    def from_dict(cls, data: object, where: str) -> IndexManifest:
        if not isinstance(data, dict):
            raise IndexFormatError(f"{where}: not a cvgl index manifest (a {type(data).__name__}, not a mapping); rebuild the index")
        data = dict(data)
        if data.get("format_version") != FORMAT_VERSION:
            raise IndexFormatError(f"{where}: index format {data.get('format_version')} but this cvgl reads {FORMAT_VERSION}; rebuild it")
        if "encoder" not in data:
            raise IndexFormatError(f"{where}: no encoder identity; rebuild the index")
        if data.get("index_type") == "flat-ip":  # format-1 indexes written before backends existed
            data["index_type"] = "flat"
            data.setdefault("backend", {"type": "flat"})
        try:
            manifest = from_dict(cls, data, where, IndexFormatError)
        except IndexFormatError as exc:  # a typed field of the wrong kind: say what to do too
            raise IndexFormatError(f"{exc}; rebuild the index" if "rebuild" not in str(exc) else str(exc)) from None
        manifest.validate(where)
        return manifest

    def validate(self, where: str) -> None:
        def bad(message: str) -> IndexFormatError:
            return IndexFormatError(f"{where}: {message}; rebuild the index")

        if self.count < 1 or self.dim < 1:
            raise bad(f"count {self.count} and dim {self.dim} must be positive")
        try:  # a size no encoder can run at (or only with more memory than the budget)
            check_input_size(self.encoder.input_size, self.encoder.arch, "encoder input_size")
        except InputError as exc:
            raise bad(str(exc)) from None
        if self.tile_m is not None and not (math.isfinite(self.tile_m) and self.tile_m > 0):
            raise bad(f"tile_m {self.tile_m} is not a positive size in metres")
        if self.source is not None and self.source.kind not in SOURCE_KINDS:
            raise bad(f"source kind '{self.source.kind}' is not one of {', '.join(SOURCE_KINDS)}")
        if self.tiling is not None:
            t = self.tiling
            if not (t.tile_m > 0 and t.stride_m > 0 and (t.gsd_m is None or t.gsd_m > 0)):
                raise bad("tiling sizes must be positive")
        if self.overview_bounds is not None:
            s, w, n, e = self.overview_bounds
            if not (-90 <= s < n <= 90 and -180 <= w < e <= 180):
                raise bad(f"overview bounds {list(self.overview_bounds)} are not south < north, west < east in degrees")


def read_manifest(folder: Path) -> IndexManifest:
    path = Path(folder) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFormatError(f"{path}: unreadable ({type(exc).__name__}); rebuild the index") from None
    return IndexManifest.from_dict(data, str(path))
