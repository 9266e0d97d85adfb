"""Scores of one window's gradients from losses before and after applying each (DESIGN §2; Templar v0.2 validator).

For uid u, with its decoded gradient applied to a copy of θ_w by the outer step (sign, lr of the window):

    improvement(before, after) = (before − after) / before                relative loss improvement
    indicator_u  = +1 if improvement on u's own pages > improvement on random pages, else −1
                   (training on the assigned pages improves those pages most; other data does not)
    score_u      = improvement on the validator's random pages when indicator_u = +1, else min(that, 0)
                   (a gradient earns rank only for helping on data it was assigned: one trained on other pages
                   still helps random pages but must not outrank the miners who did the assigned work)
    binary_ma_u ← (1 − α) · binary_ma_u + α · indicator_u,   α = binary_score_ma_alpha   (ratings.py keeps it)

A uid whose gradient is missing, late or invalid gets score 0 and indicator −1, with the reason recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Losses:
    """Mean next-token losses of θ_w (before) and θ_w + u's update (after), on u's own and on random pages."""

    own_before: float
    own_after: float
    random_before: float
    random_after: float


@dataclass(frozen=True)
class Score:
    uid: int
    score: float  # improvement on random pages; 0 when invalid
    indicator: int  # +1 / −1
    improvement_own: float | None = None
    improvement_random: float | None = None
    losses: Losses | None = None
    reason: str = ""  # why the score is zero, for invalid / missing / late gradients


def relative_improvement(before: float, after: float) -> float:
    """(before − after) / before; 0 when `before` is not a positive finite number or `after` is not finite."""
    if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
        return 0.0
    return (before - after) / before


def score_losses(uid: int, losses: Losses) -> Score:
    own = relative_improvement(losses.own_before, losses.own_after)
    random = relative_improvement(losses.random_before, losses.random_after)
    indicator = 1 if own > random else -1
    return Score(uid=uid, score=random if indicator > 0 else min(random, 0.0), indicator=indicator,
                 improvement_own=own, improvement_random=random, losses=losses)


def zero_score(uid: int, reason: str) -> Score:
    return Score(uid=uid, score=0.0, indicator=-1, reason=reason)


def update_moving_average(previous: float, indicator: int, alpha: float) -> float:
    """(1 − α)·previous + α·indicator."""
    return (1.0 - alpha) * previous + alpha * indicator
