"""Visual outputs of cvgl: an interactive HTML map and a retrieval-grid PNG.

* :func:`write_map_html` - folium map of locate results: embedded orthophoto overlay, per-query
  layers with prediction, top-k tiles, truth / error line and a similarity heatmap. Works offline
  (the orthophoto is embedded; without Leaflet from the CDN a static preview and table are shown).
* :func:`write_retrieval_grid` - one row per query: the query image, then its top-k tiles with
  rank, score and a green (correct) / red (wrong) frame.

Both write atomically (temporary file in the same folder, then ``os.replace``) and return the path.
"""

from cvgl.viz.grid import grid_size, write_retrieval_grid
from cvgl.viz.maps import write_map_html

__all__ = ["write_map_html", "write_retrieval_grid", "grid_size"]
