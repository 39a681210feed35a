"""``cvgl index``: reference source (GeoTIFF or tile folder + CSV) -> encoded, aligned index.

The source is embedded shard by shard (:mod:`cvgl.index.shards`): in this process by default, or
on a Ray cluster with ``ray=RayOptions(...)`` (:mod:`cvgl.index.ray_embed`). Either way, a build
interrupted by a crash resumes from the shards already on disk when run again.

Before any work: an existing index at ``out`` built with other settings (source, tiling, encoder,
alignment, index type) is only replaced with ``overwrite=True`` (``cvgl index --overwrite``); the
grid, the vectors and a batch through the encoder are checked against the memory budget
(:mod:`cvgl.budget`); and a grid of more than :data:`WARN_TILES` cells is announced with a rough
time estimate (:data:`NOMINAL_TILES_PER_S`), so a 60-hour build is never a surprise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm import tqdm

from cvgl.alignment import DEFAULT_KIND, fit_alignment
from cvgl.budget import check_items, count_text
from cvgl.data.raster import raster_overview
from cvgl.data.tiling import TilingSpec, grid_size
from cvgl.errors import IndexFormatError, InputError
from cvgl.geo import typical_spacing_m
from cvgl.index.manifest import MANIFEST, read_manifest
from cvgl.index.ray_embed import RayOptions
from cvgl.index.shards import (
    DEFAULT_SHARD_SIZE,
    Log,
    embed_in_process,
    merge_shards,
    open_shard_folder,
    plan_source,
    remove_shard_folder,
    shard_folder,
)
from cvgl.index.store import check_output_folder, write_index
from cvgl.models.encoder import Encoder
from cvgl.models.weights import check_input_size

DEFAULT_TILING = TilingSpec()
#: Grids larger than this are announced before planning, with a time estimate: at the
#: :data:`NOMINAL_TILES_PER_S` below, 100 000 tiles are about two hours of encoding.
WARN_TILES = 100_000
#: ViT-S/14 at 224 px on 2 CPU cores, in process (docs/benchmarks.md, "throughput"); the
#: estimate scales it by the CPU count and the input's pixel count. Rough by design.
NOMINAL_TILES_PER_S = 13.7
#: Bytes per tile the index holds while it is written: raw + aligned descriptors + the backend's
#: copy (float32 each) per dimension.
VECTOR_COPIES = 3


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def build_index(
    source: Path,
    out: Path,
    encoder: Encoder,
    spec: TilingSpec = DEFAULT_TILING,
    alignment: str = DEFAULT_KIND,
    csv: Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    *,
    shard_size: int = DEFAULT_SHARD_SIZE,
    ray: RayOptions | None = None,
    index_type: str = "auto",
    log: Log = _stderr,
    overwrite: bool = False,
) -> Path:
    """Encode ``source`` and write an index folder at ``out`` (atomically).

    ``encoder`` embeds in process; with ``ray`` it only gives the identity the Ray actors must
    reproduce (they build their own from ``ray.recipe``). Shards live in ``OUT.shards`` until the
    index is written. ``index_type`` picks the vector index (see :func:`cvgl.index.store.write_index`). Only reference-side alignments can be fitted here (no queries exist yet);
    query-view statistics are fitted at locate time on the batch of photos. An index already at
    ``out`` built with other settings is replaced only with ``overwrite``.
    """
    out = Path(out)
    check_output_folder(out)  # fail before minutes of encoding, not after
    check_replace(out, Path(source), spec, encoder, alignment, index_type, overwrite)
    check_input_size(encoder.identity.input_size, encoder.identity.arch, "input size", batch=batch_size)
    if Path(source).is_file():
        cells = grid_size(Path(source), spec)
        check_items(f"{source}: an index of up to {count_text(cells)} tiles x {encoder.dim} dimensions", cells,
                    VECTOR_COPIES * 4 * encoder.dim, "use a larger --stride-m or --gsd, or cut the raster")
        if spec.gsd_m is not None:  # a shard's tile pixels are held in memory together
            side = round(spec.tile_m / spec.gsd_m)
            check_items(f"--shard-size {shard_size}: a shard of up to {count_text(min(cells, shard_size))} tiles of {side} px",
                        min(cells, int(shard_size)), side * side * 3.0 * 2, "use a smaller --shard-size (128 is the default)")
        if cells > WARN_TILES:
            log(f"warning: {source}: the grid has {count_text(cells)} tiles (before dropping nodata), over {WARN_TILES:,}; "
                f"encoding takes about {_eta(cells, encoder.identity.input_size)}; a larger --stride-m or --gsd, "
                "or --ray on a cluster, shortens it")
    plan = plan_source(Path(source), spec, encoder.identity, csv, shard_size)
    folder = shard_folder(out)
    finished = open_shard_folder(folder, plan, log)
    todo = [shard for shard in range(plan.num_shards) if shard not in finished]
    if finished:
        log(f"{folder}: resuming, {len(finished)} of {plan.num_shards} shards already embedded")
    done = sum(len(plan.rows(shard)) for shard in finished)
    with tqdm(total=len(plan.tiles), initial=done, desc="encoding tiles", unit="tile", disable=not progress) as bar:
        def on_shard(_shard: int, tiles: int) -> None:
            bar.update(tiles)

        if ray is None:
            embed_in_process(plan, folder, encoder, todo, batch_size, on_shard)
        elif todo:  # no Ray start-up when every shard is already on disk
            from cvgl.index.ray_embed import embed_with_ray, ray_session

            with ray_session(ray.address, ray.workers):
                embed_with_ray(plan, folder, todo, ray, batch_size, on_shard)
    raw, tiles = merge_shards(folder, plan)
    fitted = fit_alignment(alignment, raw)
    overview = None
    if plan.source.kind == "tile-folder":
        extra = {"source": {"kind": "tile-folder", "name": Path(source).name, "path": plan.source.path, "count": len(tiles)}}
        # A tile folder does not say how big its tiles are: take the spacing of their centres.
        extra["tile_m"] = typical_spacing_m(tiles["lat"].to_numpy(), tiles["lon"].to_numpy()) if len(tiles) > 1 else None
        extra["tile_m_estimated"] = True
    else:
        extra = {
            # The absolute path lets maps and grids re-read tile pixels later; not needed to search.
            "source": {"kind": "geotiff", "name": Path(source).name, "path": plan.source.path},
            "tiling": {"tile_m": spec.tile_m, "stride_m": spec.stride_m, "gsd_m": spec.gsd_m, "bands": spec.bands, "crs": spec.crs},
            "tile_m": spec.tile_m,
        }
        overview = raster_overview(source, max_side=1024, bands=spec.bands, stretch=spec.stretch, crs=spec.crs)
    extra["computed_with"] = {"precision": encoder.precision, "runtime": encoder.runtime}
    written = write_index(out, raw, tiles, encoder.identity, fitted, extra=extra, overview=overview, index_type=index_type)
    remove_shard_folder(folder)
    return written


def _eta(tiles: int, input_size: tuple[int, int]) -> str:
    """A rough encoding time for ``tiles`` (see :data:`NOMINAL_TILES_PER_S`)."""
    rate = NOMINAL_TILES_PER_S * max(1, os.cpu_count() or 1) / 2 * (224 * 224) / (input_size[0] * input_size[1])
    hours = tiles / rate / 3600
    when = f"{hours:.0f} h" if hours >= 2 else f"{hours * 60:.0f} min"
    return f"{when} at ~{rate:.0f} tiles/s (ViT-S/14 on {os.cpu_count()} CPU cores)"


def check_replace(out: Path, source: Path, spec: TilingSpec, encoder: Encoder, alignment: str, index_type: str,
                  overwrite: bool) -> None:
    """Refuse to replace an index at ``out`` that was built with other settings, unless
    ``overwrite``: rebuilding the same index (a re-run) is fine, silently swapping a user's
    index for a different one is not."""
    if overwrite or not (out / MANIFEST).is_file():
        return
    try:
        old = read_manifest(out)
    except IndexFormatError:
        changes = ["its manifest is unreadable"]
    else:
        changes = []
        new_path = str(source.resolve())
        if old.source is None or old.source.path != new_path:
            changes.append(f"source {old.source.name if old.source else '?'} -> {source.name}")
        if source.is_file():
            was = old.tiling
            now = (spec.tile_m, spec.stride_m, spec.gsd_m, spec.bands, spec.crs)
            before = None if was is None else (was.tile_m, was.stride_m, was.gsd_m, was.bands, was.crs)
            if before != now:
                changes.append("tiling (tile_m, stride_m, gsd_m, bands, crs) "
                               f"{'none' if before is None else list(before)} -> {list(now)}")
        if old.encoder.differences(encoder.identity):
            changes.append(f"encoder ({', '.join(old.encoder.differences(encoder.identity))})")
        if old.alignment.get("kind") != alignment:
            changes.append(f"alignment {old.alignment.get('kind')} -> {alignment}")
        if index_type != "auto" and old.index_type != index_type:
            changes.append(f"index type {old.index_type} -> {index_type}")
    if changes:
        raise InputError(f"{out}: holds an index built with other settings ({'; '.join(changes)}); "
                         "pass --overwrite to replace it, or choose another --out")
