"""The node's state store writing behind (a resident node), and a miner recovering momentum a write behind lost."""

import functools
import logging
import threading

import pytest
import torch

from templar_lib.buckets import LocalBucket
from templar_lib.checkpoints import ModelState, model_fingerprint
from templar_lib.data import Dataset, read_manifest
from templar_lib.hparams import HParams
from templar_lib.model import build_model
from templar_lib.ratings import Ratings, UidRating
from templar_lib.roles.validator import rate_window, ratings_before
from templar_lib.scoring import Score
from templar_lib.roles.miner import mine_window, skip_window
from templar_lib.strategies import new_feedback
from templar_lib.wire import EvaluationReport, evaluation_key, write_evaluation
from templar_lib.state import (RATINGS_LOOKBACK, MomentumLost, MomentumUnrecoverable, StateMissing, StateStore,
                               WriteBehind)

FAST = HParams(learning_rate=2e-3, warmup_steps=0, pages_per_window=2, batch_size=4)
UIDS = [1, 2]


def files(root) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(root.iterdir()) if path.is_file()}


def theta(model, window: int) -> ModelState:
    """A distinct θ per window from the built model's θ_0 (recomputing a window must use that window's own θ)."""
    return ModelState(window, window, {n: p + 1e-3 * window for n, p in model.theta_0.items()})


def mine(store: StateStore, windows, *, model, dataset, gradients, hparams: HParams = FAST) -> list:
    data, results = Dataset.open(dataset), []
    for window in windows:
        state = theta(model, window)
        store.save_model(state, background=True)
        state = store.load_model(window)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state.parameters[name])
        results += mine_window(window, UIDS, model=model, step=state.step, store=store, dataset=data,
                               gradients=gradients, hparams=hparams, model_hash=state.fingerprint)
    return results


@pytest.fixture(scope="module")
def model(dataset):
    model = build_model("tiny", vocab_size=read_manifest(dataset).vocab_size)
    model.theta_0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    return model


@pytest.fixture(scope="module")
def reference(dataset, model, tmp_path_factory):
    """Three windows mined with every state file written synchronously: the bytes a write behind must reproduce."""
    root = tmp_path_factory.mktemp("reference")
    mine(StateStore(root / "state"), range(3), model=model, dataset=dataset, gradients=LocalBucket(root / "gradients"))
    return root


def test_write_behind_writes_the_same_files_and_hands_state_over_in_memory(dataset, model, reference, tmp_path):
    writer = WriteBehind()
    store = StateStore(tmp_path / "state", writer=writer)
    mine(store, range(3), model=model, dataset=dataset, gradients=LocalBucket(tmp_path / "gradients"))
    held = writer.momentum[1][1]
    assert store.load_momentum(1, 2) is held and 1 not in writer.momentum  # handed over once, after it landed
    assert store.load_model(2) is writer.model and writer.model.fingerprint == model_fingerprint(
        writer.model.parameters)
    writer.flush()
    assert files(tmp_path / "gradients") == files(reference / "gradients")
    assert files(tmp_path / "state") == files(reference / "state")  # no .pending marker is left either
    fresh = StateStore(tmp_path / "state")  # a new process reads the same state from disk
    assert torch.equal(fresh.load_momentum(1, 2)["model.norm.weight"], held["model.norm.weight"])


def test_a_queued_write_is_marked_until_it_lands_and_loads_wait_for_it(tmp_path):
    writer, release = WriteBehind(), threading.Event()
    writer.submit("gate", lambda: release.wait(10))  # holds the writer's thread: the next write queues behind it
    store = StateStore(tmp_path, writer=writer)
    store.save_momentum(3, 5, {"m": torch.ones(4)})
    assert (tmp_path / "momentum-3-5.pending").exists() and not (tmp_path / "momentum-3-5.safetensors").exists()
    assert StateStore(tmp_path).has_model(5) is False
    with pytest.raises(MomentumLost, match="uid 3 after window 5"):
        StateStore(tmp_path).load_momentum(3, 5)  # another process, as after a kill: the write is not there
    loaded = []
    reader = threading.Thread(target=lambda: loaded.append(store.load_momentum(3, 5)))
    reader.start()
    reader.join(0.2)
    assert reader.is_alive()  # the miner would update it in place: it waits for the file first
    release.set()
    reader.join(10)
    assert torch.equal(loaded[0]["m"], torch.ones(4))
    assert (tmp_path / "momentum-3-5.safetensors").exists() and not (tmp_path / "momentum-3-5.pending").exists()


def test_a_failed_write_behind_is_written_again_at_its_barrier_or_raised(tmp_path, monkeypatch, caplog):
    writer = WriteBehind()
    store = StateStore(tmp_path, writer=writer)
    original, failures = LocalBucket.put_file, iter([OSError("disk full")])

    def flaky(bucket, key, write):
        error = next(failures, None) if key.endswith(".safetensors") else None
        if error is not None:
            raise error
        original(bucket, key, write)

    monkeypatch.setattr(LocalBucket, "put_file", flaky)
    store.save_momentum(3, 5, {"m": torch.ones(4)})
    with caplog.at_level(logging.WARNING, logger="templar_lib.state"):
        writer.flush()
    assert "writing momentum-3-5.safetensors behind failed (OSError: disk full)" in caplog.text
    assert torch.equal(StateStore(tmp_path).load_momentum(3, 5)["m"], torch.ones(4))

    failures = iter([OSError("disk full"), OSError("still full")])
    store.save_momentum(3, 6, {"m": torch.ones(4)})
    with pytest.raises(OSError, match="still full"):
        store.load_momentum(3, 6)


def test_a_lost_momentum_write_is_recomputed_to_the_same_bytes(dataset, model, reference, tmp_path, caplog):
    writer = WriteBehind()
    store = StateStore(tmp_path / "state", writer=writer)
    gradients = LocalBucket(tmp_path / "gradients")
    mine(store, range(2), model=model, dataset=dataset, gradients=gradients)
    writer.flush()
    (tmp_path / "state" / "momentum-1-1.safetensors").unlink()  # uid 1's write of window 1 never landed ...
    (tmp_path / "state" / "momentum-1-1.pending").write_bytes(b"")  # ... when the node was killed
    restarted = StateStore(tmp_path / "state", writer=WriteBehind())
    with caplog.at_level(logging.WARNING, logger="templar_lib.roles.miner"):
        results = mine(restarted, [2], model=model, dataset=dataset, gradients=gradients)
    restarted.writer.flush()
    assert [(r.uid, r.momentum) for r in results] == [(1, "recomputed"), (2, "carried")]
    assert "momentum of uid 1 after window 1 was being written behind" in caplog.text
    assert "recomputing it from θ_1" in caplog.text
    assert files(tmp_path / "gradients") == files(reference / "gradients")
    assert files(tmp_path / "state") == files(reference / "state")
    assert all(torch.equal(p, theta(model, 2).parameters[n]) for n, p in model.named_parameters())  # θ_2 restored


def test_windows_a_node_did_not_mine_carry_its_state_over_to_the_next_it_mines(dataset, model, tmp_path):
    """Checks off, a node catching up does not mine windows that had closed (skip_window): each uid's state after
    them is its state after the last window it mined, without a copy. Window 4's files are those of a node whose
    state after window 1 were its state after window 3, whether the state is handed over in memory (a resident
    node), read from its file, or recomputed because its write behind was lost across the gap. Mining a carried
    window after all (mine_window called for it) replaces the carried state with the one it mines."""
    sparse, windows = FAST.replace(strategy="sparseloco"), {}
    for name in ("resident", "lost", "reference"):
        store = StateStore(tmp_path / name / "state", writer=WriteBehind() if name == "resident" else None)
        gradients = LocalBucket(tmp_path / name / "gradients")
        mine(store, range(2), model=model, dataset=dataset, gradients=gradients, hparams=sparse)
        if name == "reference":  # the state after window 1 as if windows 2 and 3 had not been
            for uid in UIDS:
                (store.root / f"momentum-{uid}-1.safetensors").rename(store.root / f"momentum-{uid}-3.safetensors")
        else:
            if name == "lost":  # uid 1's write of window 1 never landed: the node was killed, then caught up
                (store.root / "momentum-1-1.safetensors").unlink()
                (store.root / "momentum-1-1.pending").write_bytes(b"")
            for window in (2, 3):
                assert skip_window(window, UIDS, store=store, gradients=gradients, hparams=sparse) == UIDS
        results = mine(store, [4], model=model, dataset=dataset, gradients=gradients, hparams=sparse)
        windows[name] = [r.momentum for r in results], files(tmp_path / name / "gradients")
        if store.writer is not None:
            store.writer.flush()
        assert sorted(key for key in store.bucket.list("carried-")) == ([] if name == "reference" else [
            "carried-1-2.json", "carried-1-3.json", "carried-2-2.json", "carried-2-3.json"])
        if name == "resident":  # a backfill of window 3 mines it: its own state, not the carried one
            before = store.load_momentum(1, 3)
            mine(store, [3], model=model, dataset=dataset, gradients=gradients, hparams=sparse)
            store.writer.flush()
            assert not store.bucket.exists("carried-1-3.json") and store.bucket.exists("carried-1-2.json")
            assert not torch.equal(store.load_momentum(1, 3)["error.model.norm.weight"],
                                   before["error.model.norm.weight"])
    assert windows["resident"][0] == ["carried", "carried"] and windows["reference"][0] == ["carried", "carried"]
    assert windows["lost"][0] == ["recomputed", "carried"]
    assert windows["resident"][1] == windows["lost"][1] == windows["reference"][1]
    assert sorted(windows["resident"][1]) == [f"gradient-{w}-{uid}.safetensors" for w in (0, 1, 4) for uid in UIDS]


def test_a_carried_state_is_kept_as_long_as_the_windows_it_stands_for_and_a_rerun_carries_again(dataset, model,
                                                                                                   tmp_path):
    """keep_windows 2: the state after window 1, which stands for windows 2-4 (carried over), outlives the save of
    window 5 (it counts as window 4's), so a re-run of window 5 still starts from it; a re-run of a carried window
    that is not planned (a backfill) carries it again instead of mining it. Once every window it stands for is older
    than the windows kept, it goes, and loading one of them says it cannot be recomputed."""
    sparse = FAST.replace(strategy="sparseloco")
    store, gradients = StateStore(tmp_path / "state", keep_windows=2), LocalBucket(tmp_path / "gradients")
    mine(store, range(2), model=model, dataset=dataset, gradients=gradients, hparams=sparse)
    for window in (2, 3, 4):
        skip_window(window, UIDS, store=store, gradients=gradients, hparams=sparse)
    first = files(tmp_path / "gradients")
    mine(store, [5], model=model, dataset=dataset, gradients=gradients, hparams=sparse)
    assert not store.bucket.exists("momentum-1-0.safetensors") and store.bucket.exists("momentum-1-1.safetensors")
    assert torch.equal(store.load_momentum(1, 4)["error.model.norm.weight"],
                       StateStore(tmp_path / "state").load_momentum(1, 1)["error.model.norm.weight"])
    assert [r.momentum for r in mine(store, [5], model=model, dataset=dataset, gradients=gradients,
                                     hparams=sparse)] == ["carried", "carried"]  # a re-run of window 5
    assert skip_window(3, UIDS, store=store, gradients=gradients, hparams=sparse, planned=False) == UIDS
    assert skip_window(5, UIDS, store=store, gradients=gradients, hparams=sparse, planned=False) == []
    assert sorted(files(tmp_path / "gradients")) == sorted(first) + ["gradient-5-1.safetensors",
                                                                     "gradient-5-2.safetensors"]
    mine(store, [6], model=model, dataset=dataset, gradients=gradients, hparams=sparse)
    assert not store.bucket.exists("momentum-1-1.safetensors") and store.momentum_pruned(1, 3)
    with pytest.raises(MomentumUnrecoverable, match="uid 1 after window 1 was deleted"):
        store.load_momentum(1, 3)


def test_a_state_mined_over_a_carried_window_is_loaded_even_where_its_mark_outlived_it(tmp_path):
    """Mining a carried window after all writes its state, then deletes the mark; killed in between, both are left,
    and the load takes the state mined, not the one the mark carried."""
    store = StateStore(tmp_path)
    store.save_momentum(1, 0, {"m": torch.zeros(2)})
    store.carry_momentum(1, 1)
    assert torch.equal(store.load_momentum(1, 1)["m"], torch.zeros(2))
    store.save_momentum(1, 1, {"m": torch.ones(2)})
    assert not store.bucket.exists("carried-1-1.json")
    store.carry_momentum(1, 1)  # as a kill between the write and the mark's deletion leaves it
    assert torch.equal(store.load_momentum(1, 1)["m"], torch.ones(2))


def test_the_watch_s_copies_are_kept_for_the_windows_an_evaluation_reads(tmp_path):
    """A validator's copies of what its watch saw (up to max_gradient_bytes per uid and window) go once no evaluation
    reads them: after window w, those of windows ≤ w − max(keep_windows, 3); the records stay, and the newest window
    pruned is recorded. A store that keeps everything keeps them."""
    for keep, through in ((4, 2), (1, 3), (None, -1)):
        store = StateStore(tmp_path / str(keep), keep_windows=keep)
        for window in range(7):
            store.bucket.put(f"seen-{window}.json", b"{}")
            for uid in (1, 12):
                store.bucket.put(f"seen-{window}-{uid}.safetensors", b"copy")
        store.bucket.put("seen-notes.safetensors", b"not a copy")
        assert store.prune_seen(6) == list(range(through + 1)) and store.seen_pruned_through() == through
        left = sorted(store.bucket.list("seen-"))
        assert [key for key in left if key.endswith(".json")] == [f"seen-{w}.json" for w in range(7)]
        assert sorted(key for key in left if key.endswith(".safetensors")) == sorted(
            [f"seen-{w}-{uid}.safetensors" for w in range(through + 1, 7) for uid in (1, 12)]
            + ["seen-notes.safetensors"])
        assert store.prune_seen(5) == [] and store.seen_pruned_through() == through  # never moves back


def test_a_lost_momentum_without_its_theta_restarts_from_zeros_loudly(dataset, model, tmp_path, caplog):
    store = StateStore(tmp_path / "state")
    (tmp_path / "state" / "momentum-1-6.pending").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="templar_lib.roles.miner"):
        results = mine(store, [7], model=model, dataset=dataset, gradients=LocalBucket(tmp_path / "gradients"))
    assert [(r.uid, r.momentum) for r in results] == [(1, "zeros (lost, not recomputable)"), (2, "zeros")]
    assert "cannot be recomputed" in caplog.text and "starts again from zero momentum" in caplog.text
    assert (tmp_path / "state" / "momentum-1-7.safetensors").exists()


def test_a_state_of_another_strategy_restarts_from_zeros_loudly(dataset, model, tmp_path, caplog):
    """A node whose settings changed strategy under its state store (sparseloco's error and AdamW moments, then demo,
    and back): each miner starts from zeros with the reason, instead of failing inside its step."""
    store, gradients = StateStore(tmp_path / "state"), LocalBucket(tmp_path / "gradients")
    sparse = FAST.replace(strategy="sparseloco")
    assert [r.momentum for r in mine(store, [0], model=model, dataset=dataset, gradients=gradients,
                                     hparams=sparse)] == ["zeros", "zeros"]
    with caplog.at_level(logging.WARNING, logger="templar_lib.roles.miner"):
        switched = mine(store, [1], model=model, dataset=dataset, gradients=gradients)
        back = mine(store, [2], model=model, dataset=dataset, gradients=gradients, hparams=sparse)
    assert all(r.momentum.startswith("zeros (a state that does not fit: ") for r in switched + back), switched + back
    assert "is not a demo miner's of this model" in caplog.text and "is not a sparseloco miner's" in caplog.text
    assert [r.momentum for r in mine(store, [3], model=model, dataset=dataset, gradients=gradients,
                                     hparams=sparse)] == ["carried", "carried"]


def test_momentum_from_a_state_file_moves_to_the_parameters_device():
    parameters = {"w": torch.empty(2, 3, device="meta")}
    feedback = new_feedback(parameters, FAST, momentum={"w": torch.ones(2, 3)})
    assert feedback.momentum["w"].device.type == "meta"
    assert new_feedback(parameters, FAST).momentum["w"].device.type == "meta"



def test_a_theta_pruned_as_it_is_opened_is_missing_state_not_a_crash(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    store.save_model(ModelState(3, 3, {"w": torch.ones(2)}))
    original = LocalBucket.local_path

    def pruned_meanwhile(bucket, key):  # the writer thread prunes old windows while a backfill opens one
        path = original(bucket, key)
        path.unlink()
        return path

    monkeypatch.setattr(LocalBucket, "local_path", pruned_meanwhile)
    with pytest.raises(StateMissing, match="θ_3 is not in .*older than the windows kept"):
        store.load_model(3)


def test_a_validator_that_did_not_rate_a_window_goes_on_from_the_ratings_it_had(tmp_path, caplog):
    """latest_ratings: the ratings after a window, or after the latest one before it this node rated (it was down,
    or a backfill runs out of order), bans and history included; fresh ratings only where it rated none."""
    store = StateStore(tmp_path / "state")
    banned = Ratings(window=3, by_uid={7: UidRating("hotkey-7", 30.0, 5.0, score_ema=0.4, banned_until=52)})
    store.save_ratings(banned, {7: 1.0})
    store.save_ratings(Ratings(window=9, by_uid={}), None)
    assert store.latest_ratings(3) == banned
    with caplog.at_level(logging.WARNING, logger="templar_lib.state"):
        assert store.latest_ratings(5) == banned  # windows 4 and 5 not rated
    assert "going on from those of window 3" in caplog.text
    assert store.latest_ratings(2) == Ratings()
    assert store.latest_ratings(12).window == 9
    assert store.latest_ratings(9 + RATINGS_LOOKBACK).window == 9
    assert store.latest_ratings(10 + RATINGS_LOOKBACK) == Ratings()  # another era


def test_a_window_evaluated_but_not_rated_is_folded_into_the_ratings_with_its_bans(tmp_path):
    """roles.validator.ratings_before: the latest ratings, with the node's own reports of the windows it evaluated
    but did not rate since then folded in, so that a spot check that failed in one of them still bans its uid."""
    hparams = HParams()
    store, reports, aggregator = (StateStore(tmp_path / "state"), LocalBucket(tmp_path / "reports"),
                                  LocalBucket(tmp_path / "aggregator"))
    hotkeys = {7: "hotkey-7", 8: "hotkey-8"}
    rated, _ = rate_window(EvaluationReport(3, 0, 3, 1.0, [], {7: Score(7, 0.5, 1), 8: Score(8, 0.4, 1)}), Ratings(),
                           hotkeys, hparams)
    store.save_ratings(rated, None)
    failed = EvaluationReport(4, 0, 4, 1.0, [], {7: Score(7, 0.5, 1), 8: Score(8, 0.4, 1)},
                              checks={7: "replaying its window from its committed state gives another file"})
    reports.put(evaluation_key(4, 0), write_evaluation(failed))  # window 4 evaluated, its ratings step failed
    asked = []

    def metagraph() -> dict[int, str]:
        asked.append(True)
        return hotkeys
    before = functools.partial(ratings_before, store=store, own_bucket=reports, validator=0, aggregator=aggregator,
                               hotkeys=metagraph, hparams=hparams, shapes={})
    assert before(4) == rated and not asked  # nothing to fold in: nothing more is read
    caught_up = before(6)  # window 5 not evaluated either
    assert caught_up.window == 4 and caught_up.by_uid[7].banned_until == 4 + hparams.spot_check_ban_windows - 1
    assert caught_up.by_uid[8].banned_until == -1 and asked
