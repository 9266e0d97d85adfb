"""The network over time: each window's health and each miner's series (score, rating, weight, zero-score reason).

The `network` asset is written by the validator's last step, `chain_weights` (assets/chain.py), with the weights it
set: a multi-asset, so it runs in `validator_job` and `local_network_job` without a step of its own. Its numeric
metadata (health numbers and `uid_{uid}_{score|rating|weight}`) are plotted by the Dagster UI over the window
partitions (Assets → network → Overview → Metadata → Plots); its `history` table shows every uid across the last
HISTORY_WINDOWS windows.
"""

from __future__ import annotations

import dagster as dg

from templar_lib.buckets import Bucket, ObjectMissing
from templar_lib.chain import Chain
from templar_lib.state import StateMissing, StateStore
from templar_lib.wire import InvalidFile, evaluation_key, read_evaluation
from templar_pipelines.assets.validator import ratings
from templar_pipelines.health import WindowRecord, window_record

HISTORY_WINDOWS = 8  # windows the history table looks back over

NETWORK = dg.AssetSpec(
    "network", group_name="network", kinds={"python"}, deps=[ratings],
    description="Each window's health (miners seen, valid, peers, the node's lag behind the chain, the block weights "
                "were set at) and each uid's score, rating and weight, plotted over windows; the history table holds "
                "every uid across the last windows with its zero-score reasons. Written by chain_weights.")


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


def last_weights_block(chain: Chain, validator: int, *, status: str, block: int) -> int | None:
    """The block `validator`'s weights were last set at: the chain's record where it keeps one (LocalChain), else
    `block` when they were set just now, else unknown."""
    recorded = getattr(chain, "weights_block", None)  # not in the Chain protocol: BittensorChain has no reader yet
    if recorded is not None:
        return recorded(validator)
    return block if status == "set" else None
