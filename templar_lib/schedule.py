"""When each role runs for a window: the one schedule the sensor and the resident node follow.

With the chain in window `current` (window w is complete once the chain is in w + 1):

    aggregator   every completed window w < current: θ_{w+1} exists before anyone trains on it
    miner        every window up to the one in progress, w ≤ current
    validator    every window whose uploads are final, w ≤ current − validator_offset

Runs are planned in that order (aggregator, miner, validator), oldest window first, at most MAX_WINDOWS_PER_RUN
windows of each role per call (catching up after downtime happens over several calls), never a window before 0.
A cursor holds, per role, the last window planned; a new cursor starts from the chain's present.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

ROLES = ("aggregator", "miner", "validator")  # planning order
MAX_WINDOWS_PER_RUN = 4


def initial_cursor(current: int, offset: int) -> dict[str, int]:
    """Start from the chain's present: nothing before the window in progress is planned."""
    return {"aggregator": current - 2, "miner": current - 1, "validator": current - offset - 1}


def due_runs(current: int, offset: int, cursor: Mapping[str, int],
             roles: Iterable[str] = ROLES) -> list[tuple[str, int]]:
    """The (role, window) runs due with the chain in window `current`, in launch order, for the given roles."""
    last = {"aggregator": current - 1, "miner": current, "validator": current - offset}
    wanted = set(roles)
    return [(role, window) for role in ROLES if role in wanted
            for window in range(max(cursor[role] + 1, 0), last[role] + 1)[:MAX_WINDOWS_PER_RUN]]


def advanced(cursor: Mapping[str, int], runs: Iterable[tuple[str, int]]) -> dict[str, int]:
    """The cursor after `runs` were planned or done."""
    updated = dict(cursor)
    for role, window in runs:
        updated[role] = max(updated[role], window)
    return updated
