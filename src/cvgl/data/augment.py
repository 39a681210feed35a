"""Paired augmentations that keep a query and its reference showing the same geometry.

A cross-view pair is only a positive while both views agree on where north is. Flipping or
rotating one view alone turns it into a hard false pair, so geometric changes are drawn once
and applied to both views in the matching form:

* ``kind="aerial"`` (drone <-> satellite): the same dihedral transform on both images - a
  horizontal flip, then a rotation by ``k * 90`` degrees counter-clockwise (``torch.rot90`` on
  the H, W axes). Rotating by odd ``k`` needs square images.
* ``kind="panorama"`` (street panorama query <-> north-up satellite reference): a horizontal flip
  of both (mirroring east and west in both views), then the satellite rotated ``k * 90`` degrees
  counter-clockwise and the panorama rolled LEFT by ``k / 4`` of its width.

  Panorama convention (CVUSA, CVACT, VIGOR): columns sweep the azimuth clockwise from the left
  edge, and the centre column looks north, so column ``x`` of a width-``W`` panorama looks at
  azimuth ``(x + 0.5) / W * 360 - 180`` degrees (clockwise from north). Rotating the satellite
  counter-clockwise by 90 degrees brings what was east to the top, i.e. makes it the new north;
  the panorama's centre must then show what was east, which sat a quarter width right of the
  centre: a roll left by ``W / 4``. Rolling by the full width is the identity.

``query_rotation_deg`` > 0 (aerial only) also turns the query alone by a small angle drawn uniformly
in ``+-query_rotation_deg``: a drone photo whose heading is unknown is tried at a few rotations, so
the best one is still off by up to half their spacing (11.25 degrees for 16), and a model trained
only on exactly north-up pairs learns to reject what it will be shown at locate time.

Photometric jitter (brightness and contrast, small) is drawn independently per view: the two
views come from different sensors, so their colours need not change together.

Every draw comes from a generator seeded by ``(seed, epoch, index)`` and nothing else: the
augmentation of a sample does not depend on which worker loads it or on what was drawn before,
so a resumed run reproduces it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

__all__ = ["AugmentDraw", "PairedAugment", "dihedral", "roll_panorama"]


@dataclass(frozen=True)
class AugmentDraw:
    """One sample's random choices: the shared geometry and each view's photometric change."""

    flip: bool
    quarter_turns: int  # counter-clockwise quarter turns of the aerial view(s), 0..3
    query_brightness: float
    query_contrast: float
    reference_brightness: float
    reference_contrast: float
    query_angle_deg: float = 0.0  # clockwise turn of the query alone (see query_rotation_deg)


def dihedral(image: torch.Tensor, flip: bool, quarter_turns: int) -> torch.Tensor:
    """Horizontal flip (if ``flip``) then ``quarter_turns`` x 90 degrees counter-clockwise, on [..., H, W]."""
    if flip:
        image = torch.flip(image, dims=(-1,))
    if quarter_turns % 4:
        image = torch.rot90(image, k=quarter_turns % 4, dims=(-2, -1))
    return image


def roll_panorama(panorama: torch.Tensor, quarter_turns: int) -> torch.Tensor:
    """The panorama seen after its satellite turned ``quarter_turns`` x 90 degrees counter-clockwise.

    A roll to the left by ``quarter_turns / 4`` of the width (rounded to whole columns when the
    width is not a multiple of 4); four quarter turns are exactly the identity.
    """
    width = panorama.shape[-1]
    shift = round(quarter_turns * width / 4)
    return torch.roll(panorama, shifts=-shift, dims=-1) if shift % width else panorama


def _photometric(image: torch.Tensor, brightness: float, contrast: float) -> torch.Tensor:
    """Contrast about the image's mean grey level, then a brightness gain, clamped to [0, 1]."""
    mean = image.mean()
    return ((image - mean) * contrast + mean).mul(brightness).clamp(0.0, 1.0)


class PairedAugment:
    """Consistent flips/rotations for a pair plus independent small photometric jitter.

    ``aug(query, reference, epoch=e, index=i)`` takes float tensors ``[3, H, W]`` in [0, 1] and
    returns the augmented pair; ``jitter`` is the largest relative change of brightness and of
    contrast (0 disables it).
    """

    def __init__(
        self,
        kind: Literal["aerial", "panorama"],
        flip: bool = True,
        rotate: bool = True,
        jitter: float = 0.1,
        seed: int = 0,
        query_rotation_deg: float = 0.0,
    ) -> None:
        if kind not in ("aerial", "panorama"):
            raise ValueError(f"PairedAugment: kind must be 'aerial' or 'panorama', got {kind!r}")
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"PairedAugment: jitter must be in [0, 1), got {jitter}")
        self.kind = kind
        self.flip = bool(flip)
        self.rotate = bool(rotate)
        if not 0.0 <= query_rotation_deg <= 45.0 or (query_rotation_deg and kind != "aerial"):
            raise ValueError(f"PairedAugment: query_rotation_deg must be in [0, 45] and only for aerial pairs, got {query_rotation_deg}")
        self.jitter = float(jitter)
        self.seed = int(seed)
        self.query_rotation_deg = float(query_rotation_deg)

    def generator(self, epoch: int, index: int) -> torch.Generator:
        """The generator of sample ``index`` in ``epoch``: a pure function of (seed, epoch, index)."""
        state = np.random.SeedSequence([self.seed, int(epoch), int(index)]).generate_state(2, np.uint32)
        return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)

    def draw(self, generator: torch.Generator) -> AugmentDraw:
        """Draw one sample's choices; always consumes the same number of values from ``generator``."""
        u = torch.rand(6, generator=generator, dtype=torch.float64).tolist()
        spread = lambda x: 1.0 + self.jitter * (2.0 * x - 1.0)
        angle = 0.0
        if self.query_rotation_deg:  # drawn after the six, so runs without it keep their draws
            angle = self.query_rotation_deg * (2.0 * float(torch.rand(1, generator=generator, dtype=torch.float64)) - 1.0)
        return AugmentDraw(
            flip=self.flip and u[0] < 0.5,
            quarter_turns=min(int(u[1] * 4), 3) if self.rotate else 0,
            query_brightness=spread(u[2]),
            query_contrast=spread(u[3]),
            reference_brightness=spread(u[4]),
            reference_contrast=spread(u[5]),
            query_angle_deg=angle,
        )

    def apply(self, query: torch.Tensor, reference: torch.Tensor, d: AugmentDraw) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply drawn choices ``d`` to a pair (see the module docstring for the geometry)."""
        if self.kind == "aerial":
            if d.quarter_turns % 2:
                self._need_square(query, "query")
            query = dihedral(query, d.flip, d.quarter_turns)
            if d.query_angle_deg:
                from torchvision.transforms import InterpolationMode  # lazy: torchvision costs seconds to import
                from torchvision.transforms.v2.functional import rotate

                query = rotate(query, -d.query_angle_deg, interpolation=InterpolationMode.BILINEAR)  # v2: counter-clockwise
        else:
            query = roll_panorama(dihedral(query, d.flip, 0), d.quarter_turns)
        if d.quarter_turns % 2:
            self._need_square(reference, "reference")
        reference = dihedral(reference, d.flip, d.quarter_turns)
        if self.jitter > 0.0:
            query = _photometric(query, d.query_brightness, d.query_contrast)
            reference = _photometric(reference, d.reference_brightness, d.reference_contrast)
        return query.contiguous(), reference.contiguous()

    def __call__(
        self, query: torch.Tensor, reference: torch.Tensor, *, epoch: int = 0, index: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.apply(query, reference, self.draw(self.generator(epoch, index)))

    def check_sizes(self, query_size: tuple[int, int], reference_size: tuple[int, int]) -> None:
        """Fail at dataset construction, not mid-epoch, when a rotated view is not square."""
        if not self.rotate:
            return
        rotated = [("reference", reference_size)] + ([("query", query_size)] if self.kind == "aerial" else [])
        for role, (h, w) in rotated:
            if h != w:
                raise ValueError(f"PairedAugment: rotating the {role} needs a square size, got {h}x{w}")

    @staticmethod
    def _need_square(image: torch.Tensor, role: str) -> None:
        if image.shape[-1] != image.shape[-2]:
            raise ValueError(
                f"PairedAugment: a quarter turn of the {role} needs a square image, got "
                f"{image.shape[-2]}x{image.shape[-1]}"
            )

    def __repr__(self) -> str:
        return (f"PairedAugment(kind={self.kind!r}, flip={self.flip}, rotate={self.rotate}, "
                f"jitter={self.jitter}, seed={self.seed}, query_rotation_deg={self.query_rotation_deg})")
