"""Window order survives failures: retried and re-queued runs never let a run that needs them start first, and a
failure that retrying cannot help is not retried as a run.

The daemon test runs Dagster's own daemons one iteration at a time on a real instance configured as a templar
instance (templar_pipelines/instance.py: queued run coordinator, lane limits, run retries): the sensor daemon
evaluates `new_block_sensor` and queues its runs, the QueuedRunCoordinatorDaemon dequeues them (into Dagster's
MockedRunLauncher, which records the order runs are launched in), and the run-retry daemon's
`consume_new_runs_for_automatic_reexecution` queues retries of failed runs. A launched run "starts" the way a real
one does: the node resource's check (`check_run_order`) first, then its work, reported as Dagster events.
"""

import json
import logging
import sys
import time

import dagster as dg
import pytest
import yaml
from dagster._core.events import DagsterEvent, DagsterEventType
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.storage.tags import (BACKFILL_ID_TAG, MAX_RETRIES_TAG, PARTITION_NAME_TAG, PRIORITY_TAG,
                                        WILL_RETRY_TAG)
from dagster._core.test_utils import create_test_daemon_workspace_context, freeze_time
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.auto_run_reexecution.auto_run_reexecution import consume_new_runs_for_automatic_reexecution
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon
from dagster._daemon.sensor import execute_sensor_iteration

from templar_lib import schedule
from templar_lib.chain import LocalChain
from templar_pipelines import defs
from templar_pipelines.instance import SQLITE_YAML
from templar_pipelines.partitions import OutOfOrder, check_run_order, is_scheduled
from templar_pipelines.resources import resources_from_env
from tests.conftest import ROOT

LOG = logging.getLogger(__name__)
order_definitions: dg.Definitions | None = None  # the code location the daemons load (set per test)


def templar_instance_config() -> dict:
    """The instance every templar node runs on (dagster.yaml), with runs launched into a recorder."""
    config = {key: value for key, value in yaml.safe_load(SQLITE_YAML).items() if key != "telemetry"}
    return {**config, "run_launcher": {"module": "dagster._core.test_utils", "class": "MockedRunLauncher"}}


@pytest.fixture
def daemons(network_home, network_env, monkeypatch):
    """(instance, workspace context): the templar code location in this process, its resources on network_home."""
    monkeypatch.setattr(sys.modules[__name__], "order_definitions", dg.Definitions(
        assets=defs.assets, asset_checks=defs.asset_checks, jobs=defs.jobs, sensors=defs.sensors,
        schedules=defs.schedules, resources=resources_from_env(network_env)))
    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(module_name=__name__, attribute="order_definitions",
                                                              working_directory=str(ROOT)), location_name="templar")
    with dg.instance_for_test(overrides=templar_instance_config()) as instance:
        with create_test_daemon_workspace_context(InProcessWorkspaceLoadTarget(origin), instance) as context:
            location = context.create_request_context().get_code_location("templar")
            sensor = next(iter(location.get_repositories().values())).get_sensor("new_block_sensor")
            instance.start_sensor(sensor)
            yield instance, context


def tick(context) -> None:
    """One iteration of the sensor daemon."""
    list(execute_sensor_iteration(context, LOG, None, None))


def dequeue(context) -> list[dg.DagsterRun]:
    """One iteration of the queued run coordinator daemon: the runs it launched, in launch order."""
    launcher = context.instance.run_launcher
    before = len(launcher.queue())
    list(QueuedRunCoordinatorDaemon(interval_seconds=1).run_iteration(context))
    return [context.instance.get_run_by_id(run.run_id) for run in launcher.queue()[before:]]


def retry_failed(context) -> None:
    """One pass of the run-retry daemon over the failed runs."""
    records = context.instance.get_run_records(dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
    list(consume_new_runs_for_automatic_reexecution(context, records, LOG))


def report(instance, run: dg.DagsterRun, event: DagsterEventType) -> None:
    instance.report_dagster_event(DagsterEvent(event_type_value=event.value, job_name=run.job_name),
                                  run_id=run.run_id)


def start(instance, run: dg.DagsterRun) -> bool:
    """What a launched run does before any work: the node resource's order check. Refused: the run fails with the
    check's reason, as a real one does (resource initialisation fails before the first step)."""
    try:
        check_run_order(instance, instance.get_run_by_id(run.run_id))
    except OutOfOrder as refusal:
        instance.report_run_failed(instance.get_run_by_id(run.run_id), refusal.description)
        return False
    report(instance, run, DagsterEventType.RUN_START)
    return True


def logged(instance, run_id: str) -> str:
    """Every message and error (with its causes) of a run's events."""
    texts = []
    for entry in instance.all_logs(run_id):
        texts.append(str(entry.message))
        error = getattr(entry.dagster_event.event_specific_data, "error", None) if entry.dagster_event else None
        if error is not None:
            texts.append(error.to_string())
    return " ".join(texts)


def key(run: dg.DagsterRun) -> str:
    return f"{run.job_name}:{run.tags[PARTITION_NAME_TAG]}"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("retry_queued_first", [True, False], ids=["retry-queued-first", "next-run-dequeued-first"])
def test_a_killed_miner_run_is_retried_before_the_runs_that_need_it(network_home, daemons, retry_queued_first):
    instance, context = daemons
    chain = LocalChain(network_home / "chain.sqlite")
    chain.advance_to_block(8 * chain.blocks_per_window)  # window 8 opens
    tick(context)
    first = dequeue(context)
    assert sorted(key(run) for run in first) == ["miner_job:8", "watch_job:8"]
    miner = next(run for run in first if run.job_name == "miner_job")
    watch = next(run for run in first if run.job_name == "watch_job")
    assert miner.tags[PRIORITY_TAG] == str(-schedule.order("miner", 8))  # the sensor's runs carry their place
    assert start(instance, watch) and start(instance, miner)
    report(instance, watch, DagsterEventType.RUN_SUCCESS)

    chain.advance_to_block(9 * chain.blocks_per_window)  # window 8 closes: its validator and aggregator are due
    with freeze_time(time.time() + 13):  # the sensor's minimum interval
        tick(context)
    queued = instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]))
    assert sorted(key(run) for run in queued) == ["aggregator_job:8", "miner_job:9", "validator_job:8", "watch_job:9"]

    instance.report_run_failed(instance.get_run_by_id(miner.run_id), "the run worker died (node restarted)")
    assert instance.get_run_by_id(miner.run_id).tags[WILL_RETRY_TAG] == "true"

    launched, started, refused = [], [], []

    def run_all(runs: list[dg.DagsterRun]) -> None:
        for run in runs:
            launched.append(key(run))
            if start(instance, run):
                started.append(key(run))
                report(instance, run, DagsterEventType.RUN_SUCCESS)
            else:
                refused.append(key(run))

    if not retry_queued_first:  # the queue runs before the retry daemon has queued the retry
        run_all(dequeue(context))
    for _ in range(12):
        retry_failed(context)
        runs = dequeue(context)
        if not runs:
            break
        run_all(runs)

    model = [k for k in started if not k.startswith("watch_job")]
    assert model == ["miner_job:8", "validator_job:8", "aggregator_job:8", "miner_job:9"]
    assert "watch_job:9" in started
    if retry_queued_first:  # the retry is dequeued before everything queued ahead of it
        assert [k for k in launched if not k.startswith("watch_job")] == model and refused == []
    else:  # the validator was dequeued first, refused to start, and was retried after the miner's retry
        assert refused == ["validator_job:8"] and launched[0] == "validator_job:8"
        validator_runs = instance.get_runs(dg.RunsFilter(job_name="validator_job"))
        assert [run.status for run in validator_runs] == [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
        assert validator_runs[0].tags[MAX_RETRIES_TAG] == "2"  # the refusal cost none of its retries
    miner_runs = instance.get_runs(dg.RunsFilter(job_name="miner_job", tags={PARTITION_NAME_TAG: "8"}))
    assert [run.status for run in miner_runs] == [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE]
    assert miner_runs[0].parent_run_id == miner.run_id  # the run retry, not a second request
    assert miner_runs[0].tags[PRIORITY_TAG] == miner.tags[PRIORITY_TAG]
    # the sensor's runs and their retries are the clock's: one for a closed window mines nothing new (the miner
    # asset); a backfill's run or one asked for by hand is not
    assert is_scheduled(miner) and is_scheduled(miner_runs[0])
    assert not is_scheduled(dg.DagsterRun(job_name="miner_job", tags={**miner.tags, BACKFILL_ID_TAG: "b"}))
    assert not is_scheduled(dg.DagsterRun(job_name="miner_job", tags={PARTITION_NAME_TAG: "8"}))


def test_a_run_refuses_to_start_while_the_run_before_it_has_not_finished(network_home, network_env):
    """The refusal through the real job: the node resource checks before any step works."""
    resources = resources_from_env(network_env)
    with dg.instance_for_test(overrides=templar_instance_config()) as instance:
        instance.add_dynamic_partitions("window", ["0"])
        job = defs.resolve_job_def("miner_job")
        ahead = instance.create_run_for_job(job, tags={**job.get_tags_for_partition_key("0", None),
                                                       **job.tags}, status=dg.DagsterRunStatus.STARTED)
        validator = defs.resolve_job_def("validator_job")
        result = validator.execute_in_process(instance=instance, partition_key="0", resources=resources,
                                              raise_on_error=False)
        run = instance.get_run_by_id(result.run_id)
        assert not result.success and run.tags[WILL_RETRY_TAG] == "true" and run.tags[MAX_RETRIES_TAG] == "2"
        messages = logged(instance, result.run_id)
        assert f"validator_job:0 waits for miner_job:0 (run {ahead.run_id[:8]}, started)" in messages
        assert not instance.get_runs(dg.RunsFilter(statuses=[dg.DagsterRunStatus.SUCCESS]))


def test_a_failure_retrying_cannot_help_is_not_retried_as_a_run(network_home, network_env):
    resources = resources_from_env(network_env)
    with dg.instance_for_test(overrides=templar_instance_config()) as instance:
        instance.add_dynamic_partitions("window", ["5"])
        result = defs.resolve_job_def("miner_job").execute_in_process(  # θ_5 was never made: window 4 first
            instance=instance, partition_key="5", resources=resources, raise_on_error=False)
        run = instance.get_run_by_id(result.run_id)
        assert not result.success and run.tags["dagster/failure_reason"] == "STEP_FAILURE"
        assert run.tags["dagster/retry_on_asset_or_op_failure"] == "false" and run.tags[WILL_RETRY_TAG] == "false"


def test_a_backfill_stops_at_its_first_failed_window(network_home, network_env):
    """Runs of one Dagster backfill: once window 1's run failed for good, window 2's refuses (not retried either);
    the same run outside the backfill is not held back by it."""
    resources = resources_from_env(network_env)
    job = defs.resolve_job_def("local_network_job")
    with dg.instance_for_test(overrides=templar_instance_config()) as instance:
        instance.add_dynamic_partitions("window", ["1", "2"])
        backfill = {"dagster/backfill": "b1"}
        first = job.execute_in_process(instance=instance, partition_key="1", resources=resources, tags=backfill,
                                       raise_on_error=False)  # θ_1 was never made
        assert instance.get_run_by_id(first.run_id).tags[WILL_RETRY_TAG] == "false"
        second = job.execute_in_process(instance=instance, partition_key="2", resources=resources, tags=backfill,
                                        raise_on_error=False)
        run = instance.get_run_by_id(second.run_id)
        assert not second.success and run.tags[WILL_RETRY_TAG] == "false"
        messages = logged(instance, second.run_id)
        assert "of the same backfill failed and will not be retried" in messages
        alone = job.execute_in_process(instance=instance, partition_key="2", resources=resources, raise_on_error=False)
        messages = logged(instance, alone.run_id)
        assert "of the same backfill" not in messages and "θ_2 is not in" in messages


def test_every_window_job_tags_its_runs_with_their_place():
    for job_name, role in (("miner_job", "miner"), ("validator_job", "validator"), ("aggregator_job", "aggregator"),
                           ("watch_job", "watch"), ("sync_job", "aggregator"), ("local_network_job", "watch")):
        tags = defs.resolve_job_def(job_name).get_tags_for_partition_key("7", None)
        assert tags["templar/role"] == role and tags[PRIORITY_TAG] == str(-schedule.order(role, 7)), job_name
    places = [schedule.order(role, window) for role, window in schedule.sequence(3, 5)]
    assert places == sorted(places) and len(set(places)) == len(places)
    assert json.loads(json.dumps(defs.resolve_job_def("audit_job").tags)).get(PRIORITY_TAG) is None


def test_what_retrying_cannot_help_is_told_from_what_it_can():
    from templar_lib.state import MomentumUnrecoverable
    from templar_pipelines.jobs import retrying_cannot_help

    def raised(error: BaseException, cause: BaseException | None = None) -> BaseException:
        try:
            raise error from cause
        except BaseException as caught:  # noqa: BLE001 - a chained exception as Dagster hands it to the hook
            return caught

    assert retrying_cannot_help(dg.Failure("θ_5 is not in …", allow_retries=False))
    assert retrying_cannot_help(raised(RuntimeError("step failed"), MomentumUnrecoverable("momentum gone")))
    assert not retrying_cannot_help(dg.Failure("flaky"))
    assert not retrying_cannot_help(OutOfOrder("waits for miner_job:8", allow_retries=False))  # retried after it
    assert not retrying_cannot_help(ConnectionError("bucket unreachable")) and not retrying_cannot_help(None)
