"""An encoder's identity: what must be equal for two encoders' descriptors to be comparable.

It is written into every index manifest and checked when the index is opened for search, so a
query is never scored against tiles encoded by another model, head, input size or normalisation
(:class:`cvgl.errors.IndexMismatchError`). Torch-free: the index layer reads it without a model.

``preset`` names the recipe for people; it is not compared (two names for one recipe are the
same encoder). Precision and runtime are not part of the identity either: they change how fast a
descriptor is computed, not what it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from cvgl.errors import IndexFormatError

#: Fields compared by :meth:`EncoderIdentity.differences` (all but the human-readable name).
COMPARED = ("arch", "weights_sha256", "input_size", "mean", "std", "head")


@dataclass(frozen=True)
class EncoderIdentity:
    preset: str
    arch: str
    weights_sha256: str
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    head: dict = field(default_factory=dict)  # the head recipe (zero-shot) or {"trained": model config}

    def to_dict(self) -> dict:
        """The manifest form (JSON: lists, not tuples)."""
        return {
            "preset": self.preset,
            "arch": self.arch,
            "weights_sha256": self.weights_sha256,
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "head": json.loads(json.dumps(self.head)),
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "encoder identity") -> EncoderIdentity:
        if not isinstance(data, dict):
            raise IndexFormatError(f"{where}: the encoder identity is not a mapping; rebuild the index")
        missing = [key for key in ("preset", *COMPARED) if key not in data]
        if missing:
            raise IndexFormatError(f"{where}: the encoder identity lacks '{missing[0]}'; rebuild the index")
        try:
            size = tuple(int(v) for v in data["input_size"])
            mean = tuple(float(v) for v in data["mean"])
            std = tuple(float(v) for v in data["std"])
        except (TypeError, ValueError):
            raise IndexFormatError(f"{where}: input_size, mean and std must be lists of numbers; rebuild the index") from None
        if len(size) != 2 or min(size) <= 0 or any(v % 14 for v in size):
            raise IndexFormatError(f"{where}: input_size {list(size)} is not two positive multiples of 14; rebuild the index")
        if not isinstance(data["head"], dict):
            raise IndexFormatError(f"{where}: the head recipe is not a mapping; rebuild the index")
        return cls(str(data["preset"]), str(data["arch"]), str(data["weights_sha256"]), size, mean, std, dict(data["head"]))

    def differences(self, other: EncoderIdentity) -> list[str]:
        """Names of the compared fields that differ (empty: the encoders are interchangeable)."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [key for key in COMPARED if _canon(mine[key]) != _canon(theirs[key])]

    def describe_differences(self, other: EncoderIdentity) -> str:
        """``key: self=... vs other=...`` for each differing field, shortened for one line."""
        mine, theirs = self.to_dict(), other.to_dict()
        return ", ".join(f"{k}: index={_short(mine[k])} vs encoder={_short(theirs[k])}" for k in self.differences(other))


def _canon(value) -> str:
    return json.dumps(value, sort_keys=True)


def _short(value) -> str:
    text = _canon(value)
    return text if len(text) <= 24 else text[:21] + "..."
