"""new_block_sensor: follow the chain's block clock and launch each window's role runs exactly once, in the order of
templar_lib.schedule (the same rules `templar node` follows): the watch and the miners when a window opens, the
validator and then the aggregator once it has closed. Runs of the model lane start one at a time in the schedule's
order, which their jobs tag them with (`dagster/priority`: a run retried after a crash goes before the runs that
need it) and which each run checks before it starts (templar_pipelines/partitions.py); the watch runs beside them
(templar_pipelines/instance.py).

The cursor is the schedule's (the last window planned per role); run keys are `{job}:{window}`, so a restarted
daemon that re-evaluates a tick requests nothing twice.
"""

from __future__ import annotations

import json

import dagster as dg

from templar_lib import schedule
from templar_pipelines.jobs import JOBS, aggregator_job, miner_job, validator_job, watch_job
from templar_pipelines.partitions import window_partitions
from templar_pipelines.resources import ChainResource

_OLD_CURSOR_KEYS = {"aggregated": "aggregator", "mined": "miner", "validated": "validator"}  # before 2026-12


def load_cursor(text: str | None) -> dict[str, int] | None:
    """A stored cursor (also one written before it was keyed by role, or before a role existed), or None."""
    if not text:
        return None
    cursor = {_OLD_CURSOR_KEYS.get(key, key): int(window) for key, window in json.loads(text).items()}
    return {role: cursor.get(role, min(cursor.values())) for role in schedule.ROLES}


@dg.sensor(jobs=[watch_job, miner_job, validator_job, aggregator_job], minimum_interval_seconds=12,
           default_status=dg.DefaultSensorStatus.STOPPED)
def new_block_sensor(context: dg.SensorEvaluationContext, chain: ChainResource) -> dg.SensorResult:
    current = chain.open().window()
    cursor = load_cursor(context.cursor) or schedule.initial_cursor(current)
    runs = schedule.due_runs(current, cursor)
    if not runs:
        return dg.SensorResult(skip_reason=f"chain in window {current}: nothing new (a window is scored and "
                                           f"aggregated once it has closed)")
    keys = sorted({str(window) for _, window in runs}, key=int)
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"{JOBS[role]}:{window}", job_name=JOBS[role],
                                                       partition_key=str(window)) for role, window in runs],
                           cursor=json.dumps(schedule.advanced(cursor, runs), sort_keys=True),
                           dynamic_partitions_requests=[window_partitions.build_add_request(keys)])
