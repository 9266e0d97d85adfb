"""templar node: a resident process plans the sensor's runs and executes them in-process, in window order."""

import json
import os
import socket

import pytest

from templar_lib.chain import ChainError, LocalChain
from templar_lib.state import StateStore
from templar_pipelines.node import BackfillStopped, run_backfill, run_node
from templar_lib.schedule import advanced, due_runs, initial_cursor
import dagster as dg


def test_the_schedule_never_plans_a_window_before_zero_or_a_run_before_the_ones_it_needs():
    cursor = initial_cursor(0)
    requests = due_runs(0, cursor)
    assert requests == [("watch", 0), ("miner", 0)]  # window 0 cannot be scored before it has closed
    cursor = advanced(cursor, requests)
    assert cursor == {"watch": 0, "miner": 0, "validator": -1, "aggregator": -1}
    assert due_runs(0, cursor) == []
    assert due_runs(2, cursor) == [("validator", 0), ("aggregator", 0), ("watch", 1), ("miner", 1), ("validator", 1),
                                   ("aggregator", 1), ("watch", 2), ("miner", 2)]


def test_resident_node_runs_each_role_once_per_window_in_order_and_resumes(network_home, network_env):
    chain = LocalChain(network_home / "chain.sqlite")
    blocks = 7

    def next_window(_seconds):  # instead of sleeping: the chain's block clock moves on one window
        chain.advance(blocks)

    runs = run_node(network_home, until_window=1, environ=network_env, wait=next_window)
    assert all(run.success for run in runs)
    # a closed window is scored, then aggregated, before anyone mines the next (the node keeps the watch itself)
    assert [(run.job, run.window) for run in runs] == [
        ("miner_job", 0), ("validator_job", 0), ("aggregator_job", 0), ("miner_job", 1), ("validator_job", 1),
        ("aggregator_job", 1)]
    assert StateStore(network_home / "state").model_windows()[-1] == 2  # θ_2 after aggregating windows 0 and 1
    cursor = json.loads((network_home / "state" / "node-cursor.json").read_text())
    assert cursor == {"watch": 1, "aggregator": 1, "miner": 1, "validator": 1}
    with dg.DagsterInstance.from_config(str(network_home / "dagster")) as instance:
        recorded = instance.get_run_records(dg.RunsFilter(tags={"templar/source": "templar node"}))
        assert sorted(record.dagster_run.tags["templar/run_key"] for record in recorded) == sorted(
            f"{run.job}:{run.window}" for run in runs)
    # a restarted node goes on from its cursor: nothing is run twice, a miner-only node mines the next window
    again = run_node(network_home, jobs=["miner_job"], until_window=2, environ=network_env, wait=next_window)
    assert [(run.job, run.window) for run in again] == [("miner_job", 2)] and again[0].success


def test_unknown_jobs_are_refused(network_home, network_env):
    for jobs in (["audit_job"], []):
        with pytest.raises(ValueError, match="unknown jobs"):
            run_node(network_home, jobs=jobs, environ=network_env)


def test_an_unreachable_chain_is_polled_again_not_fatal(network_home, network_env, monkeypatch):
    answers = iter([ChainError("endpoint down"), ChainError("endpoint down")])

    def flaky_block(self):
        error = next(answers, None)
        if error is not None:
            raise error
        return self._real_block()

    monkeypatch.setattr(LocalChain, "_real_block", LocalChain.block, raising=False)
    monkeypatch.setattr(LocalChain, "block", flaky_block)
    waits = []
    runs = run_node(network_home, jobs=["miner_job"], until_window=0, environ=network_env,
                    wait=waits.append)
    assert [(run.job, run.window, run.success) for run in runs] == [("miner_job", 0, True)]
    assert len(waits) == 2  # one poll interval per failed chain read, then it went on


def test_a_node_that_lost_the_chain_across_a_close_judges_only_what_its_watch_saw(network_home, network_env,
                                                                                    monkeypatch):
    """The node's watch of window 0 last looked before uid 3's file landed; then the chain read failed while the
    window closed. The node did not look at the close, so it does not score uid 3 "missing": uid 3 is not judged,
    and the uids it saw are scored. With the chain up, the next window it watches it looks at until the close."""
    from templar_lib.watch import Watch

    chain, blocks, armed, gradients = LocalChain(network_home / "chain.sqlite"), 7, [], network_home / "gradients"
    hidden = (gradients / "gradient-0-3.safetensors", network_home / "uid-3-not-yet")

    def flaky_block(self):
        if armed:
            armed.pop()
            raise ChainError("endpoint down")
        return self._real_block()

    def wait(_seconds):
        if hidden[1].exists():  # uid 3's file lands after the watch's last look, and the chain fails as it closes
            hidden[1].rename(hidden[0])
            armed.append(True)
        chain.advance(blocks)

    def hide(run):
        if run.job == "miner_job" and run.window == 0:
            hidden[0].rename(hidden[1])

    monkeypatch.setattr(LocalChain, "_real_block", LocalChain.block, raising=False)
    monkeypatch.setattr(LocalChain, "block", flaky_block)
    monkeypatch.setattr(Watch, "wait_closed", lambda self, seconds, **_: self.closed)  # tests/lib/test_watch.py
    # uid 3's file is hidden once the run that put it ends: the lookout thread must not see it during the run
    runs = run_node(network_home, until_window=0, environ=network_env, wait=wait, on_run=hide, poll_seconds=3600)
    assert all(run.success for run in runs) and not armed and not hidden[1].exists()
    evaluated = next(run for run in runs if run.job == "validator_job").metadata["evaluations"]
    assert evaluated["unjudged"] == "3" and evaluated["valid_gradients"] == 2
    assert json.loads((network_home / "state" / "seen-0.json").read_text())["closed"] is False
    again = run_node(network_home, until_window=2, environ=network_env, wait=lambda _seconds: chain.advance(blocks))
    evaluated = {run.window: run.metadata["evaluations"] for run in again if run.job == "validator_job"}
    assert evaluated[1]["watched"] is False  # window 1 opened and closed while the chain was down: never looked at
    assert evaluated[2]["unjudged"] == "none" and evaluated[2]["valid_gradients"] == 3


def test_runs_of_a_dead_node_process_are_failed_and_release_their_slots():
    """Runs a dead in-process runner left STARTED or NOT_STARTED (killed between creating and starting a run) are
    failed; a pid the kernel gave to another process (here this one, under another start time) reads as dead; runs of
    this live process, of another host (its pids mean nothing here) and a daemon's are left alone."""
    from templar_pipelines.in_process import PID_TAG, process_identity, recover_dead_runs

    dead = str(2 ** 22 + 12345)  # above the default pid_max: no such process
    recycled = f"{os.getpid()}:1"  # this pid, but a process that started one tick after boot
    runs = {"node-run": (dg.DagsterRunStatus.STARTED, {"templar/source": "templar node", PID_TAG: dead}),
            "network-run": (dg.DagsterRunStatus.STARTED, {"templar/source": "templar local-network", PID_TAG: dead}),
            "never-started": (dg.DagsterRunStatus.NOT_STARTED, {PID_TAG: f"{dead}:777"}),
            "recycled-pid": (dg.DagsterRunStatus.STARTED, {PID_TAG: recycled}),
            "this-process": (dg.DagsterRunStatus.STARTED, {PID_TAG: process_identity()}),
            "other-host": (dg.DagsterRunStatus.STARTED, {PID_TAG: f"{dead}:5@another-{socket.gethostname()}"}),
            "daemon-run": (dg.DagsterRunStatus.STARTED, {})}  # a daemon-launched run is the daemon's to monitor
    with dg.instance_for_test() as instance:
        for run_id, (status, tags) in runs.items():
            instance.add_run(dg.DagsterRun(job_name="miner_job", run_id=run_id, status=status, tags=tags))
        assert sorted(recover_dead_runs(instance)) == ["network-run", "never-started", "node-run", "recycled-pid"]
        for run_id in ("daemon-run", "this-process", "other-host"):
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.STARTED
        for run_id in ("node-run", "never-started", "recycled-pid"):
            assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE


def test_a_node_back_from_downtime_without_spot_checks_carries_its_miners_states_over_the_closed_windows(
        network_home, network_env):
    """Checks off, down for windows 2-4: its miner runs for them (which the aggregator's order brings) mine nothing
    (nobody would see the files, and a node down D windows would spend D windows' compute catching up); each uid's
    state after them is its state after window 1, and window 5 is mined from it; a backfill of them does the same."""
    chain, blocks = LocalChain(network_home / "chain.sqlite"), 7

    def next_window(_seconds):
        chain.advance(blocks)

    assert all(run.success for run in run_node(network_home, until_window=1, environ=network_env, wait=next_window))
    chain.advance(3 * blocks)
    runs = run_node(network_home, until_window=5, environ=network_env, wait=next_window)
    assert all(run.success for run in runs)
    mined = {run.window: run.metadata["gradients"] for run in runs if run.job == "miner_job"}
    assert {window: metadata["mined"] for window, metadata in mined.items()} == {
        2: "none", 3: "none", 4: "none", 5: "1, 2, 3"}
    assert [row.data["momentum"] for row in mined[5]["miners"].records] == ["carried"] * 3
    state = StateStore(network_home / "state")
    assert sorted(state.bucket.list("carried-")) == [f"carried-{uid}-{w}.json" for uid in (1, 2, 3) for w in (2, 3, 4)]
    # a backfill re-runs the windows as the node ran them: the carried ones carried, the mined one mined
    again = run_backfill(network_home, [3, 5], jobs=["miner_job"], environ=network_env)
    assert [(run.window, run.metadata["gradients"]["mined"]) for run in again] == [(3, "none"), (5, "1, 2, 3")]
    assert [row.data["momentum"] for row in again[1].metadata["gradients"]["miners"].records] == ["carried"] * 3
    uploaded = sorted(name for name in os.listdir(network_home / "gradients") if name.startswith("gradient-"))
    assert uploaded == [f"gradient-{w}-{uid}.safetensors" for w in (0, 1, 5) for uid in (1, 2, 3)]
    # the validator's copies of what its watch saw go once no evaluation reads them (keep_windows 4): an evaluation
    # that may have read them is not made again with them gone; its published report stands, or without one it fails
    assert state.seen_pruned_through() == 1 and not list((network_home / "state").glob("seen-[01]-*"))
    reports = {w: next((network_home / "gradients").glob(f"evaluation-{w}-*.json")) for w in (1, 3)}
    published = reports[3].read_bytes()
    [rerun] = run_backfill(network_home, [3], jobs=["validator_job"], environ=network_env)
    assert rerun.success and rerun.metadata["evaluations"]["published_report_stands"] is True
    assert reports[3].read_bytes() == published
    reports[1].unlink()
    with pytest.raises(BackfillStopped, match="validator_job for window 1 failed"):
        run_backfill(network_home, [1], jobs=["validator_job"], environ=network_env)


def test_a_node_restarted_after_downtime_scores_nothing_in_the_windows_it_did_not_watch(network_home, network_env):
    """Down for windows 2-4, the node runs their jobs late on its restart, in order, as the aggregator needs; its watch
    saw none of their files, so it scores nobody there (no uid is missed, the ratings stand) instead of every uid
    "missing". With spot checks on, its miners do not mine the windows that closed before their runs started (nobody
    would see the files); the files it sees after the gap are recorded and every miner is paid again
    (tests/lib/test_spot_check.py has a miner that carried its state on through the gap)."""
    from templar_lib.roles.miner import mine_window
    from templar_lib.state import WriteBehind
    from templar_lib.wire import evaluation_key, keys, read_evaluation
    from templar_pipelines.resources import resources_from_env

    environ = network_env | {"TEMPLAR_HP_SPOT_CHECK_PROBABILITY": "0.5"}
    chain, blocks = LocalChain(network_home / "chain.sqlite"), 7

    def next_window(_seconds):
        chain.advance(blocks)

    assert all(run.success for run in run_node(network_home, until_window=1, environ=environ, wait=next_window))
    store = StateStore(network_home / "state")
    rated = store.load_ratings(1)
    resources = resources_from_env(environ)
    node, buckets = resources["node"], resources["buckets"]
    # uid 1's file of window 2 landed before the node died, its state after did not: its run is mined again
    model, state = node.model_at(2, buckets.dataset())
    mine_window(2, [1], model=model, step=state.step, store=node.store(), dataset=buckets.dataset(),
                gradients=buckets.gradients(), hparams=resources["hparams"].load(), model_hash=state.fingerprint)
    WriteBehind.flush_all()
    node.store().bucket.delete(keys.momentum(1).key(2))
    chain.advance(3 * blocks)  # the node is down: windows 2, 3 and 4 open and close unwatched
    runs = run_node(network_home, until_window=6, environ=environ, wait=next_window)
    assert all(run.success for run in runs)
    assert [(run.job, run.window) for run in runs if run.job == "validator_job"] == [
        ("validator_job", window) for window in range(2, 7)]
    # a miner does not mine a window that closed before its run started: nobody would see the files
    mined = {run.window: run.metadata["gradients"]["mined"] for run in runs if run.job == "miner_job"}
    assert mined == {2: "1", 3: "none", 4: "none", 5: "1, 2, 3", 6: "1, 2, 3"}
    assert "loss" not in next(run for run in runs if run.window == 3).metadata["gradients"]  # no zero to plot
    validator, bucket = node.validator(chain), buckets.gradients()

    def report(window):
        return read_evaluation(bucket.get(evaluation_key(window, validator)), window=window, validator=validator)

    miners = sorted(report(1).scores)
    assert len(miners) == 3 and all(not score.reason for score in report(1).scores.values())
    for window in (2, 3, 4):
        assert not report(window).watched and report(window).scores == {} and report(window).peers == []
    after_gap = store.load_ratings(4)
    assert {uid: r.recent for uid, r in after_gap.by_uid.items()} == {uid: r.recent for uid, r in rated.by_uid.items()}
    assert report(5).watched and sorted(report(5).commitments) == miners  # seen and recorded (fresh starts)
    assert all(not report(6).scores[uid].reason and report(6).scores[uid].score > 0 for uid in miners)
    assert sorted(report(6).peers) == miners
    # a backfill re-runs a closed window on purpose: it mines it
    again = run_backfill(network_home, [6], jobs=["miner_job"], environ=environ)
    assert [run.metadata["gradients"]["mined"] for run in again] == ["1, 2, 3"]
    # no file it mined after a close was late: uid 1's of window 2 and window 6's had landed in time
    assert sorted(path.name for path in (network_home / "state").glob("late-*")) == []


def test_a_node_keeps_watching_while_a_run_lasts_past_the_close(network_home, network_env, monkeypatch):
    """The miner run of window 0 uploads the node's files, then lasts past the window's close: uid 3's file lands a
    block after the others, still during the run, and the chain moves on a window before the run ends. The node's
    lookout thread saw each file at the block it landed and the close after them, so window 0 is scored whole;
    looking between runs alone, the node would first have looked at window 0 after its close: never watched, nobody
    scored (and files landing during a run would all share the block of the first look after it)."""
    import time

    import templar_pipelines.node as node_module
    from templar_lib.buckets import LocalBucket

    chain, blocks, record = LocalChain(network_home / "chain.sqlite"), 7, network_home / "state" / "seen-0.json"
    gradients, held_back = network_home / "gradients", network_home / "uid-3-not-yet"
    real_execute, real_put, during = node_module._execute, LocalBucket.put, {}

    def put(bucket, key, data):  # uid 3's upload of window 0 is held back, to land later in the run
        if key == "gradient-0-3.safetensors" and bucket.root == gradients.resolve():
            held_back.write_bytes(data)
        else:
            real_put(bucket, key, data)

    def until(condition, seconds=30.0):
        deadline = time.monotonic() + seconds
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.05)
        return condition()

    def seen():
        return json.loads(record.read_text()) if record.exists() else {"seen": {}, "closed": False}

    def execute(job, window, **kwargs):
        run = real_execute(job, window, **kwargs)
        if job.name == "miner_job" and window == 0:  # the run goes on: the thread looks meanwhile
            during["first"] = chain.block()
            during["saw_two"] = until(lambda: sorted(seen()["seen"]) == ["1", "2"])
            chain.advance(1)
            held_back.rename(gradients / "gradient-0-3.safetensors")  # lands a block later, within the window
            during["saw_three"] = until(lambda: len(seen()["seen"]) == 3)
            chain.advance(blocks)  # window 0 closes while the run lasts
            during["closed"] = until(lambda: seen().get("closed", True))
        return run

    monkeypatch.setattr(LocalBucket, "put", put)
    monkeypatch.setattr(node_module, "_execute", execute)
    runs = run_node(network_home, until_window=0, environ=network_env, poll_seconds=0.1,
                    wait=lambda _seconds: chain.advance(blocks))
    assert all(run.success for run in runs)
    assert during["saw_two"] and during["saw_three"] and during["closed"], during
    blocks_seen = {uid: entry["block"] for uid, entry in seen()["seen"].items()}
    assert blocks_seen == {"1": during["first"], "2": during["first"], "3": during["first"] + 1}  # as they landed
    evaluated = next(run for run in runs if run.job == "validator_job").metadata["evaluations"]
    assert evaluated["watched"] is True and evaluated["unjudged"] == "none" and evaluated["valid_gradients"] == 3


def test_the_lookout_takes_the_highest_block_either_chain_handle_read(network_home, network_env):
    """The lookout thread's chain handle may trail the loop's by a block (two endpoints of one chain). A look at a
    block before a close already recorded neither reopens that window's watch nor records a file that landed
    after the close, and a watch whose close is recorded polls nothing, whatever block it is given."""
    from templar_pipelines.node import _Lookout
    from templar_pipelines.resources import resources_from_env

    node, chain = resources_from_env(network_env)["node"], LocalChain(network_home / "chain.sqlite")
    lookout = _Lookout(node, lambda current: current <= 1, open_chain=lambda: chain, poll_seconds=1.0)
    lookout.look(chain, 3)  # window 0 open
    lookout.look(chain, 7)  # window 1: window 0's close recorded, window 1 watched
    record = network_home / "state" / "seen-0.json"
    closed = record.read_bytes()
    assert json.loads(closed).get("closed", True) and list(lookout.watches) == [1]
    (network_home / "gradients").mkdir(exist_ok=True)
    (network_home / "gradients" / "gradient-0-1.safetensors").write_bytes(b"after the close")
    lookout.look(chain, 6)  # the other handle, a block behind
    assert list(lookout.watches) == [1] and record.read_bytes() == closed
    reopened = lookout.watches[1].at(0)  # window 0's watch as its record stands
    assert reopened.closed and reopened.poll(6) == 0 and record.read_bytes() == closed
    assert not (network_home / "state" / "seen-0-1.safetensors").exists()
