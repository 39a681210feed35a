"""The one vocabulary of camera views: what a photo (or a dataset's image) looks like.

``drone`` — from above, nadir or oblique; ``street`` — from the ground (perspective photo or
panorama); ``aerial`` — satellite or orthophoto tiles, north-up, the reference side. Datasets
that call their reference images "satellite" are read with that name as an alias.
"""

from __future__ import annotations

VIEWS = ("drone", "street", "aerial")
ALIASES = {"satellite": "aerial"}


def canonical_view(name: str, where: str = "view") -> str:
    """``name`` as one of :data:`VIEWS` (aliases resolved); ``ValueError`` naming ``where`` otherwise."""
    view = ALIASES.get(name, name)
    if view not in VIEWS:
        raise ValueError(f"{where}: {name!r} is not one of {', '.join(VIEWS)}")
    return view
