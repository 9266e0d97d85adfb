from collections.abc import Iterator

import dagster as dg

from templar_lib.roles.validator import submit_weights
from templar_lib.wire import evaluation_key, read_evaluation
from templar_pipelines.assets.network import HISTORY_WINDOWS, NETWORK, last_weights_block, recent_records
from templar_pipelines.assets.validator import ratings
from templar_pipelines.health import network_health, window_record
from templar_pipelines.metadata import network_metadata, network_metrics, uid_series, weights_metadata
from templar_pipelines.partitions import partition_window, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, NodeResource, WandbResource

CHAIN_WEIGHTS = dg.AssetSpec("chain_weights", group_name="chain", kinds={"bittensor"}, deps=[ratings],
                             description="The weights this window's ratings give, set on the chain by the validator "
                                         "(rate limit: recorded, not fatal).")


@dg.multi_asset(specs=[CHAIN_WEIGHTS, NETWORK], partitions_def=window_partitions)
def chain_weights(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
                  node: NodeResource, wandb: WandbResource) -> Iterator[dg.MaterializeResult]:
    """Set the weights this window's ratings give on the chain, then record the network as the validator saw it this
    window (`network`: health numbers and each uid's score, rating and weight, plotted over windows)."""
    window, store = partition_window(context), node.store()
    live_chain = chain.open()
    validator = node.validator(live_chain)
    validator_chain = chain.open_as(validator)
    weights = store.load_weights(window)
    status = submit_weights(validator_chain, weights)
    block, gradients = validator_chain.block(), buckets.gradients()
    report = read_evaluation(gradients.get(evaluation_key(window, validator)), window=window, validator=validator)
    now = window_record(report, store.load_ratings(window), weights)
    yield dg.MaterializeResult(asset_key=CHAIN_WEIGHTS.key,
                               metadata=weights_metadata(weights, status, block, sorted(now.weights)))
    history = [*recent_records(window - 1, validator=validator, gradients=gradients, store=store,
                               count=HISTORY_WINDOWS - 1), now]
    health = network_health(report, chain=live_chain, watch=node.watch(window, live_chain), weights_status=status,
                            weights_block=last_weights_block(validator_chain, validator, status=status, block=block))
    wandb.log("network", window, network_metrics(health), per_uid=uid_series(now))
    yield dg.MaterializeResult(asset_key=NETWORK.key, metadata=network_metadata(health, history))
