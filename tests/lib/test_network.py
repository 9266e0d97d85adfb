"""The roles end to end on a LocalChain and local buckets, and the adversary suite (tiny model, CPU)."""

import json
import subprocess
import sys

import pytest
import torch

from templar_lib.buckets import LocalBucket
from templar_lib.chain import LocalChain
from templar_lib.checkpoints import latest_checkpoint
from templar_lib.hparams import HParams
from templar_lib.simulate import ADVERSARIES, parse_adversaries, run_network
from templar_lib.wire import read_aggregation

# a few windows instead of thousands: full learning rate from the start, two pages of 2 × 128 tokens per miner
FAST = HParams(learning_rate=2e-3, warmup_steps=0, pages_per_window=2, batch_size=4, checkpoint_frequency=2)


def test_two_windows_end_to_end_write_every_artifact(dataset, tmp_path):
    report = run_network(dataset, tmp_path, miners=3, windows=2, hparams=FAST, random_page_count=2)
    gradients, aggregator = LocalBucket(tmp_path / "gradients"), LocalBucket(tmp_path / "aggregator")
    for window in (0, 1):
        for uid in (1, 2, 3):
            assert gradients.exists(f"gradient-{window}-{uid}.safetensors")
        peers = json.loads(gradients.get(f"peers_{window}.json"))
        evaluation = json.loads(gradients.get(f"evaluation-{window}-0.json"))
        assert peers["uids"] == report.windows[window].peers and evaluation["peers"] == peers["uids"]
        assert set(evaluation["uids"]) == {"1", "2", "3"}
        assert all(row["losses"]["own_before"] > 0 for row in evaluation["uids"].values())
        shapes = {n: tuple(t.shape) for n, t in latest_checkpoint(aggregator).parameters.items()}
        aggregation = read_aggregation(aggregator.get(f"aggregation-{window}.safetensors"), window=window,
                                       shapes=shapes)
        assert aggregation.peers == peers["uids"] and aggregation.step == window
    assert latest_checkpoint(aggregator).window == 2  # checkpoint_frequency 2: θ_2 published
    chain = LocalChain(tmp_path / "chain.sqlite")
    assert chain.weights()[0] == pytest.approx(report.final_weights)
    assert sum(report.final_weights.values()) == pytest.approx(1.0)
    assert report.roles == {1: "honest", 2: "honest", 3: "honest"}


def test_network_runs_are_deterministic(dataset, tmp_path):
    first = run_network(dataset, tmp_path / "a", miners=3, windows=2, hparams=FAST, random_page_count=2)
    second = run_network(dataset, tmp_path / "b", miners=3, windows=2, hparams=FAST, random_page_count=2)
    assert [w.scores for w in first.windows] == [w.scores for w in second.windows]
    assert first.final_weights == second.final_weights
    for window in (0, 1):
        assert (tmp_path / "a" / "aggregator" / f"aggregation-{window}.safetensors").read_bytes() == \
            (tmp_path / "b" / "aggregator" / f"aggregation-{window}.safetensors").read_bytes()


def assert_adversaries_lose(report, windows: int) -> None:
    last = report.windows[-1]
    honest = [uid for uid, role in report.roles.items() if role == "honest"]
    cheats = [uid for uid, role in report.roles.items() if role != "honest"]
    assert len(report.windows) == windows
    worst_honest = min(last.final[uid] for uid in honest)
    best_cheat = max(last.final.get(uid, 0.0) for uid in cheats)
    assert worst_honest > best_cheat, (last.final, report.roles)
    assert sum(last.weights.get(uid, 0.0) for uid in cheats) <= 0.05
    assert all(last.weights.get(uid, 0.0) > 0 for uid in honest)
    assert report.windows[-1].miner_loss < report.windows[0].miner_loss - 0.5  # training still works


@pytest.mark.parametrize("kind", ADVERSARIES)
def test_each_adversary_at_twenty_percent_is_caught(dataset, tmp_path, kind):
    report = run_network(dataset, tmp_path, miners=5, windows=10, adversaries={kind: 1}, hparams=FAST,
                         random_page_count=2)
    assert list(report.roles.values()).count(kind) == 1
    assert_adversaries_lose(report, 10)
    if kind in ("missing", "malformed", "scale", "free_rider", "copy", "lagging"):
        cheat = next(uid for uid, role in report.roles.items() if role == kind)
        assert all(cheat in w.reasons for w in report.windows[1:])  # rejected with a reason every window


def test_mixed_forty_percent_adversaries_are_caught(dataset, tmp_path):
    adversaries = parse_adversaries("wrong_data:1,copy:1,noise:1,replay:1")
    report = run_network(dataset, tmp_path, miners=10, windows=10, adversaries=adversaries, hparams=FAST,
                         random_page_count=2, seed=1)
    assert sum(role != "honest" for role in report.roles.values()) == 4
    assert_adversaries_lose(report, 10)


def test_parse_adversaries():
    assert parse_adversaries("copy:2, sign_flip:1,copy") == {"copy": 3, "sign_flip": 1}
    with pytest.raises(ValueError, match="unknown adversary"):
        parse_adversaries("bribe:1")


def test_templar_lib_never_imports_dagster():
    code = ("import sys, templar_lib.roles, templar_lib.simulate, templar_lib.chain, templar_lib.gather; "
            "print('dagster' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_publishing_the_signs_gives_the_same_network(dataset, tmp_path):
    """aggregation_format 2 publishes sign(update) instead of the combined coefficients: every node replays it to
    the same θ as format 1 (the aggregator's own step included), with the same scores."""
    import dataclasses

    coefficients = run_network(dataset, tmp_path / "one", miners=3, windows=2, hparams=FAST, random_page_count=2)
    signs = run_network(dataset, tmp_path / "two", miners=3, windows=2, random_page_count=2,
                        hparams=dataclasses.replace(FAST, aggregation_format=2))
    assert [w.scores for w in signs.windows] == [w.scores for w in coefficients.windows]
    one, two = (latest_checkpoint(LocalBucket(tmp_path / name / "aggregator")) for name in ("one", "two"))
    assert one.window == two.window == 2 and all(torch.equal(one.parameters[n], two.parameters[n])
                                                 for n in one.parameters)
    shapes = {n: tuple(t.shape) for n, t in two.parameters.items()}
    for window in (0, 1):
        published = read_aggregation(LocalBucket(tmp_path / "two" / "aggregator").get(
            f"aggregation-{window}.safetensors"), window=window, shapes=shapes)
        assert published.format == 2 and published.signs and published.peers == signs.windows[window].peers
