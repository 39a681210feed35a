"""A textured flat world rendered by code: the same ground seen as a north-up aerial tile and as a panorama.

Why: the geometric transforms must agree with each other and with the conventions in
:mod:`cvgl.street.geometry` exactly; a ground texture known in closed form, rendered to both views
with a known camera position, height and heading, tells whether they do (tests, and a
sanity check of a whole pipeline without any real data).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cvgl.street.geometry import PanoramaBand, as_tensor, column_azimuths, sample_image

__all__ = ["GroundTexture", "panorama_from_aerial", "render_aerial", "render_panorama"]


@dataclass(frozen=True)
class GroundTexture:
    """A smooth RGB field ``T(east, north)`` in 0..255: a sum of random plane waves per channel.

    Wavelengths ``min_wavelength_m``..``max_wavelength_m`` in random directions, so the texture is
    anisotropic (a heading is identifiable) and has structure at street-view scales.
    """

    seed: int = 0
    waves: int = 40
    min_wavelength_m: float = 3.0
    max_wavelength_m: float = 25.0

    def _params(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        wavelength = np.exp(rng.uniform(np.log(self.min_wavelength_m), np.log(self.max_wavelength_m), (3, self.waves)))
        direction = rng.uniform(0.0, 2 * np.pi, (3, self.waves))
        freq = np.stack((np.sin(direction), np.cos(direction)), axis=-1) / wavelength[..., None]  # [3, waves, 2]
        phase = rng.uniform(0.0, 2 * np.pi, (3, self.waves))
        amplitude = rng.uniform(0.5, 1.0, (3, self.waves))
        return freq, phase, amplitude / amplitude.sum(1, keepdims=True)

    def __call__(self, east: np.ndarray, north: np.ndarray) -> np.ndarray:
        """``[..., 3]`` float RGB at ground points (metres)."""
        freq, phase, amplitude = self._params()
        e, n = np.asarray(east, dtype=np.float64), np.asarray(north, dtype=np.float64)
        out = np.empty(e.shape + (3,))
        for c in range(3):
            arg = 2 * np.pi * (e[..., None] * freq[c, :, 0] + n[..., None] * freq[c, :, 1]) + phase[c]
            out[..., c] = 128.0 + 110.0 * (np.cos(arg) * amplitude[c]).sum(-1)
        return out


def render_aerial(texture: GroundTexture, centre_m: tuple[float, float], size_px: int, gsd: float) -> np.ndarray:
    """A north-up ``size_px``² aerial tile (float RGB) centred on ``centre_m`` (east, north), ``gsd`` m/px."""
    offsets = (np.arange(size_px) + 0.5 - size_px / 2.0) * gsd
    east = centre_m[0] + offsets[None, :]
    north = centre_m[1] - offsets[:, None]
    return texture(*np.broadcast_arrays(east, north))


def render_panorama(
    texture: GroundTexture,
    camera_m: tuple[float, float],
    camera_height: float,
    size: tuple[int, int],
    band: PanoramaBand = PanoramaBand(),
    heading: float = 0.0,
    sky: float = 230.0,
) -> np.ndarray:
    """An equirectangular panorama (float RGB, ``size`` = (H, W)) of the flat textured ground seen from
    ``camera_height`` m above ``camera_m``; its centre column looks at azimuth ``heading``; sky is flat grey."""
    height, width = size
    azimuth = np.deg2rad(column_azimuths(width, heading))
    elevation = band.elevation_of(np.arange(height) + 0.5, height)
    out = np.full((height, width, 3), sky)
    ground = elevation < -0.5
    distance = camera_height / np.tan(np.deg2rad(-elevation[ground]))
    east = camera_m[0] + distance[:, None] * np.sin(azimuth)[None, :]
    north = camera_m[1] + distance[:, None] * np.cos(azimuth)[None, :]
    out[ground] = texture(east, north)
    return out


def panorama_from_aerial(
    aerial: np.ndarray,
    gsd: float,
    camera_px: tuple[float, float],
    camera_height: float,
    size: tuple[int, int],
    band: PanoramaBand = PanoramaBand(),
    heading: float = 0.0,
    sky: float = 230.0,
) -> np.ndarray:
    """A flat-world panorama (float RGB) of real aerial imagery: the ground of ``aerial`` (north-up,
    ``gsd`` m/px) seen from ``camera_height`` m above pixel ``camera_px`` (col, row); ground beyond
    the image and the sky are ``sky``."""
    height, width = size
    azimuth = np.deg2rad(column_azimuths(width, heading))
    elevation = band.elevation_of(np.arange(height) + 0.5, height)
    distance = camera_height / np.tan(np.deg2rad(np.clip(-elevation, 1e-3, None)))
    cols = camera_px[0] + distance[:, None] * np.sin(azimuth)[None, :] / gsd
    rows = camera_px[1] - distance[:, None] * np.cos(azimuth)[None, :] / gsd
    image = as_tensor(aerial)
    out = sample_image(torch.cat((image, torch.ones_like(image[:, :1])), 1), torch.from_numpy(cols)[None], torch.from_numpy(rows)[None])[0]
    inside = (out[-1] > 0.999).numpy() & (elevation < -0.5)[:, None]
    pano = np.full((height, width, image.shape[1]), sky)
    pano[inside] = out[:-1].permute(1, 2, 0).numpy()[inside]
    return pano
