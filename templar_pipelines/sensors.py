"""new_block_sensor: follow the chain's block clock and launch each window's role runs exactly once.

When window w completes (the chain enters w + 1) the aggregator run for w is requested, so θ_{w+1} exists before
anyone trains on it; right after it, the miner run for w + 1 (the queued run coordinator starts runs in the order
requested). Once the chain reaches w + validator_offset (uploads are final) the validator run for w is requested.
The aggregator uses `peers_{w}.json` when a validator has already published it and screens the gradients itself
otherwise. The cursor holds the last window handled for each role; run keys are `{job}:{window}`, so a restarted
daemon that re-evaluates a tick requests nothing twice.
"""

from __future__ import annotations

import json

import dagster as dg

from templar_pipelines.jobs import aggregator_job, miner_job, validator_job
from templar_pipelines.partitions import window_partitions
from templar_pipelines.resources import ChainResource, TrainingResource

MAX_WINDOWS_PER_TICK = 4  # catching up after downtime happens over several ticks, oldest first
ROLE_JOBS = {"aggregated": "aggregator_job", "mined": "miner_job", "validated": "validator_job"}


def initial_cursor(current: int, offset: int) -> dict[str, int]:
    """Start from the chain's present: nothing before the window in progress is requested."""
    return {"aggregated": current - 2, "mined": current - 1, "validated": current - offset - 1}


def due_windows(current: int, offset: int, cursor: dict[str, int]) -> tuple[list[tuple[str, int]], dict[str, int]]:
    """The role runs due with the chain in window `current`: ([(job name, window), …] in launch order, new cursor).

    Aggregate every completed window (w < current), then mine up to the window in progress, then validate windows
    whose uploads are final (w <= current − offset); at most MAX_WINDOWS_PER_TICK of each, oldest first, never a
    window before 0.
    """
    last = {"aggregated": current - 1, "mined": current, "validated": current - offset}
    due = {role: list(range(max(cursor[role] + 1, 0), last[role] + 1))[:MAX_WINDOWS_PER_TICK] for role in ROLE_JOBS}
    requests = [(ROLE_JOBS[role], window) for role in ROLE_JOBS for window in due[role]]
    return requests, {role: (due[role] or [cursor[role]])[-1] for role in ROLE_JOBS}


@dg.sensor(jobs=[miner_job, validator_job, aggregator_job], minimum_interval_seconds=12,
           default_status=dg.DefaultSensorStatus.STOPPED)
def new_block_sensor(context: dg.SensorEvaluationContext, chain: ChainResource,
                     training: TrainingResource) -> dg.SensorResult:
    current = chain.open().window()
    offset = training.hparams().validator_offset
    cursor = json.loads(context.cursor) if context.cursor else initial_cursor(current, offset)
    requests, new_cursor = due_windows(current, offset, cursor)
    if not requests:
        return dg.SensorResult(skip_reason=f"chain in window {current}: nothing new "
                                           f"(validators wait {offset} windows for uploads to be final)")
    keys = sorted({str(window) for _, window in requests}, key=int)
    return dg.SensorResult(run_requests=[dg.RunRequest(run_key=f"{job}:{window}", job_name=job,
                                                       partition_key=str(window)) for job, window in requests],
                           cursor=json.dumps(new_cursor),
                           dynamic_partitions_requests=[window_partitions.build_add_request(keys)])
