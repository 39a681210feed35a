"""Sample4Geo samplers: neighbour tables against plain references, batch invariants, resume, DDP."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cvgl.errors import InputError
from cvgl.train.sampling import (
    PairBatchSampler,
    _greedy_batches,
    dss_neighbour_lists,
    gps_neighbours,
    similarity_neighbours,
)

FAST = settings(max_examples=60, deadline=None)
EARTH_R = 6_371_008.8
TOL_M = 1e-4  # reference distances closer than this count as ties that may come in either order
# ... plus 1e-8 of the distance: near the antipode both haversine and the chord are ill-conditioned
# (asin near 1), to ~0.2 m at 20 000 km; irrelevant for neighbours, but it must not fail the test.
TOL_REL = 1e-8


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Plain float64 haversine on the sphere, inputs in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_R * math.asin(math.sqrt(min(1.0, a)))


def reference_gps(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """[N, N] haversine distances by a double loop (self = inf)."""
    n = lat.size
    dist = np.full((n, n), np.inf)
    for i in range(n):
        for j in range(n):
            if i != j:
                dist[i, j] = haversine_m(lat[i], lon[i], lat[j], lon[j])
    return dist


def check_against_reference(got: np.ndarray, dist: np.ndarray) -> None:
    """Same distances in the same order; indices equal wherever the reference has no near-tie."""
    n, k = got.shape
    for i in range(n):
        order = np.lexsort((np.arange(n), dist[i]))
        want_d = dist[i, order[:k]]
        got_d = dist[i, got[i]]
        np.testing.assert_allclose(got_d, want_d, rtol=TOL_REL, atol=TOL_M)
        assert len(set(got[i].tolist())) == k and i not in got[i]
        full = dist[i, order]
        for pos in range(k):
            lo = full[pos - 1] if pos else -np.inf
            hi = full[pos + 1] if pos + 1 < n - 1 else np.inf
            tol = TOL_M + TOL_REL * full[pos]
            if full[pos] - lo > tol and hi - full[pos] > tol:
                assert got[i, pos] == order[pos]


lat_values = st.one_of(
    st.floats(-90, 90),
    st.sampled_from([90.0, -90.0, 89.99999, -89.99999, 0.0]),
)
lon_values = st.one_of(
    st.floats(-180, 180),
    st.sampled_from([180.0, -180.0, 179.99999, -179.99999, 0.0]),
)


@st.composite
def point_sets(draw):
    """Global scatter, plus clusters at metre to centimetre scale (where float cosines fail)."""
    points = draw(st.lists(st.tuples(lat_values, lon_values), min_size=1, max_size=12))
    for lat0, lon0 in list(points[: draw(st.integers(0, 3))]):
        scale = draw(st.sampled_from([1e-4, 1e-6, 1e-7]))  # 11 m, 11 cm, 1 cm
        for _ in range(draw(st.integers(1, 4))):
            dlat = scale * draw(st.floats(-1, 1))
            dlon = scale * draw(st.floats(-1, 1))
            points.append((max(-90.0, min(90.0, lat0 + dlat)), lon0 + dlon))
    if len(points) < 2:
        points.append((draw(lat_values), draw(lon_values)))
    lat, lon = (np.array(v, dtype=np.float64) for v in zip(*points))
    return lat, lon


@FAST
@given(point_sets(), st.data())
def test_gps_neighbours_match_haversine_loop(points, data):
    lat, lon = points
    n = lat.size
    k = data.draw(st.integers(1, n - 1))
    chunk = data.draw(st.integers(1, n))
    got = gps_neighbours(lat, lon, k, chunk_rows=chunk)
    assert got.shape == (n, k) and got.dtype == np.int32
    check_against_reference(got, reference_gps(lat, lon))


@FAST
@given(st.integers(0, 2**31), st.integers(3, 14), st.data())
def test_gps_ties_go_to_lower_index_whatever_the_chunking(seed, n_base, data):
    rng = np.random.default_rng(seed)
    base_lat, base_lon = rng.uniform(-80, 80, n_base), rng.uniform(-180, 180, n_base)
    copies = rng.integers(0, n_base, size=data.draw(st.integers(1, 10)))
    lat, lon = np.concatenate([base_lat, base_lat[copies]]), np.concatenate([base_lon, base_lon[copies]])
    n = lat.size
    k = data.draw(st.integers(1, n - 1))
    dist = reference_gps(lat, lon)
    want = np.stack([np.lexsort((np.arange(n), dist[i]))[:k] for i in range(n)])
    for chunk in (1, 3, n):
        np.testing.assert_array_equal(gps_neighbours(lat, lon, k, chunk_rows=chunk), want)


def test_gps_neighbours_across_antimeridian_and_pole_and_index_zero():
    # 0: east of the antimeridian, 1: 22 m west of it, 2: 111 km away; 3/4: 222 m apart over the pole.
    lat = np.array([10.0, 10.0, 11.0, 89.999, 89.999, 0.0])
    lon = np.array([179.9999, -179.9999, 179.9999, 0.0, 180.0, 0.0])
    got = gps_neighbours(lat, lon, 1)
    assert got[:, 0].tolist()[:5] == [1, 0, 0, 4, 3]  # index 0 is a neighbour like any other


@pytest.mark.parametrize(
    ("lat", "lon"),
    [([0.0, 91.0], [0.0, 0.0]), ([0.0, np.nan], [0.0, 0.0]), ([0.0, 1.0], [0.0])],
)
def test_gps_neighbours_rejects_bad_coordinates(lat, lon):
    with pytest.raises(InputError):
        gps_neighbours(lat, lon, 1)


def test_gps_neighbours_rejects_k_out_of_range():
    with pytest.raises(InputError):
        gps_neighbours([0.0, 1.0], [0.0, 1.0], 2)


def reference_similarity(query: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[N, N] cosine similarities in float64, row by row (self = -inf)."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True)
    r = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    sim = np.array([[float(np.dot(q[i], r[j])) for j in range(len(r))] for i in range(len(q))])
    np.fill_diagonal(sim, -np.inf)
    return sim


@FAST
@given(st.integers(0, 2**31), st.integers(2, 40), st.data())
def test_similarity_neighbours_exact_with_ties(seed, n, data):
    """Binary descriptors with four ones each: every product is exact, so ties are exact too."""
    rng = np.random.default_rng(seed)
    desc = np.zeros((2, n, 8), dtype=np.float32)
    for view in range(2):
        for i in range(n):
            desc[view, i, rng.choice(8, 4, replace=False)] = 1.0
    k = data.draw(st.integers(1, n - 1))
    sim = reference_similarity(desc[0], desc[1])
    want = np.stack([np.lexsort((np.arange(n), -sim[i]))[:k] for i in range(n)])
    for chunk in (1, 7, n):
        np.testing.assert_array_equal(similarity_neighbours(desc[0], desc[1], k, chunk_rows=chunk), want)


def test_similarity_neighbours_random_descriptors_match_reference():
    rng = np.random.default_rng(3)
    query = rng.normal(size=(120, 16)).astype(np.float32)
    reference = (query + 0.5 * rng.normal(size=query.shape)).astype(np.float32)
    got = similarity_neighbours(query, reference, 20, chunk_rows=17)
    sim = reference_similarity(query, reference)
    for i in range(len(query)):
        want = np.sort(sim[i])[::-1][:20]
        np.testing.assert_allclose(sim[i, got[i]], want, atol=1e-6)
        assert i not in got[i]


def test_similarity_neighbours_rejects_mismatched_shapes():
    with pytest.raises(InputError):
        similarity_neighbours(np.ones((4, 3)), np.ones((5, 3)), 2)


@FAST
@given(st.integers(0, 2**31), st.integers(1, 20), st.integers(0, 12))
def test_dss_lists_are_half_nearest_half_random(seed, k, extra):
    big_k = k + extra
    rng = np.random.default_rng(seed)
    table = np.stack([rng.permutation(500)[:big_k] for _ in range(30)])
    lists = dss_neighbour_lists(table, k, np.random.default_rng(seed + 1))
    assert lists.shape == (30, k)
    half = k // 2
    for row, chosen in zip(table, lists):
        chosen = set(chosen.tolist())
        assert len(chosen) == k
        assert set(row[:half].tolist()) <= chosen  # the k/2 most similar always
        assert chosen - set(row[:half].tolist()) <= set(row[half:].tolist())  # the rest from the K
    again = dss_neighbour_lists(table, k, np.random.default_rng(seed + 1))
    np.testing.assert_array_equal(lists, again)


def test_dss_random_half_changes_between_draws():
    table = np.tile(np.arange(1, 129), (50, 1))
    a = dss_neighbour_lists(table, 64, np.random.default_rng(0))
    b = dss_neighbour_lists(table, 64, np.random.default_rng(1))
    assert {frozenset(r) for r in a.tolist()} != {frozenset(r) for r in b.tolist()}


# -- the batch sampler ---------------------------------------------------------------------------


def grid(rows: int, cols: int, spacing_deg: float = 5e-4) -> tuple[np.ndarray, np.ndarray]:
    ii, jj = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    return 40.0 + spacing_deg * ii.ravel(), -105.0 + spacing_deg * jj.ravel()


def reference_greedy(order, lists, per_anchor, location, batch_size):
    """Plain restatement of the batching rule for data with unique locations (nothing waits)."""
    used, batches, current = set(), [], []
    for anchor in order:
        if anchor in used:
            continue
        group = [anchor]
        for j in [] if lists is None else lists[anchor]:
            if len(group) == per_anchor + 1 or len(current) + len(group) == batch_size:
                break
            if j not in used and j not in group and location[j] not in {location[x] for x in current + group}:
                group.append(j)
        used.update(group)
        current += group
        if len(current) == batch_size:
            batches.append(current)
            current = []
    return batches


@FAST
@given(st.integers(0, 2**31), st.integers(10, 120), st.integers(1, 9), st.integers(0, 5), st.booleans())
def test_greedy_batches_match_plain_rule(seed, n, batch_size, per_anchor, with_lists):
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    lists = np.stack([rng.permutation(n)[:6] for _ in range(n)]) if with_lists else None
    location = rng.permutation(n)  # unique
    full, partial = _greedy_batches(order, lists, per_anchor, location, n, batch_size)
    want = reference_greedy(order.tolist(), None if lists is None else lists.tolist(), per_anchor, location, batch_size)
    assert [b.tolist() for b in full] == want
    assert sum(b.size for b in full + partial) == n


def assert_valid_epoch(batches, location, batch_size, n):
    seen = np.concatenate(batches) if batches else np.empty(0, dtype=np.int64)
    assert len(set(seen.tolist())) == seen.size  # each pair at most once
    for b in batches:
        assert len(set(location[b].tolist())) == b.size  # unique locations
    return seen


@FAST
@given(st.integers(0, 2**31), st.integers(12, 150), st.integers(2, 12), st.integers(1, 3), st.booleans())
def test_sampler_invariants_with_repeated_locations(seed, n, batch_size, repeat, gps):
    rng = np.random.default_rng(seed)
    location = rng.integers(0, max(2, n // repeat), size=n) - 3  # ids include 0 and negatives
    lat, lon = (rng.uniform(40, 40.01, n), rng.uniform(-105, -104.99, n)) if gps else (None, None)
    keep = PairBatchSampler(location, lat, lon, batch_size, neighbours_per_anchor=3, gps_k=10, seed=seed)
    everything = PairBatchSampler(location, lat, lon, batch_size, neighbours_per_anchor=3, gps_k=10, seed=seed,
                                  drop_last=False)
    full = keep.global_batches()
    assert all(b.size == batch_size for b in full)
    assert_valid_epoch(full, location, batch_size, n)
    every = everything.global_batches()
    assert sorted(assert_valid_epoch(every, location, batch_size, n).tolist()) == list(range(n))
    assert [b.tolist() for b in every[: len(full)]] == [b.tolist() for b in full]


@FAST
@given(st.integers(0, 2**31), st.integers(12, 150), st.integers(2, 12))
def test_unique_locations_cover_all_but_the_remainder(seed, n, batch_size):
    rng = np.random.default_rng(seed)
    location = rng.permutation(n)  # CVUSA-like: one pair per location; location 0 included
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)
    sampler = PairBatchSampler(location, lat, lon, batch_size, neighbours_per_anchor=4, seed=seed)
    batches = list(sampler)
    assert len(batches) == len(sampler) == n // batch_size
    seen = assert_valid_epoch([np.array(b) for b in batches], location, batch_size, n)
    assert seen.size >= n - batch_size


def batch_distances(batches, lat, lon) -> tuple[float, float]:
    """(mean pairwise distance, mean distance to the nearest batch-mate) over all batches, metres."""
    pairwise, nearest = [], []
    for b in batches:
        d = np.array([[haversine_m(lat[x], lon[x], lat[y], lon[y]) if x != y else np.inf for y in b] for x in b])
        pairwise.extend(d[np.triu_indices(len(b), 1)].tolist())
        nearest.extend(d.min(axis=1).tolist())
    return float(np.mean(pairwise)), float(np.mean(nearest))


def test_gps_mode_groups_geographic_neighbours():
    lat, lon = grid(24, 24)  # 55 m x 43 m spacing
    location = np.arange(lat.size)
    shuffled = PairBatchSampler(location, None, None, 16, seed=0)
    one_group = PairBatchSampler(location, lat, lon, 16, neighbours_per_anchor=15, gps_k=32, seed=0)
    two_groups = PairBatchSampler(location, lat, lon, 16, neighbours_per_anchor=7, gps_k=16, seed=0)
    assert shuffled.mode == "random" and one_group.mode == "gps"
    random_pairwise, random_nearest = batch_distances(list(shuffled), lat, lon)
    assert batch_distances(list(one_group), lat, lon)[0] < 0.3 * random_pairwise
    assert batch_distances(list(two_groups), lat, lon)[1] < 0.5 * random_nearest


def clustered_descriptors(n_clusters: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, 32))
    query = np.repeat(centres, size, axis=0) + 0.05 * rng.normal(size=(n_clusters * size, 32))
    reference = query + 0.05 * rng.normal(size=query.shape)
    shuffle = rng.permutation(len(query))  # clusters unrelated to index order (and so to the test grids)
    cluster = np.repeat(np.arange(n_clusters), size)
    return query[shuffle].astype(np.float32), reference[shuffle].astype(np.float32), cluster[shuffle]


def test_dss_mode_batches_follow_the_similarity_lists():
    query, reference, cluster = clustered_descriptors(40, 8)
    n = len(query)
    lat, lon = grid(20, 16)
    sampler = PairBatchSampler(np.arange(n), lat, lon, 16, neighbours_per_anchor=7, dss_start_epoch=2, dss_every=2,
                               dss_k=8, dss_K=14, seed=5)
    gps_batches = sampler.global_batches()
    sampler.set_epoch(2)
    assert sampler.needs_similarity(2)
    sampler.set_similarity(query, reference)
    assert sampler.mode == "dss"
    batches = sampler.global_batches()
    # Exactly the greedy rule applied to this epoch's k/2 + k/2 lists.
    table = similarity_neighbours(query, reference, 14)
    lists = dss_neighbour_lists(table, 8, np.random.default_rng([5, 2, 1]))
    order = np.random.default_rng([5, 2, 0]).permutation(n)
    assert [b.tolist() for b in batches] == reference_greedy(order.tolist(), lists.tolist(), 7, np.arange(n), 16)
    # And similar pairs end up together far more often than under GPS sampling.
    def same_cluster_share(bs):
        return np.mean([np.mean(cluster[b][:, None] == cluster[b][None, :]) for b in bs])
    assert same_cluster_share(batches) > 2 * same_cluster_share(gps_batches)


def test_schedule_and_missing_similarity_is_an_error():
    lat, lon = grid(6, 6)
    sampler = PairBatchSampler(np.arange(36), lat, lon, 4, dss_start_epoch=3, dss_every=4, dss_K=10, seed=0)
    assert [e for e in range(12) if sampler.needs_similarity(e)] == [3, 7, 11]
    never = PairBatchSampler(np.arange(36), lat, lon, 4, dss_start_epoch=-1)
    assert not any(never.needs_similarity(e) for e in range(20))
    sampler.set_epoch(3)
    with pytest.raises(InputError, match="set_similarity"):
        len(sampler)
    sampler.set_similarity_table(np.tile(np.arange(1, 11), (36, 1)) % 36)
    assert len(sampler) == 9
    sampler.set_epoch(7)  # stale table from epoch 3
    with pytest.raises(InputError):
        list(sampler)


def test_determinism_by_seed_and_epoch():
    lat, lon = grid(10, 10)
    loc = np.arange(100) // 2

    def run(seed, epoch):
        s = PairBatchSampler(loc, lat, lon, 8, neighbours_per_anchor=3, seed=seed)
        s.set_epoch(epoch)
        return list(s)

    assert run(1, 0) == run(1, 0)
    assert run(1, 0) != run(2, 0)
    assert run(1, 0) != run(1, 1)


def roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dss", [False, True])
def test_exact_resume_mid_epoch(dss):
    query, reference, _ = clustered_descriptors(20, 6, seed=1)
    n = len(query)
    lat, lon = grid(12, 10)
    loc = np.arange(n) % 97

    def make():
        return PairBatchSampler(loc, lat, lon, 8, neighbours_per_anchor=3, dss_start_epoch=1, dss_every=2, dss_k=6,
                                dss_K=12, seed=7)

    def start_epoch(s, epoch):
        s.set_epoch(epoch)
        if s.needs_similarity(epoch):
            s.set_similarity(query, reference)

    epoch = 2 if dss else 0
    full = make()
    for e in range(epoch + 1):
        start_epoch(full, e)
        uninterrupted = list(full)
    start_epoch(full, epoch + 1)
    next_epoch = list(full)

    first = make()
    for e in range(epoch + 1):
        start_epoch(first, e)
    it = iter(first)
    half = [next(it) for _ in range(len(first) // 2)]
    state = roundtrip(first.state_dict())

    resumed = make()
    resumed.load_state_dict(state)
    resumed.set_epoch(epoch)  # the trainer re-announces the epoch it resumes
    assert half + list(resumed) == uninterrupted
    start_epoch(resumed, epoch + 1)
    assert list(resumed) == next_epoch


def test_state_from_other_data_is_refused():
    lat, lon = grid(5, 5)
    a = PairBatchSampler(np.arange(25), lat, lon, 4)
    b = PairBatchSampler(np.arange(25), lat + 1.0, lon, 4)
    with pytest.raises(InputError, match="other pairs"):
        b.load_state_dict(a.state_dict())


def test_set_similarity_mid_epoch_is_refused():
    lat, lon = grid(5, 5)
    s = PairBatchSampler(np.arange(25), lat, lon, 4, dss_K=6)
    next(iter(s))
    with pytest.raises(InputError, match="middle of an epoch"):
        s.set_similarity_table(np.tile(np.arange(1, 7), (25, 1)))


def test_ddp_ranks_take_disjoint_slices_of_one_global_batch():
    lat, lon = grid(9, 9)
    loc = np.arange(81) // 3
    kw = {"neighbours_per_anchor": 4, "gps_k": 8, "seed": 3}
    ranks = [PairBatchSampler(loc, lat, lon, 5, num_replicas=2, rank=r, **kw) for r in range(2)]
    single = PairBatchSampler(loc, lat, lon, 10, **kw)
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for b0, b1, whole in zip(*ranks, single):
        assert len(b0) == len(b1) == 5
        assert not set(b0) & set(b1)
        assert b0 + b1 == whole
        assert len(set(loc[whole].tolist())) == 10


def test_ddp_needs_drop_last_and_valid_rank():
    with pytest.raises(InputError):
        PairBatchSampler(np.arange(10), None, None, 2, num_replicas=2, drop_last=False)
    with pytest.raises(InputError):
        PairBatchSampler(np.arange(10), None, None, 2, num_replicas=2, rank=2)


def test_dataloader_batch_sampler_integration():
    data = torch.arange(40)
    sampler = PairBatchSampler(np.arange(40), None, None, 8, seed=0)
    batches = [b.tolist() for b in torch.utils.data.DataLoader(data, batch_sampler=sampler)]
    assert batches == list(sampler) and len(batches) == 5
