"""Training-free street-level (ground → aerial) matching by geometry.

A street panorama (or a perspective photo turned into a partial panorama) is matched against
north-up aerial imagery through what the two views share, geometry:

* **polar columns** (:mod:`.products`, :mod:`.descriptors`): the aerial disc around a candidate
  centre, polar-transformed so each column is one azimuth, and the panorama, each encoded into one
  DINOv2 descriptor per azimuth column and compared column by column at a heading hypothesis;
* **bird's-eye view**: the panorama projected onto flat ground, its token map slid over the aerial
  token map with a translation search (tolerates the camera being metres off the candidate centre);
* **fusion, heading and evidence** (:mod:`.matching`): z-scores over candidates summed, the best
  heading hypothesis per candidate, and how far the winner stands above the best other place;
* **search over a region** (:mod:`.search`): candidate centres on a dense grid under a location
  prior, polar shortlist, BEV re-rank, camera position and heading; the region's stored products.
* **the entry point** (:mod:`.locate`): :func:`locate_street` = one photo against an index's tiles
  -> a schema-valid :class:`cvgl.answer.Answer` (what ``cvgl locate --view street`` should call);
  measured by ``cvgl bench street``.

Conventions and transforms: :mod:`.geometry`; a textured flat world rendered by code: :mod:`.synthetic`.
"""

from cvgl.street.descriptors import (
    TokenExtractor,
    column_descriptors,
    column_scores,
    column_shift_scores,
    normalise_token_map,
    token_map_scores,
)
from cvgl.street.geometry import (
    PanoramaBand,
    PinholeView,
    annulus_mask,
    azimuth_to_column,
    column_azimuths,
    panorama_to_bev,
    perspective_azimuth_range,
    perspective_to_panorama,
    polar_transform,
)
from cvgl.street.locate import (
    StreetOptions,
    StreetReference,
    locate_street,
    street_options,
)
from cvgl.street.matching import (
    CONFIDENCE_MODEL,
    HeadingPrior,
    StreetMatch,
    StreetRanking,
    StreetScores,
    confidence,
    evidence,
    fuse,
    match,
    rank,
    score_query,
    zscore,
)
from cvgl.street.products import (
    QueryProducts,
    ReferenceProducts,
    StreetConfig,
    StreetQuery,
    aerial_token_windows,
    candidate_grid,
    crop_token_windows,
    polar_columns,
    query_products,
    region_token_map,
    resample_to_gsd,
    storage_per_km2,
)
from cvgl.street.search import (
    RegionProducts,
    StreetAnswer,
    region_products,
    search_region,
)

__all__ = [
    "CONFIDENCE_MODEL",
    "HeadingPrior",
    "PanoramaBand",
    "PinholeView",
    "QueryProducts",
    "ReferenceProducts",
    "RegionProducts",
    "StreetAnswer",
    "StreetConfig",
    "StreetMatch",
    "StreetOptions",
    "StreetQuery",
    "StreetRanking",
    "StreetReference",
    "StreetScores",
    "TokenExtractor",
    "aerial_token_windows",
    "annulus_mask",
    "azimuth_to_column",
    "candidate_grid",
    "column_azimuths",
    "column_descriptors",
    "column_scores",
    "column_shift_scores",
    "confidence",
    "crop_token_windows",
    "evidence",
    "fuse",
    "locate_street",
    "match",
    "normalise_token_map",
    "panorama_to_bev",
    "perspective_azimuth_range",
    "perspective_to_panorama",
    "polar_columns",
    "polar_transform",
    "query_products",
    "rank",
    "region_products",
    "region_token_map",
    "resample_to_gsd",
    "score_query",
    "search_region",
    "storage_per_km2",
    "street_options",
    "token_map_scores",
    "zscore",
]
