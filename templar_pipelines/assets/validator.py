import dagster as dg

from templar_lib.gather import peer_buckets
from templar_lib.roles.validator import evaluate_window, rate_window, read_evaluation
from templar_lib.wire import evaluation_key
from templar_pipelines.assets.common import GPU_TAGS, NETWORK_RETRY
from templar_pipelines.assets.miner import gradients
from templar_pipelines.metadata import evaluations_metadata, ratings_metadata
from templar_pipelines.partitions import window_of, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, TrainingResource, WandbResource


@dg.asset(partitions_def=window_partitions, group_name="validator", kinds={"pytorch"}, deps=[gradients],
          op_tags=GPU_TAGS, retry_policy=NETWORK_RETRY)
def evaluations(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
                training: TrainingResource, wandb: WandbResource) -> dg.MaterializeResult:
    """Loss before/after each miner's gradient on θ_w; invalid, late or missing gradients score 0 with a reason."""
    window, hparams, manifest = window_of(context), training.hparams(), training.manifest(buckets)
    validator_chain = chain.open_as(training.validator(chain.open()))
    model, state = training.model_at(window, buckets, manifest)
    peers, bad_commitments = peer_buckets(validator_chain.commitments(), allow_local=buckets.allow_local_peers)
    evaluation = evaluate_window(window, validator_uid=validator_chain.uid, chain=validator_chain, model=model,
                                 step=state.step, dataset=buckets.dataset(), manifest=manifest, peer_buckets=peers,
                                 own_bucket=buckets.gradients(), hparams=hparams, skipped_commitments=bad_commitments,
                                 check_upload_time=buckets.enforce_upload_window, model_hash=state.fingerprint)
    wandb.log("validator", window, {"random_loss": evaluation.random_loss, "valid": len(evaluation.valid_uids)})
    return dg.MaterializeResult(metadata=evaluations_metadata(evaluation))


@dg.asset(partitions_def=window_partitions, group_name="validator", kinds={"python"}, deps=[evaluations])
def ratings(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
            training: TrainingResource) -> dg.MaterializeResult:
    """OpenSkill ratings after this window (from the ratings after the previous one and this window's scores)."""
    window, hparams, store = window_of(context), training.hparams(), training.store()
    live_chain = chain.open()
    validator = training.validator(live_chain)
    evaluation = read_evaluation(buckets.gradients().get(evaluation_key(window, validator)), window=window,
                                 validator_uid=validator)
    hotkeys = {neuron.uid: neuron.hotkey for neuron in live_chain.metagraph().neurons}
    updated, _ = rate_window(evaluation, store.load_ratings(window - 1), hotkeys, hparams)
    store.save_ratings(updated)
    return dg.MaterializeResult(metadata=ratings_metadata(updated))
