"""Evaluation metrics: retrieval recall/AP with pessimistic tie handling, and geodesic errors.

Tie rule for every ranking metric: a non-positive gallery item whose score equals a positive's
score is ranked ABOVE that positive, so ties never inflate recall or AP. See
:mod:`cvgl.evaluate.metrics` for the full rules.
"""

from cvgl.evaluate.metrics import (
    average_precision,
    correct_within_radius,
    first_positive_rank,
    hit_rate,
    k_for_percent,
    localization_error_m,
    mean_average_precision,
    rank_of_positives,
    recall_at_k,
    recall_at_k_by_distance,
    recall_at_percent,
    summarize,
    valid_queries,
    within_m,
)

__all__ = [
    "average_precision",
    "correct_within_radius",
    "first_positive_rank",
    "hit_rate",
    "k_for_percent",
    "localization_error_m",
    "mean_average_precision",
    "rank_of_positives",
    "recall_at_k",
    "recall_at_k_by_distance",
    "recall_at_percent",
    "summarize",
    "valid_queries",
    "within_m",
]
