"""Sample4Geo's batch samplers: GPS-neighbour batches, then Dynamic Similarity Sampling (DSS).

Symmetric InfoNCE uses every other pair in a batch as a negative, so *which* pairs share a batch
decides how hard the negatives are. Sample4Geo (and GenGeo after it) fills a batch with pairs that
are close on the ground (early epochs, when descriptors are still poor) and later with pairs whose
descriptors are close (DSS: from each query's ``K`` most similar references, the ``k/2`` most
similar plus ``k/2`` drawn at random from the rest, refreshed every ``e`` epochs).

Two pairs of the same location in one batch would be *false* negatives, so every batch (and every
DDP global batch) holds each location at most once.

Bugs of the public Sample4Geo code that this module does not repeat: haversine fed with degrees,
and a sampler that treats index / location ``0`` as "missing".

Everything is numpy and O(N·k) in memory: neighbour tables are built chunk by chunk without an
N×N matrix, so CVUSA/VIGOR-sized training sets (35k–100k pairs) fit easily.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from cvgl.alignment import l2n
from cvgl.errors import InputError

__all__ = ["PairBatchSampler", "dss_neighbour_lists", "gps_neighbours", "similarity_neighbours"]

#: Working memory of one chunk of the row-by-all key matrix, in bytes.
_CHUNK_BYTES = 64 * 2**20
#: Slack on -cos(angle) when collecting GPS candidates. float64 dot products of unit vectors are
#: exact to a few 1e-16, so anything within 1e-14 of the k-th key is kept and re-ranked exactly.
_DOT_SLACK = 1e-14
_STATE_FORMAT = 1


def _rows_per_chunk(n: int, itemsize: int, chunk_rows: int | None) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1 (got {chunk_rows})")
        return chunk_rows
    return max(1, _CHUNK_BYTES // max(1, n * itemsize))


def _check_k(k: int, n: int, what: str) -> None:
    if not 1 <= k <= n - 1:
        raise InputError(f"{what}={k} must be in [1, N-1] = [1, {n - 1}] for {n} pairs")


def _k_smallest_per_row(
    key: np.ndarray, k: int, slack: float, refine: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None
) -> np.ndarray:
    """Columns of the ``k`` smallest keys of each row, ordered by (key, column index).

    ``argpartition`` alone picks arbitrarily among equal keys at the k-th place; taking every
    column within ``slack`` of the k-th key and sorting by (exact key, index) makes ties resolve to
    the lower index, whatever the chunking. ``refine(rows, cols)`` recomputes the key of those
    candidates more precisely (GPS: squared chord from coordinate differences).
    """
    kth = np.partition(key, k - 1, axis=1)[:, k - 1]
    rows, cols = np.nonzero(key <= (kth + slack)[:, None])
    exact = key[rows, cols] if refine is None else refine(rows, cols)
    order = np.lexsort((cols, exact, rows))
    rows, cols = rows[order], cols[order]
    starts = np.searchsorted(rows, np.arange(key.shape[0]))
    return cols[starts[:, None] + np.arange(k)]


def _unit_vectors(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Points on the unit sphere (float64) from latitude/longitude in degrees."""
    phi, lam = np.radians(lat), np.radians(lon)
    cos_phi = np.cos(phi)
    return np.stack([cos_phi * np.cos(lam), cos_phi * np.sin(lam), np.sin(phi)], axis=1)


def _validated_latlon(lat: Any, lon: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    if lat.ndim != 1 or lat.shape != lon.shape:
        raise InputError(f"{what}: lat and lon must be 1-D arrays of equal length (got {lat.shape} and {lon.shape})")
    bad = ~(np.isfinite(lat) & np.isfinite(lon) & (np.abs(lat) <= 90.0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{what}: row {row} has lat={lat[row]}, lon={lon[row]}; give finite WGS84 degrees with |lat| <= 90"
        )
    return lat, lon


def gps_neighbours(lat: Any, lon: Any, k: int, *, chunk_rows: int | None = None) -> np.ndarray:
    """For each pair, the ``k`` nearest *other* pairs by great-circle distance, nearest first.

    ``lat``/``lon`` are WGS84 degrees. Ranking is on the unit sphere (great-circle distance is
    monotone in the chord), which differs from the ellipsoidal geodesic by < 0.5 % — irrelevant for
    choosing negatives. The chunked row-by-all product runs in **float64**: float32 cosines of
    nearby points round to 1 below ~2 km, which would make every CVUSA neighbour a tie. Candidates
    are then re-ranked by the squared chord computed from coordinate differences (no cancellation)
    and ties go to the lower index. Returns ``int32 [N, k]``; memory O(chunk·N + N·k).
    """
    lat, lon = _validated_latlon(lat, lon, "gps_neighbours")
    n = lat.size
    _check_k(k, n, "k")
    unit = _unit_vectors(lat, lon)
    out = np.empty((n, k), dtype=np.int32)
    step = _rows_per_chunk(n, 8, chunk_rows)
    for start in range(0, n, step):
        stop = min(n, start + step)
        key = -(unit[start:stop] @ unit.T)
        key[np.arange(stop - start), np.arange(start, stop)] = np.inf

        def chord2(rows: np.ndarray, cols: np.ndarray, start: int = start) -> np.ndarray:
            diff = unit[start + rows] - unit[cols]
            return np.einsum("ij,ij->i", diff, diff)

        out[start:stop] = _k_smallest_per_row(key, k, _DOT_SLACK, chord2)
    return out


def similarity_neighbours(
    query_desc: Any, reference_desc: Any, K: int = 128, *, chunk_rows: int | None = None
) -> np.ndarray:
    """For each pair ``i``, the ``K`` references most cosine-similar to query ``i``, excluding
    reference ``i`` (its positive), most similar first — DSS's hard-negative candidates.

    Descriptors are L2-normalised here (cosine, as in the paper) and compared in float32, chunk by
    chunk; exact ties go to the lower index. Returns ``int32 [N, K]``.
    """
    query = np.asarray(query_desc, dtype=np.float32)
    reference = np.asarray(reference_desc, dtype=np.float32)
    if query.ndim != 2 or query.shape != reference.shape:
        raise InputError(
            f"similarity_neighbours: query and reference descriptors must be [N, D] of equal shape "
            f"(got {query.shape} and {reference.shape})"
        )
    if not (np.isfinite(query).all() and np.isfinite(reference).all()):
        raise InputError("similarity_neighbours: descriptors contain NaN or inf")
    n = query.shape[0]
    _check_k(K, n, "K")
    query, reference = l2n(query), l2n(reference)
    out = np.empty((n, K), dtype=np.int32)
    step = _rows_per_chunk(n, 4, chunk_rows)
    for start in range(0, n, step):
        stop = min(n, start + step)
        key = -(query[start:stop] @ reference.T)
        key[np.arange(stop - start), np.arange(start, stop)] = np.inf
        out[start:stop] = _k_smallest_per_row(key, K, 0.0)
    return out


def dss_neighbour_lists(similarity_table: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Per query: the ``k//2`` most similar candidates plus ``k - k//2`` drawn without replacement
    from the rest of its ``K`` candidates, in a random order per row.

    The row is shuffled so that an anchor that takes only a few neighbours (``neighbours_per_anchor``
    < k) still gets the paper's mix of hard and random-hard negatives, not just the hardest ones.
    """
    table = np.asarray(similarity_table)
    big_k = table.shape[1]
    if not 1 <= k <= big_k:
        raise InputError(f"DSS k={k} must be in [1, K={big_k}]")
    half = k // 2
    rest = table[:, half:]
    picked = np.argsort(rng.random(rest.shape), axis=1)[:, : k - half]
    lists = np.concatenate([table[:, :half], np.take_along_axis(rest, picked, axis=1)], axis=1)
    order = np.argsort(rng.random(lists.shape), axis=1)
    return np.take_along_axis(lists, order, axis=1)


class _BatchFiller:
    """Fills batches of ``batch_size`` pairs in which each location appears at most once.

    A pair whose location is already in the current batch waits in a queue and is placed first in
    the following batches, so repeated locations are delayed, not lost.
    """

    def __init__(self, location: np.ndarray, n_locations: int, batch_size: int) -> None:
        self.location = location
        self.batch_size = batch_size
        self.used = np.zeros(location.size, dtype=bool)
        self.batch_of_location = np.full(n_locations, -1, dtype=np.int64)
        self.number = 0  # the current batch's number
        self.current: list[int] = []
        self.full: list[np.ndarray] = []
        self.waiting: deque[int] = deque()

    def fits(self, i: int) -> bool:
        return not self.used[i] and self.batch_of_location[self.location[i]] != self.number

    def add(self, i: int) -> bool:
        """Put pair ``i`` (which must fit) in the batch; True when that closed the batch."""
        self._put(i)
        if len(self.current) < self.batch_size:
            return False
        self._close_full()
        self._place_waiting()
        return True

    def wait(self, i: int) -> None:
        self.waiting.append(i)

    def finish(self) -> list[np.ndarray]:
        """Place every waiting pair; returns the trailing partial batches."""
        partial: list[np.ndarray] = []
        while self.current or self.waiting:
            self._place_waiting()
            if self.current:
                partial.append(np.asarray(self.current, dtype=np.int64))
                self.current = []
                self.number += 1
        return partial

    def _put(self, i: int) -> None:
        self.used[i] = True
        self.batch_of_location[self.location[i]] = self.number
        self.current.append(i)

    def _close_full(self) -> None:
        self.full.append(np.asarray(self.current, dtype=np.int64))
        self.current = []
        self.number += 1

    def _place_waiting(self) -> None:
        """Move waiting pairs into the (fresh) current batch while they fit."""
        closed = True
        while closed:
            closed = False
            for _ in range(len(self.waiting)):
                i = self.waiting.popleft()
                if self.used[i]:
                    continue
                if not self.fits(i):
                    self.waiting.append(i)
                    continue
                self._put(i)
                if len(self.current) == self.batch_size:
                    self._close_full()
                    closed = True


def _greedy_batches(
    order: np.ndarray,
    neighbours: np.ndarray | None,
    neighbours_per_anchor: int,
    location: np.ndarray,
    n_locations: int,
    batch_size: int,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Walk ``order``; each unused anchor joins the current batch with up to
    ``neighbours_per_anchor`` unused neighbours (in list order) whose location is not in the batch
    yet. A group is cut where the batch fills; the rest of its list comes later as anchors.

    Returns (full batches, trailing partial batches); each pair appears at most once.
    """
    filler = _BatchFiller(location, n_locations, batch_size)
    for anchor in order.tolist():
        if filler.used[anchor]:
            continue
        if not filler.fits(anchor):
            filler.wait(anchor)
            continue
        if filler.add(anchor) or neighbours is None:
            continue
        taken = 0
        for j in neighbours[anchor].tolist():
            if taken == neighbours_per_anchor:
                break
            if filler.fits(j):
                taken += 1
                if filler.add(j):
                    break
    partial = filler.finish()
    return filler.full, partial


class PairBatchSampler(Sampler[list[int]]):
    """Batches of pair indices with unique locations: GPS neighbours first, then DSS.

    Each epoch: shuffle the pairs with a generator seeded by ``(seed, epoch)``; walk them; an unused
    anchor joins the batch with up to ``neighbours_per_anchor`` unused neighbours from its list
    (GPS table, or the DSS list once :meth:`set_similarity` was called), skipping neighbours whose
    location is already in the batch. Without ``lat``/``lon`` the GPS stage is a plain shuffle.

    Trainer protocol, every epoch::

        sampler.set_epoch(epoch)
        if sampler.needs_similarity(epoch):
            sampler.set_similarity(query_desc, reference_desc)   # every `dss_every` epochs
        for batch in DataLoader(dataset, batch_sampler=sampler): ...

    Remainder: with ``drop_last`` (default) only batches of exactly ``batch_size`` are yielded, so
    at most ``batch_size * num_replicas - 1`` pairs (plus pairs of over-repeated locations that
    could not be spread over the epoch) are skipped, differently each epoch. Without it, trailing
    partial batches follow (each still with unique locations; single process only).

    DDP: every rank builds the same global batches (same seed) of ``batch_size * num_replicas``
    pairs and yields its contiguous slice, so the negatives gathered across ranks form one
    unique-location global batch. ``len(sampler)`` is exact for the current epoch (it may differ by
    a batch between epochs when locations repeat).
    """

    def __init__(
        self,
        location_ids: Sequence[Any] | np.ndarray,
        lat: Any | None,
        lon: Any | None,
        batch_size: int,
        *,
        neighbours_per_anchor: int = 8,
        gps_k: int = 64,
        dss_start_epoch: int = 4,
        dss_every: int = 4,
        dss_k: int = 64,
        dss_K: int = 128,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = True,
    ) -> None:
        locations = np.asarray(location_ids)
        if locations.ndim != 1 or locations.size < 2:
            raise InputError(f"PairBatchSampler: location_ids must be 1-D with >= 2 pairs (got shape {locations.shape})")
        n = locations.size
        _, self._location = np.unique(locations, return_inverse=True)
        self._location = self._location.reshape(-1).astype(np.int64)
        self._n_locations = int(self._location.max()) + 1
        if batch_size < 1 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise InputError(
                f"PairBatchSampler: need batch_size >= 1, num_replicas >= 1 and 0 <= rank < num_replicas "
                f"(got {batch_size}, {num_replicas}, {rank})"
            )
        if num_replicas > 1 and not drop_last:
            raise InputError("PairBatchSampler: num_replicas > 1 needs drop_last=True (ranks need equal batches)")
        if neighbours_per_anchor < 0 or dss_every < 1 or dss_k < 1 or dss_K < 1 or gps_k < 1:
            raise InputError("PairBatchSampler: neighbours_per_anchor >= 0 and dss_every, dss_k, dss_K, gps_k >= 1")
        self.n = n
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.drop_last = drop_last
        self.neighbours_per_anchor = neighbours_per_anchor
        self.dss_start_epoch = dss_start_epoch
        self.dss_every = dss_every
        # Small datasets clamp the table sizes instead of failing.
        self.dss_K = min(dss_K, n - 1)
        self.dss_k = min(dss_k, self.dss_K)
        self.seed = seed
        self.epoch = 0
        self._position = 0  # global batches of the current epoch already yielded
        self._batches: tuple[int, list[np.ndarray]] | None = None  # (epoch, global batches)
        self._similarity: np.ndarray | None = None
        self._similarity_epoch = -1

        if (lat is None) != (lon is None):
            raise InputError("PairBatchSampler: give both lat and lon, or neither (plain shuffle)")
        self._gps: np.ndarray | None = None
        digest = hashlib.sha256(np.ascontiguousarray(self._location).tobytes())
        if lat is not None:
            lat, lon = _validated_latlon(lat, lon, "PairBatchSampler")
            if lat.size != n:
                raise InputError(f"PairBatchSampler: {lat.size} coordinates for {n} location ids")
            self._gps = gps_neighbours(lat, lon, min(gps_k, n - 1))
            digest.update(lat.tobytes() + lon.tobytes())
        settings = [batch_size, num_replicas, drop_last, neighbours_per_anchor, gps_k, dss_k, dss_K]
        digest.update(json.dumps(settings).encode())
        self._fingerprint = digest.hexdigest()

    # -- schedule -------------------------------------------------------------------------------
    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    @property
    def mode(self) -> str:
        """``"dss"`` once a similarity table is set, else ``"gps"`` (or ``"random"`` without GPS)."""
        if self._similarity is not None:
            return "dss"
        return "gps" if self._gps is not None else "random"

    def needs_similarity(self, epoch: int) -> bool:
        """True on the epochs where the trainer must extract descriptors and call set_similarity."""
        start = self.dss_start_epoch
        return start >= 0 and epoch >= start and (epoch - start) % self.dss_every == 0

    def _refresh_epoch(self, epoch: int) -> int:
        """The latest refresh epoch at or before ``epoch`` (-1 before DSS starts)."""
        start = self.dss_start_epoch
        if start < 0 or epoch < start:
            return -1
        return start + (epoch - start) // self.dss_every * self.dss_every

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a new epoch starts at its first batch, the current one keeps its place
        (so ``load_state_dict`` followed by ``set_epoch(same epoch)`` resumes mid-epoch)."""
        if epoch != self.epoch:
            self.epoch = epoch
            self._position = 0

    def set_similarity(self, query_desc: Any, reference_desc: Any) -> None:
        """Switch to DSS with fresh descriptors of the training pairs (row i = pair i)."""
        self.set_similarity_table(similarity_neighbours(query_desc, reference_desc, self.dss_K))

    def set_similarity_table(self, table: Any) -> None:
        """Use a precomputed ``[N, K]`` similarity table (e.g. computed on rank 0 and broadcast,
        so every rank builds identical batches even if float32 products differ across hosts)."""
        table = np.asarray(table)
        if table.shape != (self.n, self.dss_K) or not np.issubdtype(table.dtype, np.integer):
            raise InputError(f"similarity table must be integer [{self.n}, {self.dss_K}] (got {table.dtype} {table.shape})")
        if table.size and (table.min() < 0 or table.max() >= self.n):
            raise InputError(f"similarity table holds indices outside [0, {self.n})")
        epoch_finished = self._batches is not None and self._position >= len(self._batches[1])
        if self._position != 0 and not epoch_finished:
            raise InputError("set_similarity was called in the middle of an epoch; call it right after set_epoch")
        self._similarity = table.astype(np.int32, copy=True)
        self._similarity_epoch = self.epoch
        self._batches = None
        self._position = 0

    # -- batches --------------------------------------------------------------------------------
    def _neighbour_table(self, epoch: int) -> np.ndarray | None:
        refresh = self._refresh_epoch(epoch)
        if refresh >= 0 and self._similarity_epoch != refresh:
            raise InputError(
                f"PairBatchSampler: epoch {epoch} samples by similarity refreshed at epoch {refresh}, but the table "
                f"is from epoch {self._similarity_epoch}; call set_epoch({epoch}) then set_similarity(...) when "
                f"needs_similarity(epoch) is true"
            )
        if self._similarity is not None:
            rng = np.random.default_rng([self.seed, epoch, 1])
            return dss_neighbour_lists(self._similarity, self.dss_k, rng)
        return self._gps

    def _epoch_batches(self) -> list[np.ndarray]:
        """The global batches of the current epoch, built once and cached."""
        if self._batches is None or self._batches[0] != self.epoch:
            order = np.random.default_rng([self.seed, self.epoch, 0]).permutation(self.n)
            full, partial = _greedy_batches(
                order,
                self._neighbour_table(self.epoch),
                self.neighbours_per_anchor,
                self._location,
                self._n_locations,
                self.global_batch_size,
            )
            self._batches = (self.epoch, full if self.drop_last else full + partial)
        return self._batches[1]

    def global_batches(self) -> list[np.ndarray]:
        """All global batches of the current epoch (every rank's slices together)."""
        return [b.copy() for b in self._epoch_batches()]

    def __len__(self) -> int:
        return len(self._epoch_batches())

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._epoch_batches()
        if self._position >= len(batches):
            self._position = 0  # iterating a finished epoch again replays it
        lo = self.rank * self.batch_size
        while self._position < len(batches):
            batch = batches[self._position]
            self._position += 1
            yield batch[lo : lo + self.batch_size].tolist() if self.num_replicas > 1 else batch.tolist()

    # -- checkpointing --------------------------------------------------------------------------
    def state_dict(self, batches_done: int | None = None) -> dict[str, Any]:
        """Everything an exact resume needs; loadable with ``torch.load(weights_only=True)``.

        ``batches_done`` overrides the number of yielded batches: pass the trainer's step count
        within the epoch when a DataLoader with workers prefetches ahead of training.
        """
        position = self._position if batches_done is None else int(batches_done)
        return {
            "format": _STATE_FORMAT,
            "fingerprint": self._fingerprint,
            "seed": int(self.seed),
            "epoch": int(self.epoch),
            "position": position,
            "similarity_epoch": int(self._similarity_epoch),
            "similarity": None if self._similarity is None else torch.from_numpy(self._similarity.copy()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` taken from a sampler on the same pairs and settings."""
        if state.get("format") != _STATE_FORMAT:
            raise InputError(f"sampler state has format {state.get('format')}, expected {_STATE_FORMAT}")
        if state.get("fingerprint") != self._fingerprint:
            raise InputError(
                "sampler state was saved for other pairs, coordinates or batch settings; resume with the same data and config"
            )
        similarity = state["similarity"]
        self._similarity = None if similarity is None else np.asarray(similarity, dtype=np.int32).copy()
        self._similarity_epoch = int(state["similarity_epoch"])
        self.seed = int(state["seed"])
        self.epoch = int(state["epoch"])
        self._position = int(state["position"])
        self._batches = None
