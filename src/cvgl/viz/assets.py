"""The map's JavaScript and CSS, shipped in the package (``cvgl/viz/static``), never from a CDN.

``static/leaflet/`` is Leaflet as released on npm (``npm pack leaflet@1.9.4``; ``LICENSE`` and
``VERSION`` beside it say which and how to update). The offline map file inlines it; the service
serves the same folder at ``/viz``.
"""

from __future__ import annotations

import base64
import re
from importlib import resources
from importlib.abc import Traversable

STATIC: Traversable = resources.files("cvgl.viz") / "static"
LEAFLET: Traversable = STATIC / "leaflet"


def static_text(name: str) -> str:
    """One of our own files in ``static/`` (``cvgl_style.js``, ``cvgl_layers.js``, ``map.css``...)."""
    return (STATIC / name).read_text(encoding="utf-8")


def leaflet_version() -> str:
    """The vendored Leaflet's version, from the first line of its ``VERSION`` note."""
    match = re.match(r"Leaflet (\S+)", (LEAFLET / "VERSION").read_text(encoding="utf-8"))
    if not match:
        raise RuntimeError("cvgl/viz/static/leaflet/VERSION does not start with 'Leaflet X.Y.Z'")
    return match.group(1)


def leaflet_js() -> str:
    """``leaflet.js`` to inline: its source-map comment removed (the map is not shipped)."""
    text = (LEAFLET / "leaflet.js").read_text(encoding="utf-8")
    return re.sub(r"\n//# sourceMappingURL=\S+\s*$", "\n", text)


def leaflet_css_inline() -> str:
    """``leaflet.css`` with its ``url(images/...)`` references turned into ``data:`` URIs."""

    def embed(match: re.Match) -> str:
        data = (LEAFLET / "images" / match.group(1)).read_bytes()
        return f"url(data:image/png;base64,{base64.b64encode(data).decode('ascii')})"

    return re.sub(r"url\(images/([\w.-]+\.png)\)", embed, (LEAFLET / "leaflet.css").read_text(encoding="utf-8"))
