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

`run_backfill` re-runs past windows the same way, in window order, and stops at the first run that fails: every
later window needs the θ and momentum that one writes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dagster as dg

from templar_lib import schedule
from templar_lib.buckets import LocalBucket, ObjectMissing
from templar_lib.chain import ChainError, window_of
from templar_lib.state import MomentumUnrecoverable, WriteBehind
from templar_lib.watch import Watch
from templar_lib.wire.keys import NODE_CURSOR
from templar_pipelines.in_process import execute_window, node_instance
from templar_pipelines.jobs import JOB_ROLES, JOBS
from templar_pipelines.partitions import BACKFILL_TAG, RUN_KEY_TAG
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
    every miner's bucket at every poll, between its runs and, in a thread of its own, every poll_seconds while a run
    lasts (`_Lookout`).
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
    # the open window is watched from its first look, during the runs of the window before too (its evaluation and
    # aggregation), until this node has evaluated it; none past until_window (this node will not evaluate it)
    lookout = _Lookout(node, lambda current: "watch" in roles and current > cursor["validator"] and (
        until_window is None or current <= until_window), open_chain=resources["chain"].open, poll_seconds=poll_seconds)
    with node_instance(home, environ) as instance, _flushing_state():
        while cursor is None or until_window is None or min(cursor[role] for role in roles) < until_window:
            try:
                block = chain.block()
                current = window_of(block, chain.blocks_per_window)
                cursor = cursor if cursor is not None else schedule.initial_cursor(current)
                lookout.look(chain, block)
            except ChainError as error:  # a node outlives a chain endpoint's bad minute
                log.warning("chain unreachable (%s); polling again in %.0f s", error, poll_seconds)
                lookout.lost_sight()
                wait(poll_seconds)
                continue
            due = [(role, window) for role, window in schedule.due_runs(current, cursor)
                   if until_window is None or window <= until_window]
            if not due:
                wait(poll_seconds)
                continue
            failed = None
            with lookout.during() if "watch" in roles else contextlib.nullcontext():  # the watch is the lookout's
                for role, window in due:
                    if role in roles and role != "watch":
                        run = _execute(defs.resolve_job_def(JOBS[role]), window, instance=instance,
                                       resources=resources, source=source)
                        runs.append(run)
                        if on_run is not None:
                            on_run(run)
                        if not run.success:
                            failed = run
                            break
                    cursor = schedule.advanced(cursor, [(role, window)])
                    state.put(NODE_CURSOR, json.dumps(cursor, sort_keys=True).encode())
            if failed is not None:  # the runs after it wait, so windows still run in order
                if stop_on_failure:
                    raise RuntimeError(f"{failed.job} for window {failed.window} failed (run {failed.run_id}): its "
                                       f"events are in the Dagster instance under {home / 'dagster'}")
                log.warning("%s for window %d is retried at the next poll", failed.job, failed.window)
                wait(poll_seconds)
    return runs


class _Lookout:
    """The watch of the open window, kept by a resident node that validates: it looks between the node's runs
    (`look`, from the loop) and, while a batch of runs lasts, every poll_seconds in a thread of its own (`during`).

    Runs take most of a window (a miner's inner steps, the evaluation and aggregation of the window before), and the
    watch's first sight is the clock that decides lateness and which of two similar files is the copy (watch.py): a
    file that lands during a run must be seen then, not at the first poll after it (all such files would share that
    poll's block, a tie), and a run that ends after the close must not leave its window never looked at (scored by
    nobody) or looked at only before the run (every file that landed during it "missing").

    The thread reads the chain through a handle of its own (never used by two threads at once: an SQLite connection
    or a websocket is not shared), and the two handles may disagree by a block or two (two endpoints of one chain):
    every look takes the highest block either has read, so a window once seen closed is never polled again (nor its
    watch rebuilt from disk while its evaluation reads it). One look runs at a time; the end of a batch waits for
    the thread's look in flight, at most a poll (`poll_timeout`, and the disk time of copies begun by its deadline):
    a miner whose endpoint holds every read open delays the node by that much once a batch (once a window in steady
    state), on top of the loop's own look.
    """

    def __init__(self, node, may_watch: Callable[[int], bool], *, open_chain: Callable[[], object],
                 poll_seconds: float) -> None:
        self._node, self._may_watch, self._open_chain = node, may_watch, open_chain
        self._poll_seconds = poll_seconds
        self._chain = None  # the thread's handle, opened on its first look (again after a chain error)
        self._lock = threading.Lock()
        self._highest = -1  # the highest block a look has read, from either handle
        self.watches: dict[int, Watch] = {}

    def look(self, chain, block: int) -> None:
        """Record the close of a held watch whose window has closed (before its evaluation runs), then poll the open
        window's watch, if the node is to watch it (a restarted node reopens it: its sightings are on disk)."""
        with self._lock:
            block = self._highest = max(self._highest, block)
            current = window_of(block, chain.blocks_per_window)
            for held in self.watches.values():
                held.saw_close(block)
            if self._may_watch(current):
                watch = self.watches.get(current) or self._node.watch(current, chain)
                self.watches = {current: watch}
                watch.poll(block)

    def lost_sight(self) -> None:
        """Not looking for a while: a window that closes before the next look stays not closed."""
        with self._lock:
            self.watches = {}

    @contextlib.contextmanager
    def during(self) -> Iterator[None]:
        """Look every poll_seconds in a thread while the block runs (the loop has just looked)."""
        stop = threading.Event()
        thread = threading.Thread(target=self._keep_looking, args=(stop,), name="templar-watch", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _keep_looking(self, stop: threading.Event) -> None:
        failed = False
        while not stop.wait(self._poll_seconds):
            try:
                self._chain = self._chain or self._open_chain()
                self.look(self._chain, self._chain.block())
            except ChainError as error:
                log.warning("chain unreachable during a run (%s); looking again in %.0f s", error, self._poll_seconds)
                self._chain = None  # a handle whose connection died is not used again
                self.lost_sight()
            except Exception:  # noqa: BLE001 - must not end the runs it shadows; the loop's next look meets it too
                if not failed:  # logged once a batch: it would repeat every poll
                    log.exception("the watch's look during a run failed; looking again every %.0f s",
                                  self._poll_seconds)
                failed = True
                self.lost_sight()


class BackfillStopped(RuntimeError):
    """A backfill run failed; the windows after it were not run."""

    def __init__(self, message: str, runs: list[NodeRun]) -> None:
        super().__init__(message)
        self.runs = runs


def run_backfill(home: str | Path, windows: Sequence[int], *, jobs: Sequence[str] = ("local_network_job",),
                 environ: Mapping[str, str] | None = None, on_run: Callable[[NodeRun], None] | None = None,
                 source: str = "templar backfill") -> list[NodeRun]:
    """Re-run `jobs` for past `windows`, in this process on the node's instance: windows in increasing order, a
    window's jobs in the schedule's order (local_network_job: every role of a window in one run). θ of a window
    no longer in the state store is rebuilt from the newest published checkpoint or the node's origin, and a miner's
    pruned momentum recomputed (templar_lib.state, contract point 2), so the files are those of the live windows.

    Stops at the first run that fails and raises BackfillStopped, which names the windows not run: each later window
    needs the state that one writes. Refuses before any run when a miner's momentum before the first window can be
    neither loaded nor recomputed (the message names the window to start from). Returns the runs made.
    """
    from templar_pipelines.definitions import defs

    unknown = set(jobs) - set(JOB_ROLES)
    if unknown or not jobs:
        raise ValueError(f"unknown jobs {sorted(unknown)}: choose one or more of {sorted(JOB_ROLES)}")
    ordered = sorted(jobs, key=lambda job: schedule.ROLES.index(JOB_ROLES[job]))
    home = Path(home).resolve()
    environ = {**(environ if environ is not None else os.environ), "TEMPLAR_HOME": str(home)}
    resources = resources_from_env(environ)
    backfill = uuid.uuid4().hex[:8]
    runs: list[NodeRun] = []
    windows = sorted(set(windows))
    if windows and {"miner_job", "local_network_job"} & set(jobs):  # jobs that mine
        # a miner whose momentum cannot be recomputed would upload other bytes than live: refused before any run
        node, store = resources["node"], resources["node"].store()
        try:
            for uid in node.miners(resources["chain"].open()):
                store.check_momentum(uid, windows[0] - 1)
        except MomentumUnrecoverable as error:
            raise BackfillStopped(f"backfill {backfill} not started: {error}", runs) from None
    with node_instance(home, environ) as instance, _flushing_state():
        for index, window in enumerate(windows):
            for job in ordered:
                run = _execute(defs.resolve_job_def(job), window, instance=instance, resources=resources,
                               source=source, tags={BACKFILL_TAG: backfill})
                runs.append(run)
                if on_run is not None:
                    on_run(run)
                if not run.success:
                    rest = windows[index + 1:]
                    raise BackfillStopped(
                        f"backfill {backfill} stopped: {job} for window {window} failed (run {run.run_id}; its "
                        f"events are in the Dagster instance under {home / 'dagster'})"
                        + (f"; windows {', '.join(map(str, rest))} were not run" if rest else ""), runs)
    return runs


@contextlib.contextmanager
def _flushing_state() -> Iterator[None]:
    """θ and momentum written in the background land before the node returns or exits (an interrupt included)."""
    try:
        yield
    finally:
        WriteBehind.flush_all()


def _execute(job: dg.JobDefinition, window: int, *, instance: dg.DagsterInstance, resources: dict,
             source: str, tags: Mapping[str, str] | None = None) -> NodeRun:
    """One run of `job` for `window`; its place in the schedule is tagged by the job (templar_pipelines.partitions)."""
    started = time.perf_counter()
    result = execute_window(job, window, instance=instance, resources=resources, source=source,
                            tags={RUN_KEY_TAG: f"{job.name}:{window}", **(tags or {})}, raise_on_error=False)
    metadata = {}
    for event in result.get_asset_materialization_events() if result.success else []:
        materialization = event.step_materialization_data.materialization
        metadata[materialization.asset_key.to_user_string()] = {key: value.value for key, value in
                                                                materialization.metadata.items()}
    run = NodeRun(job.name, window, result.run_id, result.success, time.perf_counter() - started, metadata)
    if not run.success:
        log.warning("%s for window %d failed (run %s)", job.name, window, result.run_id)
    return run
