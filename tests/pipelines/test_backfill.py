"""Backfills of windows whose θ and momentum have left the node's state store: θ is rebuilt from the node's origin
(or the newest published checkpoint) by replaying the published aggregations, a miner's pruned momentum is
recomputed, and every bucket object and θ hash comes out as it was live. A window whose momentum cannot be
recomputed exactly is refused rather than mined on other momentum. A backfill stops at its first failed window."""

import dagster as dg
import pytest

from templar_lib.state import StateStore
from templar_pipelines.cli import main, parse_windows
from templar_pipelines.local_network import run_local_network
from templar_pipelines.node import BACKFILL_TAG, BackfillStopped, run_backfill

KEEP = 1  # θ and momentum files kept per node: after windows 0-2, θ_1, θ_2 and the momentum after 0 and 1 are gone


def buckets(home) -> dict[str, bytes]:
    """Every object of the gradients and aggregator buckets: gradients, peers lists, evaluations, aggregations,
    checkpoints."""
    return {str(path.relative_to(home)): path.read_bytes() for folder in ("gradients", "aggregator")
            for path in sorted((home / folder).rglob("*")) if path.is_file()}


@pytest.mark.timeout(420)
def test_backfill_of_windows_gone_from_the_store_reproduces_the_live_windows(network_home, network_env, monkeypatch,
                                                                             capsys):
    env = {**{k: v for k, v in network_env.items() if k != "TEMPLAR_HP_CHECKPOINT_FREQUENCY"},  # the demo's 4
           "TEMPLAR_STATE_KEEP_WINDOWS": str(KEEP)}
    live = {summary["window"]: summary for summary in run_local_network(network_home, windows=3, environ=env)}
    store = StateStore(network_home / "state")
    assert store.model_windows() == [0, 3]  # the origin, kept, and the newest θ
    assert not list((network_home / "state").glob("momentum-*-[01].safetensors"))
    assert not list((network_home / "aggregator").glob("checkpoint-*"))  # none published before window 4
    before = buckets(network_home)

    # window 2 alone cannot be mined again as it was live (the momentum after 0 is gone too): refused before any run
    with pytest.raises(BackfillStopped, match="not started: the momentum of uid 1 after window 1 .* backfill the "
                                              "windows in order from window 1") as refused:
        run_backfill(network_home, [2], environ=env)
    assert refused.value.runs == [] and buckets(network_home) == before
    for key, value in env.items():  # the same refusal from the command line: its reason, and exit status 1
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exited:
        main(["--home", str(network_home), "backfill", "--windows", "2"])
    assert exited.value.code == 1 and "from window 1" in capsys.readouterr().out
    assert buckets(network_home) == before

    runs = run_backfill(network_home, [2, 1], environ=env)  # run in window order, whatever the order given
    assert [(run.job, run.window, run.success) for run in runs] == [("local_network_job", 1, True),
                                                                   ("local_network_job", 2, True)]
    assert [run.metadata["checkpoint"]["sha256"] for run in runs] == [live[1]["checkpoint.sha256"],
                                                                     live[2]["checkpoint.sha256"]]
    miners = runs[0].metadata["gradients"]["miners"].records
    assert {row.data["momentum"] for row in miners} == {"recomputed"}  # window 0's momentum, mined again
    after = buckets(network_home)
    assert after.keys() == before.keys() and len(before) == 3 * (3 + 3)  # per window: 3 gradients, peers,
    # evaluation, aggregation
    assert [key for key in before if before[key] != after[key]] == []  # every object byte for byte

    # a backfill stops at its first failed window: θ_1 can no longer be rebuilt (aggregation-0 is gone)
    (network_home / "state" / "model-1.safetensors").unlink(missing_ok=True)
    (network_home / "aggregator" / "aggregation-0.safetensors").unlink()
    with pytest.raises(BackfillStopped, match="local_network_job for window 1 failed .*windows 2 were not run") as stop:
        run_backfill(network_home, [1, 2], environ=env)
    assert [(run.window, run.success) for run in stop.value.runs] == [(1, False)]
    with dg.DagsterInstance.from_config(str(network_home / "dagster")) as instance:
        backfill = stop.value.runs[0]
        tags = instance.get_run_by_id(backfill.run_id).tags
        assert [run.tags["dagster/partition"] for run in instance.get_runs(
            dg.RunsFilter(tags={BACKFILL_TAG: tags[BACKFILL_TAG]}))] == ["1"]


def test_a_pruned_momentum_is_recomputed_only_when_that_gives_the_live_bytes(tmp_path):
    """The state store's side: a momentum keep_windows deleted is MomentumPruned (the miner recomputes it) when θ of
    its window and the momentum before it are here, MomentumUnrecoverable (refused, never zeros) otherwise."""
    import torch

    from templar_lib.checkpoints import ModelState
    from templar_lib.state import MomentumPruned, MomentumUnrecoverable

    store = StateStore(tmp_path, keep_windows=1, keep_origin=True)
    theta = {"w": torch.zeros(2)}
    for window in range(4):  # a miner from window 0 on: θ_0..θ_4, momentum after 0..3
        store.save_model(ModelState(window, window, theta))
        store.save_momentum(7, window, {"m": torch.full((2,), float(window))})
    store.save_model(ModelState(4, 4, theta))
    assert store.model_windows() == [0, 4] and store.load_momentum(7, 3) is not None
    assert store.load_momentum(7, -1) is None and store.load_momentum(8, 2) is None  # never mined: zeros, as live
    with pytest.raises(MomentumPruned, match="uid 7 after window 0"):
        store.load_momentum(7, 0)  # θ_0 is kept and there was no momentum before it
    with pytest.raises(MomentumUnrecoverable, match="θ_1 is gone too.*from window 1"):
        store.load_momentum(7, 1)
    store.check_momentum(7, 0)
    with pytest.raises(MomentumUnrecoverable):
        store.check_momentum(7, 2)
    store.save_model(ModelState(2, 2, theta))  # as a backfill of window 1 leaves it, with the momentum after 1
    store.save_momentum(7, 1, {"m": torch.ones(2)}, background=False)
    with pytest.raises(MomentumPruned, match="after window 2"):
        store.load_momentum(7, 2)


def test_backfill_windows_parse_as_ranges():
    assert parse_windows("3-5,8") == [3, 4, 5, 8] and parse_windows("2,1,2") == [1, 2]
    for text in ("5-3", "x", "", "1-", "-2"):
        with pytest.raises(ValueError, match="windows"):
            parse_windows(text)
