"""Sharded, resumable embedding of a reference source: plan → shards → merge.

Why shards: a region of 10⁵–10⁸ tiles takes hours to embed, and a crash (or a pre-empted node)
must not throw that work away. The source is cut into deterministic shards of ``shard_size``
tiles in tile order; each shard is embedded and written as ``OUT.shards/shard-00012.parquet``
(the tile table's columns plus a fixed-size-list float32 ``vector`` column) with one atomic
rename, so a shard file is either complete or absent. A re-run validates what is there (readable,
right rows, written for this exact plan) and embeds only the rest; when every shard exists they
are merged in shard order into the index and the shard folder is deleted.

The same functions serve both executors: :func:`read_shard` (pixels of one shard's tiles),
``Encoder.encode`` (in batches *within* a shard) and :func:`write_shard`. The in-process loop
(:func:`embed_in_process`) and the Ray Data pipeline (:mod:`cvgl.index.ray_embed`) differ only in
where these run, which is why both produce the same index.

``plan.json`` in the shard folder records the plan's digest (source file identity, tiling, shard
size, tile table, encoder identity): shards written for another plan are never mixed in; the
folder is started over with a message saying why.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cvgl.data.raster import raster_info
from cvgl.data.tile_folder import read_tile_folder
from cvgl.data.tiling import TileSource, TilingSpec, kept_cells
from cvgl.errors import InputError
from cvgl.io import write_bytes_atomic, write_json_atomic
from cvgl.models.identity import EncoderIdentity

SHARD_FORMAT = 1
DEFAULT_SHARD_SIZE = 128
PLAN_FILE = "plan.json"
_DIGEST_KEY = b"cvgl.plan_digest"

Log = Callable[[str], None]


@dataclass
class ShardPlan:
    """Which tiles go in which shard, and the digest that identifies this exact plan."""

    source: TileSource
    tiles: pd.DataFrame  # planned rows in tile order (table metadata + where to read them)
    shard_size: int
    encoder_identity: EncoderIdentity
    digest: str

    @property
    def num_shards(self) -> int:
        return -(-len(self.tiles) // self.shard_size)

    def rows(self, shard: int) -> pd.DataFrame:
        """The planned rows of one shard (tile order)."""
        start = shard * self.shard_size
        return self.tiles.iloc[start : start + self.shard_size].reset_index(drop=True)

    def describe(self) -> dict:
        return {
            "shard_format": SHARD_FORMAT,
            "digest": self.digest,
            "source": self.source.path,
            "kind": self.source.kind,
            "tiles": len(self.tiles),
            "shard_size": self.shard_size,
            "num_shards": self.num_shards,
            "encoder": self.encoder_identity.to_dict(),
        }


def shard_folder(out: Path) -> Path:
    """``OUT.shards`` beside the index folder (outside it, so the index swap never touches it)."""
    out = Path(out)
    return out.with_name(out.name + ".shards")


def shard_path(folder: Path, shard: int) -> Path:
    return Path(folder) / f"shard-{shard:05d}.parquet"


# ----------------------------------------------------------------------------------------------
# Planning
# ----------------------------------------------------------------------------------------------


def plan_source(
    source: Path,
    spec: TilingSpec,
    encoder_identity: EncoderIdentity,
    csv: Path | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ShardPlan:
    """Plan the shards of a GeoTIFF (grid cells kept by the nodata filter) or a tile folder.

    A GeoTIFF is planned from its grid without reading pixels when no cell is dropped (the usual
    case: ``count_tiles`` reads only nodata masks, nothing at all for rasters without nodata);
    when some are dropped, one :func:`iter_tiles` pass finds which, so shards hold exactly the
    tiles ``iter_tiles`` yields, in its order.
    """
    source = Path(source)
    if int(shard_size) < 1:
        raise InputError(f"shard size {shard_size}: give a positive number of tiles per shard")
    if not source.exists():
        raise InputError(f"{source}: no such file or folder; give a GeoTIFF or a folder of tiles with tiles.csv")
    if source.is_dir():
        records = read_tile_folder(source, csv)
        tiles = pd.DataFrame(
            {
                "tile_id": [r.tile_id for r in records],
                "lat": [r.lat for r in records],
                "lon": [r.lon for r in records],
                "source": [r.image_path.name for r in records],
                "path_in_folder": [r.image_path.relative_to(source).as_posix() for r in records],
            }
        )
        spec_source = TileSource(str(source.resolve()), "tile-folder")
    else:
        cells = kept_cells(source, spec)  # nodata masks only: no pixels, no stretch
        if not cells:
            raise InputError(f"{source}: no usable tiles (all empty or nodata); check the raster, bands and tiling")
        crs = raster_info(source, spec.crs).crs
        tiles = pd.DataFrame(
            {
                "tile_id": [c.tile_id for c in cells],
                "lat": [c.lat for c in cells],
                "lon": [c.lon for c in cells],
                "x": [c.x for c in cells],
                "y": [c.y for c in cells],
                "crs": crs,
                "source": source.name,
                "col_off": [c.window[0] for c in cells],
                "row_off": [c.window[1] for c in cells],
                "width": [c.window[2] for c in cells],
                "height": [c.window[3] for c in cells],
            }
        )
        spec_source = TileSource(str(source.resolve()), "geotiff", spec).with_stretch()
    digest = _plan_digest(source, spec_source, tiles, int(shard_size), encoder_identity)
    return ShardPlan(spec_source, tiles, int(shard_size), encoder_identity, digest)


def _plan_digest(source: Path, spec: TileSource, tiles: pd.DataFrame, shard_size: int, identity: EncoderIdentity) -> str:
    """sha256 of everything a shard's content depends on (file versions, tiling, tiles, encoder)."""
    stat = source.stat()
    files = [[source.name, stat.st_size, stat.st_mtime_ns]]
    if spec.kind == "tile-folder":
        files = [[p, *_file_version(source / p)] for p in tiles["path_in_folder"]]
    head = {
        "shard_format": SHARD_FORMAT,
        "kind": spec.kind,
        "files": files,
        "tiling": None if spec.tiling is None else asdict(spec.tiling),
        "stretch": None if spec.stretch is None else asdict(spec.stretch),
        "shard_size": shard_size,
        "encoder": identity.to_dict(),
    }
    h = hashlib.sha256(json.dumps(head, sort_keys=True, default=list).encode())
    h.update(pd.util.hash_pandas_object(tiles, index=False).to_numpy().tobytes())
    return h.hexdigest()


def _file_version(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


# ----------------------------------------------------------------------------------------------
# Reading and writing one shard
# ----------------------------------------------------------------------------------------------


def read_shard(source: TileSource, rows: pd.DataFrame) -> tuple[list[np.ndarray], pd.DataFrame]:
    """Pixels (HxWx3 uint8) of one shard's tiles, and its rows of the index's tile table.

    GeoTIFF tiles are read as ground regions centred on the planned cell with the raster-wide
    stretch: the same pixels :func:`iter_tiles` gives (compared in the tests).
    """
    table = rows.reset_index(drop=True)
    if source.kind == "tile-folder":
        return [source.read(path_in_folder=p) for p in rows["path_in_folder"]], table
    images = [source.read(x, y) for x, y in zip(rows["x"], rows["y"])]
    return images, table.assign(gsd_m=[source.tiling.tile_m / image.shape[0] for image in images])


def write_shard(folder: Path, shard: int, table: pd.DataFrame, vectors: np.ndarray, digest: str) -> Path:
    """Write one shard atomically: the tile table + a fixed-size-list float32 ``vector`` column."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(table):
        raise ValueError(f"shard {shard}: {vectors.shape} vectors for {len(table)} tiles")
    arrow = pa.Table.from_pandas(table.reset_index(drop=True), preserve_index=False)
    column = pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel(), pa.float32()), vectors.shape[1])
    arrow = arrow.append_column("vector", column)
    arrow = arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), _DIGEST_KEY: digest.encode()})
    buffer = io.BytesIO()
    pq.write_table(arrow, buffer)
    return write_bytes_atomic(shard_path(folder, shard), buffer.getvalue())


def read_shard_file(path: Path) -> tuple[pd.DataFrame, np.ndarray, str]:
    """(tile table, vectors ``[n, D]`` float32, plan digest) of a shard file."""
    arrow = pq.read_table(path)
    digest = (arrow.schema.metadata or {}).get(_DIGEST_KEY, b"").decode()
    column = arrow.column("vector").combine_chunks()
    dim = column.type.list_size
    vectors = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    table = arrow.drop_columns(["vector"]).replace_schema_metadata(None).to_pandas()
    return table, vectors, digest


# ----------------------------------------------------------------------------------------------
# The shard folder: plan.json, resume, merge
# ----------------------------------------------------------------------------------------------


def open_shard_folder(folder: Path, plan: ShardPlan, log: Log = print) -> set[int]:
    """Make ``folder`` hold this plan's shards; return the shards already finished.

    A folder left by another plan (other encoder, tiling, source version or shard size) is
    started over with a message. A shard file that is unreadable, has the wrong rows or was
    written for another plan is deleted and will be embedded again.
    """
    folder = Path(folder)
    recorded = _read_plan(folder)
    foreign = folder.exists() and recorded is None and not all(_is_shard_artifact(p) for p in folder.iterdir())
    if foreign:
        raise InputError(f"{folder}: exists and is not a cvgl shard folder; move it away or choose another --out")
    if recorded is not None and recorded.get("digest") != plan.digest:
        log(f"{folder}: shards were written for another build ({_plan_difference(recorded, plan)}); starting over")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / PLAN_FILE, plan.describe())
    finished: set[int] = set()
    for shard in range(plan.num_shards):
        path = shard_path(folder, shard)
        if not path.exists():
            continue
        if _valid_shard(path, plan, shard):
            finished.add(shard)
        else:
            log(f"{path}: incomplete or from another build; embedding it again")
            path.unlink()
    return finished


def _read_plan(folder: Path) -> dict | None:
    try:
        recorded = json.loads((folder / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def _is_shard_artifact(path: Path) -> bool:
    name = path.name
    return name == PLAN_FILE or (name.startswith("shard-") and name.endswith(".parquet")) or name.endswith(".tmp")


def _plan_difference(recorded: dict, plan: ShardPlan) -> str:
    current = plan.describe()
    changed = [key for key in ("encoder", "source", "shard_size", "tiles") if recorded.get(key) != current.get(key)]
    return "changed: " + ", ".join(changed) if changed else "the source file or tiling changed"


def _valid_shard(path: Path, plan: ShardPlan, shard: int) -> bool:
    try:
        table, vectors, digest = read_shard_file(path)
    except Exception:  # noqa: BLE001 - any reader failure means a partial or corrupt shard
        return False
    expected = plan.rows(shard)["tile_id"].tolist()
    return digest == plan.digest and table["tile_id"].tolist() == expected and np.isfinite(vectors).all()


def merge_shards(folder: Path, plan: ShardPlan) -> tuple[np.ndarray, pd.DataFrame]:
    """Concatenate every shard in shard order → (raw descriptors ``[N, D]``, tile table)."""
    tables, vectors = [], []
    for shard in range(plan.num_shards):
        path = shard_path(folder, shard)
        if not path.exists():
            raise InputError(f"{path}: missing; re-run the same command to embed it")
        table, vec, digest = read_shard_file(path)
        if digest != plan.digest:
            raise InputError(f"{path}: written for another build; re-run the same command to embed it again")
        tables.append(table)
        vectors.append(vec)
    return np.concatenate(vectors), pd.concat(tables, ignore_index=True)


def remove_shard_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# The in-process executor
# ----------------------------------------------------------------------------------------------


def embed_shard(encoder, images: list[np.ndarray], batch_size: int) -> np.ndarray:
    """One shard's descriptors: the encoder in batches within the shard (both executors)."""
    return encoder.encode(images, batch_size=batch_size)


def embed_in_process(
    plan: ShardPlan,
    folder: Path,
    encoder,
    todo: Iterable[int],
    batch_size: int = 16,
    on_shard: Callable[[int, int], None] | None = None,
) -> None:
    """Read, embed and write the shards ``todo`` one after another in this process.

    ``on_shard(shard, tiles)`` is called after each shard is on disk (progress, tests).
    """
    for shard in todo:
        images, table = read_shard(plan.source, plan.rows(shard))
        write_shard(folder, shard, table, embed_shard(encoder, images, batch_size), plan.digest)
        if on_shard is not None:
            on_shard(shard, len(table))
