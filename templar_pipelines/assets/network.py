"""The network over time: each window's health and each miner's series (score, rating, weight, zero-score reason).

The `network` asset is written by the validator's last step, `chain_weights` (assets/chain.py), with the weights it
set: a multi-asset, so it runs in `validator_job` and `local_network_job` without a step of its own. Its numeric
metadata (health numbers and `uid_{uid}_{score|rating|weight}`) are plotted by the Dagster UI over the window
partitions (Assets → network → Overview → Metadata → Plots); its `history` table shows every uid across the last
HISTORY_WINDOWS windows.
"""

from __future__ import annotations

from dataclasses import dataclass

import dagster as dg

from templar_lib.buckets import Bucket, ObjectMissing
from templar_lib.chain import Chain
from templar_lib.ratings import Ratings
from templar_lib.state import StateMissing, StateStore
from templar_lib.watch import Watch
from templar_lib.wire import EvaluationReport, InvalidFile, evaluation_key, read_evaluation
from templar_pipelines.assets.validator import ratings

HISTORY_WINDOWS = 8  # windows the history table looks back over

NETWORK = dg.AssetSpec(
    "network", group_name="network", kinds={"python"}, deps=[ratings],
    description="Each window's health (miners seen, valid, peers, the node's lag behind the chain, the block weights "
                "were set at) and each uid's score, rating and weight, plotted over windows; the history table holds "
                "every uid across the last windows with its zero-score reasons. Written by chain_weights.")


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


def window_record(report: EvaluationReport, ratings: Ratings, weights: dict[int, float] | None) -> WindowRecord:
    uids = sorted(set(report.scores) | set(ratings.by_uid))
    return WindowRecord(window=report.window,
                        scores={uid: float(score.score) for uid, score in report.scores.items()},
                        reasons={uid: score.reason for uid, score in report.scores.items() if score.reason},
                        ratings={uid: float(rating.ordinal) for uid, rating in sorted(ratings.by_uid.items())},
                        weights={uid: float((weights or {}).get(uid, 0.0)) for uid in uids})


def recent_records(window: int, *, validator: int, gradients: Bucket, store: StateStore,
                   count: int = HISTORY_WINDOWS) -> list[WindowRecord]:
    """The records of the last `count` windows up to `window` that this validator evaluated and rated, oldest first
    (a window it has no report or ratings of is left out)."""
    records = []
    for past in range(max(0, window - count + 1), window + 1):
        try:
            report = read_evaluation(gradients.get(evaluation_key(past, validator)), window=past, validator=validator)
            weights = store.load_weights(past)
        except (ObjectMissing, InvalidFile, StateMissing):
            continue
        records.append(window_record(report, store.load_ratings(past), weights))
    return records


def network_health(report: EvaluationReport, *, chain: Chain, watch: Watch, weights_status: str,
                   weights_block: int | None) -> NetworkHealth:
    return NetworkHealth(window=report.window, seen=len(watch.sightings()),
                         valid=sum(1 for score in report.scores.values() if not score.reason),
                         peers=len(report.peers), chain_block=chain.block(), closing_block=watch.closes,
                         weights_status=weights_status, weights_block=weights_block)


def last_weights_block(chain: Chain, validator: int, *, status: str, block: int) -> int | None:
    """The block `validator`'s weights were last set at: the chain's record where it keeps one (LocalChain), else
    `block` when they were set just now, else unknown."""
    recorded = getattr(chain, "weights_block", None)  # not in the Chain protocol: BittensorChain has no reader yet
    if recorded is not None:
        return recorded(validator)
    return block if status == "set" else None
