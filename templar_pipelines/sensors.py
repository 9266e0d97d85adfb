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


@dg.sensor(jobs=[miner_job, validator_job, aggregator_job], minimum_interval_seconds=12,
           default_status=dg.DefaultSensorStatus.STOPPED)
def new_block_sensor(context: dg.SensorEvaluationContext, chain: ChainResource,
                     training: TrainingResource) -> dg.SensorResult:
    current = chain.open().window()
    offset = training.hparams().validator_offset
    cursor = json.loads(context.cursor) if context.cursor else \
        {"aggregated": current - 2, "mined": current - 1, "validated": current - offset - 1}
    to_aggregate = list(range(cursor["aggregated"] + 1, current))[:MAX_WINDOWS_PER_TICK]
    to_mine = list(range(cursor["mined"] + 1, current + 1))[:MAX_WINDOWS_PER_TICK]
    to_validate = list(range(cursor["validated"] + 1, current - offset + 1))[:MAX_WINDOWS_PER_TICK]
    if not (to_aggregate or to_mine or to_validate):
        return dg.SensorResult(skip_reason=f"chain in window {current}: nothing new "
                                           f"(validators wait {offset} windows for uploads to be final)")
    requests = [dg.RunRequest(run_key=f"aggregator_job:{w}", job_name="aggregator_job", partition_key=str(w))
                for w in to_aggregate]
    requests += [dg.RunRequest(run_key=f"miner_job:{w}", job_name="miner_job", partition_key=str(w)) for w in to_mine]
    requests += [dg.RunRequest(run_key=f"validator_job:{w}", job_name="validator_job", partition_key=str(w))
                 for w in to_validate]
    keys = sorted({str(w) for w in to_aggregate + to_mine + to_validate}, key=int)
    new_cursor = {"aggregated": (to_aggregate or [cursor["aggregated"]])[-1],
                  "mined": (to_mine or [cursor["mined"]])[-1],
                  "validated": (to_validate or [cursor["validated"]])[-1]}
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(new_cursor),
                           dynamic_partitions_requests=[window_partitions.build_add_request(keys)])
