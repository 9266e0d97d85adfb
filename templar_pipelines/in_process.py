"""Running jobs in this process, without a daemon: what `templar local-network` and `templar node` share.

`execute_window` runs one job for one window on the node's instance (the partition registered first), tagged with its
source and this process's id; `recover_dead_runs` releases what the runs of a killed in-process runner held, since no
daemon monitors them.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import dagster as dg

from templar_pipelines.instance import prepare_dagster_home

PID_TAG = "templar/pid"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the runs' events stay in the instance


@contextlib.contextmanager
def node_instance(home: Path, environ: Mapping[str, str]) -> Iterator[dg.DagsterInstance]:
    """The node's Dagster instance (under home/dagster), with the runs of any dead in-process runner recovered."""
    with dg.DagsterInstance.from_config(str(prepare_dagster_home(home / "dagster", environ))) as instance:
        recover_dead_runs(instance)
        yield instance


def execute_window(job: dg.JobDefinition, window: int, *, instance: dg.DagsterInstance, resources: dict,
                   source: str, tags: Mapping[str, str] | None = None,
                   raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    """One run of `job` for `window` in this process (the partition registered first), tagged with its source and
    this process's id so that recover_dead_runs can release it if the process dies."""
    instance.add_dynamic_partitions("window", [str(window)])
    return job.execute_in_process(instance=instance, partition_key=str(window), resources=resources,
                                  run_config=QUIET, raise_on_error=raise_on_error,
                                  tags={"templar/source": source, PID_TAG: str(os.getpid()), **(tags or {})})


def recover_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark runs of a killed in-process runner (`templar local-network`, `templar node`) as failed and free their
    pool slots.

    A process killed mid-run (SIGKILL, OOM, power loss) leaves its run STARTED and its `model_state` pool slot
    claimed, which would block the next run forever. Without a daemon to monitor runs, the next invocation checks
    the process id each run recorded and releases what a dead process held. Returns the run ids recovered.
    """
    recovered = []
    in_flight = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])
    for run in instance.get_runs(filters=in_flight):
        pid = int(run.tags.get(PID_TAG, "0"))  # runs a daemon launched record none: its run monitoring owns them
        if not pid or _alive(pid):
            continue
        instance.report_run_failed(run, f"the process running it died (found by the next "
                                        f"{run.tags.get('templar/source', 'in-process runner')})")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
