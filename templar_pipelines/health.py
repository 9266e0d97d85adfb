"""What a validator's node saw of the network in one window, as plain records: the `network` asset's metadata
(metadata.py) is drawn from them, and assets/network.py and assets/chain.py make them."""

from __future__ import annotations

from dataclasses import dataclass

from templar_lib.chain import Chain
from templar_lib.ratings import Ratings
from templar_lib.watch import Watch
from templar_lib.wire import EvaluationReport


@dataclass(frozen=True)
class WindowRecord:
    """One window as this validator recorded it, by uid."""

    window: int
    scores: dict[int, float]  # every uid scored (0 with a reason when invalid, late, copied or missing)
    reasons: dict[int, str]  # uid -> why its score is 0
    ratings: dict[int, float]  # uid -> OpenSkill ordinal after the window
    weights: dict[int, float]  # uid -> weight the window's ratings give (0: none)


@dataclass(frozen=True)
class NetworkHealth:
    """What the validator's node saw of the network for one window, once it had set weights."""

    window: int
    seen: int  # uids whose gradient the watch saw before the window closed
    valid: int  # of those, scored without a reason
    peers: int  # in the signed peers list
    chain_block: int  # the chain's block now
    closing_block: int  # the first block after the window
    weights_status: str  # "set", or why not
    weights_block: int | None  # the block this validator's weights were last set at (None: unknown)
    watched: bool = True  # False: the watch never looked at the window while it was open (nobody scored)


def window_record(report: EvaluationReport, ratings: Ratings, weights: dict[int, float] | None) -> WindowRecord:
    uids = sorted(set(report.scores) | set(ratings.by_uid))
    return WindowRecord(window=report.window,
                        scores={uid: float(score.score) for uid, score in report.scores.items()},
                        reasons={uid: score.reason for uid, score in report.scores.items() if score.reason},
                        ratings={uid: float(rating.ordinal) for uid, rating in sorted(ratings.by_uid.items())},
                        weights={uid: float((weights or {}).get(uid, 0.0)) for uid in uids})


def network_health(report: EvaluationReport, *, chain: Chain, watch: Watch, weights_status: str,
                   weights_block: int | None) -> NetworkHealth:
    return NetworkHealth(window=report.window, seen=len(watch.sightings()),
                         valid=sum(1 for score in report.scores.values() if not score.reason),
                         peers=len(report.peers), chain_block=chain.block(), closing_block=watch.closes,
                         weights_status=weights_status, weights_block=weights_block, watched=report.watched)
