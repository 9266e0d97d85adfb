"""OpenSkill ratings of miners, carried from window to window (DESIGN §2, §4).

Each window the evaluated uids are ranked by that window's score (higher is better; equal scores tie) and their
PlackettLuce ratings (β = openskill_beta, τ = openskill_tau, from the `openskill` package) are updated together.
Alongside, each uid's binary moving average of the own-vs-random indicator (scoring.update_moving_average).

    final_u = ordinal_u × max(0, binary_ma_u)          ordinal = μ − 3σ

Rules: a uid seen for the first time starts at the default rating (μ 25, σ 25/3, ordinal 0) and binary_ma 0, so
it earns nothing until it has been evaluated; a uid whose hotkey changed (re-registered by someone else) or that
left the metagraph loses its state.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from openskill.models import PlackettLuce

from templar_lib.hparams import HParams
from templar_lib.scoring import update_moving_average


@dataclass(frozen=True)
class UidRating:
    hotkey: str
    mu: float
    sigma: float
    binary_ma: float = 0.0

    @property
    def ordinal(self) -> float:
        return self.mu - 3.0 * self.sigma

    @property
    def final(self) -> float:
        return self.ordinal * max(0.0, self.binary_ma)


@dataclass(frozen=True)
class Ratings:
    window: int = -1  # last window folded in
    by_uid: dict[int, UidRating] = field(default_factory=dict)

    def final_scores(self) -> dict[int, float]:
        return {uid: rating.final for uid, rating in sorted(self.by_uid.items())}

    def to_json(self) -> bytes:
        return json.dumps({"window": self.window, "by_uid": {str(u): asdict(r) for u, r in self.by_uid.items()}},
                          sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Ratings:
        raw = json.loads(data)
        return cls(window=int(raw["window"]),
                   by_uid={int(uid): UidRating(**values) for uid, values in raw["by_uid"].items()})


def model(hparams: HParams) -> PlackettLuce:
    return PlackettLuce(beta=hparams.openskill_beta, tau=hparams.openskill_tau)


def update_ratings(ratings: Ratings, window: int, scores: Mapping[int, float], indicators: Mapping[int, int],
                   hotkeys: Mapping[int, str], hparams: HParams) -> Ratings:
    """Fold one window in. scores/indicators: uid -> value for every uid evaluated this window (invalid ones
    with score 0 and indicator −1); hotkeys: the metagraph now (uid -> hotkey)."""
    skill = model(hparams)
    current = {uid: r for uid, r in ratings.by_uid.items() if hotkeys.get(uid) == r.hotkey}
    for uid in scores:
        if uid not in current:
            fresh = skill.rating()
            current[uid] = UidRating(hotkeys[uid], fresh.mu, fresh.sigma)
    ranked = sorted(uid for uid in scores if uid in hotkeys)
    if len(ranked) >= 2:
        teams = [[skill.rating(mu=current[uid].mu, sigma=current[uid].sigma)] for uid in ranked]
        updated = skill.rate(teams, scores=[float(scores[uid]) for uid in ranked])
        for uid, (rating,) in zip(ranked, updated):
            current[uid] = UidRating(current[uid].hotkey, rating.mu, rating.sigma, current[uid].binary_ma)
    for uid in ranked:
        ma = update_moving_average(current[uid].binary_ma, indicators[uid], hparams.binary_score_ma_alpha)
        current[uid] = UidRating(current[uid].hotkey, current[uid].mu, current[uid].sigma, ma)
    return Ratings(window=window, by_uid=dict(sorted(current.items())))
