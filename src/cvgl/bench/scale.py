"""Index-scale benchmark: build time, memory, batch-1 latency and recall@10 vs exact per index type.

    python -m cvgl.bench.scale [--out FILE] [--quick] [--sizes 1e5,1e6] [--types flat,sq8,ivfpq,hnsw,qdrant]

For every database size and index type (the shipped backends of :mod:`cvgl.index.backends` plus
faiss HNSW as an outside reference, and Qdrant local mode where it is feasible): build seconds,
index bytes (serialised), resident-memory growth while building (peak, sampled every 10 ms) and
after, median / p99 wall time of single-query searches (k = 10, faiss on 2 OpenMP threads),
recall@10 against the exact numpy top-10, and where the query's known true match lands.

**Data: real Longmont descriptors, grown.** Uniform random vectors have no neighbourhood
structure and make every ANN index look broken, so the database starts from the real tile
descriptors of the default encoder (Longmont WV3, 112 m tiles every 56 m at 0.5 m GSD, encoded
once) and is grown by structured perturbations in their own PCA basis (:func:`grow_descriptors`):

1. ``X`` = the real descriptors, L2-normalised; ``noise()`` draws ``z @ diag(s) @ V`` where
   ``V, s`` are the principal axes and standard deviations of ``X`` (plus an isotropic floor
   at the smallest ``s`` in the directions ``X`` does not span): perturbations shaped like the
   real descriptors' own variation, not isotropic;
2. *places*: ``n / place_size`` synthetic scenes, each a blend ``(1 - t) x_a + t x_b`` of two
   random real tiles (``t ~ U(0, 0.5)``) plus ``place_noise * noise()``;
3. *tiles*: each database vector is a place plus ``tile_noise * noise()`` (like the overlapping
   tiles and acquisition dates of one neighbourhood), L2-normalised;
4. *queries*: a random database vector plus ``query_noise * noise()``, L2-normalised; that
   vector is the query's known true match (other tiles of its place are near-duplicates, which
   is what makes the top-10 hard).

``--quick`` replaces the real descriptors by a seeded Gaussian mixture
(:func:`make_mixture`) so it needs no model; it is a smoke test, not a result.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np

from cvgl.bench.common import emit_section, log, markdown_table

# ----------------------------------------------------------------------------------------------
# Structured descriptors (a Gaussian mixture; real descriptors grown by perturbation)
# ----------------------------------------------------------------------------------------------

QUERY_NOISE = 0.5  # mixture queries: noise in units of their cluster's per-axis std


@dataclass
class Mixture:
    """An anisotropic Gaussian mixture in ``dim`` dimensions (see :func:`make_mixture`)."""

    centres: np.ndarray  # [K, D], unit norm
    scales: np.ndarray  # [K, D] per-cluster std along the rotated axes
    rotation: np.ndarray  # [D, D] orthogonal
    weights: np.ndarray  # [K] cluster probabilities
    description: str = field(default="")


def make_mixture(dim: int = 384, clusters: int = 1000, seed: int = 0, decay: float = 0.6,
                 spread: tuple[float, float] = (0.45, 0.9)) -> Mixture:
    """A mixture shaped like image descriptors rather than like uniform noise.

    * one random orthogonal basis ``R``; along its axes variance decays as ``(j + 1) ** -2*decay``
      (a few directions carry most of the variance, as in real descriptors' PCA spectra);
    * cluster centres ``c_k`` are drawn with that spectrum, then L2-normalised;
    * each cluster has its own per-axis std: the global spectrum times a log-normal factor
      (sigma 0.5) per axis, rescaled to a total spread (norm of the deviation) drawn uniformly
      from ``spread``: anisotropic, and tight or loose clusters alike;
    * cluster sizes are unequal: probabilities proportional to log-normal(0, 1) weights.
    """
    rng = np.random.default_rng(seed)
    gauss = rng.standard_normal((dim, dim))
    q, r = np.linalg.qr(gauss)
    rotation = (q * np.sign(np.diag(r))).astype(np.float32)
    spectrum = (np.arange(dim) + 1.0) ** -decay
    centres = (rng.standard_normal((clusters, dim)) * spectrum) @ rotation
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scales = spectrum * np.exp(0.5 * rng.standard_normal((clusters, dim)))
    scales *= (rng.uniform(*spread, size=clusters) / np.linalg.norm(scales, axis=1))[:, None]
    weights = np.exp(rng.standard_normal(clusters))
    weights /= weights.sum()
    description = (
        f"{clusters}-cluster anisotropic Gaussian mixture in {dim}-d: random orthogonal basis, "
        f"per-axis variance ~ (j+1)^-{2 * decay:g} times log-normal(0, 0.5) per cluster and axis, "
        f"cluster spread (deviation norm) U{spread}, unit-norm centres, log-normal(0, 1) cluster "
        "sizes; every vector L2-normalised"
    )
    return Mixture(centres.astype(np.float32), scales.astype(np.float32), rotation, weights, description)


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def sample_mixture(mixture: Mixture, n: int, seed: int = 1, chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit-norm float32 vectors and their cluster labels, generated ``chunk`` rows at a time
    (peak extra memory ~ 3 chunk x dim floats beyond the output)."""
    rng = np.random.default_rng(seed)
    dim = mixture.centres.shape[1]
    labels = rng.choice(len(mixture.weights), size=n, p=mixture.weights).astype(np.int32)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        lab = labels[start : start + chunk]
        z = rng.standard_normal((len(lab), dim), dtype=np.float32)
        z *= mixture.scales[lab]
        block = z @ mixture.rotation
        block += mixture.centres[lab]
        out[start : start + len(lab)] = _normalise(block)
    return out, labels


def make_queries(database: np.ndarray, labels: np.ndarray, mixture: Mixture, count: int, noise: float = QUERY_NOISE,
                 seed: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Queries = noisy copies of ``count`` random database rows -> (unit queries, true row ids).

    The noise follows the item's own cluster shape (``noise`` x its per-axis std, rotated): a
    query moves along the directions its neighbours differ in, which is what makes it hard.
    """
    rng = np.random.default_rng(seed)
    truth = rng.choice(len(database), size=count, replace=False)
    lab = labels[truth]
    z = rng.standard_normal((count, database.shape[1]), dtype=np.float32) * mixture.scales[lab]
    queries = database[truth] + noise * (z @ mixture.rotation)
    return np.ascontiguousarray(_normalise(queries.astype(np.float32))), truth.astype(np.int64)


def structured_dataset(n: int, queries: int = 1000, dim: int = 384, clusters: int = 1000, noise: float = QUERY_NOISE,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, Mixture]:
    """(database, queries, true ids, mixture) drawn from :func:`make_mixture`."""
    mixture = make_mixture(dim, clusters, seed)
    database, labels = sample_mixture(mixture, n, seed + 1)
    q, truth = make_queries(database, labels, mixture, queries, noise, seed + 2)
    return database, q, truth, mixture


@dataclass(frozen=True)
class Growth:
    """Noise levels of :func:`grow_descriptors`, in units of the real descriptors' own spread."""

    place_size: int = 50
    blend: float = 0.5
    place_noise: float = 0.6
    tile_noise: float = 0.3
    query_noise: float = 0.4

    def describe(self) -> str:
        return (f"places of ~{self.place_size} tiles, blend t ~ U(0, {self.blend:g}), place noise "
                f"{self.place_noise:g}, tile noise {self.tile_noise:g}, query noise {self.query_noise:g}")


class SpectralNoise:
    """Gaussian perturbations with the covariance of ``real`` (PCA axes and spreads), plus an
    isotropic floor at the smallest principal std where ``real`` spans nothing."""

    def __init__(self, real: np.ndarray) -> None:
        centred = real - real.mean(0)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        keep = s > s[0] * 1e-6
        self.std = (s[keep] / math.sqrt(max(1, len(real) - 1))).astype(np.float32)
        self.axes = vt[keep].astype(np.float32)
        self.floor = float(self.std[-1])

    def __call__(self, rng: np.random.Generator, count: int) -> np.ndarray:
        z = rng.standard_normal((count, len(self.std)), dtype=np.float32) * self.std
        out = z @ self.axes
        out += self.floor * rng.standard_normal((count, self.axes.shape[1]), dtype=np.float32)
        return out


def grow_descriptors(real: np.ndarray, n: int, queries: int, growth: Growth = Growth(), seed: int = 0,
                     chunk: int = 65_536) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(database [n, D], queries [Q, D], true rows [Q]) grown from ``real`` (module doc, steps 1-4)."""
    rng = np.random.default_rng(seed)
    real = _normalise(np.array(real, dtype=np.float32))
    noise = SpectralNoise(real)
    places = max(1, n // growth.place_size)
    a, b = rng.integers(0, len(real), places), rng.integers(0, len(real), places)
    t = rng.uniform(0, growth.blend, (places, 1)).astype(np.float32)
    centres = (1 - t) * real[a] + t * real[b] + growth.place_noise * noise(rng, places)
    place_of = rng.integers(0, places, n)
    database = np.empty((n, real.shape[1]), dtype=np.float32)
    for start in range(0, n, chunk):
        rows = place_of[start : start + chunk]
        block = growth.tile_noise * noise(rng, len(rows))
        block += centres[rows]
        database[start : start + len(rows)] = _normalise(block)
    truth = rng.choice(n, size=queries, replace=False).astype(np.int64)
    q = database[truth] + growth.query_noise * noise(rng, queries)
    return database, np.ascontiguousarray(_normalise(q)), truth


def real_longmont_descriptors(weights: str = "embedded") -> np.ndarray:
    """Default-encoder descriptors of the Longmont WV3 tiles (112 m every 56 m, 0.5 m GSD)."""
    from cvgl.data.samples import longmont_scene
    from cvgl.data.tiling import TilingSpec, iter_tiles
    from cvgl.models.factory import create_encoder

    encoder = create_encoder(weights=weights)
    images = [tile.image for tile in iter_tiles(longmont_scene("wv3"), TilingSpec(112.0, 56.0, 0.5))]
    return encoder.encode(images, batch_size=16)


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def exact_reference(database: np.ndarray, queries: np.ndarray, truth: np.ndarray, k: int = 10, chunk: int = 64
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Plain numpy: exact top-k rows per query (ties: lower row) and the exact rank (1-based) of
    each query's true match, ``chunk`` queries at a time."""
    top = np.empty((len(queries), k), dtype=np.int64)
    rank = np.empty(len(queries), dtype=np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ database.T
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.lexsort((part, -np.take_along_axis(scores, part, 1)), axis=1)
        top[start : start + chunk] = np.take_along_axis(part, order, 1)
        own = scores[np.arange(len(scores)), truth[start : start + chunk]]
        rank[start : start + chunk] = (scores > own[:, None]).sum(1) + 1
    return top, rank


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean |found_i ∩ exact_i| / k over queries (k = exact's width; -1 never matches)."""
    k = exact.shape[1]
    return float(np.mean([len(set(f[f >= 0].tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))


def resident_bytes() -> int:
    """Current resident set size of this process (/proc/self/statm; 0 where unavailable)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRss:
    """Highest resident memory seen (sampled every 10 ms on a thread) while the block runs."""

    def __enter__(self) -> Self:
        self.start = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())
        self.end = resident_bytes()


def faiss_bytes(index) -> int:
    """Exact serialised size of a faiss index, counted through a callback (no copy in memory)."""
    import faiss

    total = [0]

    def count(chunk: bytes) -> None:
        total[0] += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total[0]


class HnswReference:
    """faiss ``IndexHNSWFlat`` (inner product): not a shipped backend, a reference point."""

    kind = "hnsw"

    def __init__(self, vectors: np.ndarray, m: int = 32, ef_construction: int = 40, ef_search: int = 64) -> None:
        import faiss

        self.index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.index.add(np.ascontiguousarray(vectors))
        self.index.hnsw.efSearch = ef_search
        self.params = {"faiss": f"IndexHNSWFlat(M={m}, efConstruction={ef_construction}, IP)", "efSearch": ef_search}

    def search(self, queries: np.ndarray, k: int, allowed=None, geo=None) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(np.ascontiguousarray(queries), k)


@dataclass
class ScaleResult:
    n: int
    kind: str
    params: str
    build_s: float
    index_bytes: int | None
    peak_rss_delta: int
    rss_delta: int
    median_ms: float
    p99_ms: float
    recall10: float
    match1: float
    match10: float
    median_rank: str
    note: str = ""


def _params_text(params: dict) -> str:
    skip = {"type", "dim", "distance", "server", "train_size"}
    return ", ".join(f"{k}={v}" for k, v in params.items() if k not in skip and k != "faiss") or "-"


def _latencies(search: Callable[[np.ndarray], object], queries: np.ndarray, count: int) -> tuple[float, float]:
    """Median and p99 ms of single-query calls over the first ``count`` queries (after 3 warm-ups)."""
    for i in range(min(3, len(queries))):
        search(queries[i : i + 1])
    times = []
    for i in range(min(count, len(queries))):
        t0 = time.perf_counter()
        search(queries[i : i + 1])
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, math.ceil(0.99 * len(times)) - 1)]


def measure(kind: str, database: np.ndarray, queries: np.ndarray, truth: np.ndarray, exact_top: np.ndarray,
            latency_queries: int = 300, variants: Sequence[dict] = ({},), workdir: Path | None = None,
            log: Callable[[str], None] = lambda _m: None) -> list[ScaleResult]:
    """Build one index type over ``database`` and measure each search variant of it."""
    from cvgl.index.backends import FAISS_BACKENDS

    n = len(database)
    gc.collect()
    with PeakRss() as rss:
        t0 = time.perf_counter()
        if kind == "hnsw":
            backend = HnswReference(database)
        elif kind == "qdrant":
            from cvgl.index.qdrant import QdrantBackend

            folder = Path(tempfile.mkdtemp(prefix="cvgl-scale-qdrant-", dir=workdir))
            QdrantBackend.build(database, folder=folder)
            backend = QdrantBackend.open(folder, params={"collection": "tiles"})
        else:
            backend = FAISS_BACKENDS[kind].build(database)
        build_s = time.perf_counter() - t0
    size = faiss_bytes(backend.index) if hasattr(backend, "index") else None
    results = []
    for variant in variants:
        params = dict(getattr(backend, "params", {}))
        if variant:
            params.update(variant)
            backend.params.update(variant)
            if "nprobe" in variant:
                backend.index.nprobe = variant["nprobe"]
        _, found = backend.search(queries, 10)
        _, deep = backend.search(queries, 100)
        hit = deep == truth[:, None]
        ranks = np.where(hit.any(1), hit.argmax(1) + 1, 101)
        median_ms, p99_ms = _latencies(lambda q: backend.search(q, 10), queries, latency_queries)
        med = float(np.median(ranks))
        results.append(ScaleResult(
            n, kind, _params_text(params), build_s, size, rss.peak - rss.start, rss.end - rss.start, median_ms, p99_ms,
            recall_at_k(found, exact_top), float(np.mean(found[:, 0] == truth)), float(np.mean((found == truth[:, None]).any(1))),
            ">100" if med > 100 else f"{med:g}"))
        r = results[-1]
        log(f"  {kind} {r.params}: build {build_s:.1f} s, recall {r.recall10:.3f}, median {median_ms:.2f} ms, p99 {p99_ms:.2f} ms")
    return results


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


@dataclass
class Config:
    sizes: tuple[int, ...] = (100_000, 1_000_000)
    types: tuple[str, ...] = ("flat", "sq8", "ivfpq", "hnsw", "qdrant")
    queries: int = 500
    latency_queries: int = 300
    # Qdrant local mode ingests point by point in Python (~115 points/s measured on the loaded
    # 2-core machine: ~15 min at 1e5), so it runs at its own smaller size only.
    qdrant_sizes: tuple[int, ...] = (20_000,)
    threads: int = 2
    quick: bool = False
    weights: str = "embedded"


def _mb(nbytes: float | None) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**20:,.0f}"


def run(config: Config, argv: Sequence[str], log: Callable[[str], None]) -> str:
    import faiss

    from cvgl.bench.common import machine_line
    from cvgl.bench.throughput import CpuMonitor
    from cvgl.index.backends import FLAT_MAX, SQ8_MAX

    started = time.perf_counter()
    faiss.omp_set_num_threads(config.threads)
    if config.quick:
        mixture = make_mixture(384, 300, seed=0)
        real, _ = sample_mixture(mixture, 300, seed=1)
        source = "a 300-vector Gaussian mixture standing in for real descriptors (--quick smoke test)"
    else:
        log("encoding the Longmont WV3 tiles with the default encoder")
        real = real_longmont_descriptors(config.weights)
        source = (f"{len(real)} real Longmont WV3 tile descriptors (default encoder, 112 m tiles every 56 m, "
                  f"0.5 m GSD, {real.shape[1]}-d)")
    growth = Growth()
    monitor = CpuMonitor()
    rows, notes = [], []
    for n in sorted(set(config.sizes) | (set(config.qdrant_sizes) if "qdrant" in config.types else set())):
        log(f"{n:,} descriptors: growing from {len(real)} real ones")
        database, queries, truth = grow_descriptors(real, n, config.queries, growth, seed=0)
        exact_top, exact_rank = exact_reference(database, queries, truth)
        notes.append(f"N = {n:,}: the true match is the exact rank-1 tile for {np.mean(exact_rank == 1):.2f} of the "
                     f"queries and in the exact top-10 for {np.mean(exact_rank <= 10):.2f}.")
        with tempfile.TemporaryDirectory(prefix="cvgl-scale-") as tmp:
            for kind in config.types:
                if (kind == "qdrant") != (n in config.qdrant_sizes) or (kind != "qdrant" and n not in config.sizes):
                    continue  # Qdrant only at its own sizes, the other types only at theirs
                variants: Sequence[dict] = ({},)
                if kind == "sq8":
                    variants = ({}, {"rerank": 1})
                if kind == "ivfpq":
                    variants = ({"nprobe": 16}, {"nprobe": 32}, {"nprobe": 64}, {"nprobe": 32, "rerank": 1})
                log(f"  {kind}: building over {n:,}")
                for r in measure(kind, database, queries, truth, exact_top, config.latency_queries, variants, Path(tmp),
                                 log):
                    rows.append([f"{r.n:,}", r.kind, r.params, f"{r.build_s:.1f}", _mb(r.index_bytes),
                                 _mb(r.peak_rss_delta), _mb(r.rss_delta), f"{r.median_ms:.2f}", f"{r.p99_ms:.2f}",
                                 f"{r.recall10:.3f}", f"{r.match1:.2f}", f"{r.match10:.2f}", r.median_rank])
                gc.collect()
        del database, queries, truth
        gc.collect()
    title = "## Benchmark `scale` (index types at 10⁵ and 10⁶ descriptors)"
    lines = [
        title, "",
        f"Machine: {machine_line()}; faiss {faiss.__version__} on {config.threads} OpenMP threads. "
        "Command: `python -m cvgl.bench.scale" + ("" if not argv else " " + shlex.join(argv)) + "`.", "",
        (f"Data: {source}, grown to N by structured perturbation in their PCA basis ({growth.describe()}; "
        "see `cvgl.bench.scale` for the exact recipe); "
        f"{config.queries} queries = perturbed copies of random database tiles, that tile being the known match. "
        "Recall@10 = |top-10 ∩ exact numpy top-10| / 10. Latency: single-query `search` calls (k = 10) over the first "
        f"{config.latency_queries} queries. Memory: serialised index size; resident growth while building "
        "(peak, sampled) and after. 'sq8' and 'ivfpq' re-rank rerank × k candidates exactly against the stored "
        "vectors (rerank=1: quantised scores alone). 'match at 1 / in top-10' and 'median rank' (within the top 100) locate the "
        "known true match."), "",
    ]
    lines += markdown_table(["N", "index", "params", "build s", "index MB", "peak RSS +MB", "RSS after +MB",
                     "median ms (b1)", "p99 ms (b1)", "recall@10 vs exact", "match at 1", "match in top-10",
                     "median rank"], rows)
    lines += ["", *notes, "",
              (f"Qdrant (local mode, `QdrantClient(path=...)`) runs only at N = "
               f"{', '.join(f'{q:,}' for q in config.qdrant_sizes)}: its ingest is pure Python (upsert point by point "
               "into local storage), far too slow for 10⁵–10⁶ here; a Qdrant server (`CVGL_QDRANT_URL`) is the "
               "scale-out path and is not measured on this machine."
               if "qdrant" in config.types else ""), "",
              (f"`index_type='auto'` picks flat below {FLAT_MAX:,} vectors, SQ8 up to {SQ8_MAX:,}, IVF-PQ above "
               "(thresholds read off this table: see `cvgl.index.backends`)."), "",
              f"While this ran, {monitor.others()}. Total {time.perf_counter() - started:.0f} s.", ""]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cvgl.bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here (atomically)")
    parser.add_argument("--quick", action="store_true", help="smoke test: mixture stand-in, 2e4 vectors")
    parser.add_argument("--sizes", default=None, help="comma-separated database sizes (default 1e5,1e6)")
    parser.add_argument("--types", default=None, help="subset of flat,sq8,ivfpq,hnsw,qdrant")
    parser.add_argument("--queries", type=int, default=None)
    parser.add_argument("--weights", default="embedded", help="encoder weights for the real descriptors")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    config = Config(weights=args.weights, quick=args.quick)
    if args.quick:
        config.sizes, config.queries, config.latency_queries = (20_000,), 200, 100
        config.types = ("flat", "sq8", "ivfpq", "hnsw")
    if args.sizes:
        config.sizes = tuple(int(float(s)) for s in args.sizes.split(","))
    if args.types:
        config.types = tuple(t.strip() for t in args.types.split(",") if t.strip())
    if args.queries:
        config.queries = args.queries

    return emit_section(run(config, argv, log), args.out)


if __name__ == "__main__":
    raise SystemExit(main())
