"""The run's log: one JSON line per record in ``OUT/log.jsonl``, mirrored to TensorBoard when asked.

JSONL is the record of truth (always written, read by ``cvgl bench training``); TensorBoard is an
optional view of its numbers. After a resume the lines written past the checkpoint are dropped,
because the resumed run writes them again: the log then reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from cvgl.io import write_text_atomic

LOG = "log.jsonl"
TENSORBOARD = "tensorboard"


class RunLog:
    """Writes only when ``enabled`` (the main process), so every rank can call it unconditionally."""

    def __init__(self, out: Path, enabled: bool = True) -> None:
        self.path = Path(out) / LOG
        self.tensorboard_dir = Path(out) / TENSORBOARD
        self.enabled = enabled
        self._tb = None

    def write(self, record: dict) -> None:
        """Append ``record`` with a leading wall-clock ``time``; numbers go to TensorBoard by ``step``."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("time", "step", "epoch"):
                    self._tb.add_scalar(key, value, record.get("step", 0))

    def trim_after(self, step: int) -> None:
        """Drop lines of steps after ``step`` (the checkpoint's): the resumed run redoes them."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def open_tensorboard(self) -> None:
        """Start mirroring to ``OUT/tensorboard``; a no-op without the optional tensorboard package."""
        if not self.enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional; JSONL is always written
            return
        self._tb = SummaryWriter(str(self.tensorboard_dir))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None  # a closed SummaryWriter would silently open a new events file
