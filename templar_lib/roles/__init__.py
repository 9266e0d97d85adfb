"""The three Templar roles as one function per window step, over injected Chain, Buckets and state; no Dagster.

    miner_step       pages -> forward/backward -> error feedback + compression -> gradient-{window}-{uid}
    validator_step   gather -> screen -> loss before/after per uid -> scores -> ratings -> weights, peers list
    aggregator_step  gather -> screen -> (peers list) -> combine -> aggregation-{window} -> θ_{w+1} (-> checkpoint)
"""

from templar_lib.roles.aggregator import AggregatorResult, aggregator_step
from templar_lib.roles.miner import MinerResult, miner_step
from templar_lib.roles.validator import ValidatorResult, validator_step

__all__ = ["AggregatorResult", "MinerResult", "ValidatorResult", "aggregator_step", "miner_step", "validator_step"]
