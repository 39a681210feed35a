"""Sequence decoders: exact HMM inference against brute force, sparse transitions, particles, decode."""

from __future__ import annotations

import itertools
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from cvgl.track import (
    EmissionModel,
    Fix,
    FrameEvidence,
    MotionModel,
    ParticleOptions,
    TileStates,
    TrackOptions,
    decode,
)
from cvgl.track.evidence import emission_loglik, outlier_share, retrieval_loglik
from cvgl.track.hmm import forward_backward, forward_filter, viterbi
from cvgl.track.motion import TransitionCache, build_transition, neighbours
from cvgl.track.odometry import Odometry
from cvgl.track.particles import _ffbsm, run_particles, transition_density

SPACING = 56.0


def grid_states(side: int, spacing: float = SPACING) -> TileStates:
    g = np.arange(side) * spacing
    return TileStates(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), spacing, "EPSG:32613")


# --------------------------------------------------------------------------- brute force


def _random_problem(seed: int):
    rng = np.random.default_rng(seed)
    n, t_len = int(rng.integers(2, 5)), int(rng.integers(1, 5))
    states = TileStates(rng.uniform(0, 150, size=(n, 2)), 40.0)
    motion = MotionModel(max_speed_mps=float(rng.uniform(5, 30)), teleport_prob=float(rng.choice([0.0, 1e-3, 0.2])),
                         sigma_fraction=float(rng.choice([0.3, 0.5, math.inf])))
    dts = rng.uniform(0.2, 3.0, size=t_len - 1)
    transitions = [build_transition(states, motion, float(dt)) for dt in dts]
    log_e = rng.normal(0, 2, size=(t_len, n))
    log_e[rng.random((t_len, n)) < 0.1] = -30.0  # near-impossible states
    log_prior = np.log(rng.dirichlet(np.ones(n)))
    return log_e, transitions, log_prior


def _brute_force(log_e, transitions, log_prior):
    """Score of every path by enumeration: (paths [P, T], scores [P])."""
    t_len, n = log_e.shape
    dense = [np.log(np.maximum(tr.dense(), 1e-300)) for tr in transitions]
    paths = np.array(list(itertools.product(range(n), repeat=t_len)))
    scores = log_prior[paths[:, 0]] + log_e[0, paths[:, 0]]
    for t in range(1, t_len):
        scores = scores + dense[t - 1][paths[:, t - 1], paths[:, t]] + log_e[t, paths[:, t]]
    return paths, scores


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_viterbi_matches_brute_force(seed):
    log_e, transitions, log_prior = _random_problem(seed)
    path, score = viterbi(log_e, transitions, log_prior)
    paths, scores = _brute_force(log_e, transitions, log_prior)
    assert score == pytest.approx(scores.max(), abs=1e-9)
    mine = np.flatnonzero((paths == path).all(1))[0]
    assert scores[mine] == pytest.approx(scores.max(), abs=1e-9)  # the path itself is optimal (ties allowed)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000))
def test_forward_backward_marginals_match_brute_force(seed):
    log_e, transitions, log_prior = _random_problem(seed)
    post = forward_backward(log_e, transitions, log_prior)
    paths, scores = _brute_force(log_e, transitions, log_prior)
    p = np.exp(scores - logsumexp(scores))
    t_len, n = log_e.shape
    for t in range(t_len):
        marginal = np.bincount(paths[:, t], weights=p, minlength=n)
        np.testing.assert_allclose(post.smoothed[t], marginal, atol=1e-9)
    assert post.log_likelihood == pytest.approx(logsumexp(scores), abs=1e-8)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000))
def test_causal_filter_is_the_forward_pass_and_sees_only_the_past(seed):
    log_e, transitions, log_prior = _random_problem(seed)
    filtered = forward_filter(log_e, transitions, log_prior).filtered
    np.testing.assert_array_equal(filtered, forward_backward(log_e, transitions, log_prior).filtered)
    t_len, n = log_e.shape
    for t in range(t_len):  # frame t's filtered posterior = brute-force marginal of frames 0..t
        paths, scores = _brute_force(log_e[: t + 1], transitions[:t], log_prior)
        p = np.exp(scores - logsumexp(scores))
        np.testing.assert_allclose(filtered[t], np.bincount(paths[:, t], weights=p, minlength=n), atol=1e-9)
    # Changing a later frame's evidence never changes an earlier filtered posterior.
    if t_len > 1:
        changed = log_e.copy()
        changed[-1] = np.random.default_rng(seed).normal(0, 5, n)
        np.testing.assert_array_equal(forward_filter(changed, transitions, log_prior).filtered[:-1], filtered[:-1])


# --------------------------------------------------------------------------- transitions


def test_transition_is_row_stochastic_bounded_and_sparse_matches_dense():
    states = grid_states(6)
    motion = MotionModel(max_speed_mps=15.0, teleport_prob=1e-3)
    tr = build_transition(states, motion, 2.0)
    dense = tr.dense()
    np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-12)
    dist = np.linalg.norm(states.xy[:, None] - states.xy[None], axis=2)
    reach = motion.reach_m(2.0, SPACING)
    assert reach == pytest.approx(15.0 * 2.0 + SPACING)
    # Beyond the reach only the teleport term is left.
    np.testing.assert_allclose(dense[dist > reach], 1e-3 / len(states))
    assert (dense[dist <= reach] > 1e-3 / len(states)).all()
    p = np.random.default_rng(0).dirichlet(np.ones(len(states)))
    np.testing.assert_allclose(tr.propagate(p), dense.T @ p, atol=1e-14)
    np.testing.assert_allclose(tr.pull_back(p), dense @ p, atol=1e-14)


def test_transition_memory_and_time_are_linear_in_tiles():
    states = grid_states(200)  # 40 000 tiles, a 11 km square
    motion = MotionModel(max_speed_mps=20.0)
    started = time.perf_counter()
    tr = build_transition(states, motion, 1.5)
    built = time.perf_counter() - started
    reach = motion.reach_m(1.5, SPACING)
    per_tile = math.pi * (reach / SPACING + 1) ** 2  # a generous bound on lattice points in the disc
    assert len(tr.src) <= per_tile * len(states)
    nbytes = tr.src.nbytes + tr.log_k.nbytes + tr.dst_ptr.nbytes + tr.k_t.data.nbytes + tr.k_t.indices.nbytes
    assert nbytes < 64 * per_tile * len(states)  # O(N k) bytes, nowhere near N^2 = 1.6e9 entries
    assert built < 10.0
    log_e = np.random.default_rng(0).normal(0, 1, size=(3, len(states)))
    started = time.perf_counter()
    viterbi(log_e, [tr, tr])
    forward_backward(log_e, [tr, tr])
    assert time.perf_counter() - started < 10.0


def test_transition_cache_shares_intervals_and_resets_long_gaps():
    states = grid_states(5)
    cache = TransitionCache(states, MotionModel(max_speed_mps=10.0, max_reach_m=500.0))
    trs = cache.for_intervals(np.array([1.0, 1.0, 1.02, 100.0]))
    assert trs[0] is trs[1] and trs[2] is not trs[0]
    assert trs[2].reach_m >= 10.0 * 1.02 + SPACING  # rounded up, never down
    assert trs[3].is_reset
    np.testing.assert_allclose(trs[3].dense(), 1.0 / len(states))
    with pytest.raises(ValueError, match="time order"):
        cache.for_intervals(np.array([-1.0]))


def test_neighbours_are_exactly_the_pairs_within_the_radius():
    rng = np.random.default_rng(1)
    states = TileStates(rng.uniform(0, 300, size=(60, 2)), 30.0)
    pairs = neighbours(states, 70.0)
    dist = np.linalg.norm(states.xy[:, None] - states.xy[None], axis=2)
    expected = {(i, j) for i, j in zip(*np.nonzero(dist <= 70.0))}
    assert set(zip(pairs.src.tolist(), pairs.dst.tolist())) == expected
    assert np.all(np.diff(pairs.dst) >= 0)


# --------------------------------------------------------------------------- emissions


def test_retrieval_loglik_is_a_robust_ratio():
    model = EmissionModel(temperature=0.02, outlier_prob=0.1)
    np.testing.assert_allclose(retrieval_loglik(np.full(10, 0.3), model), 0.0, atol=1e-12)  # flat: no information
    scores = np.array([0.5, 0.2, -np.inf, 0.1])
    e = retrieval_loglik(scores, model)
    assert e[2] == pytest.approx(math.log(0.1))  # unscored: the floor, not -inf
    assert e.min() >= math.log(0.1) - 1e-12 and e[0] == e.max()
    assert np.exp(e).mean() == pytest.approx(1.0)  # a ratio against an uninformative frame, on average 1


def test_outlier_share_flags_evidence_that_disagrees_with_the_posterior():
    model = EmissionModel(temperature=0.01, outlier_prob=0.1)
    scores = np.array([0.9, 0.1, 0.1, 0.1])
    assert outlier_share(scores, np.array([1.0, 0, 0, 0]), model) < 0.05
    assert outlier_share(scores, np.array([0, 0, 0, 1.0]), model) > 0.95


# --------------------------------------------------------------------------- synthetic flights


def synthetic_flight(states: TileStates, seed: int, frames: int = 30, dt: float = 1.5, speed: float = 10.0,
                     bad: tuple[int, ...] = (), impostor_rate: float = 0.3):
    """A straight flight over a grid with score fields peaked at the truth; a share of frames
    have a stronger impostor peak elsewhere, and ``bad`` frames peak only far from the truth."""
    rng = np.random.default_rng(seed)
    start = states.xy.min(0) + 80.0
    direction = np.array([math.sin(0.6), math.cos(0.6)])
    truth = start + np.outer(np.arange(frames) * dt * speed, direction)
    out = []
    for t in range(frames):
        d = np.linalg.norm(states.xy - truth[t], axis=1)
        peak = 0.06 * np.exp(-0.5 * (d / 40.0) ** 2)
        if t in bad:
            peak = 0.0 * peak
        scores = 0.5 + peak + rng.normal(0, 0.01, len(states))
        if t in bad or rng.random() < impostor_rate:
            far = rng.choice(np.flatnonzero(d > 300.0))
            scores[far] += 0.15 if t in bad else 0.09
        out.append(FrameEvidence(t * dt, scores, heading_deg=np.full(len(states), 33.0), heading_source="search",
                                 name=f"f{t}"))
    return truth, out


def test_hmm_smoother_beats_independent_and_coasts_through_bad_frames():
    states = grid_states(16)
    bad = (12, 13, 14)
    truth, frames = synthetic_flight(states, seed=3, bad=bad)
    options = TrackOptions(emission=EmissionModel(temperature=0.01, outlier_prob=0.1))
    indep = decode(states, frames, options, "independent")
    smooth = decode(states, frames, options, "hmm")
    causal = decode(states, frames, options, "hmm", causal=True)
    e_ind = np.linalg.norm(indep.xy - truth, axis=1)
    e_s = np.linalg.norm(smooth.xy - truth, axis=1)
    e_c = np.linalg.norm(causal.xy - truth, axis=1)
    assert (e_ind <= 50).mean() < 0.8
    assert (e_s <= 50).all() and (e_c <= 50).mean() >= 0.9
    assert smooth.method == "hmm" and causal.method == "hmm-causal"
    statuses = [smooth.points[t].status for t in bad]
    assert all(s in ("coasting", "lost") for s in statuses)
    assert all(smooth.points[t].outlier_prob > 0.5 for t in bad)
    good = [p for t, p in enumerate(smooth.points) if t not in bad]
    assert sum(p.status == "tracked" for p in good) >= 0.9 * len(good)
    assert smooth.points[5].heading_deg == pytest.approx(33.0) and smooth.points[5].heading_source == "search"
    course = np.degrees(0.6)
    course_err = [abs((p.course_deg - course + 180) % 360 - 180) for p in smooth.points[2:-2]]
    assert np.median(course_err) < 15.0 and max(course_err) < 45.0  # from tile-refined positions 60 m apart
    assert np.median([p.speed_mps for p in smooth.points[2:-2]]) == pytest.approx(10.0, abs=2.0)


def test_a_fix_sets_the_position_and_a_wrong_fix_is_ignored():
    states = grid_states(12)
    truth, frames = synthetic_flight(states, seed=5, frames=12, impostor_rate=0.0)
    frames[4].fix = Fix(*(truth[4] + (1.0, -2.0)), 3.0)
    frames[7].fix = Fix(*(truth[7] + (400.0, 0.0)), 3.0)  # a wrong verification
    for method in ("hmm", "particle"):
        track = decode(states, frames, TrackOptions(particles=ParticleOptions(particles=800)), method)
        err = np.linalg.norm(track.xy - truth, axis=1)
        assert err[4] < 6.0, method
        assert err[7] < 50.0, method
        assert not track.points[7].fix_used, method


def test_particle_filter_converges_on_an_easy_flight():
    states = grid_states(14)
    truth, frames = synthetic_flight(states, seed=11, frames=25, impostor_rate=0.1)
    options = TrackOptions(particles=ParticleOptions(particles=800, seed=2))
    smooth = decode(states, frames, options, "particle")
    causal = decode(states, frames, options, "particle", causal=True)
    e_s = np.linalg.norm(smooth.xy - truth, axis=1)
    e_c = np.linalg.norm(causal.xy - truth, axis=1)
    assert np.median(e_s) < 20.0 and (e_s <= 50).all()
    assert (e_c[5:] <= 50).mean() >= 0.9
    assert all(p.confidence > 0.5 for p in smooth.points[3:])


def test_particle_ffbsm_matches_a_plain_double_loop():
    states = grid_states(5)
    rng = np.random.default_rng(0)
    opts = ParticleOptions(particles=12, teleport_prob=0.05)
    times = np.array([0.0, 1.0, 2.5])
    pos = rng.uniform(0, 200, size=(3, 12, 2))
    vel = rng.normal(0, 5, size=(3, 12, 2))
    yaw = rng.uniform(0, 360, size=(3, 12))
    log_w = np.log(rng.dirichlet(np.ones(12), size=3))
    odometry = [None, Odometry(3.0, 10.0, 5.0, None, sigma_m=20.0, sigma_deg=40.0), None]  # step 0->1 measured

    def vm(delta_deg, sigma_deg):
        kappa = 1.0 / math.radians(sigma_deg) ** 2
        return math.exp(kappa * math.cos(math.radians(delta_deg))) / (2 * math.pi * np.i0(kappa))

    def f(t, j, i):  # the density written out, one pair at a time
        dt, odo = times[t + 1] - times[t], odometry[t + 1]
        x0, v0, y0, x1, v1, y1 = pos[t, i], vel[t, i], yaw[t, i], pos[t + 1, j], vel[t + 1, j], yaw[t + 1, j]
        area = len(states) * states.cell_area_m2
        if odo is not None:
            a = math.radians(y0)
            mean = x0 + (odo.dx_m * math.cos(a) + odo.dy_m * math.sin(a), -odo.dx_m * math.sin(a) + odo.dy_m * math.cos(a))
            r = x1 - mean
            core = math.exp(-0.5 * r @ r / odo.sigma_m**2) / (2 * math.pi * odo.sigma_m**2) * vm(y1 - y0 - odo.turn_deg, odo.sigma_deg)
            uniform = 1.0 / (area * 2 * math.pi)
        else:
            sv2, sp2 = (opts.accel_sigma_mps2 * dt) ** 2, opts.position_sigma_m**2
            dv = v1 - v0
            r = x1 - x0 - 0.5 * (v0 + v1) * dt
            core = math.exp(-0.5 * dv @ dv / sv2 - 0.5 * r @ r / sp2) / ((2 * math.pi) ** 2 * sv2 * sp2)
            core *= vm(y1 - y0, opts.yaw_sigma_dps * dt)
            uniform = 1.0 / (area * math.pi * 20.0**2 * 2 * math.pi)
        return (1 - opts.teleport_prob) * core + opts.teleport_prob * uniform

    for t in (0, 1):
        dense = transition_density(states, opts, 20.0, times[t + 1] - times[t], odometry[t + 1], pos[t], vel[t], yaw[t],
                                   pos[t + 1], vel[t + 1], yaw[t + 1])
        for i, j in [(0, 0), (3, 7), (11, 2)]:
            assert dense[i, j] == pytest.approx(f(t, j, i), rel=1e-9)
    w = np.exp(log_w)
    expected = [w[2]]
    for t in (1, 0):
        s_next = expected[0]
        new = np.zeros(12)
        for i in range(12):
            total = 0.0
            for j in range(12):
                denom = sum(w[t][k] * f(t, j, k) for k in range(12))
                total += s_next[j] * f(t, j, i) / denom
            new[i] = w[t][i] * total
        expected.insert(0, new / new.sum())
    smoothed = np.exp(_ffbsm(states, opts, 20.0, times, odometry, pos, vel, yaw, log_w))
    np.testing.assert_allclose(smoothed, np.array(expected), rtol=1e-8, atol=1e-12)


def test_particle_run_is_reproducible_and_causal_weights_ignore_the_future():
    states = grid_states(8)
    _, frames = synthetic_flight(states, seed=1, frames=8)
    model = EmissionModel()
    a = run_particles(states, frames, model, 20.0, ParticleOptions(particles=200, seed=4), smooth=False)
    b = run_particles(states, frames[:5], model, 20.0, ParticleOptions(particles=200, seed=4), smooth=False)
    np.testing.assert_array_equal(a.log_w[:5], b.log_w)
    np.testing.assert_array_equal(a.pos[:5], b.pos)


def test_decode_rejects_unordered_frames_and_wrong_shapes():
    states = grid_states(4)
    frames = [FrameEvidence(1.0, np.zeros(16)), FrameEvidence(0.0, np.zeros(16))]
    with pytest.raises(ValueError, match="time order"):
        decode(states, frames)
    with pytest.raises(ValueError, match="scores for 16 tiles"):
        emission_loglik(states, FrameEvidence(0.0, np.zeros(3)), EmissionModel())
    with pytest.raises(ValueError, match="method"):
        decode(states, frames[:1], method="kalman")


def test_track_geojson_is_a_lon_lat_line():
    states = grid_states(8)
    g = states.xy + (487_600.0, 4_442_600.0)
    states = TileStates(g, SPACING, "EPSG:32613")
    _, frames = synthetic_flight(states, seed=2, frames=6, impostor_rate=0.0)
    feature = decode(states, frames).geojson()
    assert feature["geometry"]["type"] == "LineString"
    lon, lat = feature["geometry"]["coordinates"][0]
    assert 40.1 < lat < 40.2 and -105.2 < lon < -105.1  # Longmont, Colorado
    assert len(feature["properties"]["status"]) == 6


def test_a_location_window_restricts_states_and_evidence_together():
    states = grid_states(20)
    truth, frames = synthetic_flight(states, seed=4, frames=10, impostor_rate=0.0)
    rows = states.window(tuple(truth[5]), 400.0)
    assert 0 < len(rows) < len(states)
    assert np.all(np.linalg.norm(states.xy[rows] - truth[5], axis=1) <= 400.0)
    small = states.subset(rows)
    sub = [f.subset(rows) for f in frames]
    assert sub[0].scores.shape == (len(rows),) and sub[0].heading_deg.shape == (len(rows),)
    track = decode(small, sub)
    assert (np.linalg.norm(track.xy - truth, axis=1) <= 50).all()
