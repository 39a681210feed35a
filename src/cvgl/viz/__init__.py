"""Visual outputs of cvgl: an offline interactive HTML map and a retrieval-grid PNG.

* :func:`write_map_html` - one self-contained HTML file (Leaflet inlined, no network): the
  orthophoto (or the index's tiles at their coordinates), predictions with their uncertainty,
  truth and error lines, top-k tiles, verified footprints, camera positions, tracks, a legend.
  Built from :mod:`cvgl.viz.layers` (answers -> GeoJSON) and :mod:`cvgl.viz.basemap`.
* :func:`write_retrieval_grid` - one row per query: the query image, then its top-k tiles with
  rank, score and a green (correct) / red (wrong) frame.

Both write atomically (temporary file in the same folder, then ``os.replace``) and return the path.
"""

from cvgl.viz.grid import grid_size, write_retrieval_grid
from cvgl.viz.maps import write_map_html

__all__ = ["grid_size", "write_map_html", "write_retrieval_grid"]
