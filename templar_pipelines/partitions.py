"""Window partitions: one dynamic partition per chain window, key = the window number in decimal (DESIGN §6).

Per-miner work fans out inside the `gradients` asset rather than over a window × uid multi-partition: a window is
the unit that is complete, backfilled, retried and audited, and every uid of a window shares θ_w, so one
partition key per window keeps the UI's partition bar, backfills and the sensor's run keys one-dimensional.
"""

import dagster as dg

window_partitions = dg.DynamicPartitionsDefinition(name="window")


def partition_window(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> int:
    """The window a partitioned run works on."""
    return int(context.partition_key)
