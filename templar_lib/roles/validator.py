"""Validator window step (DESIGN §2; Templar v0.2 incentive mechanism with later countermeasures).

For window w, on the same θ_w the miners trained on:
1. gather every other uid's gradient (validated files, upload time inside the window), then screen them
   (stale model, norm outliers, copies: screening.py). Everything else scores 0 with its reason.
2. losses on the validator's random pages for θ_w, once.
3. per valid uid, in ascending uid order, on one scratch copy of the model: load θ_w, loss on the uid's own pages,
   apply the uid's gradient alone with the window's outer step (sign, lr, weight decay), loss on its own pages
   and on the random pages again. Memory is two models; time is three evaluations per uid, so a single GPU
   scores dozens of uids per 84 s window on the 1b preset with pages of a few thousand tokens.
4. scores and indicators (scoring.py) -> OpenSkill ratings and binary moving averages (ratings.py)
   -> weights (weights.py), set on the chain; `peers_{w}.json` (valid uids with a positive score, best first,
   at most topk_peers) and `evaluation-{w}-{validator}.json` (wire.documents) written to the validator's gradients
   bucket.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from templar_lib.aggregation import aggregate_window, apply_aggregation_, learning_rate_at
from templar_lib.buckets import Bucket
from templar_lib.chain import Chain, ChainError, window_time_range
from templar_lib.checkpoints import ModelState, model_fingerprint
from templar_lib.commitments import PeerBuckets
from templar_lib.data import Dataset, random_pages
from templar_lib.gather import gather, publish_peers
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_, parameters_of
from templar_lib.ratings import Ratings, update_ratings
from templar_lib.scoring import Losses, Score, score_losses, zero_score
from templar_lib.screening import screen
from templar_lib.training import evaluate_loss
from templar_lib.weights import normalised_weights
from templar_lib.wire import EvaluationReport, Gradient, Peers, evaluation_key, write_evaluation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationOptions:
    """How a validator gathers and compares (defaults: production)."""

    random_page_count: int | None = None  # random pages per window (None: pages_per_window)
    gather_timeout: float = 60.0  # seconds for the whole gather
    check_upload_time: bool = True  # skip files uploaded outside their window (off on a local network: reruns)


@dataclass(frozen=True)
class WindowEvaluation:
    """Steps 1–3 of a validator's window: the published report (every uid's score, the peers list) and what it
    took."""

    report: EvaluationReport
    keys: list[str]  # bucket keys written
    seconds: float

    @property
    def window(self) -> int:
        return self.report.window

    @property
    def validator_uid(self) -> int:
        return self.report.validator

    @property
    def scores(self) -> dict[int, Score]:
        return self.report.scores

    @property
    def peers(self) -> list[int]:
        return self.report.peers

    @property
    def random_loss(self) -> float:
        return self.report.random_loss

    @property
    def valid_uids(self) -> list[int]:
        return [uid for uid, score in self.scores.items() if not score.reason]


@dataclass(frozen=True)
class ValidatorResult:
    evaluation: WindowEvaluation
    ratings: Ratings
    weights: dict[int, float] | None  # what was submitted (None: nothing positive to set)
    weights_status: str  # "set", or why not


def evaluate_gradient(scratch: torch.nn.Module, theta: Mapping[str, torch.Tensor], gradient: Gradient, *,
                      window: int, step: int, own: torch.Tensor, random: torch.Tensor, random_before: float,
                      hparams: HParams) -> Losses:
    """Losses of θ_w and of θ_w + this uid's update alone, on its own and the random pages (scratch is reused)."""
    load_parameters_(scratch, dict(theta))
    own_before = evaluate_loss(scratch, own, hparams.batch_size)
    single = aggregate_window(window, step, learning_rate_at(step, hparams), {gradient.uid: gradient.tensors},
                              list(theta))
    apply_aggregation_(parameters_of(scratch), single, weight_decay=hparams.weight_decay)
    return Losses(own_before=own_before, own_after=evaluate_loss(scratch, own, hparams.batch_size),
                  random_before=random_before, random_after=evaluate_loss(scratch, random, hparams.batch_size))


def evaluate_window(window: int, *, chain: Chain, model: torch.nn.Module, state: ModelState, dataset: Dataset,
                    peers: PeerBuckets, own_bucket: Bucket, hparams: HParams,
                    options: EvaluationOptions = EvaluationOptions()) -> WindowEvaluation:
    """Score every other uid's gradient for `window` on θ_w, which `model` holds (`state`: its step and fingerprint),
    as the validator `chain` acts for; writes peers_{w}.json and evaluation-{w}-{validator}.json to `own_bucket`."""
    started = time.perf_counter()
    validator_uid = chain.uid
    uids = [uid for uid in chain.metagraph().uids if uid != validator_uid][: hparams.max_peers]
    theta = {name: p.detach() for name, p in parameters_of(model).items()}
    shapes = {name: tuple(p.shape) for name, p in theta.items()}

    gathered = gather(window, uids, peers, shapes=shapes, hparams=hparams, timeout=options.gather_timeout,
                      time_range=window_time_range(chain, window) if options.check_upload_time else None)
    rejected = screen(gathered.gradients, model_hash=state.fingerprint or model_fingerprint(theta),
                      upload_times=gathered.uploaded)
    reasons = {**gathered.skipped, **rejected}

    random_ids = random_pages(window, validator_uid, options.random_page_count or hparams.pages_per_window,
                              dataset.manifest.train_pages)
    random = dataset.tokens(random_ids)
    scratch = copy.deepcopy(model)
    random_before = evaluate_loss(model, random, hparams.batch_size)
    scores: dict[int, Score] = {}
    for uid in uids:
        if uid in reasons or uid not in gathered.gradients:
            scores[uid] = zero_score(uid, reasons.get(uid, "missing"))
            continue
        own = dataset.tokens(dataset.miner_pages(window, uid, hparams.pages_per_window))
        losses = evaluate_gradient(scratch, theta, gathered.gradients[uid], window=window, step=state.step, own=own,
                                   random=random, random_before=random_before, hparams=hparams)
        scores[uid] = score_losses(uid, losses)
    del scratch

    positive = sorted((uid for uid, s in scores.items() if not s.reason and s.score > 0),
                      key=lambda uid: (-scores[uid].score, uid))
    chosen = sorted(positive[: hparams.topk_peers])
    report = EvaluationReport(window, validator_uid, state.step, random_before, chosen, scores)
    keys = [publish_peers(own_bucket, Peers(window=window, validator=validator_uid, uids=chosen)),
            evaluation_key(window, validator_uid)]
    own_bucket.put(keys[-1], write_evaluation(report))
    return WindowEvaluation(report, keys, time.perf_counter() - started)


def rate_window(report: EvaluationReport, ratings: Ratings, hotkeys: Mapping[int, str],
                hparams: HParams) -> tuple[Ratings, dict[int, float] | None]:
    """Step 4: fold the window's scores into the ratings; the weights they give (None: nothing positive)."""
    scores = report.scores
    new_ratings = update_ratings(ratings, report.window, {u: s.score for u, s in scores.items()},
                                 {u: s.indicator for u, s in scores.items()}, hotkeys, hparams)
    return new_ratings, normalised_weights(new_ratings.final_scores(), hotkeys)


def submit_weights(chain: Chain, weights: dict[int, float] | None) -> str:
    """Set weights on the chain; returns "set" or why they were not (a refusal never fails the window)."""
    if weights is None:
        return "no uid has a positive final score: weights left unchanged"
    try:
        chain.set_weights(weights)
    except ChainError as error:  # rate limit or chain refusal: the window's evaluation still stands
        return f"not set: {error}"
    return "set"


def validator_step(window: int, *, chain: Chain, model: torch.nn.Module, state: ModelState, dataset: Dataset,
                   peers: PeerBuckets, own_bucket: Bucket, ratings: Ratings, hparams: HParams,
                   options: EvaluationOptions = EvaluationOptions()) -> ValidatorResult:
    """The whole validator window: evaluate, rate, set weights."""
    evaluation = evaluate_window(window, chain=chain, model=model, state=state, dataset=dataset, peers=peers,
                                 own_bucket=own_bucket, hparams=hparams, options=options)
    hotkeys = {neuron.uid: neuron.hotkey for neuron in chain.metagraph().neurons}
    new_ratings, weights = rate_window(evaluation.report, ratings, hotkeys, hparams)
    status = submit_weights(chain, weights)
    log.info("validator %d window %d: weights %s", evaluation.validator_uid, window, status)
    return ValidatorResult(evaluation, new_ratings, weights, status)
