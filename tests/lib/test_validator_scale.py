"""A validator among many uids: which it scores, what happens to the others, how far behind a miner may be, and what
repeated misses cost."""

import dataclasses

import pytest
import torch

from templar_lib.checkpoints import probe_positions, probe_values
from templar_lib.hparams import HParams
from templar_lib.ratings import Ratings, update_ratings
from templar_lib.roles.validator import sample_uids, sync_lags
from templar_lib.screening import sync_lag
from templar_lib.wire import Gradient

HPARAMS = HParams()


def test_sampling_scores_everyone_regularly_and_nobody_knows_in_advance():
    uids = list(range(1, 257))
    ratings, first_scored = Ratings(), {}
    for window in range(20):
        chosen = sample_uids(uids, ratings, window, 32, seed=f"block-hash-{window}")
        assert len(chosen) == 32 and len(set(chosen)) == 32
        for uid in chosen:
            first_scored.setdefault(uid, window)
        scores = {uid: 0.01 * (uid % 7) for uid in chosen}
        ratings = update_ratings(ratings, window, scores, {uid: 1 for uid in chosen},
                                 {uid: str(uid) for uid in uids}, HPARAMS)
    assert len(first_scored) == 256 and max(first_scored.values()) <= 12  # 8 windows at the least
    assert sample_uids(uids, ratings, 20, 32, "x") == sample_uids(uids, ratings, 20, 32, "x")  # recomputable
    assert sample_uids(uids, ratings, 20, 32, "x") != sample_uids(uids, ratings, 20, 32, "y")  # seeded by the block
    assert sample_uids(uids[:20], ratings, 20, 32, "x") == uids[:20]  # few enough: everyone


def test_uids_not_sampled_keep_what_they_earned():
    hotkeys = {1: "a", 2: "b"}
    ratings = update_ratings(Ratings(), 0, {1: 0.5, 2: 0.3}, {1: 1, 2: 1}, hotkeys, HPARAMS)
    later = update_ratings(ratings, 1, {1: 0.5}, {1: 1}, hotkeys, HPARAMS)  # uid 2 not sampled in window 1
    assert later.by_uid[2] == ratings.by_uid[2] and later.by_uid[2].final > 0


def test_misses_cost_a_share_each_and_most_misses_start_a_uid_over():
    hotkeys = {1: "a", 2: "b"}
    ratings = Ratings()
    for window in range(8):
        missed = [2] if window >= 4 else []  # uid 2 misses four windows in a row, then more
        scores = {1: 0.5, 2: 0.0 if missed else 0.5}
        ratings = update_ratings(ratings, window, scores, {1: 1, 2: -1 if missed else 1}, hotkeys, HPARAMS,
                                 missed=missed)
        if window == 4:
            one_miss = ratings.by_uid[2]
            assert one_miss.final == pytest.approx(one_miss.score_ema * HPARAMS.miss_penalty)
    missing = ratings.by_uid[2]
    assert missing.misses == 4 and missing.final == pytest.approx(missing.score_ema * HPARAMS.miss_penalty ** 4)
    assert missing.final < HPARAMS.miss_penalty ** 4 * ratings.by_uid[1].final
    for window in range(8, 10):
        ratings = update_ratings(ratings, window, {1: 0.5, 2: 0.0}, {1: 1, 2: -1}, hotkeys, HPARAMS, missed=[2])
    assert ratings.by_uid[2].misses >= HPARAMS.miss_exclude
    assert ratings.by_uid[2].final == 0.0 and ratings.by_uid[2].score_ema == 0.0  # started over


def test_a_lagging_miner_is_scored_by_how_far_behind_its_theta_is():
    generator = torch.Generator().manual_seed(0)
    thetas = {w: {"w": torch.randn(8, 8, generator=generator), "b": torch.randn(8, generator=generator)}
              for w in range(5)}
    window = 4

    def gradient(uid: int, trained_on: int) -> Gradient:
        return Gradient(window, uid, {}, "", model_hash=f"theta-{trained_on}",
                        probes=tuple(probe_values(thetas[trained_on], window)))

    gradients = {1: gradient(1, 4), 2: gradient(2, 3), 3: gradient(3, 2), 4: gradient(4, 1)}
    diverged = dataclasses.replace(gradients[1], uid=5, model_hash="other")
    lags = sync_lags(window, gradients | {5: diverged}, thetas[4], "theta-4", thetas.get, HPARAMS)
    assert (lags[1], lags[2], lags[3]) == (0, 1, 2)
    assert lags[4].startswith("stale model") and lags[5].startswith("diverged")
    assert len(probe_positions(window, {"w": (8, 8), "b": (8,)})) == 8
    assert sync_lag([1.0, 2.0], {0: [1.0, 2.5], 1: [1.0, 2.0]}) == 1 and sync_lag([0.0], {0: [1.0]}) is None
