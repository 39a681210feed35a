"""The evaluation a training config asks for, prepared once before the first step.

Building it up front means the Longmont photos are made once, the test split is read once, and
every module the protocol needs is imported before a long run starts, not half-way through it.
The protocols themselves live in :mod:`cvgl.evaluate`, so a trained row and a zero-shot row of a
benchmark are scored by the same code.
"""

from __future__ import annotations

from pathlib import Path

from cvgl.evaluate.retrieval import evaluate_split
from cvgl.models.encoder import Encoder
from cvgl.train.config import TrainConfig


class Evaluator:
    """``eval.protocol``: ``longmont`` (east-half drone protocol) or ``split`` (the dataset's test split)."""

    def __init__(self, config: TrainConfig, out: Path) -> None:
        self._protocol = None
        self._test_split = None
        if config.eval.protocol == "longmont":
            from cvgl.evaluate.longmont import LongmontProtocol

            self._protocol = LongmontProtocol(config.eval.per_family, config.eval.families, seed=0)
        else:
            from cvgl.train.data import test_split

            self._test_split = test_split(config, Path(out))

    def evaluate(self, query: Encoder, reference: Encoder) -> dict:
        """Metrics of this protocol for the two encoders (the caller puts the model in eval mode)."""
        if self._protocol is not None:
            return self._protocol.evaluate(query, reference)
        return evaluate_split(query, reference, self._test_split)
