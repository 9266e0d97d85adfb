import dagster as dg

from templar_lib.roles.miner import answer_spot_checks, mark_late, mine_window, skip_window
from templar_lib.wire import gradient_key
from templar_pipelines.assets.common import GPU_TAGS, MODEL_STATE_POOL, NETWORK_RETRY
from templar_pipelines.assets.data import dataset_pages
from templar_pipelines.metadata import gradients_metadata, miner_lines, protocol_metadata
from templar_pipelines.partitions import is_scheduled, partition_window, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, HParamsResource, NodeResource, WandbResource


@dg.asset(partitions_def=window_partitions, group_name="miner", kinds={"pytorch", "s3"}, deps=[dataset_pages],
          pool=MODEL_STATE_POOL, op_tags=GPU_TAGS, retry_policy=NETWORK_RETRY)
def gradients(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
              hparams: HParamsResource, node: NodeResource, wandb: WandbResource) -> dg.MaterializeResult:
    """Every served miner trains θ_w on its pages and uploads gradient-{window}-{uid}, under the network's strategy
    (demo: compressed momentum; sparseloco: a 2-bit sparse pseudo-gradient of its inner AdamW steps). A run the
    chain's clock planned for a window that had closed (a node catching up after downtime) mines only the uids an
    earlier attempt put a file of (roles.miner.skip_window); the spot checks owed are answered."""
    window, dataset, live_chain = partition_window(context), buckets.dataset(), chain.open()
    own_bucket = buckets.gradients()  # opened once (each call makes a client)
    model, state = node.model_at(window, dataset)
    settings, uids, store = hparams.load(), node.miners(live_chain), node.store()
    # a spot check of the previous window is answered first: this window's work updates the states it asks for;
    # one of the window before that too where its answer is not in the bucket (the node was down), asked once more
    answered = {window - back: answer_spot_checks(
        window - back, uids, seed=live_chain.block_hash((window - back + 1) * settings.blocks_per_window),
        store=store, gradients=own_bucket, hparams=settings, late=back == 2, model=model, dataset=dataset)
        for back in (1, 2) if window - back >= 0}
    closes, spot_checked = (window + 1) * settings.blocks_per_window, settings.spot_check_probability > 0
    # a file of a closed window is worth nothing (no validator sees it): a run the clock planned (a node catching up
    # after downtime) does not mine it for a uid with no file of it; one an earlier attempt put is mined again (its
    # state, which the next window and a check of that file need, is saved; the file stands). A run someone asked
    # for (a backfill) mines it, but for the uids whose states such a run carried over (spot checks off)
    closed = live_chain.block() >= closes  # when this run started
    planned = is_scheduled(context.run) and closed
    unmined = skip_window(window, uids, store=store, gradients=own_bucket, hparams=settings, planned=planned)
    if unmined:
        why = ("its planned run had carried their states over it (re-run as it ran)" if not planned else
               "it closed before this run started (their next window starts from no state)" if spot_checked else
               "it closed before this run started (their states carry over to the next window)")
        context.log.warning(f"window {window}: uids {unmined} not mined: {why}")
    mined = [uid for uid in uids if uid not in unmined]
    # a file already there when a run that started after the close began, an earlier attempt put: in time, or late
    # and marked so by that attempt; this run's upload of it is not late (publish_once keeps it)
    landed = {uid for uid in mined if own_bucket.exists(gradient_key(window, uid))} if spot_checked and closed \
        else set()
    results = mine_window(
        window, mined, model=model, step=state.step, store=store, dataset=dataset, gradients=own_bucket,
        hparams=settings, model_hash=state.fingerprint,  # what the validators recorded of the last files:
        records=buckets.validator_records(live_chain, window - 1) if spot_checked and window > 0 else None
    ) if mined else []
    late = [result.uid for result in results if result.uid not in landed]
    if late and spot_checked and live_chain.block() >= closes:
        context.log.warning(f"window {window} closed before the files of uids {late} landed: their next window "
                            f"starts from no state")
        mark_late(window, late, store=store)
    for line in miner_lines(results):
        context.log.info(line)
    metadata = gradients_metadata(results) | protocol_metadata(settings) | {
        "mined": ", ".join(map(str, mined)) or "none",  # uids: not those whose window had closed
        "spot_checks_answered": ", ".join(f"{uid} (window {checked})" for checked, put in sorted(answered.items())
                                          for uid in sorted(put)) or "none"}
    if results:
        wandb.log("miner", window, {"loss": metadata["loss"], "bytes": metadata["bytes"]})
    else:  # nothing mined: no loss or size to plot, rather than a zero
        metadata = {key: value for key, value in metadata.items()
                    if key not in ("loss", "bytes", "compression_ratio", "tokens_per_second")}
    return dg.MaterializeResult(metadata=metadata)
