"""`templar chain status | advance`: the embedded LocalChain's manual clock from the command line, and the window
sensor following it (so the sensor can be tried from the UI without writing Python)."""

import dagster as dg
import pytest

from templar_lib.chain import LocalChain
from templar_lib.commitments import register_local_network
from templar_pipelines.cli import main
from templar_pipelines.resources import resources_from_env
from templar_pipelines.sensors import new_block_sensor


@pytest.fixture
def home(tmp_path):
    """A local chain (manual clock, 7 blocks per window) with a validator and two miners; nothing else."""
    home = tmp_path / "templar"
    register_local_network(LocalChain(home / "chain.sqlite", blocks_per_window=7), 2, (home / "gradients").as_uri())
    return home


def templar(home, capsys, *argv) -> str:
    """`templar --home HOME ARGV…` in this process; what it printed (a refusal is a SystemExit)."""
    main(["--home", str(home), *argv])
    return capsys.readouterr().out


def test_chain_status_and_advance_move_the_manual_clock(home, capsys):
    status = templar(home, capsys, "chain", "status")
    for line in ("block: 0", "window: 0", "blocks per window: 7", "clock: manual", "uids: 0 (validator), 1, 2"):
        assert line in status, status
    assert "block 0 -> 3, window 0 -> 0" in templar(home, capsys, "chain", "advance", "--blocks", "3")
    assert LocalChain(home / "chain.sqlite").block() == 3
    moved = templar(home, capsys, "chain", "advance", "--windows", "2")  # to the first block of window 2
    assert "block 3 -> 14, window 0 -> 2" in moved and "opens window 2's partition" in moved
    assert LocalChain(home / "chain.sqlite").block() == 14
    assert "block: 14\nwindow: 2\n" in templar(home, capsys, "chain", "status")


def sensor_tick(instance, resources, cursor=None):
    """One evaluation of new_block_sensor, as the daemon's tick would run it."""
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        return new_block_sensor(context)


def test_the_sensor_opens_the_window_the_cli_advanced_to(home, capsys):
    resources = resources_from_env({"TEMPLAR_HOME": str(home), "TEMPLAR_WANDB_MODE": "disabled"})
    with dg.instance_for_test() as instance:
        first = sensor_tick(instance, resources)
        assert [r.run_key for r in first.run_requests] == ["watch_job:0", "miner_job:0"]
        repeat = sensor_tick(instance, resources, first.cursor)
        assert not repeat.run_requests and "window 0" in repeat.skip_reason.skip_message  # the clock has not moved

        templar(home, capsys, "chain", "advance", "--windows", "1")
        tick = sensor_tick(instance, resources, first.cursor)
        assert [r.run_key for r in tick.run_requests] == ["validator_job:0", "aggregator_job:0", "watch_job:1",
                                                          "miner_job:1"]
        assert [r.partition_key for r in tick.run_requests] == ["0", "0", "1", "1"]
        [opened] = tick.dynamic_partitions_requests
        assert opened.partitions_def_name == "window" and list(opened.partition_keys) == ["0", "1"]
        instance.add_dynamic_partitions(opened.partitions_def_name, list(opened.partition_keys))  # as the daemon does
        assert "1" in instance.get_dynamic_partitions("window")


def test_advance_refuses_a_wall_clock_a_missing_chain_and_a_real_chain(home, tmp_path, capsys, monkeypatch):
    LocalChain(tmp_path / "wall" / "chain.sqlite", clock="wall")
    for where, argv, refusal in ((tmp_path / "wall", ["--blocks", "1"], "has a wall clock"),
                                 (home, ["--blocks", "0"], "only moves forward"),
                                 (tmp_path / "nothing", ["--windows", "1"], "run `templar init` first")):
        with pytest.raises(SystemExit, match=refusal):
            templar(where, capsys, "chain", "advance", *argv)
    assert not (tmp_path / "nothing").exists()  # refusing created no empty chain
    monkeypatch.setenv("TEMPLAR_CHAIN_URL", "bittensor://finney?netuid=3")  # refused before anything is opened
    for argv in (["status"], ["advance", "--blocks", "1"]):
        with pytest.raises(SystemExit, match="is not a local chain"):
            templar(home, capsys, "chain", *argv)
    assert LocalChain(home / "chain.sqlite").block() == 0


def test_init_records_the_network_settings_that_later_commands_read(tmp_path, capsys, monkeypatch):
    """`templar init` writes the network's hyper-parameters (overrides included) to its home; a later process on the
    home reads them without being told (make ui, templar audit); an explicit other file wins and init says so."""
    monkeypatch.delenv("TEMPLAR_HPARAMS_FILE", raising=False)
    monkeypatch.setenv("TEMPLAR_HP_STRATEGY", "sparseloco")
    home = tmp_path / "network"
    assert "hparams: strategy sparseloco" in templar(home, capsys, "init", "--max-chars", "20000", "--miners", "1")
    monkeypatch.delenv("TEMPLAR_HP_STRATEGY")
    assert resources_from_env({"TEMPLAR_HOME": str(home)})["hparams"].load().strategy == "sparseloco"
    assert resources_from_env({"TEMPLAR_HOME": str(tmp_path / "elsewhere")})["hparams"].load().strategy == "demo"
    other = tmp_path / "other.yaml"
    other.write_text("strategy: demo\n")
    said = templar(home, capsys, "--hparams", str(other), "init", "--miners", "1")
    assert "differ from the network's" in said and "strategy sparseloco" in said, said
    named = {"TEMPLAR_HOME": str(home), "TEMPLAR_HPARAMS_FILE": str(other)}
    assert resources_from_env(named)["hparams"].load().strategy == "demo"
    assert resources_from_env({"TEMPLAR_HOME": str(home)})["hparams"].load().strategy == "sparseloco"  # untouched
    # running the other network on this home is refused before anything runs: its θ and miner states would not fit
    # (a sparseloco miner's state loaded as demo's momentum failed inside the miner's step)
    with pytest.raises(SystemExit) as refused:
        templar(home, capsys, "--hparams", str(other), "local-network", "--miners", "1", "--windows", "1")
    assert refused.value.code == 2 and "another protocol" in capsys.readouterr().err
