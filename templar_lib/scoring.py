"""Scores of one window's gradients from losses before and after applying each (DESIGN §2).

For uid u, with its decoded gradient applied alone to a copy of θ_w by the outer step (sign, lr of the window):

    improvement(before, after) = (before − after) / before        relative loss improvement
    specific_p   = improvement on u's own page p − max(0, improvement on the validator's random pages)
    score_u      = max(0, min over u's own pages p of specific_p)
    indicator_u  = +1 if score_u > 0, else −1

What a miner is paid for is what its assigned pages bought: a gradient trained on them improves them more than it
improves pages nobody assigned, and every one of them. A gradient trained elsewhere (another uid's file, a mean of the
public uploads, the validator's pages) helps the random pages as much as the miner's own, so its specific improvement
is about zero; one that skipped a page scores what that page got, about zero. The minimum over pages makes skipping
any part of the work cost the whole score, so no shortcut earns more per unit of compute than the assigned work. An
update that makes every page worse (noise) earns nothing for making its own pages a little less worse: only a real
improvement of each own page counts, beyond what the random pages gained.

A uid whose gradient is missing, late or invalid gets score 0 and indicator −1, with the reason recorded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Losses:
    """Mean next-token losses of θ_w (before) and θ_w + u's update (after), on u's own and on random pages.
    own_pages: (before, after) on each own page, in the order assigned; own_before/own_after are their means."""

    own_before: float
    own_after: float
    random_before: float
    random_after: float
    own_pages: list[tuple[float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Score:
    uid: int
    score: float  # min over own pages of the specific improvement, ≥ 0; 0 when invalid
    indicator: int  # +1 / −1
    improvement_own: float | None = None  # on all own pages together
    improvement_random: float | None = None
    losses: Losses | None = None
    reason: str = ""  # why the score is zero, for invalid / missing / late gradients
    sync_lag: int = 0  # outer steps behind θ_w the miner trained on (its score is scaled down by it)


def relative_improvement(before: float, after: float) -> float:
    """(before − after) / before; 0 when `before` is not a positive finite number or `after` is not finite."""
    if not (math.isfinite(before) and math.isfinite(after)) or before <= 0:
        return 0.0
    return (before - after) / before


def score_losses(uid: int, losses: Losses) -> Score:
    own = relative_improvement(losses.own_before, losses.own_after)
    random = relative_improvement(losses.random_before, losses.random_after)
    pages = losses.own_pages or [(losses.own_before, losses.own_after)]
    specific = min(relative_improvement(before, after) for before, after in pages) - max(0.0, random)
    score = max(0.0, specific)
    return Score(uid=uid, score=score, indicator=1 if score > 0 else -1, improvement_own=own,
                 improvement_random=random, losses=losses)


def zero_score(uid: int, reason: str) -> Score:
    return Score(uid=uid, score=0.0, indicator=-1, reason=reason)


def update_moving_average(previous: float, value: float, alpha: float) -> float:
    """(1 − α)·previous + α·value."""
    return (1.0 - alpha) * previous + alpha * value
