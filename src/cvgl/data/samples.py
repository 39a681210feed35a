"""The embedded demo region: WorldView-3 and WorldView-2 scenes of Longmont, Colorado.

Both ship in the PyPI package ``dgsamples`` (installed, never committed): the same 1 km² seen by
two sensors four months apart (WV2 2014-06 at 0.5 m, WV3 2014-10 at 0.3 m, panchromatic, UTM 13N),
a real appearance gap between query and reference.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cvgl.errors import InputError

_SCENES = {
    "wv3": "wv3_longmont_1k/055516443010_01_P001_PAN/14OCT06175136-P2AS-055516443010_01_P001.TIF",
    "wv2": "wv2_longmont_1k/053792616010_01_P001_PAN/14JUN20181517-P2AS-053792616010_01_P001.TIF",
}


def longmont_scene(name: str) -> Path:
    """Path of the ``wv3`` (reference) or ``wv2`` (query source) panchromatic GeoTIFF."""
    spec = importlib.util.find_spec("dgsamples")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("dgsamples: not installed; pip install --no-deps dgsamples==1.1.2 (make demo does this)")
    path = Path(list(spec.submodule_search_locations)[0]) / _SCENES[name]
    if not path.is_file():
        raise InputError(f"{path}: missing from the dgsamples install; reinstall dgsamples==1.1.2")
    return path
