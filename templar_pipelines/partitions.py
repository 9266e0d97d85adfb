"""Window partitions, and the order of the runs over them.

Partitions: one dynamic partition per chain window, key = the window number in decimal (DESIGN §6). Per-miner work
fans out inside the `gradients` asset rather than over a window × uid multi-partition: a window is the unit that is
complete, backfilled, retried and audited, and every uid of a window shares θ_w, so one partition key per window
keeps the UI's partition bar, backfills and the sensor's run keys one-dimensional.

Order: every run of a window job has a place in templar_lib.schedule's sequence (`schedule.order`: lower window
first, within a window watch, miner, validator, aggregator), and two things keep it however runs are requested,
retried or re-queued:

1. Its tags (`order_tags`, given by each job's partitioned config, so sensor runs, backfills, in-process runs and
   run retries all carry them): `templar/role`, and `dagster/priority` = −place, which the queued run coordinator
   dequeues highest first (FIFO among equals). A retry of `miner_job:8` queued after `aggregator_job:8` and
   `miner_job:9` is dequeued before them.
2. Its own check when it starts (`check_run_order`, at the node resource's first use in the run, before any work):
   a run of the model lane refuses to start while a model-lane run of a lower place on this instance has not
   finished: queued, starting or running, or failed with a run retry still to be queued (the retry daemon queues it
   seconds after the failure, and the queue may dequeue the next run first). Its step fails with a clear reason
   (OutOfOrder: not retried as a step), it raises its own `dagster/max_retries` by one so the refusal costs none of
   its retries, and the run is retried behind the run it waits for.
   A run of a Dagster backfill whose earlier window failed for good (no retry left, or not retryable) refuses for
   good: a backfill stops at its first failed window.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence

import dagster as dg
from dagster._core.storage.tags import (AUTO_RETRY_RUN_ID_TAG, BACKFILL_ID_TAG, MAX_RETRIES_TAG, PARTITION_NAME_TAG,
                                        PRIORITY_TAG, SENSOR_NAME_TAG, WILL_RETRY_TAG)

from templar_lib import schedule

window_partitions = dg.DynamicPartitionsDefinition(name="window")

# Runs of the model lane advance θ and momentum and must run one at a time in window order; a watch runs for a whole
# window beside them (the instance limits each lane to one run: templar_pipelines/instance.py).
LANE = "templar/lane"
MODEL_LANE, WATCH_LANE = {LANE: "model"}, {LANE: "watch"}
ROLE_TAG = "templar/role"  # the run's place in a window (templar_lib.schedule.ROLES)
BACKFILL_TAG = "templar/backfill"  # the runs of one run_backfill (a Dagster backfill's runs carry dagster/backfill)
RUN_KEY_TAG = "templar/run_key"  # `{job}:{window}` on the runs the resident node plans (the sensor's: a run key)

UNFINISHED = [dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
              dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
RETRY_PENDING_FOR = datetime.timedelta(hours=1)  # a failed run whose retry is not queued after this never will be


def partition_window(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> int:
    """The window a partitioned run works on."""
    return int(context.partition_key)


def is_scheduled(run: dg.DagsterRun) -> bool:
    """Whether a run is one the chain's clock planned (the sensor's, the resident node's, and their retries), not
    one someone asked for: a backfill (Dagster's or `templar backfill`), `dagster job execute`, a materialisation
    from the UI."""
    planned = SENSOR_NAME_TAG in run.tags or RUN_KEY_TAG in run.tags
    return planned and BACKFILL_ID_TAG not in run.tags and BACKFILL_TAG not in run.tags


def order_tags(role: str, window: int) -> dict[str, str]:
    """The tags that keep a run of `role` for `window` in the schedule's order (module docstring)."""
    return {ROLE_TAG: role, PRIORITY_TAG: str(-schedule.order(role, window))}


def ordered_config(role: str) -> dg.PartitionedConfig:
    """A window job's partitioned config: no run config, and `order_tags` on every run of a partition."""
    return dg.PartitionedConfig(partitions_def=window_partitions, run_config_for_partition_key_fn=lambda key: {},
                                tags_for_partition_key_fn=lambda key: order_tags(role, int(key)))


def run_place(run: dg.DagsterRun) -> int | None:
    """The run's place in the schedule (None: not a run of a window job, e.g. the audit)."""
    role, partition = run.tags.get(ROLE_TAG), run.tags.get(PARTITION_NAME_TAG, "")
    if role not in schedule.ROLES or not partition.isdecimal():
        return None
    return schedule.order(role, int(partition))


def describe(run: dg.DagsterRun) -> str:
    return f"{run.job_name}:{run.tags.get(PARTITION_NAME_TAG, '?')} (run {run.run_id[:8]}, {run.status.value.lower()})"


class OutOfOrder(dg.Failure):
    """A run refused to start: a run before it in the schedule has not finished (retried later), or failed for good
    in the same backfill (not retried)."""


def runs_ahead(instance: dg.DagsterInstance, run: dg.DagsterRun) -> tuple[list[dg.DagsterRun], list[dg.DagsterRun]]:
    """(unfinished, failed): model-lane runs of a lower place than `run` on this instance that have not finished
    (module docstring), and those of its Dagster backfill that failed for good. Both empty for a run outside the
    model lane or of no place."""
    place = run_place(run)
    if place is None or run.tags.get(LANE) != MODEL_LANE[LANE]:
        return [], []

    def ahead(other: dg.DagsterRun) -> bool:
        other_place = run_place(other)
        return other.run_id != run.run_id and other_place is not None and other_place < place

    unfinished = [other for other in instance.get_runs(dg.RunsFilter(statuses=UNFINISHED, tags=MODEL_LANE))
                  if ahead(other)]
    recent = datetime.datetime.now(datetime.timezone.utc) - RETRY_PENDING_FOR
    failed_to_retry = dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE], tags={**MODEL_LANE, WILL_RETRY_TAG: "true"},
                                    updated_after=recent)
    unfinished += [other for other in instance.get_runs(failed_to_retry)
                   if ahead(other) and _retry_to_come(instance, other)]
    failed = []
    backfill = run.tags.get(BACKFILL_ID_TAG)
    if backfill is not None:
        ended = dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED],
                              tags={BACKFILL_ID_TAG: backfill})
        waiting = {other.run_id for other in unfinished}
        failed = [other for other in instance.get_runs(ended) if ahead(other) and other.run_id not in waiting
                  and other.tags.get(WILL_RETRY_TAG) != "true" and not _succeeded_since(instance, other)]
    return unfinished, failed


def _retry_to_come(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """A failed run the retry daemon will retry but has not yet (dagster/_daemon/auto_run_reexecution: it retries a
    run with dagster/will_retry=true launched from a code location, unless its backfill has ended)."""
    if AUTO_RETRY_RUN_ID_TAG in run.tags or run.remote_job_origin is None:  # retried already, or run in-process
        return False
    backfill = run.tags.get(BACKFILL_ID_TAG)
    if backfill is not None:
        from dagster._core.execution.backfill import BulkActionStatus

        record = instance.get_backfill(backfill)
        return record is not None and record.status == BulkActionStatus.REQUESTED
    return True


def _succeeded_since(instance: dg.DagsterInstance, run: dg.DagsterRun) -> bool:
    """Whether a re-execution of the run (its run group: retries, manual re-executions) succeeded."""
    group = instance.get_run_group(run.run_id)
    return group is not None and any(other.status == dg.DagsterRunStatus.SUCCESS for other in group[1])


_STARTED: set[str] = set()  # runs this process let start: each is checked once, before its first step works


def check_current_run() -> None:
    """check_run_order for the run whose step is executing in this thread, once per run and process (a run that
    has started its work is not stopped by runs requested after that); nothing outside a run."""
    try:
        context = dg.OpExecutionContext.get()
    except dg.DagsterInvariantViolationError:
        return
    if context.run_id not in _STARTED:
        check_run_order(context.instance, context.run)
        _STARTED.add(context.run_id)


def check_run_order(instance: dg.DagsterInstance | None, run: dg.DagsterRun | None) -> None:
    """Raise OutOfOrder when `run` must not start yet (module docstring, point 2). Once one of its steps has
    succeeded the run has started its window's work, and is not stopped by runs requested after that."""
    if instance is None or run is None or run_place(run) is None or run.tags.get(LANE) != MODEL_LANE[LANE]:
        return
    started = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_SUCCESS, limit=1).records
    if started:
        return
    unfinished, failed = runs_ahead(instance, run)
    this = f"{run.job_name}:{run.tags.get(PARTITION_NAME_TAG)}"
    if unfinished:
        retries = int(run.tags.get(MAX_RETRIES_TAG, instance.run_retries_max_retries))
        instance.add_run_tags(run.run_id, {MAX_RETRIES_TAG: str(retries + 1)})  # the refusal costs no retry
        then = ("retried after them" if instance.run_retries_enabled else
                "run retries are off on this instance: re-execute it once they have finished")
        raise OutOfOrder(description=f"{this} waits for {_names(unfinished)}, which come before it in the schedule "
                                     f"and have not finished: {then}", allow_retries=False)
    if failed:
        instance.add_run_tags(run.run_id, {MAX_RETRIES_TAG: "0"})
        raise OutOfOrder(description=f"{this} is not run: {_names(failed)} of the same backfill failed and will not "
                                     f"be retried (a backfill stops at its first failed window; re-execute that "
                                     f"run, then the backfill's later windows)", allow_retries=False)


def _names(runs: Sequence[dg.DagsterRun]) -> str:
    return ", ".join(describe(run) for run in sorted(runs, key=lambda run: run_place(run) or 0))
