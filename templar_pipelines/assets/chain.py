import dagster as dg

from templar_lib.roles.validator import submit_weights
from templar_pipelines.assets.validator import ratings
from templar_pipelines.metadata import weights_metadata
from templar_pipelines.partitions import partition_window, window_partitions
from templar_pipelines.resources import ChainResource, NodeResource


@dg.asset(partitions_def=window_partitions, group_name="chain", kinds={"bittensor"}, deps=[ratings])
def chain_weights(context: dg.AssetExecutionContext, chain: ChainResource, node: NodeResource) -> dg.MaterializeResult:
    """The weights this window's ratings give, set on the chain by the validator (rate limit: recorded, not fatal)."""
    window = partition_window(context)
    validator_chain = chain.open_as(node.validator(chain.open()))
    weights = node.store().load_weights(window)
    status = submit_weights(validator_chain, weights)
    return dg.MaterializeResult(metadata=weights_metadata(weights, status, validator_chain.block()))
