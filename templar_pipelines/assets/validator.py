import dagster as dg

from templar_lib.roles.validator import EvaluationOptions, evaluate_window, rate_window
from templar_lib.wire import evaluation_key, read_evaluation
from templar_pipelines.assets.common import GPU_TAGS, NETWORK_RETRY
from templar_pipelines.assets.miner import gradients
from templar_pipelines.metadata import evaluations_metadata, ratings_metadata
from templar_pipelines.partitions import partition_window, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, HParamsResource, NodeResource, WandbResource


@dg.asset(partitions_def=window_partitions, group_name="validator", kinds={"pytorch"}, deps=[gradients],
          op_tags=GPU_TAGS, retry_policy=NETWORK_RETRY)
def evaluations(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
                hparams: HParamsResource, node: NodeResource, wandb: WandbResource) -> dg.MaterializeResult:
    """Loss before/after each miner's gradient on θ_w; invalid, late or missing gradients score 0 with a reason."""
    window, dataset = partition_window(context), buckets.dataset()
    validator_chain = chain.open_as(node.validator(chain.open()))
    model, state = node.model_at(window, dataset)
    evaluation = evaluate_window(window, chain=validator_chain, model=model, state=state, dataset=dataset,
                                 peers=buckets.peers(validator_chain), own_bucket=buckets.gradients(),
                                 hparams=hparams.load(),
                                 options=EvaluationOptions(check_upload_time=buckets.enforce_upload_window))
    wandb.log("validator", window, {"random_loss": evaluation.random_loss, "valid": len(evaluation.valid_uids)})
    return dg.MaterializeResult(metadata=evaluations_metadata(evaluation))


@dg.asset(partitions_def=window_partitions, group_name="validator", kinds={"python"}, deps=[evaluations])
def ratings(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
            hparams: HParamsResource, node: NodeResource) -> dg.MaterializeResult:
    """OpenSkill ratings after this window (from the ratings after the previous one and this window's scores), and
    the weights they give (set on the chain by `chain_weights`)."""
    window, store = partition_window(context), node.store()
    live_chain = chain.open()
    validator = node.validator(live_chain)
    report = read_evaluation(buckets.gradients().get(evaluation_key(window, validator)), window=window,
                             validator=validator)
    hotkeys = {neuron.uid: neuron.hotkey for neuron in live_chain.metagraph().neurons}
    updated, weights = rate_window(report, store.load_ratings(window - 1), hotkeys, hparams.load())
    store.save_ratings(updated, weights)
    return dg.MaterializeResult(metadata=ratings_metadata(updated))
