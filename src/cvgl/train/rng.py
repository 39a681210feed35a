"""The process-wide random generators (Python, NumPy, torch): seeding, and capture/restore for resume.

Augmentation and sampling draw from their own seeded generators, but anything that still uses a
global generator (dropout, library code) must continue where it stopped for a resumed run to be
bit-exact, so a checkpoint carries all three states. They are stored as tensors and plain
Python values so ``torch.load(weights_only=True)`` can read them back.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
