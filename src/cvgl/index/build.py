"""``cvgl index``: reference source (GeoTIFF or tile folder + CSV) -> encoded, aligned index.

The source is embedded shard by shard (:mod:`cvgl.index.shards`): in this process by default, or
on a Ray cluster with ``ray=RayOptions(...)`` (:mod:`cvgl.index.ray_embed`). Either way, a build
interrupted by a crash resumes from the shards already on disk when run again.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from cvgl.alignment import DEFAULT_KIND, fit_alignment
from cvgl.data.raster import raster_overview
from cvgl.data.tiling import TilingSpec
from cvgl.geo import typical_spacing_m
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

DEFAULT_TILING = TilingSpec()


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
) -> Path:
    """Encode ``source`` and write an index folder at ``out`` (atomically).

    ``encoder`` embeds in process; with ``ray`` it only gives the identity the Ray actors must
    reproduce (they build their own from ``ray.recipe``). Shards live in ``OUT.shards`` until the
    index is written. ``index_type`` picks the vector index (see :func:`cvgl.index.store.write_index`). Only reference-side alignments can be fitted here (no queries exist yet);
    query-view statistics are fitted at locate time on the batch of photos.
    """
    out = Path(out)
    check_output_folder(out)  # fail before minutes of encoding, not after
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
            "tiling": {"tile_m": spec.tile_m, "stride_m": spec.stride_m, "gsd_m": spec.gsd_m, "bands": spec.bands},
            "tile_m": spec.tile_m,
        }
        overview = raster_overview(source, max_side=1024, bands=spec.bands, stretch=spec.stretch)
    written = write_index(out, raw, tiles, encoder.identity, fitted, extra=extra, overview=overview, index_type=index_type)
    remove_shard_folder(folder)
    return written
