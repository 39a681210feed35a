"""Exact inference in the hidden-Markov model over tiles: Viterbi, forward filter, forward-backward.

The hidden state of frame *t* is the tile its ground centre lies in; emissions are the per-frame
log-likelihood ratios of :mod:`cvgl.track.evidence`, transitions the sparse-plus-rank-one
matrices of :mod:`cvgl.track.motion`. Three decoders over the same model:

* :func:`viterbi` — the single most probable tile path (max-product, in the log domain; each step
  is a segment-max over incoming edges, ``O(E + N)``).
* :func:`forward_filter` — the causal posterior ``P(state_t | frames 0..t)``: what a drone can
  know in flight. It is exactly the forward pass of :func:`forward_backward`.
* :func:`forward_backward` — the smoothed marginals ``P(state_t | all frames)``, for per-frame
  confidence. Sum-product in the probability domain with per-step scaling (Rabiner): every step
  is normalised and emissions are shifted by their maximum before ``exp``, which is as stable as
  log-sum-exp here because the transition is row-stochastic, and lets a scipy sparse mat-vec do
  the work.

Memory: the posteriors are ``[T, N]`` float64 and Viterbi keeps ``[T, N]`` int32 back-pointers;
restrict the states to a location window (:meth:`~cvgl.track.evidence.TileStates.window`,
:meth:`~cvgl.track.evidence.TileStates.subset`) when ``T * N`` is large.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cvgl.track.motion import Transition


@dataclass(frozen=True)
class Posteriors:
    filtered: np.ndarray  # [T, N] P(state_t | frames 0..t)
    smoothed: np.ndarray | None  # [T, N] P(state_t | all frames); None from forward_filter
    log_likelihood: float  # log P(frames) up to the emissions' common reference (ratios)
    restarts: np.ndarray  # [T] bool: the filter lost all mass and restarted from the evidence


def _check(log_e: np.ndarray, transitions: Sequence[Transition], log_prior: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    log_e = np.asarray(log_e, dtype=np.float64)
    if log_e.ndim != 2 or log_e.shape[0] == 0:
        raise ValueError(f"emissions must be [T, N] with T >= 1, got {log_e.shape}")
    t_len, n = log_e.shape
    if len(transitions) != t_len - 1:
        raise ValueError(f"{t_len} frames need {t_len - 1} transitions, got {len(transitions)}")
    if any(tr.n != n for tr in transitions):
        raise ValueError("a transition is for a different number of states")
    if log_prior is None:
        log_prior = np.full(n, -math.log(n))
    log_prior = np.asarray(log_prior, dtype=np.float64)
    if log_prior.shape != (n,):
        raise ValueError(f"prior must be [N] = [{n}], got {log_prior.shape}")
    return log_e, log_prior


def _segment_argmax(values: np.ndarray, ptr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(max, index of the first maximum) of ``values`` over each non-empty CSR segment."""
    seg_max = np.maximum.reduceat(values, ptr[:-1])
    seg = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    candidate = np.where(values == seg_max[seg], np.arange(len(values)), len(values))
    return seg_max, np.minimum.reduceat(candidate, ptr[:-1])


def viterbi_step(delta: np.ndarray, tr: Transition) -> tuple[np.ndarray, np.ndarray]:
    """``max_i delta_i + log A[i, j]`` and its argmax ``i`` for every ``j``."""
    best_any = int(np.argmax(delta))
    jump = delta[best_any] + tr.log_jump
    if tr.is_reset:
        return np.full(tr.n, jump), np.full(tr.n, best_any, dtype=np.int64)
    # On an edge A = (1 - rho) K + rho / N exactly; off the edges A = rho / N.
    log_a = np.logaddexp(tr.log_keep + tr.log_k, tr.log_jump)
    edge_max, edge_at = _segment_argmax(delta[tr.src] + log_a, tr.dst_ptr)
    back = tr.src[edge_at].astype(np.int64)
    take_jump = jump > edge_max
    return np.where(take_jump, jump, edge_max), np.where(take_jump, best_any, back)


def viterbi(log_e: np.ndarray, transitions: Sequence[Transition], log_prior: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """The most probable state path ``[T]`` and its log-probability (joint with the emissions)."""
    log_e, log_prior = _check(log_e, transitions, log_prior)
    t_len, n = log_e.shape
    back = np.zeros((t_len, n), dtype=np.int32)
    delta = log_prior + log_e[0]
    for t, tr in enumerate(transitions, start=1):
        best, back[t] = viterbi_step(delta, tr)
        delta = best + log_e[t]
    path = np.zeros(t_len, dtype=np.int64)
    path[-1] = int(np.argmax(delta))
    for t in range(t_len - 1, 0, -1):
        path[t - 1] = back[t, path[t]]
    return path, float(delta[path[-1]])


def _forward(log_e: np.ndarray, transitions: Sequence[Transition], log_prior: np.ndarray):
    t_len, n = log_e.shape
    alpha = np.zeros((t_len, n))
    shift = log_e.max(axis=1)
    shift = np.where(np.isfinite(shift), shift, 0.0)
    scale = np.zeros(t_len)
    restarts = np.zeros(t_len, dtype=bool)
    prior = np.exp(log_prior - log_prior.max())
    prior /= prior.sum()
    for t in range(t_len):
        emission = np.exp(log_e[t] - shift[t])
        predicted = prior if t == 0 else transitions[t - 1].propagate(alpha[t - 1])
        a = predicted * emission
        total = a.sum()
        if not total > 0:  # every reachable state is impossible: restart from the evidence
            restarts[t] = True
            a = emission / n
            total = a.sum()
            if not total > 0:
                a, total = np.full(n, 1.0 / n), 1.0
        alpha[t] = a / total
        scale[t] = total
    log_likelihood = float(np.sum(np.log(scale) + shift))
    return alpha, scale, shift, restarts, log_likelihood


def forward_filter(log_e: np.ndarray, transitions: Sequence[Transition], log_prior: np.ndarray | None = None) -> Posteriors:
    """The causal posteriors: frame *t* sees only frames ``0..t`` (the forward pass)."""
    log_e, log_prior = _check(log_e, transitions, log_prior)
    alpha, _, _, restarts, log_likelihood = _forward(log_e, transitions, log_prior)
    return Posteriors(alpha, None, log_likelihood, restarts)


def forward_backward(log_e: np.ndarray, transitions: Sequence[Transition], log_prior: np.ndarray | None = None) -> Posteriors:
    """Filtered and smoothed posteriors (scaled sum-product; see module doc)."""
    log_e, log_prior = _check(log_e, transitions, log_prior)
    alpha, scale, shift, restarts, log_likelihood = _forward(log_e, transitions, log_prior)
    t_len, n = log_e.shape
    gamma = np.zeros_like(alpha)
    beta = np.ones(n)
    gamma[-1] = alpha[-1]
    for t in range(t_len - 2, -1, -1):
        weighted = np.exp(log_e[t + 1] - shift[t + 1]) * beta
        beta = transitions[t].pull_back(weighted) / scale[t + 1]
        if restarts[t + 1]:  # the forward pass cut the chain here; so does the backward pass
            beta = np.ones(n)
        g = alpha[t] * beta
        total = g.sum()
        gamma[t] = g / total if total > 0 else alpha[t]
        beta = beta / max(float(np.max(beta)), 1e-300)  # keep beta's scale bounded (gamma is normalised)
    return Posteriors(alpha, gamma, log_likelihood, restarts)
