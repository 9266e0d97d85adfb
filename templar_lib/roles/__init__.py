"""The three Templar roles as one function per window step, over injected Chain, Buckets and state; no Dagster.

    miner_step       pages -> forward/backward -> error feedback + compression -> gradient-{window}-{uid}
    validator_step   gather -> screen -> loss before/after per uid -> scores -> ratings -> weights, peers list
    aggregator_step  gather -> screen -> (peers list) -> combine -> aggregation-{window}
    advance_window   replay aggregation-{window} -> θ_{w+1} (-> checkpoint) -> held-out loss
"""

from templar_lib.roles.aggregator import AggregatorResult, WindowAdvance, advance_window, aggregator_step
from templar_lib.roles.miner import MinerResult, miner_step
from templar_lib.roles.validator import EvaluationOptions, ValidatorResult, validator_step

__all__ = ["AggregatorResult", "EvaluationOptions", "MinerResult", "ValidatorResult", "WindowAdvance",
           "advance_window", "aggregator_step", "miner_step", "validator_step"]
