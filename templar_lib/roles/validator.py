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
   at most topk_peers) and `evaluation-{w}-{validator}.json` written to the validator's gradients bucket.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch

from templar_lib.aggregation import apply_aggregation_, combine_peers, learning_rate_at
from templar_lib.buckets import Bucket
from templar_lib.chain import Chain, ChainError, window_time_range
from templar_lib.checkpoints import model_fingerprint
from templar_lib.data import Manifest, load_pages, pages_for, random_pages
from templar_lib.gather import gather, publish_peers
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_, parameters_of
from templar_lib.ratings import Ratings, update_ratings
from templar_lib.scoring import Losses, Score, score_losses, zero_score
from templar_lib.screening import screen
from templar_lib.training import evaluate_loss
from templar_lib.weights import normalised_weights
from templar_lib.wire import Gradient, Peers, evaluation_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowEvaluation:
    """Steps 1–3 of a validator's window: every uid's score (valid or not) and the peers list."""

    window: int
    validator_uid: int
    step: int
    scores: dict[int, Score]
    peers: list[int]
    random_loss: float  # θ_w on the validator's random pages
    keys: list[str]  # bucket keys written
    seconds: float

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
    single = combine_peers(window, step, learning_rate_at(step, hparams), {gradient.uid: gradient.tensors},
                           list(theta))
    apply_aggregation_(parameters_of(scratch), single, weight_decay=hparams.weight_decay)
    return Losses(own_before=own_before, own_after=evaluate_loss(scratch, own, hparams.batch_size),
                  random_before=random_before, random_after=evaluate_loss(scratch, random, hparams.batch_size))


def evaluate_window(window: int, *, validator_uid: int, chain: Chain, model: torch.nn.Module, step: int,
                    dataset: Bucket, manifest: Manifest, peer_buckets: Mapping[int, Bucket], own_bucket: Bucket,
                    hparams: HParams, random_page_count: int | None = None, gather_timeout: float = 60.0,
                    skipped_commitments: Mapping[int, str] | None = None,
                    check_upload_time: bool = True, model_hash: str | None = None) -> WindowEvaluation:
    """Score every other uid's gradient for `window` on θ_w held by `model` (outer step `step`; model_hash its
    fingerprint when known); writes peers_{w}.json and evaluation-{w}-{validator}.json to `own_bucket`."""
    started = time.perf_counter()
    uids = [uid for uid in chain.metagraph().uids if uid != validator_uid][: hparams.max_peers]
    theta = {name: p.detach() for name, p in parameters_of(model).items()}
    shapes = {name: tuple(p.shape) for name, p in theta.items()}

    gathered = gather(window, uids, peer_buckets, shapes=shapes, hparams=hparams, timeout=gather_timeout,
                      time_range=window_time_range(chain, window) if check_upload_time else None)
    rejected = screen(gathered.gradients, model_hash=model_hash or model_fingerprint(theta),
                      upload_times=gathered.uploaded)
    reasons = {**(skipped_commitments or {}), **gathered.skipped, **rejected}

    random_ids = random_pages(window, validator_uid, random_page_count or hparams.pages_per_window,
                              manifest.train_pages)
    random = load_pages(dataset, manifest, random_ids)
    scratch = copy.deepcopy(model)
    random_before = evaluate_loss(model, random, hparams.batch_size)
    scores: dict[int, Score] = {}
    for uid in uids:
        if uid in reasons or uid not in gathered.gradients:
            scores[uid] = zero_score(uid, reasons.get(uid, "missing"))
            continue
        own = load_pages(dataset, manifest, pages_for(window, uid, hparams.pages_per_window, manifest.train_pages))
        losses = evaluate_gradient(scratch, theta, gathered.gradients[uid], window=window, step=step, own=own,
                                   random=random, random_before=random_before, hparams=hparams)
        scores[uid] = score_losses(uid, losses)
    del scratch

    positive = sorted((uid for uid, s in scores.items() if not s.reason and s.score > 0),
                      key=lambda uid: (-scores[uid].score, uid))
    peers = sorted(positive[: hparams.topk_peers])
    keys = [publish_peers(own_bucket, Peers(window=window, validator=validator_uid, uids=peers)),
            evaluation_key(window, validator_uid)]
    own_bucket.put(keys[-1], evaluation_report(window, validator_uid, step, scores, peers, random_before))
    return WindowEvaluation(window, validator_uid, step, scores, peers, random_before, keys,
                            time.perf_counter() - started)


def rate_window(evaluation: WindowEvaluation, ratings: Ratings, hotkeys: Mapping[int, str],
                hparams: HParams) -> tuple[Ratings, dict[int, float] | None]:
    """Step 4: fold the window's scores into the ratings; the weights they give (None: nothing positive)."""
    scores = evaluation.scores
    new_ratings = update_ratings(ratings, evaluation.window, {u: s.score for u, s in scores.items()},
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


def validator_step(window: int, *, validator_uid: int, chain: Chain, model: torch.nn.Module, step: int,
                   dataset: Bucket, manifest: Manifest, peer_buckets: Mapping[int, Bucket], own_bucket: Bucket,
                   ratings: Ratings, hparams: HParams, **options) -> ValidatorResult:
    """The whole validator window: evaluate, rate, set weights. `options` go to evaluate_window."""
    evaluation = evaluate_window(window, validator_uid=validator_uid, chain=chain, model=model, step=step,
                                 dataset=dataset, manifest=manifest, peer_buckets=peer_buckets,
                                 own_bucket=own_bucket, hparams=hparams, **options)
    hotkeys = {neuron.uid: neuron.hotkey for neuron in chain.metagraph().neurons}
    new_ratings, weights = rate_window(evaluation, ratings, hotkeys, hparams)
    status = submit_weights(chain, weights)
    log.info("validator %d window %d: weights %s", validator_uid, window, status)
    return ValidatorResult(evaluation, new_ratings, weights, status)


def evaluation_report(window: int, validator_uid: int, step: int, scores: Mapping[int, Score], peers: list[int],
                      random_loss: float) -> bytes:
    """evaluation-{window}-{validator}.json: what was measured, per uid (stable, sorted JSON)."""
    rows = {}
    for uid, score in sorted(scores.items()):
        row = asdict(score)
        row.pop("uid")
        rows[str(uid)] = row
    return json.dumps({"format": 1, "window": window, "validator": validator_uid, "step": step,
                       "random_loss": random_loss, "peers": peers, "uids": rows}, sort_keys=True, indent=1).encode()


def read_evaluation(data: bytes, *, window: int, validator_uid: int) -> WindowEvaluation:
    """Parse evaluation-{window}-{validator}.json (as written by evaluation_report), validating its schema.
    Raises InvalidFile."""
    from templar_lib.wire import InvalidFile

    try:
        raw = json.loads(data)
        if raw["format"] != 1 or raw["window"] != window or raw["validator"] != validator_uid:
            raise InvalidFile("evaluation file is for another window or validator")
        scores = {}
        for key, row in raw["uids"].items():
            losses = Losses(**row["losses"]) if row["losses"] is not None else None
            scores[int(key)] = Score(uid=int(key), score=float(row["score"]), indicator=int(row["indicator"]),
                                     improvement_own=row["improvement_own"], improvement_random=row["improvement_random"],
                                     losses=losses, reason=str(row["reason"]))
        peers = [int(uid) for uid in raw["peers"]]
        return WindowEvaluation(window, validator_uid, int(raw["step"]), dict(sorted(scores.items())), peers,
                                float(raw["random_loss"]), [], 0.0)
    except InvalidFile:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InvalidFile(f"evaluation file malformed: {type(error).__name__}: {str(error)[:80]}") from None
