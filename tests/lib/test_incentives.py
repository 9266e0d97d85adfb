"""Score formulas, OpenSkill ratings, weights and screening, on hand-checkable numbers."""

from datetime import datetime, timedelta, timezone

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


def test_score_and_indicator():
    honest = score_losses(7, Losses(own_before=4.0, own_after=3.0, random_before=5.0, random_after=4.5))
    assert (honest.improvement_own, honest.improvement_random, honest.indicator, honest.score) == (0.25, 0.1, 1, 0.1)
    other_data = score_losses(8, Losses(own_before=4.0, own_after=3.9, random_before=5.0, random_after=4.5))
    assert other_data.indicator == -1 and other_data.score == 0.0  # helps random pages, not its own: no rank
    harmful = score_losses(9, Losses(own_before=4.0, own_after=4.4, random_before=5.0, random_after=6.0))
    assert harmful.indicator == 1 and harmful.score == -0.2  # harm counts against it whatever the indicator
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
    assert ours.by_uid[2].final == 0.0  # negative moving average earns nothing
    assert ours.by_uid[1].final == pytest.approx(expected[0][0].ordinal() * 0.05)
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
    idx = torch.tensor([idx if idx is not None else list(range(len(values)))])
    return Gradient(1, uid, {"w": Sparse(idx, vals, (64,), (64,))}, "", model_hash)


def test_screen_rejects_stale_scaled_empty_and_copied_gradients():
    now = datetime.now(timezone.utc)
    gradients = {
        1: gradient(1, [1.0, 2.0, 3.0]),
        2: gradient(2, [3.0, -1.0, 2.0], idx=[4, 5, 6]),
        3: gradient(3, [2.0, 2.0, -2.0], idx=[7, 8, 9]),
        4: gradient(4, [10.0, 20.0, 30.0], idx=[10, 11, 12]),  # ×10 norm
        5: gradient(5, [0.0, 0.0, 0.0], idx=[13, 14, 15]),  # empty
        6: gradient(6, [1.0, 2.0, 3.0001]),  # copy of uid 1, uploaded later
        7: gradient(7, [1.0, 1.0, 1.0], model_hash="old"),
    }
    times = {uid: now + timedelta(seconds=uid) for uid in gradients}
    rejected = screen(gradients, model_hash="h", upload_times=times)
    assert set(rejected) == {4, 5, 6, 7}
    assert rejected[7].startswith("stale model") and rejected[4].startswith("norm outlier")
    assert rejected[5].startswith("norm outlier") and rejected[6].startswith("copy of uid 1")
    tied = screen({1: gradients[1], 6: gradients[6]}, model_hash="h", upload_times=None)
    assert set(tied) == {1, 6}  # same time (unknown): both rejected
    overlap, cosine = similarity(gradients[1], gradients[2])
    assert overlap == 0.0 and cosine == 0.0
