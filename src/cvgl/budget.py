"""The memory budget: how much one cvgl command may plan to allocate, checked before the work.

Why: a single number from a user or a file (an altitude of 100 km, ``--rotations 100000``, a
0.001 m stride, a 14000 px input size, a 196-megapixel PNG) can turn into hundreds of gigabytes
of pixels, hypotheses or grid cells. Failing after minutes with a ``MemoryError`` (or the OOM
killer) is the worst answer; every size, count and scale that reaches an allocation is instead
turned into a byte estimate *before* the allocation and compared with this budget, and refused
with one line that names the input, the number and the budget (:class:`cvgl.errors.InputError`).

The budget is, in this order:

* ``$CVGL_MEMORY_BUDGET`` when set: a size such as ``4GiB``, ``512MiB``, ``2G``, ``1.5e9`` (bytes);
* otherwise :data:`RAM_FRACTION` (half) of the RAM available *now* (``MemAvailable``), capped at
  :data:`MAX_BUDGET_BYTES` (8 GiB) and never below :data:`MIN_BUDGET_BYTES` (256 MiB).

It bounds what one input asks for (one photo's hypotheses, one raster's grid, one index's
vectors), not the process: the interpreter, torch and the model weights (about 1 GB resident
for the tiny test ViT, more for real weights) come on top.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from cvgl.errors import InputError

ENV = "CVGL_MEMORY_BUDGET"
GIB = 1024**3
MIB = 1024**2
#: Share of the available RAM one input may plan to use when ``$CVGL_MEMORY_BUDGET`` is unset.
RAM_FRACTION = 0.5
#: The documented cap: no input may plan more than this unless ``$CVGL_MEMORY_BUDGET`` says so.
MAX_BUDGET_BYTES = 8 * GIB
#: The floor: a busy machine still localises an ordinary photo.
MIN_BUDGET_BYTES = 256 * MIB

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": MIB,
    "g": 1000**3, "gb": 1000**3, "gib": GIB,
    "t": 1000**4, "tb": 1000**4, "tib": 1024**4,
}


def available_ram_bytes() -> int:
    """Bytes of RAM available now (``MemAvailable``), or total physical RAM where /proc is absent."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_size(text: str) -> int:
    """``"4GiB"`` -> 4294967296; plain numbers are bytes. Raises :class:`InputError`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
    if not match or match.group(2) not in _UNITS:
        raise InputError(f"{ENV}='{text}': not a size; give bytes or a number with a unit, e.g. 4GiB or 512MiB")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if not (math.isfinite(value) and value >= 1):
        raise InputError(f"{ENV}='{text}': the budget must be at least one byte")
    return int(value)


def memory_budget() -> int:
    """The budget in bytes (see the module docstring); read each time, so a test can set the variable."""
    override = os.environ.get(ENV, "").strip()
    if override:
        return parse_size(override)
    return int(max(MIN_BUDGET_BYTES, min(MAX_BUDGET_BYTES, RAM_FRACTION * available_ram_bytes())))


def describe_budget() -> str:
    """Where the budget comes from, for messages."""
    if os.environ.get(ENV, "").strip():
        return f"memory budget of {format_bytes(memory_budget())} (set by {ENV})"
    return f"memory budget of {format_bytes(memory_budget())} (half the available RAM, at most {format_bytes(MAX_BUDGET_BYTES)}; set {ENV} to change it)"


def format_bytes(n: float) -> str:
    """Binary units, three significant digits: ``9.4 GiB``."""
    if not math.isfinite(n):
        return "an unbounded amount"
    for unit, size in (("TiB", 1024**4), ("GiB", GIB), ("MiB", MIB), ("KiB", 1024)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g} {unit}" if value < 1e4 else f"{value:.3e} {unit}"
    return f"{int(n)} B"


def check_allocation(what: str, nbytes: float, advice: str = "") -> None:
    """Refuse, before any work, a plan that needs more than the budget.

    ``what`` names the input and the number ("photo.jpg: 100000 heading hypotheses of a
    4000x3000 canvas"); ``advice`` says what to change. Non-finite sizes count as over.
    """
    budget = memory_budget()
    if not (math.isfinite(nbytes) and nbytes <= budget):
        tail = f"; {advice}" if advice else ""
        raise InputError(f"{what} needs about {format_bytes(nbytes)}, over the {describe_budget()}{tail}")


def image_bytes(height: float, width: float, channels: int = 3, itemsize: int = 1) -> float:
    """Bytes of one ``height x width x channels`` array of ``itemsize``-byte values (floats: no overflow)."""
    return float(height) * float(width) * float(channels) * float(itemsize)


def check_image(what: str, height: float, width: float, channels: int = 3, itemsize: int = 1,
                copies: float = 1.0, advice: str = "") -> None:
    """:func:`check_allocation` for ``copies`` images of ``height x width x channels``."""
    size = f"{count_text(width)}x{count_text(height)} px"
    check_allocation(f"{what} ({size})", copies * image_bytes(height, width, channels, itemsize), advice)


def check_items(what: str, count: float, bytes_each: float, advice: str = "") -> None:
    """:func:`check_allocation` for ``count`` items of ``bytes_each`` (grid cells, vectors, hypotheses);
    ``what`` names the input and the count."""
    check_allocation(what, float(count) * float(bytes_each), advice)


def count_text(value: float) -> str:
    """A count for messages: digits up to ten million, then ``1.23e+12``."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.0f}" if abs(value) < 1e7 else f"{value:.3g}"
