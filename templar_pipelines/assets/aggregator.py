import dagster as dg

from templar_lib.aggregation import update_norm
from templar_lib.audit import held_out_loss
from templar_lib.checkpoints import catch_up, checkpoint_windows, save_checkpoint
from templar_lib.gather import peer_buckets
from templar_lib.roles import aggregator_step
from templar_pipelines.assets.common import MODEL_STATE_POOL, NETWORK_RETRY
from templar_pipelines.assets.validator import evaluations
from templar_pipelines.metadata import aggregation_metadata, loss_chart
from templar_pipelines.partitions import window_of, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, TrainingResource, WandbResource


@dg.asset(partitions_def=window_partitions, group_name="aggregator", kinds={"pytorch", "s3"}, deps=[evaluations],
          retry_policy=NETWORK_RETRY)
def aggregation(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
                training: TrainingResource) -> dg.MaterializeResult:
    """aggregation-{window}: the accepted gradients (those in peers_{window}.json) combined into one update."""
    window, hparams, manifest = window_of(context), training.hparams(), training.manifest(buckets)
    state = training.state_at(window, buckets)
    live_chain = chain.open()
    peers, bad_commitments = peer_buckets(live_chain.commitments(), allow_local=buckets.allow_local_peers)
    result, _ = aggregator_step(window, state=state, uids=training.miners(live_chain), peer_buckets=peers,
                                aggregator=buckets.aggregator(), hparams=hparams, peers_bucket=buckets.gradients(),
                                skipped_commitments=bad_commitments, advance=False)
    return dg.MaterializeResult(metadata=aggregation_metadata(result))


@dg.asset(partitions_def=window_partitions, group_name="aggregator", kinds={"safetensors"}, deps=[aggregation],
          pool=MODEL_STATE_POOL)
def checkpoint(context: dg.AssetExecutionContext, buckets: BucketsResource, training: TrainingResource,
               wandb: WandbResource) -> dg.MaterializeResult:
    """θ_{window+1}: the published aggregation replayed onto θ_window (every node computes the same bits); published
    as checkpoint-{window+1} every checkpoint_frequency windows."""
    window, hparams, manifest = window_of(context), training.hparams(), training.manifest(buckets)
    state = training.state_at(window, buckets)
    following = catch_up(state, buckets.aggregator(), window + 1, hparams=hparams)
    published = following.window % hparams.checkpoint_frequency == 0
    if published:  # before the local save: a run killed in between redoes this window and publishes again
        save_checkpoint(buckets.aggregator(), following, hparams)
    store = training.store()
    sha256 = store.save_model(following)  # the file's digest: no second serialisation
    loss = held_out_loss(following, preset=training.preset, dataset=buckets.dataset(), manifest=manifest,
                         hparams=hparams, model=training.model(manifest))  # on the node's device: 1b is GPU-only
    store.record_held_out_loss(following.window, loss)
    wandb.log("aggregator", window, {"held_out_loss": loss})
    return dg.MaterializeResult(metadata={"sha256": sha256, "held_out_loss": loss,
                                          "model_window": following.window, "step": following.step,
                                          "update_norm": update_norm(state.parameters, following.parameters),
                                          "published": published,
                                          "held_out_loss_over_windows": loss_chart(store.held_out_losses())})


@dg.asset(group_name="aggregator", kinds={"safetensors"})
def published_checkpoint(buckets: BucketsResource) -> dg.MaterializeResult:
    """The newest checkpoint published in the aggregator bucket (audited by the checkpoint_audit checks)."""
    windows = checkpoint_windows(buckets.aggregator())
    return dg.MaterializeResult(metadata={"window": windows[0] if windows else -1,
                                          "published_checkpoints": len(windows)})
