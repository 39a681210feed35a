"""A particle filter and smoother in continuous coordinates: the second decoder.

Why a particle filter next to the exact tile HMM: the HMM's state is a tile and its motion model
is memoryless, so its positions are tile-quantised (refined only by the posterior spread over
overlapping tiles), it cannot use a precise relative motion (each step re-quantises), and over
ground not in the index it can only diffuse. A particle carries a continuous position, velocity
and camera heading: it follows frame-to-frame visual odometry (:mod:`cvgl.track.odometry`) at
full precision, so a flight has to match the map as one rigid shape; without odometry it coasts
on a constant-velocity model (white-noise acceleration, speed capped at ``v_max``); a verified
fix is used at full precision; its cost grows with the number of particles, not of tiles. The
price is approximation (Monte-Carlo noise) and a weaker global search than the exact HMM.

* State per particle: position (m), velocity (m/s), camera heading (degrees clockwise from north).
* Motion, per interval: with odometry ``x' = x + R(heading) d + N(0, sigma_o^2)``,
  ``heading' = heading + turn + N(0, sigma_deg^2)`` (velocity := displacement / dt); without,
  ``v' = cap(v + a dt)``, ``x' = x + (v + v') dt / 2 + N(0, position_sigma^2)``,
  ``heading' = heading + N(0, (yaw_sigma dt)^2)``. With probability ``teleport_prob`` a particle
  is redrawn uniformly over the tile cells (relocalisation after a wrong lock).
* Likelihood: the robust emissions of :mod:`cvgl.track.evidence` (or, for a heading search, of
  :mod:`cvgl.track.heading` at the hypothesis nearest the particle's heading), interpolated with a
  Gaussian kernel (sigma = spacing / 2) over the tiles within 1.5 spacings; no tile within reach
  (off the index) gives the outlier floor. A fix adds its robust Gaussian likelihood at the particle.
* Initialisation by importance sampling from the first frame: half the particles from its
  posterior over tiles (over (tile, heading) pairs for a heading search), half uniform, jittered
  within a cell (and heading bin), weighted by prior / proposal; velocity uniform over the disc of
  speeds up to ``v_max``; heading the known one when there is one.
* Systematic resampling when the effective sample size falls under ``resample_below``.
* Smoother: forward-filtering backward-smoothing (FFBSm; Doucet, Godsill & Andrieu 2000) on the
  stored weighted particle sets, ``O(P^2)`` per frame as matrix products, in blocks of columns so
  memory stays ``O(P * block)``. Its transition density is the sampled one above (headings as von
  Mises, the speed cap ignored: it binds only at ``v_max``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.special import i0e, logsumexp

from cvgl.track.evidence import (
    EmissionModel,
    FrameEvidence,
    TileStates,
    retrieval_loglik,
)
from cvgl.track.heading import MIN_BINS, product_loglik
from cvgl.track.odometry import Odometry
from cvgl.track.shape import Pose

SMOOTH_BLOCK = 512  # FFBSm columns per block: memory P x block float64


@dataclass(frozen=True)
class ParticleOptions:
    particles: int = 2000  # 1000 lost 0.03-0.09 R@1 in the sequence study; cost is O(P^2) offline
    accel_sigma_mps2: float = 2.0  # white-noise acceleration: manoeuvres of a few m/s per second
    position_sigma_m: float = 2.0  # extra position noise per step (model mismatch, wind)
    yaw_sigma_dps: float = 10.0  # heading random walk without odometry, degrees per second
    teleport_prob: float = 0.001  # per frame and particle: redraw uniformly (0.001 beat 0.01 in the study)
    resample_below: float = 0.5  # resample when ESS < this fraction of the particles
    seed: int = 0

    def __post_init__(self) -> None:
        if self.particles < 10:
            raise ValueError(f"need at least 10 particles, got {self.particles}")
        if not 0.0 <= self.teleport_prob < 1.0:
            raise ValueError(f"teleport_prob must be in [0, 1), got {self.teleport_prob}")


@dataclass(frozen=True)
class ParticleRun:
    """Weighted particle sets per frame: filtered (causal) and, if asked, smoothed weights."""

    pos: np.ndarray  # [T, P, 2]
    vel: np.ndarray  # [T, P, 2]
    yaw: np.ndarray  # [T, P] camera heading, degrees
    log_w: np.ndarray  # [T, P] normalised filtering log-weights
    log_w_smooth: np.ndarray | None  # [T, P] normalised smoothing log-weights
    outlier_logw: np.ndarray  # [T, P] log of the retrieval outlier share per particle (eps / L)
    heading_search: bool  # whether the evidence searched headings (particle headings then matter)


def _hypothesis_grid(frame: FrameEvidence) -> np.ndarray | None:
    if frame.hypothesis_scores is None or frame.hypothesis_headings is None:
        return None
    grid = np.asarray(frame.hypothesis_headings, dtype=np.float64)
    return grid if len(grid) >= MIN_BINS else None


class EvidenceField:
    """The robust emissions of one frame as a continuous log-likelihood over (position, heading)."""

    def __init__(self, states: TileStates, frame: FrameEvidence, model: EmissionModel) -> None:
        self.states, self.frame, self.model = states, frame, model
        self.grid = _hypothesis_grid(frame)
        if self.grid is None:
            self.table = retrieval_loglik(np.asarray(frame.scores), model)[:, None]  # [N, 1]
        else:
            self.table = product_loglik(frame, model).reshape(len(states), len(self.grid))  # [N, H]
        self.tile_loglik = self.table.max(1) if self.grid is not None else self.table[:, 0]
        self.floor = math.log(model.outlier_prob) if model.outlier_prob > 0 else -np.inf

    def _bins(self, yaw: np.ndarray) -> np.ndarray:
        if self.grid is None:
            return np.zeros(len(yaw), dtype=np.int64)
        step = 360.0 / len(self.grid)
        return np.rint(((yaw - self.grid[0]) % 360.0) / step).astype(np.int64) % len(self.grid)

    def retrieval(self, pos: np.ndarray, yaw: np.ndarray) -> np.ndarray:
        """Interpolated retrieval log-likelihood ratio at ``pos`` ``[P, 2]`` facing ``yaw`` -> ``[P]``."""
        spacing = self.states.spacing_m
        k = min(12, len(self.states))
        dist, idx = self.states.tree.query(pos, k=k, distance_upper_bound=1.5 * spacing)
        dist, idx = dist.reshape(len(pos), k), idx.reshape(len(pos), k)
        valid = np.isfinite(dist)
        kernel = np.where(valid, np.exp(-0.5 * (np.where(valid, dist, 0.0) / (0.5 * spacing)) ** 2), 0.0)
        rows = np.minimum(idx, len(self.states) - 1)
        e = np.where(valid, self.table[rows, self._bins(yaw)[:, None]], -np.inf)
        norm = kernel.sum(1)
        out = np.full(len(pos), self.floor)
        some = norm > 0
        out[some] = logsumexp(e[some], b=kernel[some], axis=1) - np.log(norm[some])
        return out

    def fix(self, pos: np.ndarray) -> np.ndarray:
        """Robust log-likelihood ratio of the frame's fix at ``pos`` (zeros without a fix)."""
        fix = self.frame.fix
        if fix is None:
            return np.zeros(len(pos))
        var = fix.radius_m**2
        d2 = ((pos - (fix.x, fix.y)) ** 2).sum(1)
        area = len(self.states) * self.states.cell_area_m2
        eps = self.model.fix_outlier_prob
        density = np.exp(-0.5 * d2 / var) / (2 * math.pi * var)
        with np.errstate(divide="ignore"):
            return np.log((1 - eps) * area * density + eps)


POSE_SIGMA_M = 10.0
POSE_SIGMA_DEG = 6.0
POSE_PRIOR_SHARE = 0.8  # with candidate poses: their share of frame 0's prior (the rest uniform)


def _initial(states: TileStates, field: EvidenceField, count: int, rng: np.random.Generator, known: float | None,
             poses: list[Pose] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Initial (position, heading, log importance weight) of the particles.

    Prior of frame 0: uniform over the tile cells (and headings) — or, with candidate poses,
    ``POSE_PRIOR_SHARE`` of Gaussians around them (equal shares) plus the rest uniform: an
    empirical prior from the rigid-shape search, which has seen the later frames (so the smoothed
    confidence of an offline run counts their evidence twice; the position is what it is for).
    Proposal: the same pose Gaussians for their share, and for the rest the first frame's
    posterior over tiles (over (tile, heading) pairs for a heading search) mixed half and half with
    uniform, jittered within a cell (and heading bin). Weight = prior / proposal.
    """
    table = field.table.reshape(-1)
    bins_n = field.table.shape[1]
    q_pairs = 0.5 * np.exp(table - logsumexp(table)) + 0.5 / len(table)
    share = POSE_PRIOR_SHARE if poses else 0.0
    n_pose = round(count * share)
    pairs = rng.choice(len(table), size=count - n_pose, p=q_pairs)
    tiles, bins = np.divmod(pairs, bins_n)
    pos = states.xy[tiles] + (rng.random((len(pairs), 2)) - 0.5) * states.spacing_m
    step = 360.0 / len(field.grid) if field.grid is not None else 360.0
    if field.grid is not None:
        yaw = (field.grid[bins] + (rng.random(len(pairs)) - 0.5) * step) % 360.0
    else:
        yaw = rng.random(len(pairs)) * 360.0 if known is None else np.full(len(pairs), known)
    if n_pose:
        which = rng.integers(len(poses), size=n_pose)
        centre = np.array([[poses[k].x, poses[k].y] for k in which])
        pos = np.concatenate([pos, centre + rng.normal(0.0, POSE_SIGMA_M, size=(n_pose, 2))])
        if field.grid is not None:
            heading = np.array([poses[k].heading_deg for k in which]) + rng.normal(0.0, POSE_SIGMA_DEG, n_pose)
            yaw = np.concatenate([yaw, heading % 360.0])
        else:
            yaw = np.concatenate([yaw, rng.random(n_pose) * 360.0 if known is None else np.full(n_pose, known)])
    # Densities over position (and heading, for a heading search, in radians).
    heading_measure = math.radians(step) if field.grid is not None else 1.0
    cell = states.tree.query(pos)[1]
    q_grid = q_pairs[cell * bins_n + field._bins(yaw)] / (states.cell_area_m2 * heading_measure)
    uniform = 1.0 / (len(states) * states.cell_area_m2 * (2 * math.pi if field.grid is not None else 1.0))
    if n_pose:
        d2 = ((pos[:, None, :] - np.array([[p.x, p.y] for p in poses])[None]) ** 2).sum(-1)
        q_pose = np.exp(-0.5 * d2 / POSE_SIGMA_M**2) / (2 * math.pi * POSE_SIGMA_M**2)
        if field.grid is not None:
            dh = np.radians((yaw[:, None] - np.array([p.heading_deg for p in poses])[None] + 180) % 360 - 180)
            sh = math.radians(POSE_SIGMA_DEG)
            q_pose = q_pose * np.exp(-0.5 * (dh / sh) ** 2) / (math.sqrt(2 * math.pi) * sh)
        pose_mix = q_pose.mean(1)
        prior = share * pose_mix + (1 - share) * uniform
        q = share * pose_mix + (1 - share) * q_grid
    else:
        prior, q = np.full(count, uniform), q_grid
    return pos, yaw, np.log(prior) - np.log(np.maximum(q, 1e-300))


def _normalise(log_w: np.ndarray) -> np.ndarray:
    return log_w - logsumexp(log_w)


def _systematic_resample(log_w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = np.exp(log_w)
    positions = (rng.random() + np.arange(len(w))) / len(w)
    return np.minimum(np.searchsorted(np.cumsum(w), positions), len(w) - 1)


def _uniform_in_cells(states: TileStates, count: int, rng: np.random.Generator, probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    tiles = rng.choice(len(states), size=count, p=probs)
    jitter = (rng.random((count, 2)) - 0.5) * states.spacing_m
    return states.xy[tiles] + jitter, tiles


def _uniform_velocity(count: int, v_max: float, rng: np.random.Generator) -> np.ndarray:
    speed = v_max * np.sqrt(rng.random(count))
    angle = rng.random(count) * 2 * math.pi
    return np.stack([speed * np.sin(angle), speed * np.cos(angle)], axis=1)


def _cap_speed(vel: np.ndarray, v_max: float) -> np.ndarray:
    speed = np.linalg.norm(vel, axis=1, keepdims=True)
    return vel * np.minimum(1.0, v_max / np.maximum(speed, 1e-12))


def _log_vm_norm(kappa: float) -> float:
    """log(2 pi I0(kappa)), stable for large kappa."""
    return math.log(2 * math.pi) + math.log(i0e(kappa)) + kappa


def _kappa(sigma_deg: float) -> float:
    return 1.0 / max(math.radians(sigma_deg), 1e-6) ** 2


def _cv_features(opts: ParticleOptions, dt: float, pos: np.ndarray, vel: np.ndarray, later: bool) -> np.ndarray:
    """4-D features whose squared distance is the constant-velocity model's exponent.

    ``-2 log f_cv(x1 | x0) + const = |v1 - v0|^2 / sv^2 + |(x1 - v1 dt/2) - (x0 + v0 dt/2)|^2 / sp^2``,
    i.e. ``|B(x1) - C(x0)|^2`` with the features below: the pairwise densities are one matrix
    product (a GEMM) instead of a ``[P, P, 2]`` broadcast.
    """
    sv = max(opts.accel_sigma_mps2 * dt, 1e-6)
    sp = opts.position_sigma_m
    shifted = pos - 0.5 * dt * vel if later else pos + 0.5 * dt * vel
    return np.concatenate([vel / sv, shifted / sp], axis=1)


def _pair_sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.maximum((a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2.0 * a @ b.T, 0.0)


def transition_density(states: TileStates, opts: ParticleOptions, v_max: float, dt: float, odometry: Odometry | None,
                       pos0: np.ndarray, vel0: np.ndarray, yaw0: np.ndarray,
                       pos1: np.ndarray, vel1: np.ndarray, yaw1: np.ndarray) -> np.ndarray:
    """``f(x1_j | x0_i)`` for all pairs ``[P0, P1]``: the sampled motion model plus teleport (module doc)."""
    area = len(states) * states.cell_area_m2
    r0, r1 = np.radians(yaw0), np.radians(yaw1)
    if odometry is not None:
        sp2 = odometry.sigma_m**2
        kappa = _kappa(odometry.sigma_deg)
        mean = pos0 + odometry.world_displacement(yaw0)
        mean_yaw = r0 + math.radians(odometry.turn_deg)
        log_core = -0.5 * _pair_sqdist(mean, pos1) / sp2 - math.log(2 * math.pi * sp2)
        uniform = 1.0 / (area * 2 * math.pi)
    else:
        sv2 = max(opts.accel_sigma_mps2 * dt, 1e-6) ** 2
        sp2 = opts.position_sigma_m**2
        kappa = _kappa(opts.yaw_sigma_dps * max(dt, 1e-3))
        mean_yaw = r0
        d2 = _pair_sqdist(_cv_features(opts, dt, pos0, vel0, later=False), _cv_features(opts, dt, pos1, vel1, later=True))
        log_core = -0.5 * d2 - math.log((2 * math.pi) ** 2 * sv2 * sp2)
        uniform = 1.0 / (area * math.pi * v_max**2 * 2 * math.pi)
    cos_term = np.cos(mean_yaw)[:, None] * np.cos(r1)[None, :] + np.sin(mean_yaw)[:, None] * np.sin(r1)[None, :]
    core = np.exp(log_core + kappa * (cos_term - 1.0) + kappa - _log_vm_norm(kappa))
    return (1.0 - opts.teleport_prob) * core + opts.teleport_prob * uniform


def run_particles(states: TileStates, frames: list[FrameEvidence], model: EmissionModel, v_max: float,
                  opts: ParticleOptions = ParticleOptions(), smooth: bool = True, use_odometry: bool = True,
                  init_poses: list[Pose] | None = None) -> ParticleRun:
    """Filter (and smooth) a flight; the filtered weights are causal, the smoothed ones offline.

    ``use_odometry``: follow the frames' visual odometry where they carry it (else the
    constant-velocity model everywhere). ``init_poses``: candidate poses of frame 0 (from
    :func:`cvgl.track.shape.shape_search`, which looks at later frames: not for a causal run),
    the empirical prior of frame 0 (see :func:`_initial`).
    """
    if not frames:
        raise ValueError("no frames")
    rng = np.random.default_rng(opts.seed)
    p_count, t_len = opts.particles, len(frames)
    pos = np.zeros((t_len, p_count, 2))
    vel = np.zeros((t_len, p_count, 2))
    yaw = np.zeros((t_len, p_count))
    log_w = np.zeros((t_len, p_count))
    outlier = np.zeros((t_len, p_count))
    times = np.array([f.time_s for f in frames], dtype=np.float64)
    if np.any(np.diff(times) < 0):
        raise ValueError("frames must be in time order")
    odometry = [f.odometry if use_odometry else None for f in frames]
    search = any(_hypothesis_grid(f) is not None for f in frames)

    for t, frame in enumerate(frames):
        field = EvidenceField(states, frame, model)
        if t == 0:
            known = None if search or frame.heading_deg is None else frame.heading_at(0)
            pos[0], yaw[0], log_prop = _initial(states, field, p_count, rng, known, init_poses)
            vel[0] = _uniform_velocity(p_count, v_max, rng)
        else:
            dt = times[t] - times[t - 1]
            prev = log_w[t - 1]
            if 1.0 / np.exp(2 * prev).sum() < opts.resample_below * p_count:  # effective sample size
                ancestors, log_prop = _systematic_resample(prev, rng), np.zeros(p_count)
            else:
                ancestors, log_prop = np.arange(p_count), prev
            x0, v0, y0 = pos[t - 1][ancestors], vel[t - 1][ancestors], yaw[t - 1][ancestors]
            odo = odometry[t]
            if odo is not None:
                x1 = x0 + odo.world_displacement(y0) + rng.normal(0.0, odo.sigma_m, size=(p_count, 2))
                y1 = y0 + odo.turn_deg + rng.normal(0.0, odo.sigma_deg, size=p_count)
                v1 = _cap_speed((x1 - x0) / max(dt, 1e-3), v_max)
            else:
                accel = rng.normal(0.0, opts.accel_sigma_mps2, size=(p_count, 2))
                v1 = _cap_speed(v0 + accel * dt, v_max)
                x1 = x0 + 0.5 * (v0 + v1) * dt + rng.normal(0.0, opts.position_sigma_m, size=(p_count, 2))
                y1 = y0 + rng.normal(0.0, opts.yaw_sigma_dps * max(dt, 1e-3), size=p_count)
            jump = rng.random(p_count) < opts.teleport_prob
            if jump.any():
                x1[jump], _ = _uniform_in_cells(states, int(jump.sum()), rng)
                v1[jump] = _uniform_velocity(int(jump.sum()), v_max, rng)
                y1[jump] = rng.random(int(jump.sum())) * 360.0
            pos[t], vel[t], yaw[t] = x1, v1, y1 % 360.0
        retrieval = field.retrieval(pos[t], yaw[t])
        log_w[t] = _normalise(log_prop + retrieval + field.fix(pos[t]))
        outlier[t] = field.floor - retrieval if np.isfinite(field.floor) else -np.inf

    smoothed = _ffbsm(states, opts, v_max, times, odometry, pos, vel, yaw, log_w) if smooth else None
    return ParticleRun(pos, vel, yaw, log_w, smoothed, outlier, search)


def _ffbsm(states: TileStates, opts: ParticleOptions, v_max: float, times: np.ndarray, odometry: list[Odometry | None],
           pos: np.ndarray, vel: np.ndarray, yaw: np.ndarray, log_w: np.ndarray) -> np.ndarray:
    """Forward-filtering backward-smoothing weights (module doc), in blocks of ``SMOOTH_BLOCK`` columns.

    ``w_{t|T}^i ∝ w_t^i sum_j w_{t+1|T}^j f(x_{t+1}^j | x_t^i) / sum_k w_t^k f(x_{t+1}^j | x_t^k)``.
    """
    t_len, p_count = log_w.shape
    smooth = np.zeros_like(log_w)
    smooth[-1] = log_w[-1]
    for t in range(t_len - 2, -1, -1):
        dt = times[t + 1] - times[t]
        w = np.exp(log_w[t])
        s_next = np.exp(smooth[t + 1])
        acc = np.zeros(p_count)
        for start in range(0, p_count, SMOOTH_BLOCK):
            cols = slice(start, start + SMOOTH_BLOCK)
            f = transition_density(states, opts, v_max, dt, odometry[t + 1], pos[t], vel[t], yaw[t],
                                   pos[t + 1][cols], vel[t + 1][cols], yaw[t + 1][cols])
            denom = w @ f  # [block]: the predictive density of each later particle
            acc += f @ (s_next[cols] / np.maximum(denom, 1e-300))
        with np.errstate(divide="ignore"):
            smooth[t] = _normalise(log_w[t] + np.log(acc))
    return smooth
