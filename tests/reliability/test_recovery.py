"""Late joiners, stale nodes and killed runs: every path back ends on the same bits as an always-on node."""

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from templar_lib.buckets import LocalBucket
from templar_lib.checkpoints import checkpoint_windows, model_fingerprint, state_sha256
from templar_lib.hparams import HParams
from templar_lib.state import StateMissing, StateStore, sync_to
from templar_lib.wire import read_gradient
from templar_pipelines import defs
from templar_pipelines.cli import init
from templar_pipelines.local_network import run_local_network
from templar_pipelines.resources import resources_from_env
from tests.conftest import FAST_HPARAMS, ROOT

import dagster as dg


def make_home(path, dataset):
    shutil.copytree(dataset.root, path / "dataset")
    init(path, hparams=HParams.load(FAST_HPARAMS), max_chars=None, miners=3)
    return path


def env_for(frequency: int) -> dict[str, str]:
    return {"TEMPLAR_HPARAMS_FILE": str(FAST_HPARAMS), "TEMPLAR_WANDB_MODE": "disabled",
            "TEMPLAR_HP_CHECKPOINT_FREQUENCY": str(frequency),
            "TEMPLAR_STATE_KEEP_WINDOWS": "100"}  # these tests make stale nodes from the always-on node's history


@pytest.fixture(scope="module")
def always_on(tmp_path_factory, dataset):
    """A node that ran windows 0..6 live, publishing a checkpoint every 5 windows: θ_7, checkpoint-5."""
    home = make_home(tmp_path_factory.mktemp("always-on"), dataset)
    run_local_network(home, windows=7, environ=env_for(5))
    return home


def test_late_joiner_catches_up_from_the_checkpoint_bit_identically(always_on, tmp_path):
    aggregator = LocalBucket(tmp_path / "aggregator")
    for key in LocalBucket(always_on / "aggregator").list():
        if not key.startswith(("aggregation-0", "aggregation-1", "aggregation-2", "aggregation-3", "aggregation-4")):
            aggregator.put(key, LocalBucket(always_on / "aggregator").get(key))  # only what a late joiner needs
    assert checkpoint_windows(aggregator) == [5]
    joiner = StateStore(tmp_path / "state")
    hparams = HParams.load(FAST_HPARAMS).replace(checkpoint_frequency=5)
    caught_up = sync_to(joiner, aggregator, 7, hparams=hparams)
    live = StateStore(always_on / "state").load_model(7)
    assert caught_up.window == 7 and caught_up.step == live.step
    assert all(torch.equal(caught_up.parameters[n], live.parameters[n]) for n in live.parameters)
    assert joiner.model_windows() == [7]  # saved: the next window starts from here
    with pytest.raises(StateMissing, match="no checkpoint at or before window 4"):
        sync_to(StateStore(tmp_path / "empty"), aggregator, 4, hparams=hparams)


def test_stale_node_resyncs_before_mining_and_uploads_gradients_on_the_current_model(always_on, tmp_path):
    stale = tmp_path / "stale"
    shutil.copytree(always_on, stale, ignore=shutil.ignore_patterns("model-[4-9].safetensors", "dagster"))
    assert StateStore(stale / "state").model_windows() == [0, 1, 2, 3]
    env = {**env_for(5), "TEMPLAR_HOME": str(stale), "TEMPLAR_AGGREGATOR_URL": (always_on / "aggregator").as_uri(),
           "TEMPLAR_GRADIENTS_URL": (tmp_path / "uploads").as_uri()}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("window", ["7"])
        result = defs.resolve_job_def("miner_job").execute_in_process(instance=instance, partition_key="7",
                                                                      resources=resources_from_env(env))
    assert result.success
    live = StateStore(always_on / "state").load_model(7)
    shapes = {n: tuple(p.shape) for n, p in live.parameters.items()}
    gradient = read_gradient(LocalBucket(tmp_path / "uploads").get("gradient-7-1.safetensors"), window=7, uid=1,
                             shapes=shapes)
    assert gradient.model_hash == model_fingerprint(live.parameters)  # trained on θ_7, not the stale θ_3
    assert 7 in StateStore(stale / "state").model_windows()


KILLER = textwrap.dedent("""
    import os, signal, sys
    from templar_lib.buckets import LocalBucket
    target = sys.argv[1]
    original = LocalBucket.put
    def put(self, key, data):
        if key == target:  # die in the middle of this write: half the bytes in a temporary file, never renamed
            (self.root / f".tmp-killed.part").write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, key, data)
    original_file = LocalBucket.put_file
    def put_file(self, key, write):  # large state files are written through put_file
        if key == target:  # die after filling the temporary file, before the rename
            write(self.root / ".tmp-killed.part")
            os.kill(os.getpid(), signal.SIGKILL)
        return original_file(self, key, write)
    LocalBucket.put = put
    LocalBucket.put_file = put_file
    from templar_pipelines.cli import main
    main(sys.argv[2:])
""")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dataset):
    home = make_home(tmp_path_factory.mktemp("uninterrupted"), dataset)
    run_local_network(home, windows=3, environ=env_for(1))
    return {key: LocalBucket(home / "aggregator").get(key) for key in LocalBucket(home / "aggregator").list()}, \
        state_sha256(StateStore(home / "state").load_model(3))


# Where a run is killed, in the order a run writes them: a miner's upload, the aggregation, the published checkpoint,
# the node's θ. Each kill lands on the home the kill before it left.
KILL_POINTS = {"gradient upload": "gradient-1-2.safetensors", "aggregation": "aggregation-1.safetensors",
               "checkpoint publish": "checkpoint-2.safetensors", "state save": "model-2.safetensors"}


def test_sigkill_mid_write_at_each_point_in_turn_then_rerun_gives_identical_hashes(uninterrupted, tmp_path, dataset):
    expected_objects, expected_sha = uninterrupted
    home = make_home(tmp_path / "node", dataset)
    env = {**os.environ, **env_for(1), "TEMPLAR_HOME": str(home), "PYTHONPATH": str(ROOT)}
    store = StateStore(home / "state")

    def argv(windows: int) -> list[str]:
        return ["--home", str(home), "--hparams", str(FAST_HPARAMS), "local-network", "--miners", "3",
                "--windows", str(windows)]

    def remaining() -> int:
        return 3 - max(store.model_windows(), default=0)

    for point, target in KILL_POINTS.items():
        log = tmp_path / f"killed-{target}.log"
        with log.open("w") as output:
            killed = subprocess.Popen([sys.executable, "-c", KILLER, target, *argv(remaining())], env=env, cwd=ROOT,
                                      stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                killed.wait(timeout=240)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(killed.pid, signal.SIGKILL)  # anything it left behind
        assert killed.returncode == -signal.SIGKILL, (point, log.read_text()[-3000:])  # the fault really happened
        assert remaining() > 0, point
    rerun = subprocess.run([sys.executable, "-m", "templar_pipelines.cli", *argv(remaining())], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert state_sha256(store.load_model(3)) == expected_sha
    aggregator = LocalBucket(home / "aggregator")
    assert {key: aggregator.get(key) for key in aggregator.list()} == expected_objects  # byte-identical, no leftovers


NODE_KILLER = textwrap.dedent("""
    import json, os, signal, sys, time
    from pathlib import Path
    from templar_lib.buckets import LocalBucket
    from templar_lib.chain import LocalChain
    home, target = Path(sys.argv[1]), sys.argv[2]
    original_file = LocalBucket.put_file
    def put_file(self, key, write):
        if key == target:  # a write behind: die once the node has recorded the run that queued it as done
            cursor, deadline = home / "state" / "node-cursor.json", time.monotonic() + 120
            while time.monotonic() < deadline and json.loads(cursor.read_text())["miner"] < 1:
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)
        return original_file(self, key, write)
    LocalBucket.put_file = put_file
    from templar_pipelines.node import run_node
    chain = LocalChain(home / "chain.sqlite")
    run_node(home, until_window=2, environ=dict(os.environ), wait=lambda seconds: chain.advance(7))
""")


def run_node_until(home, window: int) -> None:
    from templar_lib.chain import LocalChain
    from templar_pipelines.node import run_node

    chain = LocalChain(home / "chain.sqlite")
    runs = run_node(home, until_window=window, environ=env_for(1), wait=lambda seconds: chain.advance(7),
                    stop_on_failure=True)  # a run that fails here fails the test instead of being retried forever
    assert runs and all(run.success for run in runs)


def test_node_killed_before_its_momentum_landed_recomputes_it_to_the_same_bytes(tmp_path, dataset, caplog):
    """A resident node writes momentum behind; killed after the miner run was recorded done but before the file
    landed, its restart finds the .pending marker, recomputes the momentum and mines on as if never killed."""
    always = make_home(tmp_path / "always", dataset)
    run_node_until(always, 2)
    home = make_home(tmp_path / "killed", dataset)
    env = {**os.environ, **env_for(1), "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", NODE_KILLER, str(home), "momentum-1-1.safetensors"], env=env,
                            cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert (home / "state" / "momentum-1-1.pending").exists()
    assert not (home / "state" / "momentum-1-1.safetensors").exists()
    with caplog.at_level(logging.WARNING, logger="templar_lib.roles.miner"):
        run_node_until(home, 2)
    assert "recomputing it from θ_1" in caplog.text
    for name in ("gradients", "aggregator"):
        expected, got = LocalBucket(always / name), LocalBucket(home / name)
        assert {k: got.get(k) for k in got.list("gradient-") + got.list("aggregation-")} == \
            {k: expected.get(k) for k in expected.list("gradient-") + expected.list("aggregation-")}
    for key in ("momentum-1-1.safetensors", "momentum-1-2.safetensors", "model-3.safetensors"):
        assert (home / "state" / key).read_bytes() == (always / "state" / key).read_bytes(), key
    assert not list((home / "state").glob("*.pending"))
