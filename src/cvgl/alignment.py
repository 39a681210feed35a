"""Statistical alignment of query-view and reference-view descriptor distributions.

Every alignment here is a per-view affine map ``y = normalize((x - mean_v) @ W_v)`` fitted once —
saved with the index (reference-side kinds) or, for query-view statistics, fitted once on photos
the user chooses and saved as a file (``cvgl align``, then ``--query-alignment``) — so applying it
is one matrix product. What differs is *what
it is fitted on*, and that is recorded in :attr:`Alignment.fitted_on`:

=================  ==============================================  ======================
kind               fitted on                                        uses query labels?
=================  ==============================================  ======================
``none``           nothing                                          no
``center``         reference set (+ optional unlabelled queries)    no
``pca-whiten``     reference set                                    no
``coral``          reference set + unlabelled query-view sample     no
``procrustes``     explicit anchor pairs (a *train* split)          only the train split's
``mnn-procrustes`` reference set + unlabelled query-view sample     no (pairs are mutual NNs)
=================  ==============================================  ======================

The public VFM-Loc code fits PCA + Procrustes on the *test* pairs: that is ``procrustes`` called
with the test set as anchors. :func:`fit_alignment` accepts it only with ``leaky=True`` and marks
the result ``"leaky": true`` so a benchmark table can never present it as a deployable number.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cvgl.errors import InputError
from cvgl.io import write_bytes_atomic

KINDS = ("none", "center", "pca-whiten", "coral", "procrustes", "mnn-procrustes")
# Measured on Longmont (`cvgl bench longmont`): with block-8 GeM, centring on the reference
# alone lowers R@1 while statistics of unlabelled query photos (center/coral on the batch, see
# ``cvgl align`` + ``--query-alignment``) raise it; so an index stores no alignment by default.
DEFAULT_KIND = "none"


def l2n(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero); keeps the dtype."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass
class Alignment:
    """A fitted per-view affine transform; ``apply(x, view)`` returns L2-normalised vectors."""

    kind: str
    query_mean: np.ndarray
    query_matrix: np.ndarray
    reference_mean: np.ndarray
    reference_matrix: np.ndarray
    fitted_on: dict = field(default_factory=dict)

    def apply(self, x: np.ndarray, view: str) -> np.ndarray:
        """``view`` is "query" or "reference"."""
        x = np.asarray(x, dtype=np.float32)
        if view == "query":
            return l2n((x - self.query_mean) @ self.query_matrix).astype(np.float32)
        if view == "reference":
            return l2n((x - self.reference_mean) @ self.reference_matrix).astype(np.float32)
        raise ValueError(f"view must be 'query' or 'reference', got '{view}'")

    @property
    def leaky(self) -> bool:
        return bool(self.fitted_on.get("leaky", False))

    def describe(self) -> dict:
        return {"kind": self.kind, **self.fitted_on}

    def digest(self) -> str:
        """sha256 of the kind and the four arrays: names a fitted alignment in every answer."""
        h = hashlib.sha256(self.kind.encode())
        for array in (self.query_mean, self.query_matrix, self.reference_mean, self.reference_matrix):
            h.update(np.ascontiguousarray(array, dtype=np.float32).tobytes())
        return h.hexdigest()

    def save(self, path: Path | io.BytesIO) -> None:
        """Write ``path`` (.npz); the caller makes the enclosing folder write atomic."""
        np.savez(
            path,
            query_mean=self.query_mean,
            query_matrix=self.query_matrix,
            reference_mean=self.reference_mean,
            reference_matrix=self.reference_matrix,
            meta=np.array(json.dumps({"kind": self.kind, "fitted_on": self.fitted_on})),
        )

    def save_file(self, path: Path) -> Path:
        """Write a stand-alone alignment file atomically (a saved query-view alignment)."""
        buffer = io.BytesIO()
        self.save(buffer)
        return write_bytes_atomic(Path(path), buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> Alignment:
        with np.load(path) as data:
            meta = json.loads(str(data["meta"]))
            return cls(
                kind=meta["kind"],
                query_mean=data["query_mean"].astype(np.float32),
                query_matrix=data["query_matrix"].astype(np.float32),
                reference_mean=data["reference_mean"].astype(np.float32),
                reference_matrix=data["reference_matrix"].astype(np.float32),
                fitted_on=meta["fitted_on"],
            )


def load_query_alignment(path: Path, fitted_for: str, dim: int) -> Alignment:
    """A saved query-view alignment (``cvgl align``), refused unless it was fitted for this index
    and encoder (``fitted_for``: :meth:`cvgl.index.store.ReferenceIndex.alignment_key`).

    Why a file and not statistics of the photos being located: a photo's answer must depend only
    on the photo, the index, the model and the options — never on which other photos share the
    command or the request. The statistics are fitted once, on photos the user chooses, and
    applied identically by the CLI and the service; answers name the file's digest.
    """
    path = Path(path)
    try:
        alignment = Alignment.load(path)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same user problem
        raise InputError(f"{path}: not a cvgl alignment file ({type(exc).__name__}); make one with `cvgl align`") from None
    recorded = alignment.fitted_on.get("fitted_for")
    if recorded != fitted_for:
        raise InputError(f"{path}: fitted for another index or encoder; refit it with `cvgl align` for this index")
    if alignment.query_mean.shape != (dim,) or alignment.query_matrix.shape[0] != dim:
        raise InputError(f"{path}: alignment is {alignment.query_mean.shape[0]}-d but the index is {dim}-d; refit it")
    if alignment.leaky:
        raise InputError(f"{path}: a leaky (test-fitted) alignment cannot be used to locate photos")
    return alignment


def _identity(dim: int) -> np.ndarray:
    return np.eye(dim, dtype=np.float32)


def _sqrtm(cov: np.ndarray, power: float, eps: float) -> np.ndarray:
    """Symmetric matrix power via eigendecomposition (with ridge ``eps``)."""
    values, vectors = np.linalg.eigh(cov + eps * np.eye(cov.shape[0]))
    return (vectors * np.maximum(values, eps) ** power) @ vectors.T


def procrustes_rotation(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Orthogonal ``R`` minimising ``||source @ R - target||_F`` (Schönemann 1966)."""
    u, _, vt = np.linalg.svd(source.T @ target)
    return (u @ vt).astype(np.float32)


def mutual_nearest_neighbours(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j) where b[j] is a's nearest to a[i] and vice versa (inner product)."""
    sims = a @ b.T
    ab = sims.argmax(1)
    ba = sims.argmax(0)
    i = np.nonzero(ba[ab] == np.arange(len(a)))[0]
    return i, ab[i]


def fit_alignment(
    kind: str,
    reference: np.ndarray,
    queries: np.ndarray | None = None,
    anchors: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    leaky: bool = False,
    pca_dim: int | None = None,
    eps: float = 1e-3,
    iterations: int = 5,
) -> Alignment:
    """Fit an alignment of ``kind`` (see module table).

    ``reference``: reference-view descriptors ``[N, D]`` (the gallery being indexed).
    ``queries``: an *unlabelled* query-view sample (no correspondence to ``reference`` is used).
    ``anchors``: ``(query_desc, reference_desc)`` known pairs, row i matching row i — a train
    split. Passing the *test* pairs reproduces the leaky paper protocol; say so with ``leaky=True``.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown alignment '{kind}'; choose one of {KINDS}")
    reference = np.asarray(reference, dtype=np.float64)
    dim = reference.shape[1]
    ref_mean = reference.mean(0)
    info: dict = {"reference": int(len(reference)), "unlabelled_queries": 0, "anchor_pairs": 0, "leaky": leaky}

    if kind == "none":
        zero = np.zeros(dim)
        return _make(kind, zero, _identity(dim), zero, _identity(dim), info)

    if kind == "center":
        q_mean = ref_mean
        if queries is not None and len(queries):
            q_mean = np.asarray(queries, dtype=np.float64).mean(0)
            info["unlabelled_queries"] = int(len(queries))
        return _make(kind, q_mean, _identity(dim), ref_mean, _identity(dim), info)

    if kind == "pca-whiten":
        centred = reference - ref_mean
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        k = min(pca_dim or len(s), len(s))
        variances = s[:k] ** 2 / max(len(reference) - 1, 1)
        w = vt[:k].T / np.sqrt(variances + eps * variances.max())
        info["pca_dim"] = int(k)
        q_mean = ref_mean
        if queries is not None and len(queries):
            q_mean = np.asarray(queries, dtype=np.float64).mean(0)
            info["unlabelled_queries"] = int(len(queries))
        return _make(kind, q_mean, w, ref_mean, w, info)

    if kind == "coral":
        if queries is None or len(queries) < 2:
            raise ValueError("coral needs an unlabelled query-view sample (queries=...)")
        q = np.asarray(queries, dtype=np.float64)
        q_mean = q.mean(0)
        c_q = np.cov(q - q_mean, rowvar=False)
        c_r = np.cov(reference - ref_mean, rowvar=False)
        w = _sqrtm(c_q, -0.5, eps) @ _sqrtm(c_r, 0.5, eps)
        info["unlabelled_queries"] = int(len(q))
        return _make(kind, q_mean, w, ref_mean, _identity(dim), info)

    if kind == "procrustes":
        if anchors is None:
            raise ValueError("procrustes needs anchor pairs (anchors=(query_desc, reference_desc))")
        q_a, r_a = (np.asarray(a, dtype=np.float64) for a in anchors)
        if q_a.shape != r_a.shape:
            raise ValueError(f"anchor shapes differ: {q_a.shape} vs {r_a.shape}")
        q_mean, r_mean = q_a.mean(0), r_a.mean(0)
        basis = np.eye(dim)
        if pca_dim:
            _, _, vt = np.linalg.svd(np.concatenate([q_a - q_mean, r_a - r_mean]), full_matrices=False)
            basis = vt[:pca_dim].T
            info["pca_dim"] = int(pca_dim)
        rotation = procrustes_rotation((q_a - q_mean) @ basis, (r_a - r_mean) @ basis)
        info["anchor_pairs"] = int(len(q_a))
        return _make(kind, q_mean, basis @ rotation, r_mean, basis, info)

    # mnn-procrustes: unsupervised, pairs found as mutual nearest neighbours, refined iteratively.
    if queries is None or len(queries) < 2:
        raise ValueError("mnn-procrustes needs an unlabelled query-view sample (queries=...)")
    q = np.asarray(queries, dtype=np.float64)
    q_mean = q.mean(0)
    qc, rc = l2n(q - q_mean), l2n(reference - ref_mean)
    rotation = np.eye(dim)
    pairs = 0
    for _ in range(iterations):
        i, j = mutual_nearest_neighbours(qc @ rotation, rc)
        pairs = len(i)
        if pairs < 2:
            break
        rotation = procrustes_rotation(qc[i], rc[j]).astype(np.float64)
    info["unlabelled_queries"] = int(len(q))
    info["mnn_pairs"] = int(pairs)
    return _make(kind, q_mean, rotation, ref_mean, _identity(dim), info)


def _make(kind, q_mean, q_w, r_mean, r_w, info) -> Alignment:
    return Alignment(
        kind=kind,
        query_mean=np.asarray(q_mean, dtype=np.float32),
        query_matrix=np.asarray(q_w, dtype=np.float32),
        reference_mean=np.asarray(r_mean, dtype=np.float32),
        reference_matrix=np.asarray(r_w, dtype=np.float32),
        fitted_on=info,
    )
