"""Vector backends: exact and compressed inner-product indexes behind one interface
(:class:`cvgl.index.vectors.VectorBackend`), and the registry that builds and opens them by kind.

=========  =========================================  ===========  =============================
type       faiss index                                bytes/vector  why
=========  =========================================  ===========  =============================
``flat``   ``IndexFlatIP``                            4 D           exact; the reference
``sq8``    ``IndexScalarQuantizer`` 8 bit + re-rank   D             4x smaller, still a full scan
``ivfpq``  ``IndexIVFPQ`` + exact re-rank (raw.npy)   m (+ 8 id)    sub-linear: probes nprobe lists
=========  =========================================  ===========  =============================

``auto`` (:func:`choose_index_type`) picks by size. Thresholds from ``cvgl bench scale`` (384-d
descriptors grown from real Longmont ones, batch-1 queries, faiss on 2 cores of a shared machine):
a flat scan reads the whole matrix per query — 24 ms at 1e5, 180 ms and 1.5 GB at 1e6 — so flat
stops at 2e5 (~50 ms). SQ8 + re-rank reads 4x less: 48 ms, 366 MB and recall@10 1.000 at 1e6,
built in 1.4 s, so it carries the range up to 1e6. Above, only an inverted file keeps latency
flat: IVF-PQ + re-rank answered in 0.8 ms (p99 1.3 ms) with recall@10 0.993 at 1e6 (nprobe 32,
60 MB of codes) but took 141 s to train and fill, which is why it is not used below 1e6.

A geographic prior becomes ``allowed`` (row ids inside the radius, computed by the store from
tile lat/lon). Small allowed sets are searched exactly over those rows; larger ones go through a
faiss ``IDSelectorBatch`` (exact for flat/SQ8 scans; for IVF-PQ the probed lists are filtered
and the survivors re-ranked). Qdrant (:mod:`cvgl.index.qdrant`) filters natively (``geo=``).
"""

from __future__ import annotations

import math
from pathlib import Path

import faiss
import numpy as np

from cvgl.index.qdrant import QdrantBackend
from cvgl.index.vectors import (
    RowVectors,
    VectorBackend,
    exact_top_k,
    no_results,
    pad_results,
    rerank_exact,
)

FAISS_FILE = "vectors.faiss"
FLAT_MAX = 200_000  # auto: exact below this many vectors
SQ8_MAX = 1_000_000  # auto: SQ8 up to this many, IVF-PQ above
EXACT_SUBSET_MAX = 50_000  # an allowed set this small is scored exactly (one [Q, A] product)
DEFAULT_RERANK = 10  # IVF-PQ: exact re-rank of rerank * k candidates
DEFAULT_NPROBE = 32
KMEANS_ITERATIONS = 10  # coarse k-means: faiss's 25 cost minutes at 1e6 for no measurable recall

def choose_index_type(n: int) -> str:
    """``auto``: flat below :data:`FLAT_MAX`, SQ8 up to :data:`SQ8_MAX`, IVF-PQ above."""
    if n < FLAT_MAX:
        return "flat"
    return "sq8" if n <= SQ8_MAX else "ivfpq"


class FaissBackend:
    """A faiss index of aligned vectors; subclasses say how to build and how to search it."""

    kind = "faiss"
    native_geo = False
    mmap_flag = faiss.IO_FLAG_MMAP_IFC

    def __init__(self, index: faiss.Index, params: dict | None = None, vectors: RowVectors | None = None) -> None:
        self.index = index
        self.params = dict(params or {})
        self.vectors = vectors  # exact aligned vectors by row (re-rank, small allowed sets)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def describe(self) -> dict:
        return {"type": self.kind, **self.params}

    def save(self, folder: Path) -> None:
        faiss.write_index(self.index, str(Path(folder) / FAISS_FILE))

    @classmethod
    def open(cls, folder: Path, mmap: bool = False, params: dict | None = None,
             vectors: RowVectors | None = None) -> FaissBackend:
        path = str(Path(folder) / FAISS_FILE)
        index = faiss.read_index(path, cls.mmap_flag) if mmap else faiss.read_index(path)
        return cls(index, params, vectors)

    def _search_params(self, selector: faiss.IDSelector | None):
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def _raw_search(self, queries: np.ndarray, k: int, selector: faiss.IDSelector | None
                    ) -> tuple[np.ndarray, np.ndarray]:
        params = self._search_params(selector)
        if params is None:
            return self.index.search(queries, k)
        return self.index.search(queries, k, params=params)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               geo: tuple[float, float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k; with ``params["rerank"] > 1`` (SQ8, IVF-PQ) the approximate index proposes
        ``rerank * k`` candidates and their exact scores (``vectors``) pick the k."""
        if geo is not None:
            raise ValueError(f"{self.kind} backend filters by allowed rows, not geo; pass allowed=")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        rerank = int(self.params.get("rerank", 1))
        if allowed is not None:
            allowed = np.unique(np.asarray(allowed, dtype=np.int64))  # sorted, once for both paths
        small_subset = allowed is not None and len(allowed) <= EXACT_SUBSET_MAX
        if rerank > 1 and self.vectors is not None and not small_subset:
            _, candidates = self._approximate(queries, k * rerank, allowed)
            return rerank_exact(queries, candidates, self.vectors, k)
        return self._approximate(queries, k, allowed)

    def _approximate(self, queries: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """The index's own top-k (exact over a small allowed subset; ``allowed`` sorted, unique)."""
        if allowed is None:
            return pad_results(*self._raw_search(queries, min(k, len(self)), None), k)
        if len(allowed) == 0:
            return no_results(len(queries), k)
        if self.vectors is not None and len(allowed) <= EXACT_SUBSET_MAX:
            return exact_top_k(queries, self.vectors(allowed), k, allowed)
        selector = faiss.IDSelectorBatch(allowed)
        return pad_results(*self._raw_search(queries, min(k, len(allowed)), selector), k)


class FlatBackend(FaissBackend):
    """Exact inner product over every vector (``IndexFlatIP``)."""

    kind = "flat"

    @classmethod
    def build(cls, vectors: np.ndarray, **_: object) -> FlatBackend:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return cls(index, {"faiss": "IndexFlatIP"}, vectors=lambda rows: vectors[rows])


class SQ8Backend(FaissBackend):
    """8-bit scalar quantisation per dimension (``IndexScalarQuantizer``, inner product): 4x less
    memory than flat, still a full scan. Real descriptors share a large common component (cosine
    ~0.93 between unrelated Longmont tiles), so 8-bit codes alone blur the top-10 (recall@10
    ~0.93 in ``cvgl bench scale``); the ``rerank * k`` best are therefore re-scored exactly."""

    kind = "sq8"

    @classmethod
    def build(cls, vectors: np.ndarray, rerank: int = DEFAULT_RERANK, **_: object) -> SQ8Backend:
        index = faiss.IndexScalarQuantizer(vectors.shape[1], faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        index.train(data)  # per-dimension min/max: one pass, no sampling needed
        index.add(data)
        return cls(index, {"faiss": "IndexScalarQuantizer(QT_8bit, IP)", "rerank": int(rerank)},
                   vectors=lambda rows: vectors[rows])


def ivfpq_params(n: int, dim: int, nlist: int | None = None, m: int | None = None, nbits: int | None = None,
                 nprobe: int | None = None, rerank: int | None = None, train_size: int | None = None) -> dict:
    """IVF-PQ parameters for ``n`` vectors: nlist ~ 4 sqrt(n) (at most n / 39, faiss's minimum
    training points per centroid), m = the largest of 48/32/24/16/8/4/2/1 dividing ``dim`` with
    8-bit codes (fewer bits when there are too few vectors to train 256 centroids)."""
    nlist = nlist or max(1, min(round(4 * math.sqrt(n)), n // 39))
    if m is None:
        m = next(c for c in (48, 32, 24, 16, 8, 4, 2, 1) if dim % c == 0 and c <= dim)
    if dim % m:
        raise ValueError(f"IVF-PQ: m={m} must divide the dimension {dim}")
    nbits = nbits or max(1, min(8, int(math.log2(max(2, n // 39)))))
    train_size = train_size or min(n, max(30 * nlist, 39 * 2**nbits, 10_000))
    return {"nlist": int(nlist), "m": int(m), "nbits": int(nbits), "nprobe": int(nprobe or min(DEFAULT_NPROBE, nlist)),
            "rerank": int(DEFAULT_RERANK if rerank is None else rerank), "train_size": int(min(train_size, n))}


class IVFPQBackend(FaissBackend):
    """Inverted file over ``nlist`` k-means cells, product-quantised residuals, then an exact
    re-rank of the ``rerank * k`` best candidates against the stored vectors (``vectors(rows)``,
    i.e. raw.npy memory-mapped and aligned on the fly). Without re-rank, PQ distances alone cap
    recall@10 well below 0.95 on dense descriptor clusters; with it, the cap is nprobe."""

    kind = "ivfpq"
    mmap_flag = faiss.IO_FLAG_MMAP

    def __init__(self, index: faiss.Index, params: dict | None = None, vectors: RowVectors | None = None) -> None:
        super().__init__(index, params, vectors)
        self.index.nprobe = int(self.params.get("nprobe", DEFAULT_NPROBE))

    @classmethod
    def build(cls, vectors: np.ndarray, seed: int = 0, **overrides: object) -> IVFPQBackend:
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        n, dim = data.shape
        params = ivfpq_params(n, dim, **overrides)
        quantizer = faiss.IndexFlatL2(dim)  # L2 on unit vectors ranks like inner product
        index = faiss.IndexIVFPQ(quantizer, dim, params["nlist"], params["m"], params["nbits"])
        index.cp.seed = seed
        index.cp.niter = KMEANS_ITERATIONS
        index.pq.cp.seed = seed
        rows = np.sort(np.random.default_rng(seed).choice(n, size=params["train_size"], replace=False))
        index.train(np.ascontiguousarray(data[rows]))
        index.add(data)
        params["faiss"] = f"IndexIVFPQ(nlist={params['nlist']}, m={params['m']}x{params['nbits']} bit, L2)"
        return cls(index, params, vectors=lambda r: data[r])

    def _search_params(self, selector: faiss.IDSelector | None):
        if selector is None:
            return None
        return faiss.SearchParametersIVF(sel=selector, nprobe=self.index.nprobe)


FAISS_BACKENDS: dict[str, type[FaissBackend]] = {"flat": FlatBackend, "sq8": SQ8Backend, "ivfpq": IVFPQBackend}
KINDS = (*FAISS_BACKENDS, "qdrant")


def build_backend(kind: str, vectors: np.ndarray, folder: Path | None = None, **params: object) -> VectorBackend:
    """Build a backend of ``kind`` (flat | sq8 | ivfpq | qdrant; ``auto`` by size) over aligned
    ``vectors``; ``folder`` is where a Qdrant local-mode collection is stored."""
    if kind == "auto":
        kind = choose_index_type(len(vectors))
    if kind in FAISS_BACKENDS:
        return FAISS_BACKENDS[kind].build(vectors, **params)
    if kind == "qdrant":
        return QdrantBackend.build(vectors, folder=folder, **params)
    raise ValueError(f"unknown index type {kind!r} (auto | {' | '.join(KINDS)})")


def open_backend(kind: str, folder: Path, mmap: bool, params: dict, vectors: RowVectors) -> VectorBackend:
    """Open the saved backend of ``kind`` in an index folder (``vectors``: exact rows for re-ranking)."""
    if kind == "qdrant":
        return QdrantBackend.open(folder, mmap, params)
    return FAISS_BACKENDS[kind].open(folder, mmap, params, vectors)
