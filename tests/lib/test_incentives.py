"""Score formulas, OpenSkill ratings, weights and screening, on hand-checkable numbers."""

import dataclasses

import pytest
import torch
from openskill.models import PlackettLuce

from templar_lib.compression import Sparse
from templar_lib.hparams import HParams
from templar_lib.ratings import Ratings, UidRating, update_ratings
from templar_lib.scoring import Losses, relative_improvement, score_losses, update_moving_average, zero_score
from templar_lib.screening import screen, similarity
from templar_lib.weights import normalised_weights
from templar_lib.wire import Gradient

HPARAMS = HParams()


def test_relative_improvement():
    assert relative_improvement(4.0, 3.0) == 0.25
    assert relative_improvement(4.0, 5.0) == -0.25
    assert relative_improvement(0.0, 1.0) == 0.0 and relative_improvement(float("nan"), 1.0) == 0.0
    assert relative_improvement(2.0, float("inf")) == 0.0


def test_score_is_the_least_improved_own_page_beyond_the_random_pages():
    honest = score_losses(7, Losses(own_before=4.0, own_after=3.0, random_before=5.0, random_after=4.5,
                                    own_pages=[(4.0, 3.0), (4.0, 3.2)]))
    assert (honest.improvement_own, honest.improvement_random) == (0.25, 0.1)
    assert (honest.indicator, honest.score) == (1, pytest.approx(0.2 - 0.1))  # the page that improved least
    lazy = score_losses(8, Losses(own_before=4.0, own_after=3.4, random_before=5.0, random_after=4.5,
                                  own_pages=[(4.0, 2.8), (4.0, 3.6)]))
    assert lazy.indicator == -1 and lazy.score == 0.0  # one page skipped: only what the random pages got
    other_data = score_losses(9, Losses(own_before=4.0, own_after=3.6, random_before=5.0, random_after=4.5,
                                        own_pages=[(4.0, 3.6), (4.0, 3.6)]))
    assert other_data.score == 0.0  # helps every page alike: its own pages bought nothing specific
    noise = score_losses(10, Losses(own_before=4.0, own_after=4.1, random_before=5.0, random_after=5.5,
                                    own_pages=[(4.0, 4.1), (4.0, 4.1)]))
    assert noise.score == 0.0  # less harm on its own pages than on random ones is still harm
    missing = zero_score(3, "missing: no gradient-1-3.safetensors")
    assert (missing.score, missing.indicator, missing.reason) == (0.0, -1, "missing: no gradient-1-3.safetensors")


def test_binary_moving_average():
    assert update_moving_average(0.0, 1, 0.05) == pytest.approx(0.05)
    assert update_moving_average(0.05, 1, 0.05) == pytest.approx(0.0975)
    assert update_moving_average(0.5, -1, 0.1) == pytest.approx(0.35)


def test_ratings_match_openskill_called_directly():
    hotkeys = {1: "a", 2: "b", 3: "c"}
    scores, indicators = {1: 0.3, 2: 0.1, 3: 0.2}, {1: 1, 2: -1, 3: 1}
    ours = update_ratings(Ratings(), 0, scores, indicators, hotkeys, HPARAMS)
    model = PlackettLuce(beta=7, tau=0.1)
    expected = model.rate([[model.rating()] for _ in range(3)], scores=[0.3, 0.1, 0.2])
    for uid, (rating,) in zip((1, 2, 3), expected):
        assert ours.by_uid[uid].mu == pytest.approx(rating.mu) and ours.by_uid[uid].sigma == pytest.approx(rating.sigma)
        assert ours.by_uid[uid].ordinal == pytest.approx(rating.ordinal())
    assert ours.by_uid[1].binary_ma == pytest.approx(0.05) and ours.by_uid[2].binary_ma == pytest.approx(-0.05)
    # pay follows the moving average of scores (α = 0.2), not the rank
    assert [ours.by_uid[uid].final for uid in (1, 2, 3)] == pytest.approx([0.06, 0.02, 0.04])
    # a second window starts from the carried ratings
    again = update_ratings(ours, 1, scores, indicators, hotkeys, HPARAMS)
    second = model.rate([[model.rating(mu=r.mu, sigma=r.sigma)] for (r,) in expected], scores=[0.3, 0.1, 0.2])
    assert again.by_uid[3].mu == pytest.approx(second[2][0].mu) and again.window == 1
    assert Ratings.from_json(again.to_json()) == again


def test_ratings_reset_for_new_hotkey_and_drop_deregistered():
    ratings = Ratings(4, {1: UidRating("old", 30.0, 5.0, 0.5), 2: UidRating("b", 28.0, 5.0, 0.3)})
    updated = update_ratings(ratings, 5, {1: 0.1, 2: 0.2}, {1: 1, 2: 1}, {1: "new", 2: "b"}, HPARAMS)
    assert updated.by_uid[1].hotkey == "new" and updated.by_uid[1].binary_ma == pytest.approx(0.05)
    gone = update_ratings(updated, 6, {2: 0.2}, {2: 1}, {2: "b"}, HPARAMS)
    assert set(gone.by_uid) == {2}


def test_weights_normalise_positive_registered_scores_only():
    assert normalised_weights({1: 3.0, 2: 1.0, 3: -2.0, 4: 5.0}, registered=[1, 2, 3]) == {1: 0.75, 2: 0.25}
    assert normalised_weights({1: 0.0, 2: -1.0}, registered=[1, 2]) is None
    weights = normalised_weights({u: float(u) for u in range(1, 6)}, range(10))
    assert sum(weights.values()) == pytest.approx(1.0) and weights == normalised_weights(
        {u: float(u) for u in range(5, 0, -1)}, range(10))


def gradient(uid, values, idx=None, model_hash="h") -> Gradient:
    vals = torch.tensor([values], dtype=torch.float32)
    vals = vals / vals.norm() if vals.norm() > 0 else vals  # what miners send: unit norm per parameter
    idx = torch.tensor([idx if idx is not None else list(range(len(values)))])
    return Gradient(1, uid, {"w": Sparse(idx, vals, (64,), (64,))}, "", model_hash)


def test_screen_rejects_stale_scaled_empty_and_later_copies():
    gradients = {
        1: gradient(1, [1.0, 2.0, 3.0]),
        2: gradient(2, [3.0, -1.0, 2.0], idx=[4, 5, 6]),
        3: gradient(3, [2.0, 2.0, -2.0], idx=[7, 8, 9]),
        6: gradient(6, [1.0, 2.0, 3.0001]),  # copy of uid 1, first seen later
        7: gradient(7, [1.0, 1.0, 1.0], model_hash="old"),
        8: gradient(8, [0.0, 0.0, 0.0], idx=[13, 14, 15]),  # empty
    }
    gradients[4] = dataclasses.replace(gradients[2], uid=4, tensors={"w": Sparse(
        torch.tensor([[10, 11, 12]]), gradients[2].tensors["w"].vals * 3, (64,), (64,))})  # ×3 norm
    first_seen = {uid: 100 + uid for uid in gradients}
    rejected = screen(gradients, model_hash="h", first_seen=first_seen)
    assert set(rejected) == {4, 6, 7, 8}
    assert rejected[7].startswith("stale model") and rejected[4].startswith("norm:")
    assert rejected[8].startswith("empty") and rejected[6].startswith("copy of uid 1")
    tied = screen({1: gradients[1], 6: gradients[6]}, model_hash="h", first_seen={1: 104, 6: 104})
    assert tied == {}  # first seen in the same poll: the order is unknown, neither is zeroed here
    victim_later = screen({1: gradients[1], 6: gradients[6]}, model_hash="h", first_seen={1: 110, 6: 104})
    assert set(victim_later) == {1}  # whoever the validator saw later is the copy, whatever its uid
    overlap, cosine = similarity(gradients[1], gradients[2])
    assert overlap == 0.0 and cosine == 0.0


def test_a_ban_zeroes_the_moving_average_for_its_windows():
    hotkeys = {1: "a", 2: "b"}
    ratings = update_ratings(Ratings(), 0, {1: 0.5, 2: 0.5}, {1: 1, 2: 1}, hotkeys, HPARAMS)
    banned = update_ratings(ratings, 1, {1: 0.5, 2: 0.5}, {1: 1, 2: 1}, hotkeys, HPARAMS,
                            banned={2: "changed after it was scored"})
    assert banned.by_uid[2].final == 0.0 and banned.by_uid[2].banned_until == HPARAMS.ban_windows
    later = update_ratings(banned, HPARAMS.ban_windows, {1: 0.5, 2: 0.5}, {1: 1, 2: 1}, hotkeys, HPARAMS)
    assert later.by_uid[2].final == 0.0 and later.by_uid[1].final > 0  # still banned in its last window
    free = update_ratings(later, HPARAMS.ban_windows + 1, {1: 0.5, 2: 0.5}, {1: 1, 2: 1}, hotkeys, HPARAMS)
    assert free.by_uid[2].final > 0
