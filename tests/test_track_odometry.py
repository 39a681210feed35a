"""Heading states, visual odometry and the rigid-shape search, on sequences made by code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cvgl.track import (
    EmissionModel,
    FrameEvidence,
    MotionModel,
    ParticleOptions,
    TileStates,
    TrackOptions,
    decode,
)
from cvgl.track.heading import (
    HeadingModel,
    heading_grid,
    heading_kernel,
    odometry_transition,
    product_transition,
)
from cvgl.track.hmm import forward_backward, viterbi
from cvgl.track.motion import build_transition
from cvgl.track.odometry import Odometry, measure_odometry
from cvgl.track.shape import chain_odometry, place, shape_search

SPACING = 56.0


def grid_states(side: int) -> TileStates:
    g = np.arange(side) * SPACING
    return TileStates(np.stack(np.meshgrid(g, g), -1).reshape(-1, 2), SPACING)


def camera_odometry(x0, x1, yaw0, yaw1) -> Odometry:
    """The odometry a camera facing ``yaw0`` measures for a move x0 -> x1 (inverse of world_displacement)."""
    east, north = x1 - x0
    a = math.radians(yaw0)
    return Odometry(east * math.cos(a) - north * math.sin(a), east * math.sin(a) + north * math.cos(a), yaw1 - yaw0)


def heading_flight(states: TileStates, seed: int, frames: int = 24, bins: int = 8, turn_rate: float = 4.0,
                   impostors: int = 3, odometry: bool = True):
    """A curving flight with heading-search evidence: the true tile peaks at the bin nearest the
    camera heading; impostor tiles peak as high, each frame at a random bin."""
    rng = np.random.default_rng(seed)
    grid = np.arange(bins) * 360.0 / bins
    yaw = 30.0 + turn_rate * np.arange(frames)
    step = 12.0
    xy = [states.xy.min(0) + 150.0]
    for t in range(1, frames):
        a = math.radians(yaw[t - 1])
        xy.append(xy[-1] + step * np.array([math.sin(a), math.cos(a)]))
    xy = np.array(xy)
    out = []
    for t in range(frames):
        d = np.linalg.norm(states.xy - xy[t], axis=1)
        diff = np.abs((grid - yaw[t] + 180) % 360 - 180)
        scores = 0.5 + rng.normal(0, 0.01, size=(bins, len(states)))
        scores += 0.06 * np.exp(-0.5 * (d / 40.0) ** 2)[None, :] * np.exp(-0.5 * (diff / 20.0) ** 2)[:, None]
        for far in rng.choice(np.flatnonzero(d > 250.0), size=impostors, replace=False):
            scores[rng.integers(bins), far] += 0.07
        odo = camera_odometry(xy[t - 1], xy[t], yaw[t - 1], yaw[t]) if odometry and t else None
        best = scores.argmax(0)
        out.append(FrameEvidence(t * 1.0, scores.max(0), heading_deg=grid[best], heading_source="search",
                                 hypothesis_scores=scores, hypothesis_headings=grid, odometry=odo, name=f"f{t}"))
    return xy, yaw, out


# --------------------------------------------------------------------------- heading states


def test_heading_grid_needs_one_common_search_grid():
    states = grid_states(4)
    _, _, frames = heading_flight(states, seed=0, frames=3, impostors=0)
    np.testing.assert_allclose(heading_grid(frames), np.arange(8) * 45.0)
    frames[1].hypothesis_headings = np.arange(8) * 45.0 + 10.0
    assert heading_grid(frames) is None
    assert heading_grid([FrameEvidence(0.0, np.zeros(16))]) is None


def test_product_transition_is_the_kronecker_product_plus_teleport():
    states = grid_states(3)
    tile = build_transition(states, MotionModel(teleport_prob=0.01), 1.5)
    grid = np.arange(6) * 60.0
    kernel = heading_kernel(grid, 1.5, HeadingModel(max_yaw_rate_dps=30.0))
    np.testing.assert_allclose(kernel.sum(1), 1.0)
    assert kernel[0, 3] == 0.0  # 180 degrees in 1.5 s is beyond 30 deg/s plus one bin
    product = product_transition(tile, kernel)
    k = tile.k_t.toarray().T
    expected = 0.99 * np.kron(k, kernel) + 0.01 / (9 * 6)
    np.testing.assert_allclose(product.dense(), expected, atol=1e-12)


def test_decoders_on_product_and_odometry_transitions_match_brute_force():
    import itertools

    from scipy.special import logsumexp

    rng = np.random.default_rng(7)
    states = TileStates(rng.uniform(0, 120, size=(3, 2)), 40.0)
    grid = np.arange(4) * 90.0
    tile = build_transition(states, MotionModel(teleport_prob=0.05), 1.0)
    transitions = [product_transition(tile, heading_kernel(grid, 1.0, HeadingModel(max_yaw_rate_dps=60.0))),
                   odometry_transition(states, grid, Odometry(5.0, 30.0, 80.0, sigma_m=10.0), MotionModel(teleport_prob=0.05),
                                       1.0, HeadingModel())]
    n = 12
    log_e = rng.normal(0, 2, size=(3, n))
    dense = [np.log(np.maximum(tr.dense(), 1e-300)) for tr in transitions]
    paths = np.array(list(itertools.product(range(n), repeat=3)))
    scores = -math.log(n) + log_e[0, paths[:, 0]]
    for t in (1, 2):
        scores = scores + dense[t - 1][paths[:, t - 1], paths[:, t]] + log_e[t, paths[:, t]]
    _path, best = viterbi(log_e, transitions)
    assert best == pytest.approx(scores.max(), abs=1e-6)
    p = np.exp(scores - logsumexp(scores))
    smoothed = forward_backward(log_e, transitions).smoothed
    for t in range(3):
        np.testing.assert_allclose(smoothed[t], np.bincount(paths[:, t], weights=p, minlength=n), atol=1e-9)


def test_heading_states_reject_impostors_that_need_a_new_heading_every_frame():
    states = grid_states(10)
    xy, yaw, frames = heading_flight(states, seed=2, frames=20, odometry=False)
    options = TrackOptions(emission=EmissionModel(temperature=0.01), heading=HeadingModel(max_yaw_rate_dps=10.0))
    with_heading = decode(states, frames, options, "hmm")
    without = decode(states, frames, TrackOptions(emission=options.emission, heading_states=False), "hmm")
    e_with = np.linalg.norm(with_heading.xy - xy, axis=1)
    e_without = np.linalg.norm(without.xy - xy, axis=1)
    assert (e_with <= 50).mean() >= (e_without <= 50).mean()
    assert (e_with <= 50).mean() >= 0.9
    assert all(p.heading_source == "sequence" for p in with_heading.points)
    head_err = [abs((p.heading_deg - y + 180) % 360 - 180) for p, y in zip(with_heading.points, yaw)]
    assert np.median(head_err) <= 22.5


# --------------------------------------------------------------------------- odometry


def _texture(seed: int = 0, size: int = 900) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    base = np.zeros((size, size), np.float32)
    for sigma, weight in [(2.0, 0.5), (6.0, 1.0), (20.0, 1.5)]:
        base += weight * cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), sigma)
    base = (base - base.min()) / (base.max() - base.min())
    return np.repeat((base * 255).astype(np.uint8)[:, :, None], 3, axis=2)


def _view(texture: np.ndarray, east_px: float, north_px: float, yaw: float) -> np.ndarray:
    """A nadir camera at (east, north) pixels from the texture centre, facing ``yaw``."""
    from cvgl.data.geometry import simulate_drone_view

    c = texture.shape[0] / 2
    col, row = round(c + east_px), round(c - north_px)
    patch = texture[row - 170:row + 170, col - 170:col + 170]
    return simulate_drone_view(patch, yaw, 0.0, 70.0, (224, 224))


@pytest.mark.parametrize("yaw, move_m, turn", [(0.0, 12.0, 0.0), (35.0, 10.0, 8.0), (250.0, 20.0, -12.0)])
def test_measured_odometry_recovers_the_motion(yaw, move_m, turn):
    texture, gsd = _texture(), 0.5
    a = math.radians(yaw)
    east, north = move_m * math.sin(a), move_m * math.cos(a)  # flying forward
    odo = measure_odometry(_view(texture, 0, 0, yaw), _view(texture, east / gsd, north / gsd, yaw + turn), gsd)
    assert odo is not None and odo.inliers >= 15
    assert odo.dx_m == pytest.approx(0.0, abs=0.5) and odo.dy_m == pytest.approx(move_m, abs=0.5)
    assert odo.turn_deg == pytest.approx(turn, abs=0.5)
    np.testing.assert_allclose(odo.world_displacement(yaw), [east, north], atol=0.6)


def test_featureless_frames_give_no_odometry():
    flat = np.full((224, 224, 3), 120, np.uint8)
    assert measure_odometry(flat, flat, 0.5) is None


def test_world_displacement_conventions():
    odo = Odometry(dx_m=3.0, dy_m=10.0, turn_deg=0.0)
    np.testing.assert_allclose(odo.world_displacement(0.0), [3.0, 10.0])
    np.testing.assert_allclose(odo.world_displacement(90.0), [10.0, -3.0], atol=1e-12)  # up = east, right = south
    north_up = Odometry(3.0, 10.0, 0.0, image_heading_deg=0.0)
    np.testing.assert_allclose(north_up.world_displacement(123.0), [3.0, 10.0])  # its own axis wins


def test_odometry_transition_moves_mass_by_the_measured_displacement():
    states = grid_states(8)
    motion = MotionModel()
    odo = Odometry(0.0, SPACING, 0.0, image_heading_deg=0.0)  # one tile north, north-up view
    tr = odometry_transition(states, None, odo, motion, 2.0, HeadingModel())
    dense = tr.dense()
    np.testing.assert_allclose(dense.sum(1), 1.0, atol=1e-9)
    start = 8 * 3 + 3
    assert int(np.argmax(dense[start])) == start + 8  # the tile one row north
    grid = np.arange(4) * 90.0
    camera = odometry_transition(states, grid, Odometry(0.0, SPACING, 90.0), motion, 2.0, HeadingModel())
    d = camera.dense()
    np.testing.assert_allclose(d.sum(1), 1.0, atol=1e-9)
    to = int(np.argmax(d[start * 4 + 1]))  # facing east (bin 1): one tile east, now facing south (bin 2)
    assert divmod(to, 4) == (start + 1, 2)
    # The exact decoders run on it unchanged (brute force covers them on generic transitions).
    log_e = np.random.default_rng(0).normal(0, 1, size=(2, len(states) * 4))
    path, _ = viterbi(log_e, [camera])
    assert forward_backward(log_e, [camera]).smoothed.shape == (2, len(states) * 4) and len(path) == 2


# --------------------------------------------------------------------------- rigid shape


def test_chained_odometry_places_the_path_and_stops_at_a_gap():
    states = grid_states(12)
    xy, yaw, frames = heading_flight(states, seed=1, frames=12, impostors=0)
    segment = chain_odometry(frames)
    np.testing.assert_allclose(place(segment, *xy[0], yaw[0]), xy, atol=1e-6)
    np.testing.assert_allclose(segment.turns_deg, yaw - yaw[0], atol=1e-9)
    frames[6].odometry = None
    assert chain_odometry(frames).frames == 6 and chain_odometry(frames, start=6).frames == 6


def test_shape_search_finds_the_pose_where_frames_alone_fail():
    states = grid_states(12)
    xy, yaw, frames = heading_flight(states, seed=3, frames=16, impostors=6)
    model = EmissionModel(temperature=0.01)
    best = shape_search(states, frames, model)[0]
    assert math.hypot(best.x - xy[0, 0], best.y - xy[0, 1]) <= 10.0
    assert abs((best.heading_deg - yaw[0] + 180) % 360 - 180) <= 5.0
    options = TrackOptions(emission=model, particles=ParticleOptions(particles=600))
    indep = decode(states, frames, options, "independent")
    shape = decode(states, frames, options, "shape")
    assert (np.linalg.norm(indep.xy - xy, axis=1) <= 50).mean() < 0.9
    err = np.linalg.norm(shape.xy - xy, axis=1)
    assert err.max() <= 10.0 and shape.method == "shape"
    assert all(abs((p.heading_deg - y + 180) % 360 - 180) <= 6 for p, y in zip(shape.points, yaw))
    online = decode(states, frames, options, "shape", causal=True)
    assert online.method == "shape-causal"
    assert (np.linalg.norm(online.xy - xy, axis=1)[6:] <= 25.0).all()  # once a few frames have been seen
    # Causal: changing the last frame's evidence changes nothing before it.
    changed = list(frames)
    changed[-1] = FrameEvidence(frames[-1].time_s, frames[-1].scores[::-1].copy(), heading_source="search",
                                hypothesis_scores=frames[-1].hypothesis_scores[:, ::-1].copy(),
                                hypothesis_headings=frames[-1].hypothesis_headings, odometry=frames[-1].odometry)
    np.testing.assert_array_equal(decode(states, changed, options, "shape", causal=True).xy[:-1], online.xy[:-1])


def test_particles_follow_odometry_from_the_shape_pose():
    states = grid_states(16)
    xy, _yaw, frames = heading_flight(states, seed=4, frames=20, impostors=6)
    options = TrackOptions(emission=EmissionModel(temperature=0.01), particles=ParticleOptions(particles=600, seed=1))
    smooth = decode(states, frames, options, "particle")
    err = np.linalg.norm(smooth.xy - xy, axis=1)
    assert np.median(err) <= 10.0 and (err <= 50).all()
    assert all(p.heading_source == "sequence" for p in smooth.points)


def test_shape_decode_falls_back_to_the_hmm_without_odometry():
    states = grid_states(10)
    xy, _, frames = heading_flight(states, seed=5, frames=10, impostors=0, odometry=False)
    track = decode(states, frames, TrackOptions(emission=EmissionModel(temperature=0.01)), "shape")
    assert (np.linalg.norm(track.xy - xy, axis=1) <= 50).all()


def test_camera_frame_odometry_without_a_heading_search_is_not_used_by_the_shape_search():
    states = grid_states(8)
    _, _, frames = heading_flight(states, seed=6, frames=8, impostors=0)
    plain = [FrameEvidence(f.time_s, f.scores, heading_deg=0.0, heading_source="metadata", odometry=f.odometry) for f in frames]
    assert shape_search(states, plain, EmissionModel()) == []
    for causal in (False, True):
        track = decode(states, plain, TrackOptions(), "shape", causal=causal)  # all frames fall back to the HMM
        assert len(track.points) == 8
