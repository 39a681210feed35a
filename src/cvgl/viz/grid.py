"""Retrieval grid: one PNG row per query, the query image then its top-k tiles.

Under every tile: its rank and score. Frame: green when the tile is a correct match, red when it
is wrong, none when unknown. Drawn with Pillow only (no matplotlib), so it is fast and has no
backend concerns.

Layout (all in pixels, see :func:`grid_size`)::

    PAD | title (TITLE_H)
    PAD | [query] PAD [tile 1] PAD [tile 2] ... PAD      <- cell x cell images
        |  name       #1 0.81    #2 0.77                  <- LABEL_H
    PAD | next row ...
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from cvgl.io import write_bytes_atomic

__all__ = ["FRAME", "LABEL_H", "PAD", "TITLE_H", "grid_size", "write_retrieval_grid"]

PAD = 8  #: gap between cells and around the image
TITLE_H = 30  #: height of the title band
LABEL_H = 22  #: height of the text band under each row
FRAME = 5  #: width of the correct / wrong frame

_GREEN = (0, 170, 60)
_RED = (220, 30, 30)
_BG = (255, 255, 255)
_TEXT = (20, 20, 20)


def grid_size(n_rows: int, n_tiles: int, cell: int = 160) -> tuple[int, int]:
    """(width, height) of a grid with ``n_rows`` rows of one query plus ``n_tiles`` tiles."""
    width = max(PAD + (1 + n_tiles) * (cell + PAD), 320)  # 320: room for the title
    height = TITLE_H + n_rows * (cell + LABEL_H + PAD) + PAD
    return width, height


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _to_pil(image: Any) -> Image.Image:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or arr.size == 0:
        raise ValueError(f"expected an HxWx3 uint8 image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    if arr.ndim == 3:
        arr = arr[:, :, :3]
    return Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")


def _fit(image: Image.Image, cell: int) -> Image.Image:
    """Letterbox ``image`` into a ``cell`` x ``cell`` square (keeps the aspect ratio)."""
    image = ImageOps.contain(image, (cell, cell), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (cell, cell), (235, 235, 235))
    canvas.paste(image, ((cell - image.width) // 2, (cell - image.height) // 2))
    return canvas


def _fit_text(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int, keep_end: bool = False
) -> str:
    """Shorten ``text`` with "..." until it fits ``width`` pixels (file names: keep the end)."""
    if draw.textlength(text, font=font) <= width:
        return text
    if keep_end:
        while text and draw.textlength("..." + text, font=font) > width:
            text = text[1:]
        return "..." + text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def _get(seq: Sequence | None, k: int) -> Any:
    return seq[k] if seq is not None and k < len(seq) else None


def write_retrieval_grid(
    out_path: str | os.PathLike,
    rows: list[dict],
    max_rows: int = 12,
    *,
    cell: int = 160,
    title: str = "cvgl retrieval",
) -> Path:
    """Write a PNG grid of queries and their top-k tiles; returns the path.

    Args:
        out_path: PNG file to write (parent folders are created; written atomically).
        rows: one dict per query: ``query_image`` (HxWx3 uint8), ``query_name`` (str), ``tiles``
            (list of HxWx3 uint8, best first), ``scores`` (list of float, aligned with
            ``tiles``) and ``correct`` (list of ``True``/``False``/``None``: green frame, red
            frame, no frame). Missing scores / correctness entries count as unknown.
        max_rows: at most this many rows are drawn (the first ones); the title says when capped.
        cell: side of each image cell in pixels (images are letterboxed into it).
        title: text at the top of the image.

    The image is :func:`grid_size` ``(min(len(rows), max_rows), max tiles per row, cell)``.
    """
    out = Path(out_path)
    rows = list(rows or [])
    shown = rows[: max(0, int(max_rows))]
    n_tiles = max((len(r.get("tiles") or []) for r in shown), default=0)
    width, height = grid_size(len(shown), n_tiles, cell)
    canvas = Image.new("RGB", (width, height), _BG)
    draw = ImageDraw.Draw(canvas)
    title_font = _font(16)
    label_font = _font(13)

    heading = f"{title}: {len(rows)} quer{'y' if len(rows) == 1 else 'ies'}"
    if len(shown) < len(rows):
        heading += f" (showing first {len(shown)} of {len(rows)}, capped at max_rows={max_rows})"
    if not rows:
        heading += " (nothing to show)"
    heading = _fit_text(draw, heading, title_font, width - 2 * PAD)
    draw.text((PAD, (TITLE_H - 16) // 2), heading, fill=_TEXT, font=title_font)

    for r, row in enumerate(shown):
        y = TITLE_H + r * (cell + LABEL_H + PAD)
        text_y = y + cell + 3

        # Query.
        x = PAD
        if row.get("query_image") is not None:
            canvas.paste(_fit(_to_pil(row["query_image"]), cell), (x, y))
        else:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(235, 235, 235))
        draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(60, 60, 200), width=2)
        name = str(row.get("query_name") or f"query {r + 1}")
        name = _fit_text(draw, name, label_font, cell, keep_end=True)
        draw.text((x, text_y), name, fill=_TEXT, font=label_font)

        # Top-k tiles.
        scores = row.get("scores")
        correct = row.get("correct")
        for k, tile in enumerate(row.get("tiles") or []):
            x = PAD + (k + 1) * (cell + PAD)
            canvas.paste(_fit(_to_pil(tile), cell), (x, y))
            ok = _get(correct, k)
            if ok is not None:
                frame = _GREEN if bool(ok) else _RED
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=frame, width=FRAME)
            score = _get(scores, k)
            label = f"#{k + 1}"
            if score is not None:
                try:
                    label += f"  {float(score):.4f}"
                except (TypeError, ValueError):
                    label += f"  {score}"
            if ok is not None:
                label += "  ok" if bool(ok) else "  wrong"
            colour = _TEXT if ok is None else (_GREEN if bool(ok) else _RED)
            draw.text((x, text_y), _fit_text(draw, label, label_font, cell), fill=colour, font=label_font)

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    write_bytes_atomic(out, buffer.getvalue())
    return out
