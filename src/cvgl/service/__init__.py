"""``cvgl serve``: the HTTP service (FastAPI) and its offline map page."""

from __future__ import annotations

from cvgl.service.app import create_app, detect_image_type, safe_name

__all__ = ["create_app", "detect_image_type", "safe_name"]
