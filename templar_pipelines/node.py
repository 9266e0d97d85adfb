"""A resident node: one long-lived process that follows the chain and runs this node's role jobs in-process.

The daemon + `new_block_sensor` path launches every run as a fresh process: seconds of imports before any work, and
θ loaded again and put on the GPU again, every window (bench/RESULTS.md). `templar node` plans the same runs with the
same rules (templar_lib.schedule), but executes them in its own process against the node's
Dagster instance, so the runs, their materialisations and metadata are in the UI as usual, while the Python process,
the imported libraries and the built model (see `resources.cached_model`) stay warm between windows. Files are still
written every window exactly as in a fresh-process run, so any window can be re-run or backfilled from the UI.

θ and each miner's momentum are kept in memory from one window to the next and their files written in the background
(templar_lib.state, whose docstring tells the durability contract; TEMPLAR_STATE_WRITE_BEHIND=0 turns it off).

Run either the sensor or `templar node` for a role, not both: each keeps its own cursor (the schedule's, by role).
The node's cursor is `<home>/state/node-cursor.json` (written atomically after every run), so a restarted node
goes on where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from templar_lib import schedule
from templar_lib.buckets import LocalBucket, ObjectMissing
from templar_lib.chain import ChainError, window_of
from templar_lib.state import WriteBehind
from templar_lib.watch import Watch
from templar_lib.wire.keys import NODE_CURSOR
from templar_pipelines.in_process import execute_window, node_instance
from templar_pipelines.jobs import JOBS
from templar_pipelines.resources import resources_from_env
from templar_pipelines.sensors import load_cursor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeRun:
    job: str
    window: int
    run_id: str
    success: bool
    seconds: float
    metadata: dict[str, dict] = field(default_factory=dict, repr=False)  # asset -> its materialization's values


def run_node(home: str | Path, *, jobs: Sequence[str] = tuple(JOBS.values()), until_window: int | None = None,
             poll_seconds: float = 2.0, environ: Mapping[str, str] | None = None,
             wait: Callable[[float], None] = time.sleep, on_run: Callable[[NodeRun], None] | None = None,
             source: str = "templar node", stop_on_failure: bool = False) -> list[NodeRun]:
    """Follow the chain and run `jobs` for every due window, in this process; returns the runs made.

    until_window: stop once every selected role has handled this window (None: run until interrupted).
    wait(seconds) is called when nothing is due (tests and the local network advance a manual chain clock there).
    A failed run is retried on the next poll (or, with stop_on_failure, raises RuntimeError); the runs after it in that
    poll wait, so windows still run in order.
    A node that validates keeps the watch of each open window itself (`watch_job` is the daemon's way): it looks at
    every miner's bucket at every poll, between its runs.
    """
    from templar_pipelines.definitions import defs

    unknown = set(jobs) - set(JOBS.values())
    if unknown or not jobs:
        raise ValueError(f"unknown jobs {sorted(unknown)}: choose one or more of {sorted(JOBS.values())}")
    roles = [role for role, job in JOBS.items() if job in jobs or (role == "watch" and JOBS["validator"] in jobs)]
    home = Path(home).resolve()
    environ = {"TEMPLAR_STATE_WRITE_BEHIND": "1", **(environ if environ is not None else os.environ),
               "TEMPLAR_HOME": str(home)}
    resources = resources_from_env(environ)
    chain, node = resources["chain"].open(), resources["node"]
    state = LocalBucket(home / "state")
    try:
        cursor = load_cursor(state.get(NODE_CURSOR).decode())
    except ObjectMissing:
        cursor = None  # a new node starts from the chain's present, once it can read it
    runs: list[NodeRun] = []
    watches: dict[int, Watch] = {}
    with node_instance(home, environ) as instance, _flushing_state():
        while cursor is None or until_window is None or min(cursor[role] for role in roles) < until_window:
            try:
                block = chain.block()
                current = window_of(block, chain.blocks_per_window)
                cursor = cursor if cursor is not None else schedule.initial_cursor(current)
                if "watch" in roles and cursor["watch"] >= current > cursor["validator"]:
                    # the watch of the open window (a restarted node reopens it: its sightings are on disk)
                    watch = watches.get(current) or node.watch(current, chain)
                    watches = {current: watch}
                    watch.poll(block)
            except ChainError as error:  # a node outlives a chain endpoint's bad minute
                log.warning("chain unreachable (%s); polling again in %.0f s", error, poll_seconds)
                wait(poll_seconds)
                continue
            due = [(role, window) for role, window in schedule.due_runs(current, cursor)
                   if until_window is None or window <= until_window]
            if not due:
                wait(poll_seconds)
                continue
            for role, window in due:
                if role in roles and role != "watch":  # the watch is kept between runs (above)
                    run = _execute(defs.resolve_job_def(JOBS[role]), window, instance=instance, resources=resources,
                                   source=source)
                    runs.append(run)
                    if on_run is not None:
                        on_run(run)
                    if not run.success:
                        if stop_on_failure:
                            raise RuntimeError(f"{run.job} for window {window} failed (run {run.run_id}): its events "
                                               f"are in the Dagster instance under {home / 'dagster'}")
                        wait(poll_seconds)
                        break
                cursor = schedule.advanced(cursor, [(role, window)])
                state.put(NODE_CURSOR, json.dumps(cursor, sort_keys=True).encode())
    return runs


@contextlib.contextmanager
def _flushing_state() -> Iterator[None]:
    """θ and momentum written in the background land before the node returns or exits (an interrupt included)."""
    try:
        yield
    finally:
        WriteBehind.flush_all()


def _execute(job: dg.JobDefinition, window: int, *, instance: dg.DagsterInstance, resources: dict,
             source: str) -> NodeRun:
    started = time.perf_counter()
    result = execute_window(job, window, instance=instance, resources=resources, source=source,
                            tags={"templar/run_key": f"{job.name}:{window}"}, raise_on_error=False)
    metadata = {}
    for event in result.get_asset_materialization_events() if result.success else []:
        materialization = event.step_materialization_data.materialization
        metadata[materialization.asset_key.to_user_string()] = {key: value.value for key, value in
                                                                materialization.metadata.items()}
    run = NodeRun(job.name, window, result.run_id, result.success, time.perf_counter() - started, metadata)
    if not run.success:
        log.warning("%s for window %d failed (run %s); retrying at the next poll", job.name, window, result.run_id)
    return run
