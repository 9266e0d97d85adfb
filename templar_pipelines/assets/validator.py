import functools
import time

import dagster as dg

from templar_lib.chain import Chain, ChainError, LocalChain
from templar_lib.roles.spot_checks import own_report
from templar_lib.roles.validator import (EvaluationOptions, WindowEvaluation, evaluate_window, rate_window,
                                         ratings_before, swaps_found)
from templar_lib.state import SEEN_COPY_WINDOWS
from templar_lib.wire import evaluation_key, read_evaluation
from templar_pipelines.assets.common import GPU_TAGS, NETWORK_RETRY
from templar_pipelines.assets.miner import gradients
from templar_pipelines.metadata import (evaluation_lines, evaluations_metadata, protocol_metadata, ratings_metadata,
                                        sightings_metadata)
from templar_pipelines.partitions import partition_window, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, HParamsResource, NodeResource, WandbResource


WATCH_CHAIN_FAILURES = 100  # chain reads in a row the watch outlives (≈ 5 min at 3 s between looks)
WATCH_CLOSE_MARGIN_SECONDS = 5.0  # beyond a poll and a sleep, for the watch's run to record the close


@dg.asset(partitions_def=window_partitions, group_name="validator", kinds={"s3"}, deps=[gradients])
def gradient_sightings(context: dg.AssetExecutionContext, chain: ChainResource,
                       node: NodeResource) -> dg.MaterializeResult:
    """While the window is open, the validator looks at every miner's bucket every few seconds and keeps what it sees
    first, with the chain block it saw it at (templar_lib.watch): the clock lateness and copies are judged by. Ends
    when the window closes; on a window already closed it reports what was seen live. On a local chain with a manual
    clock (a local network's window in one run) it looks once and then moves the clock to the close itself. A run
    that stops before the close leaves the watch not `closed`: its evaluation judges only the uids it saw."""
    window, live_chain = partition_window(context), chain.open()
    watch, failures = node.watch(window, live_chain), 0
    while True:
        try:
            block = live_chain.block()
        except ChainError as error:  # a chain endpoint's bad minute: look again once it answers
            if (failures := failures + 1) > WATCH_CHAIN_FAILURES:
                raise
            context.log.warning(f"chain unreachable ({error}): looking again in {node.watch_poll_seconds:g} s")
            watch.lost_sight()  # blind meanwhile: a close seen next counts only after another look
            time.sleep(node.watch_poll_seconds)
            continue
        failures = 0
        if block >= watch.closes:
            break
        if block >= watch.opens:
            watch.poll(block)
        if isinstance(live_chain, LocalChain) and live_chain.manual:  # nothing else would move this clock
            live_chain.advance_to_block(watch.closes)
        else:
            time.sleep(node.watch_poll_seconds)
    watch.saw_close(block)  # it looked until the close: a uid it saw nothing of is "missing", not unjudged
    return dg.MaterializeResult(metadata=sightings_metadata(watch))


@dg.asset(partitions_def=window_partitions, group_name="validator", kinds={"pytorch"},
          deps=[gradients, gradient_sightings], op_tags=GPU_TAGS, retry_policy=NETWORK_RETRY)
def evaluations(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
                hparams: HParamsResource, node: NodeResource, wandb: WandbResource) -> dg.MaterializeResult:
    """Loss before/after each gradient the validator saw before the window closed, on θ_w; invalid, late or missing
    gradients score 0 with a reason. Publishes the signed peers list with the sha256 of every file scored."""
    window, dataset, own_bucket = partition_window(context), buckets.dataset(), buckets.gradients()
    validator = node.validator(chain.open())
    validator_chain = chain.open_as(validator)
    store, settings = node.store(), hparams.load()
    if 0 <= (pruned := store.seen_pruned_through()) >= window - (SEEN_COPY_WINDOWS - 1):  # a re-run (a backfill)
        return _published(context, window, own_bucket, validator, pruned, settings)
    model, state = node.model_at(window, dataset)
    watch = node.watch(window, validator_chain)
    # the watch runs in its own run, which may still be in its last poll as the window closes and this run starts
    if not watch.wait_closed(watch.poll_timeout + node.watch_poll_seconds + WATCH_CLOSE_MARGIN_SECONDS):
        context.log.warning(f"window {window}: the watch stopped before the window closed: the uids it saw nothing "
                            f"of are not judged" if watch.watched else f"window {window}: never watched")
    before = ratings_before(window, store=store, own_bucket=own_bucket, validator=validator,
                           aggregator=buckets.aggregator(), hparams=settings, hotkeys=lambda: _hotkeys(validator_chain),
                           shapes={name: tuple(p.shape) for name, p in model.named_parameters()})
    evaluation = evaluate_window(window, chain=validator_chain, model=model, state=state, dataset=dataset,
                                 watch=watch, own_bucket=own_bucket, hparams=settings, ratings=before,
                                 history=store.parameters_at, options=EvaluationOptions(),
                                 others=functools.partial(buckets.validator_records, validator_chain))
    for line in evaluation_lines(evaluation, {uid: seen.size for uid, seen in watch.sightings().items()}):
        context.log.info(line)
    store.prune_seen(window)  # the copies no later evaluation reads
    wandb.log("validator", window, {"random_loss": evaluation.random_loss, "valid": len(evaluation.valid_uids)})
    return dg.MaterializeResult(metadata=evaluations_metadata(evaluation) | protocol_metadata(settings))


def _published(context: dg.AssetExecutionContext, window: int, own_bucket, validator: int, pruned: int,
               settings) -> dg.MaterializeResult:
    """A re-run of an evaluation whose copies of what the watch saw were deleted (StateStore.prune_seen): it could
    not score what it scored, so its published report and peers list stand, and are what the run reports; without
    one it fails (no retry) rather than publish scores of files it no longer has."""
    report = own_report(own_bucket, window, validator)
    if report is None:
        raise dg.Failure(description=f"window {window} cannot be evaluated: this validator's copies of the files its "
                                     f"watch saw up to window {pruned} were deleted (keep_windows), and it has no "
                                     f"report of it", allow_retries=False)
    context.log.info(f"window {window}: the copies it read are deleted (up to window {pruned}): its published "
                     f"report stands")
    evaluation = WindowEvaluation(report, [evaluation_key(window, validator)], 0.0)
    return dg.MaterializeResult(metadata=evaluations_metadata(evaluation) | protocol_metadata(settings) | {
        "published_report_stands": True})


def _hotkeys(chain: Chain) -> dict[int, str]:
    return {neuron.uid: neuron.hotkey for neuron in chain.metagraph().neurons}


@dg.asset(partitions_def=window_partitions, group_name="validator", kinds={"python"}, deps=[evaluations])
def ratings(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
            hparams: HParamsResource, node: NodeResource) -> dg.MaterializeResult:
    """What each miner has earned after this window (ratings.py: the moving average of scores, the OpenSkill rating),
    and the weights it gives (set on the chain by `chain_weights`). A uid the aggregator of the previous window found
    with other bytes than were scored is banned."""
    window, store, settings = partition_window(context), node.store(), hparams.load()
    live_chain = chain.open()
    validator, own_bucket, aggregator = node.validator(live_chain), buckets.gradients(), buckets.aggregator()
    report = read_evaluation(own_bucket.get(evaluation_key(window, validator)), window=window, validator=validator)
    model = node.training.model(buckets.dataset().vocab_size)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    banned = swaps_found(aggregator, window - 1, shapes=shapes, hparams=settings) if window > 0 else {}
    hotkeys = _hotkeys(live_chain)
    before = ratings_before(window, store=store, own_bucket=own_bucket, validator=validator, aggregator=aggregator,
                            hparams=settings, hotkeys=lambda: hotkeys, shapes=shapes)
    updated, weights = rate_window(report, before, hotkeys, settings, banned=banned)
    store.save_ratings(updated, weights)
    return dg.MaterializeResult(metadata=ratings_metadata(updated))
