import dagster as dg

from templar_lib.roles.validator import submit_weights
from templar_lib.weights import normalised_weights
from templar_pipelines.assets.validator import ratings
from templar_pipelines.metadata import weights_metadata
from templar_pipelines.partitions import window_of, window_partitions
from templar_pipelines.resources import ChainResource, TrainingResource


@dg.asset(partitions_def=window_partitions, group_name="chain", kinds={"bittensor"}, deps=[ratings])
def chain_weights(context: dg.AssetExecutionContext, chain: ChainResource,
                  training: TrainingResource) -> dg.MaterializeResult:
    """Weights from this window's ratings, set on the chain by the validator (rate limit: recorded, not fatal)."""
    window = window_of(context)
    validator_chain = chain.open_as(training.validator(chain.open()))
    weights = normalised_weights(training.store().load_ratings(window).final_scores(),
                                 validator_chain.metagraph().uids)
    status = submit_weights(validator_chain, weights)
    return dg.MaterializeResult(metadata=weights_metadata(weights, status, validator_chain.block()))
