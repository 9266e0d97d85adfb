"""The Dagster code location on real resources pointed at temporary directories."""

import json
import os
import subprocess
import sys

import dagster as dg
import pytest

from templar_lib.chain import LocalChain
from templar_lib.wire import parse_header
from templar_lib.wire.container import templar_header
from templar_lib.wire.keys import CHECKPOINT, gradient_key
from templar_pipelines import defs
from templar_pipelines.instance import SQLITE_YAML
from templar_pipelines.local_network import run_local_network
from templar_pipelines.resources import resources_from_env
from templar_pipelines.sensors import new_block_sensor
from tests.conftest import ROOT

WINDOW_ASSETS = ["dataset_pages", "gradients", "evaluations", "ratings", "chain_weights", "aggregation", "checkpoint"]


def test_definitions_load_and_jobs_resolve():
    dg.Definitions.validate_loadable(defs)
    for job in ("miner_job", "validator_job", "aggregator_job", "sync_job", "local_network_job", "audit_job"):
        assert defs.resolve_job_def(job) is not None
    assert (ROOT / "dagster.yaml").read_text() == SQLITE_YAML  # the checked-in instance file is the default one


def materialization(instance, asset: str, partition: str):
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=10).records
    assert records, f"{asset} has no materialization for window {partition}"
    assert event is not None
    return records[0].asset_materialization


def test_two_windows_materialise_every_asset_with_metadata(network_home, network_env):
    summaries = run_local_network(network_home, windows=2, environ=network_env)
    assert [s["window"] for s in summaries] == [0, 1]
    assert summaries[1]["checkpoint.held_out_loss"] < summaries[0]["checkpoint.held_out_loss"] + 0.5
    with dg.DagsterInstance.from_config(str(network_home / "dagster")) as instance:
        for window in ("0", "1"):
            for asset in WINDOW_ASSETS:
                assert materialization(instance, asset, window).metadata, asset
        gradients = materialization(instance, "gradients", "1").metadata
        assert gradients["miners"].value.records[0].data["uid"] == 1 and gradients["bytes"].value > 0
        # what the files mean, on the assets that write or combine them: the hash in every file's header
        header = templar_header(parse_header((network_home / "gradients" / gradient_key(1, 1)).read_bytes(),
                                             max_bytes=1 << 30)[1])
        for asset in ("gradients", "evaluations", "aggregation"):
            metadata = materialization(instance, asset, "1").metadata
            assert metadata["protocol_hash"].value == header["hparams_hash"], asset
            assert metadata["strategy"].value == "demo" and metadata["protocol"].value["pages_per_window"] == 2
        evaluations = materialization(instance, "evaluations", "1").metadata
        assert evaluations["valid_gradients"].value == 3
        assert "final_scores" in materialization(instance, "ratings", "1").metadata
        chart = materialization(instance, "checkpoint", "1").metadata["held_out_loss_over_windows"].value
        assert "θ_    1" in chart and "θ_    2" in chart  # one bar per window so far
        assert materialization(instance, "chain_weights", "1").metadata["status"].value == "set"
    assert LocalChain(network_home / "chain.sqlite").weights()[0]  # the validator's weights are on the chain


def test_a_spot_checked_miner_the_validator_did_not_record_starts_its_next_window_fresh(network_home, network_env):
    """Through Dagster: the gradients asset reads what the validators recorded of the last window (on a local
    network from the bucket its miners share: its validator commits none) before it mines. Every miner carries its
    state on while its files are recorded; one the validator's report of window 1 leaves out (as when its watch
    missed the file) starts window 2 from no state, which links, instead of scoring 0 for good."""
    from templar_lib.hparams import HParams
    from templar_lib.spot_check import ZEROS, committed
    from templar_lib.wire import evaluation_key
    from tests.conftest import FAST_HPARAMS

    env = {**network_env, "TEMPLAR_HP_SPOT_CHECK_PROBABILITY": "1.0"}
    hparams = HParams.load(FAST_HPARAMS, env)
    run_local_network(network_home, windows=2, environ=env)
    report = network_home / "gradients" / evaluation_key(1, 0)
    document = json.loads(report.read_bytes())
    assert {"1", "2", "3"} <= set(document["commitments"])
    del document["commitments"]["1"]
    report.write_text(json.dumps(document))
    summaries = run_local_network(network_home, windows=1, environ=env)
    assert [summary["window"] for summary in summaries] == [2]

    def state(window: int, uid: int):
        data = (network_home / "gradients" / gradient_key(window, uid)).read_bytes()
        return committed(data, window=window, uid=uid, hparams=hparams)
    assert state(2, 1).before == ZEROS
    assert state(2, 2).before == state(1, 2).after != ZEROS and state(2, 3).before == state(1, 3).after
    assert not summaries[0]["reasons"], summaries[0]["reasons"]  # the fresh start links: every file is paid


def test_backfill_of_past_windows_reproduces_every_object_and_hash(network_home, network_env):
    live = run_local_network(network_home, windows=2, environ=network_env)
    before = snapshot(network_home)
    job = defs.resolve_job_def("local_network_job")
    resources = resources_from_env(network_env)
    with dg.DagsterInstance.from_config(str(network_home / "dagster")) as instance:
        for window in ("0", "1"):  # a backfill over past windows applies them in order
            result = job.execute_in_process(instance=instance, partition_key=window, resources=resources)
            sha = result.asset_materializations_for_node("checkpoint")[0].metadata["sha256"].value
            assert sha == live[int(window)]["checkpoint.sha256"]
    after = snapshot(network_home)
    assert after.keys() == before.keys() and len(before) > 20
    assert [key for key in before if before[key] != after[key]] == []  # every object byte-identical


def test_signs_aggregations_give_the_same_checkpoints_through_dagster(network_home, network_env, tmp_path, dataset):
    """TEMPLAR_HP_AGGREGATION_FORMAT=2: the aggregation asset publishes the signs and the checkpoint asset replays them
    to the same θ hashes as the default format, with a smaller file."""
    import shutil

    from templar_lib.hparams import HParams
    from templar_pipelines.cli import init
    from tests.conftest import FAST_HPARAMS

    coefficients = run_local_network(network_home, windows=2, environ=network_env)
    home = tmp_path / "signs"
    shutil.copytree(dataset.root, home / "dataset")
    init(home, hparams=HParams.load(FAST_HPARAMS), max_chars=None, miners=3)
    signs = run_local_network(home, windows=2, environ={**network_env, "TEMPLAR_HOME": str(home),
                                                        "TEMPLAR_HP_AGGREGATION_FORMAT": "2"})
    assert [s["checkpoint.sha256"] for s in signs] == [s["checkpoint.sha256"] for s in coefficients]
    for window in (0, 1):  # the signs were published (with 3 peers the file is not smaller: it is from ≈ 4 on)
        entries, _ = parse_header((home / "aggregator" / f"aggregation-{window}.safetensors").read_bytes(),
                                  max_bytes=1 << 30)
        assert entries and all(key.endswith((".positive", ".zero")) for key in entries)


def snapshot(home) -> dict[str, bytes]:
    """Every bucket object and state file a window writes (gradients, peers, evaluations, aggregations,
    checkpoints, θ, momentum, ratings)."""
    return {str(path.relative_to(home)): path.read_bytes() for folder in ("gradients", "aggregator", "state")
            for path in sorted((home / folder).rglob("*")) if path.is_file()}


def test_a_window_without_its_previous_state_fails_clearly(network_home, network_env):
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions("window", ["5"])
        result = defs.resolve_job_def("miner_job").execute_in_process(
            instance=instance, partition_key="5", resources=resources_from_env(network_env), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "θ_5 is not in" in str(failure.event_specific_data.error.message) + str(
        failure.event_specific_data.user_failure_data)


def test_new_block_sensor_requests_each_window_once_in_the_production_order(network_home, network_env):
    chain = LocalChain(network_home / "chain.sqlite")
    chain.advance_to_block(5 * 7)  # the chain is in window 5
    resources = resources_from_env(network_env)
    with dg.instance_for_test() as instance:
        cursor = json.dumps({"watch": 3, "miner": 3, "validator": 2, "aggregator": 2})
        with dg.build_sensor_context(cursor=cursor, resources=resources, instance=instance) as context:
            result = new_block_sensor(context)
        keys = [r.run_key for r in result.run_requests]
        # a closed window is scored, then aggregated, before anyone mines the next; the watch opens with the window
        assert keys == ["validator_job:3", "aggregator_job:3", "watch_job:4", "miner_job:4", "validator_job:4",
                        "aggregator_job:4", "watch_job:5", "miner_job:5"]
        assert json.loads(result.cursor) == {"watch": 5, "miner": 5, "validator": 4, "aggregator": 4}
        assert result.dynamic_partitions_requests[0].partition_keys == ["3", "4", "5"]
        with dg.build_sensor_context(cursor=result.cursor, resources=resources, instance=instance) as context:
            again = new_block_sensor(context)
        assert not again.run_requests and "nothing new" in again.skip_reason.skip_message
        with dg.build_sensor_context(resources=resources, instance=instance) as context:
            first = new_block_sensor(context)
        assert [r.run_key for r in first.run_requests] == ["watch_job:5", "miner_job:5"]
        chain.advance(7)  # window 6 opens: window 5 has closed
        with dg.build_sensor_context(cursor=first.cursor, resources=resources, instance=instance) as context:
            later = new_block_sensor(context)
        assert [r.run_key for r in later.run_requests] == ["validator_job:5", "aggregator_job:5", "watch_job:6",
                                                           "miner_job:6"]


def test_a_cursor_from_before_the_watch_is_read():
    from templar_pipelines.sensors import load_cursor

    assert load_cursor('{"aggregated": 2, "mined": 3, "validated": 1}') == {
        "watch": 1, "miner": 3, "validator": 1, "aggregator": 2}


def test_checkpoint_audit_passes_then_fails_on_tampering(network_home, network_env):
    run_local_network(network_home, windows=2, environ=network_env)  # checkpoint_frequency 1: θ_1 and θ_2 published
    job = defs.resolve_job_def("audit_job")
    resources = resources_from_env(network_env)
    with dg.instance_for_test() as instance:
        good = job.execute_in_process(instance=instance, resources=resources)
        verdicts = {e.check_name: e.passed for e in good.get_asset_check_evaluations()}
        assert verdicts == {"checkpoint_matches_manifest": True, "checkpoint_replays_from_previous": True,
                            "held_out_loss_within_threshold": True}
        path = network_home / "aggregator" / CHECKPOINT.key(2)
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
        bad = job.execute_in_process(instance=instance, resources=resources, raise_on_error=False)
        verdicts = {e.check_name: e.passed for e in bad.get_asset_check_evaluations()}
        assert verdicts["checkpoint_matches_manifest"] is False


def test_dagster_job_execute_runs_the_miner_job_for_one_window(network_home, network_env, tmp_path):
    dagster_home = network_home / "dagster"
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        instance.add_dynamic_partitions("window", ["0"])
    env = {**os.environ, **network_env, "DAGSTER_HOME": str(dagster_home)}
    command = [str(ROOT / ".venv" / "bin" / "dagster") if (ROOT / ".venv" / "bin" / "dagster").exists() else "dagster",
               "job", "execute", "-m", "templar_pipelines", "-j", "miner_job", "--tags", '{"dagster/partition": "0"}']
    finished = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stdout[-2000:] + finished.stderr[-2000:]
    for uid in (1, 2, 3):
        assert (network_home / "gradients" / f"gradient-0-{uid}.safetensors").exists()
    assert sys.executable  # the subprocess used the project's dagster entry point


def test_dagster_definitions_validate_cli(network_env):
    dagster = ROOT / ".venv" / "bin" / "dagster"
    finished = subprocess.run([str(dagster) if dagster.exists() else "dagster", "definitions", "validate", "-m",
                               "templar_pipelines"], cwd=ROOT, env={**os.environ, **network_env},
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_setting_compiles_the_nodes_model_in_place(tmp_path):
    from templar_lib.model import build_model
    from templar_pipelines.resources import cached_model

    assert resources_from_env({"TEMPLAR_HOME": str(tmp_path), "TEMPLAR_COMPILE": "1"})["training"].compile
    assert not resources_from_env({"TEMPLAR_HOME": str(tmp_path)})["training"].compile
    compiled = cached_model("tiny", 512, "cpu", compile=True)
    names = [name for name, _ in build_model("tiny", vocab_size=512).named_parameters()]
    assert [name for name, _ in compiled.named_parameters()] == names  # θ is still copied in by name
    assert compiled._compiled_call_impl is not None  # nn.Module.compile(): compiled on the first forward
    assert cached_model("tiny", 512, "cpu", compile=True) is compiled
    plain = cached_model("tiny", 512, "cpu")
    assert plain is not compiled and plain._compiled_call_impl is None


def test_the_watch_outlives_a_chain_read_that_fails_and_records_a_close_only_after_looking_again(
        network_home, network_env, monkeypatch):
    """The gradient_sightings asset on a manual clock: a failed chain read before its first look is looked past (the
    watch looks, then sees the close: closed); one after its last look, as the window closes, leaves the watch not
    closed (blind at the close: its evaluation judges only the uids it saw)."""
    from templar_lib.chain import ChainError
    from templar_lib.watch import Watch
    from templar_pipelines.assets import validator as validator_assets
    from templar_pipelines.assets.validator import gradient_sightings

    countdown, failed = {}, []  # trigger -> the chain reads after it until the one that fails

    def flaky_block(self):
        for trigger, left in list(countdown.items()):
            countdown[trigger] = left - 1
            if left == 1:
                del countdown[trigger]
                failed.append(trigger)
                raise ChainError("endpoint down")
        return self._real_block()

    def arm(method, trigger, reads):
        def armed(watch, *args, **kwargs):
            result = method(watch, *args, **kwargs)
            if trigger in plan:
                countdown[trigger] = reads
            return result
        return armed

    plan = set()
    monkeypatch.setattr(LocalChain, "_real_block", LocalChain.block, raising=False)
    monkeypatch.setattr(LocalChain, "block", flaky_block)
    monkeypatch.setattr(Watch, "__init__", arm(Watch.__init__, "before the first look", 1))
    monkeypatch.setattr(Watch, "poll", arm(Watch.poll, "after the last look", 2))  # the clock's move reads it first
    monkeypatch.setattr(validator_assets.time, "sleep", lambda seconds: None)
    resources, instance = resources_from_env(network_env), dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("window", ["0", "1"])
    for window, trigger, closed in ((0, "before the first look", True), (1, "after the last look", False)):
        plan, failed[:] = {trigger}, []
        result = dg.materialize([gradient_sightings], partition_key=str(window), resources=resources,
                                instance=instance)
        assert result.success and failed == [trigger]
        plan = set()
        assert Watch(window, blocks_per_window=7, state=resources["node"].store().bucket, peers=None, uids=[],
                     max_bytes=1).closed is closed
