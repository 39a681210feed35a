"""Atomic file writes: results are never half-written, whatever interrupts us."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from cvgl.errors import InputError


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs should read like any other file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def finite_json(data: object) -> object:
    """``data`` with every NaN / infinity replaced by ``null``: JSON has no such numbers, and a
    reader must never be handed ``NaN`` (most parsers reject it; the rest silently propagate it)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def dumps_json(data: object, indent: int | None = None) -> str:
    """Strict JSON text (no NaN/Infinity, see :func:`finite_json`)."""
    return json.dumps(finite_json(data), indent=indent, allow_nan=False)


def write_json_atomic(path: Path, data: object) -> Path:
    return write_text_atomic(path, dumps_json(data, indent=2) + "\n")


def write_jsonl_atomic(path: Path, rows: list) -> Path:
    """One strict JSON object per line (JSON Lines)."""
    return write_text_atomic(path, "".join(dumps_json(row) + "\n" for row in rows))


def check_output_path(path: Path, what: str = "output") -> None:
    """Refuse, before any work, an output path that cannot be written: a folder, a path under a
    file, or a folder we may not write into. Raises ``cvgl.errors.InputError``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: {what} is a folder; give a file name")
    parent = path.parent
    for ancestor in [parent, *parent.parents]:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise InputError(f"{path}: {what} lies under {ancestor}, which is a file")
            if not os.access(ancestor, os.W_OK):
                raise InputError(f"{path}: {what}: cannot write into {ancestor}")
            return
