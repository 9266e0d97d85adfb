"""What each miner has earned, carried from window to window (DESIGN §2, §4).

Per uid, after every window it was evaluated in:

    score_ema_u ← (1 − α) · score_ema_u + α · score_u      α = score_ema_alpha          (what weights follow)
    binary_ma_u ← (1 − α_b) · binary_ma_u + α_b · indicator_u   α_b = binary_score_ma_alpha
    OpenSkill PlackettLuce rating (β = openskill_beta, τ = openskill_tau), the uids ranked by this window's score

    final_u = score_ema_u · miss_penalty^m_u     m_u = misses among the uid's last miss_window evaluated windows
            = 0 while the uid is banned, or once m_u ≥ miss_exclude (its moving average and rating restart)

A miss is a window the uid was evaluated in and scored zero for a reason (missing, late, invalid, stale, a copy, a
broken norm, too small to use): each costs a share of its pay for the next miss_window windows, and a uid that misses
most of them starts over. With the defaults (0.8, 8, 6): one miss costs 20 % of the pay, three about half, six of
eight everything. A uid the validator did not sample in a window (roles/validator.py) is not evaluated there: nothing
about it changes.

Pay follows contribution: a score is a measured improvement (scoring.py), so its moving average is proportional to
the work a miner did, while a rank throws the size of the difference away (two honest miners a hair apart get very
different ordinals, and an OpenSkill rating random-walks with the noise of the ranks). The rating is kept because it
says how consistently a miner places, which people read and the validator's sampling may use; it does not set pay.

A uid found to have changed its file after the validator scored it is banned for `ban_windows` windows, one that
failed a spot check (spot_check.py) for `spot_check_ban_windows` (its zeros while banned are not misses): its score
is 0, its moving average restarts at 0. A uid seen for the first time starts at the default rating (μ 25, σ 25/3),
score_ema 0 and binary_ma 0, so it earns nothing until it has been evaluated; a uid whose hotkey changed
(re-registered by someone else) or that left the metagraph loses its state.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

from openskill.models import PlackettLuce

from templar_lib.hparams import HParams
from templar_lib.scoring import update_moving_average


@dataclass(frozen=True)
class UidRating:
    hotkey: str
    mu: float
    sigma: float
    binary_ma: float = 0.0
    score_ema: float = 0.0
    banned_until: int = -1  # last window of a ban (-1: not banned)
    recent: str = ""  # the last evaluated windows, oldest first: "1" a miss, "0" not
    evaluated: int = -1  # the last window the uid was evaluated in
    final: float = 0.0  # what the weights follow, as of the last window the uid was evaluated in

    @property
    def misses(self) -> int:
        return self.recent.count("1")

    @property
    def ordinal(self) -> float:
        return self.mu - 3.0 * self.sigma


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
                   hotkeys: Mapping[int, str], hparams: HParams, banned: Mapping[int, str] | None = None,
                   missed: Iterable[int] = (), failed_checks: Mapping[int, str] | None = None) -> Ratings:
    """Fold one window in. scores/indicators: uid -> value for every uid evaluated this window (invalid ones with
    score 0 and indicator −1); hotkeys: the metagraph now (uid -> hotkey); banned: uids to ban from this window on
    (uid -> reason), e.g. found to have changed their file after it was scored; missed: the evaluated uids whose
    zero had a reason (a miss); failed_checks: uids whose spot check failed (uid -> reason), banned for
    spot_check_ban_windows."""
    skill, missed = model(hparams), set(missed)
    current = {uid: r for uid, r in ratings.by_uid.items() if hotkeys.get(uid) == r.hotkey}
    for uid in set(scores) | set(banned or {}) | set(failed_checks or {}):
        if uid not in current and uid in hotkeys:
            fresh = skill.rating()
            current[uid] = UidRating(hotkeys[uid], fresh.mu, fresh.sigma)
    bans = {uid: hparams.ban_windows for uid in banned or {}} | {
        uid: hparams.spot_check_ban_windows for uid in failed_checks or {}}
    for uid, length in bans.items():
        if uid in current:
            current[uid] = replace(current[uid], score_ema=0.0, final=0.0,
                                   banned_until=max(current[uid].banned_until, window + length - 1))
    ranked = sorted(uid for uid in scores if uid in hotkeys)
    effective = {uid: 0.0 if current[uid].banned_until >= window else float(scores[uid]) for uid in ranked}
    if len(ranked) >= 2:
        teams = [[skill.rating(mu=current[uid].mu, sigma=current[uid].sigma)] for uid in ranked]
        updated = skill.rate(teams, scores=[effective[uid] for uid in ranked])
        for uid, (rating,) in zip(ranked, updated):
            current[uid] = replace(current[uid], mu=rating.mu, sigma=rating.sigma)
    for uid in ranked:
        rating = current[uid]
        rating = replace(
            rating, binary_ma=update_moving_average(rating.binary_ma, indicators[uid], hparams.binary_score_ma_alpha),
            score_ema=update_moving_average(rating.score_ema, effective[uid], hparams.score_ema_alpha),
            recent=(rating.recent + ("1" if uid in missed else "0"))[-hparams.miss_window:], evaluated=window)
        if rating.misses >= hparams.miss_exclude:  # missed most windows: starts over
            fresh = skill.rating()
            rating = replace(rating, mu=fresh.mu, sigma=fresh.sigma, score_ema=0.0, binary_ma=0.0)
        current[uid] = replace(rating, final=rating.score_ema * hparams.miss_penalty ** rating.misses)
    return Ratings(window=window, by_uid=dict(sorted(current.items())))
