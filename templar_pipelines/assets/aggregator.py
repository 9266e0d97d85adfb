import dagster as dg

from templar_lib.checkpoints import checkpoint_windows
from templar_lib.roles import advance_window, aggregator_step
from templar_pipelines.assets.common import MODEL_STATE_POOL, NETWORK_RETRY
from templar_pipelines.assets.validator import evaluations
from templar_pipelines.metadata import aggregation_lines, aggregation_metadata, loss_chart, protocol_metadata
from templar_pipelines.partitions import partition_window, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, HParamsResource, NodeResource, WandbResource


@dg.asset(partitions_def=window_partitions, group_name="aggregator", kinds={"pytorch", "s3"}, deps=[evaluations],
          retry_policy=NETWORK_RETRY)
def aggregation(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
                hparams: HParamsResource, node: NodeResource) -> dg.MaterializeResult:
    """aggregation-{window}: exactly the gradients a validator scored (their sha256 in its signed peers_{window}.json)
    combined into one update; fails (and is retried) until the validator has published the list."""
    window, live_chain, settings = partition_window(context), chain.open(), hparams.load()
    result = aggregator_step(window, state=node.sync_state(window), chain=live_chain,
                             peers=buckets.peers(live_chain), aggregator=buckets.aggregator(), hparams=settings,
                             peers_list=buckets.gradients())
    for line in aggregation_lines(result):
        context.log.info(line)
    return dg.MaterializeResult(metadata=aggregation_metadata(result) | protocol_metadata(settings))


@dg.asset(partitions_def=window_partitions, group_name="aggregator", kinds={"safetensors"}, deps=[aggregation],
          pool=MODEL_STATE_POOL)
def checkpoint(context: dg.AssetExecutionContext, buckets: BucketsResource, hparams: HParamsResource,
               node: NodeResource, wandb: WandbResource) -> dg.MaterializeResult:
    """θ_{window+1}: the published aggregation replayed onto θ_window (every node computes the same bits); published
    as checkpoint-{window+1} every checkpoint_frequency windows."""
    window, dataset = partition_window(context), buckets.dataset()
    store = node.store()
    advance = advance_window(window, state=node.sync_state(window), aggregator=buckets.aggregator(), store=store,
                             model=node.training.model(dataset.vocab_size), dataset=dataset, hparams=hparams.load())
    wandb.log("aggregator", window, {"held_out_loss": advance.held_out_loss})
    return dg.MaterializeResult(metadata={"sha256": advance.sha256, "held_out_loss": advance.held_out_loss,
                                          "model_window": advance.state.window, "step": advance.state.step,
                                          "update_norm": advance.update_norm,
                                          "published": advance.checkpoint is not None,
                                          "held_out_loss_over_windows": loss_chart(store.held_out_losses())})


@dg.asset(group_name="aggregator", kinds={"safetensors"})
def published_checkpoint(buckets: BucketsResource) -> dg.MaterializeResult:
    """The newest checkpoint published in the aggregator bucket (audited by the checkpoint_audit checks)."""
    windows = checkpoint_windows(buckets.aggregator())
    return dg.MaterializeResult(metadata={"window": windows[0] if windows else -1,
                                          "published_checkpoints": len(windows)})
