"""new_block_sensor: follow the chain's block clock and launch each window's role runs exactly once.

Window w opens a miner run while it is the chain's current window; once the chain reaches w + validator_offset
(uploads are final) it requests the validator and aggregator runs. The cursor holds the last window handled for
each; run keys are `{job}:{window}`, so a restarted daemon that re-evaluates a tick requests nothing twice.
"""

from __future__ import annotations

import json

import dagster as dg

from templar_pipelines.jobs import aggregator_job, miner_job, validator_job
from templar_pipelines.partitions import window_partitions
from templar_pipelines.resources import ChainResource, TrainingResource

MAX_WINDOWS_PER_TICK = 4  # catching up after downtime happens over several ticks, oldest first


@dg.sensor(jobs=[miner_job, validator_job, aggregator_job], minimum_interval_seconds=12,
           default_status=dg.DefaultSensorStatus.STOPPED)
def new_block_sensor(context: dg.SensorEvaluationContext, chain: ChainResource,
                     training: TrainingResource) -> dg.SensorResult:
    current = chain.open().window()
    offset = training.hparams().validator_offset
    cursor = json.loads(context.cursor) if context.cursor else {"mined": current - 1, "closed": current - offset - 1}
    to_mine = list(range(cursor["mined"] + 1, current + 1))[:MAX_WINDOWS_PER_TICK]
    to_close = list(range(cursor["closed"] + 1, current - offset + 1))[:MAX_WINDOWS_PER_TICK]
    if not to_mine and not to_close:
        return dg.SensorResult(skip_reason=f"chain in window {current}: nothing new "
                                           f"(validators wait {offset} windows for uploads to be final)")
    requests = [dg.RunRequest(run_key=f"miner_job:{w}", job_name="miner_job", partition_key=str(w)) for w in to_mine]
    for w in to_close:
        requests += [dg.RunRequest(run_key=f"{job}:{w}", job_name=job, partition_key=str(w))
                     for job in ("validator_job", "aggregator_job")]
    keys = sorted({str(w) for w in to_mine + to_close}, key=int)
    new_cursor = {"mined": to_mine[-1] if to_mine else cursor["mined"],
                  "closed": to_close[-1] if to_close else cursor["closed"]}
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(new_cursor),
                           dynamic_partitions_requests=[window_partitions.build_add_request(keys)])
