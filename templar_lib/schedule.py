"""When each role runs for a window: the one schedule the sensor, the resident node, the local network and the
simulator all follow, so what is tested is what production runs.

Every window w goes through the same sequence of runs, each allowed once the chain is in the window given:

    watch(w)        chain in w       the validator's first sightings of w's gradients, until w closes
    miner(w)        chain in w       miners train on θ_w and upload
    validator(w)    chain in w + 1   score what the watch saw (uploads are final at the close: nobody else's
                                     clock decides lateness), publish the signed peers list with every sha256
    aggregator(w)   chain in w + 1   combine exactly the files the validator scored; θ_{w+1}
    watch(w + 1), miner(w + 1), …

The sequence is strict: a run is never planned before the runs ahead of it, so the aggregation of w never runs on
files nobody scored, and θ_{w+1} exists before anyone mines w + 1. Runs planned in order may still finish out of
order (a run retried after a crash is queued again); `order` is each run's place, which a queue and each run's
own check keep (templar_pipelines.partitions). The cost is latency: miners of w + 1 start once
the validator and the aggregator of w are done (bench/RESULTS.md has it measured). A cursor holds, per role, the
last window planned; a new cursor starts from the chain's present.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ROLES = ("watch", "miner", "validator", "aggregator")  # the order of one window's runs
_OPENS = {"watch": 0, "miner": 0, "validator": 1, "aggregator": 1}  # chain window, relative to w, a run may start
MAX_WINDOWS_PER_CALL = 4  # catching up after downtime happens over several calls, oldest first


def initial_cursor(current: int) -> dict[str, int]:
    """Start from the chain's present: the window in progress is the first one planned."""
    return {role: current - 1 for role in ROLES}


def sequence(first: int, last: int) -> list[tuple[str, int]]:
    """Every run of windows first..last, in the order they must happen."""
    return [(role, window) for window in range(first, last + 1) for role in ROLES]


def order(role: str, window: int) -> int:
    """The place of (role, window) in `sequence`: windows in order, a window's runs in ROLES order. A run must not
    start before the runs of lower places (a queue dequeues them first: templar_pipelines.partitions)."""
    return window * len(ROLES) + ROLES.index(role)


def due_runs(current: int, cursor: Mapping[str, int]) -> list[tuple[str, int]]:
    """The (role, window) runs due with the chain in window `current`, in launch order: the runs not yet planned, in
    sequence, up to the first one the chain does not allow yet. A node that runs only some roles skips the others'
    runs in this order (another node runs them) and advances the cursor past them all the same."""
    start = max(0, min(cursor[role] for role in ROLES) + 1)
    runs = []
    for role, window in sequence(start, start + MAX_WINDOWS_PER_CALL - 1):
        if window <= cursor[role]:
            continue
        if window + _OPENS[role] > current:
            break
        runs.append((role, window))
    return runs


def advanced(cursor: Mapping[str, int], runs: Iterable[tuple[str, int]]) -> dict[str, int]:
    """The cursor after `runs` were planned or done."""
    updated = dict(cursor)
    for role, window in runs:
        updated[role] = max(updated[role], window)
    return updated
