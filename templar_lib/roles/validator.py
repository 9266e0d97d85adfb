"""Validator window step (DESIGN §2; Templar's incentive mechanism with its later countermeasures).

For window w, once it has closed, on the same θ_w the miners trained on:
1. take what the validator's watch first saw of each uid's gradient before the close (watch.py: its own clock, chain
   blocks), validate each file, then screen them (stale model, unit norms, copies by first sight: screening.py).
   Everything else scores 0 with its reason. A window the watch never looked at while it was open (the validator
   was down and runs it late) scores nobody: nothing of it can be judged, and its report says so (`watched`). One
   it looked at but stopped watching before the close (`Watch.closed`: it died, or the node went down, and came back
   after the close) judges only the uids it saw: the others' files may have landed after its last poll.
2. the random pages: chosen by the hash of the block that closed w, which nobody knew while w was open and anyone
   can recompute afterwards (they are in the evaluation report); θ_w's loss on them, once.
3. per valid uid, in ascending uid order, on one scratch copy of the model: load θ_w, loss on each of the uid's own
   pages, apply the uid's gradient alone with the window's outer step (sign, lr, weight decay), loss on its own pages
   and on the random pages again (scoring.py: the least-improved own page against the random pages).
4. scores -> ratings (ratings.py: the moving average of scores sets the weights) -> weights (weights.py), set on the
   chain; `peers_{w}.json` (valid uids with a positive score, best first, at most topk_peers; a score below
   peer_score_ratio of the window's median positive score counts as 0, with that reason: too small to use, so not
   paid), each with the sha256 of the bytes scored, signed by the validator's hotkey) and
   `evaluation-{w}-{validator}.json` (wire.documents) written to the validator's gradients bucket. A uid the
   aggregator of w − 1 found with other bytes than were scored (`refused` in aggregation-{w−1}) is banned
   (ratings.py).
5. where the network spot-checks miners (spot_check_probability > 0; spot_check.py, roles/spot_checks.py): the
   report records what every file seen commits to (`commitments`), a scored file whose state does not continue the
   uid's recorded file of w − 1 scores 0, and the drawn uids of w − 1 are replayed from the states they put during
   w; each result is in the report's `checks`: a failure bans the uid for spot_check_ban_windows and zeroes its file
   of w; no state put leaves the check pending, zeroes the file of w and asks again during w + 1 (a node down for a
   window loses that window's pay, not 50), when no state is a failure.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from templar_lib.buckets import Bucket, ObjectMissing
from templar_lib.chain import Chain, ChainError
from templar_lib.checkpoints import ModelState, model_fingerprint, probe_values
from templar_lib.data import Dataset, random_pages
from templar_lib.gather import fetch_peers, publish_peers
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_, parameters_of
from templar_lib.ratings import Ratings, update_ratings
from templar_lib.roles.spot_checks import (BANNED, PENDING, Records, file_commitments, is_failure, mender, own_report,
                                           pending_checks, record_commitments, spot_check_window)
from templar_lib.scoring import Losses, Score, score_losses, zero_score
from templar_lib.screening import screen, sync_lag
from templar_lib.state import RATINGS_LOOKBACK, StateStore
from templar_lib.strategies import NormReference, strategy_of
from templar_lib.training import evaluate_loss
from templar_lib.weights import normalised_weights
from templar_lib.watch import Watch
from templar_lib.wire import (EvaluationReport, Gradient, InvalidFile, Peers, aggregation_key, evaluation_key,
                              peers_key, write_evaluation)
from templar_lib.wire.aggregation import CHANGED_AFTER_SCORING, read_refusals

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvaluationOptions:
    """How a validator compares (defaults: production)."""

    random_page_count: int | None = None  # random pages per window (None: pages_per_window)


@dataclass(frozen=True)
class WindowEvaluation:
    """Steps 1–3 of a validator's window: the published report (every uid's score, the peers list) and what it
    took."""

    report: EvaluationReport
    keys: list[str]  # bucket keys written
    seconds: float
    unjudged: list[int] = dataclasses.field(default_factory=list)  # not seen by a watch that stopped before the close

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
                      window: int, step: int, own: list[torch.Tensor], random: torch.Tensor, random_before: float,
                      hparams: HParams, reference: NormReference | None = None) -> Losses:
    """Losses of θ_w and of θ_w + this uid's update alone, on each of its own pages (`own`, one tensor per page) and
    on the random pages (scratch is reused)."""
    load_parameters_(scratch, dict(theta))
    before = [evaluate_loss(scratch, page, hparams.batch_size) for page in own]
    strategy_of(hparams).apply_alone_(parameters_of(scratch), gradient, window=window, step=step, reference=reference)
    after = [evaluate_loss(scratch, page, hparams.batch_size) for page in own]
    return Losses(own_before=sum(before) / len(before), own_after=sum(after) / len(after),
                  random_before=random_before, random_after=evaluate_loss(scratch, random, hparams.batch_size),
                  own_pages=list(zip(before, after)))


SAMPLING_BINS = 4  # rating bins the scored uids are drawn from when there are more than scored_per_window


def sample_uids(candidates: list[int], ratings: Ratings, window: int, budget: int, seed: str) -> list[int]:
    """Which of `candidates` the validator scores in `window` when there are more than `budget`.

    Half the budget goes to rating bins: the candidates ranked by what they have earned (final score) are cut into
    SAMPLING_BINS bins, each with an equal share drawn without replacement with weight (windows since last evaluated
    + 1)³, so the best and the worst are both re-scored regularly. The other half goes to the uids that have waited
    longest (ties drawn at random), so no uid waits more than about n / (budget / 2) windows. Seeded with the closing
    block's hash: nobody knows during the window whether it will be scored, and anyone can recompute the draw
    afterwards."""
    if len(candidates) <= budget:
        return sorted(candidates)
    generator = torch.Generator().manual_seed(int(hashlib.sha256(f"sample:{window}:{seed}".encode()).hexdigest(), 16)
                                               % (1 << 63))

    def waited(uid: int) -> float:
        return float(window - (ratings.by_uid[uid].evaluated if uid in ratings.by_uid else -1))

    def draw(members: list[int], count: int) -> list[int]:
        if count <= 0 or not members:
            return []
        weights = torch.tensor([waited(uid) ** 3 for uid in members])
        picks = torch.multinomial(weights, min(count, len(members)), replacement=False, generator=generator)
        return [members[pick] for pick in picks.tolist()]

    ranked = sorted(candidates, key=lambda uid: (-(ratings.by_uid[uid].final if uid in ratings.by_uid else 0.0), uid))
    bins = [ranked[len(ranked) * i // SAMPLING_BINS: len(ranked) * (i + 1) // SAMPLING_BINS]
            for i in range(SAMPLING_BINS)]
    per_bin = budget // 2 // SAMPLING_BINS
    chosen = [uid for members in bins for uid in draw(members, per_bin)]
    taken = set(chosen)
    order = torch.randperm(len(ranked), generator=generator).tolist()
    rest = sorted((uid for uid in ranked if uid not in taken), key=lambda uid: (-waited(uid), order[ranked.index(uid)]))
    return sorted(chosen + rest[: budget - len(chosen)])


def sync_lags(window: int, gradients: Mapping[int, Gradient], theta: Mapping[str, torch.Tensor], fingerprint: str,
              history: Callable[[int], Mapping[str, torch.Tensor] | None], hparams: HParams) -> dict[int, int | str]:
    """How many outer steps behind θ_w (`theta`) each gradient's θ is (0: its fingerprint is θ_w's), or why it cannot
    be scored. history(window) gives θ of an earlier window when this node still has it."""
    behind = {uid: g for uid, g in gradients.items() if g.model_hash != fingerprint}
    lags: dict[int, int | str] = {uid: 0 for uid in gradients if uid not in behind}
    if not behind:
        return lags
    probes = {0: probe_values(theta, window)}
    for lag in range(1, min(hparams.sync_max_lag, window) + 1):
        earlier = history(window - lag)
        if earlier is not None:
            probes[lag] = probe_values(earlier, window)
    for uid, gradient in behind.items():
        lag = sync_lag(gradient.probes, probes)
        if lag is None:
            lags[uid] = (f"stale model: trained on θ {gradient.model_hash[:12] or '(none)'}, not θ_{window} "
                         f"{fingerprint[:12]} nor one of the {hparams.sync_max_lag} before it")
        elif lag == 0:
            lags[uid] = f"diverged: θ {gradient.model_hash[:12]} has θ_{window}'s probe values, not its fingerprint"
        else:
            lags[uid] = lag
    return lags


def evaluate_window(window: int, *, chain: Chain, model: torch.nn.Module, state: ModelState, dataset: Dataset,
                    watch: Watch, own_bucket: Bucket, hparams: HParams, ratings: Ratings = Ratings(),
                    history: Callable[[int], Mapping[str, torch.Tensor] | None] = lambda window: None,
                    options: EvaluationOptions = EvaluationOptions(),
                    others: Callable[[int], Records] | None = None) -> WindowEvaluation:
    """Score the other uids' gradients for `window` as the watch saw them, on θ_w, which `model` holds (`state`: its
    step and fingerprint), as the validator `chain` acts for; writes the signed peers_{w}.json and
    evaluation-{w}-{validator}.json to `own_bucket`. Needs the window closed (its closing block seeds the random
    pages). With more uids seen than scored_per_window, a sample of them is scored (`ratings`: what they have earned
    and when they were last evaluated; sample_uids); the others are `unsampled` and nothing about them changes.
    others(w): every validator's report of window w (roles.spot_checks.validator_records), read only where spot
    checks are on and a file that does not start fresh finds no record of its uid in this validator's own report of
    window − 1, to mend a file of window − 1 its watch missed (roles.spot_checks.mender); None: nothing is mended."""
    started = time.perf_counter()
    validator_uid = chain.uid
    seed_block = (window + 1) * hparams.blocks_per_window
    seed = chain.block_hash(seed_block)
    if seed is None:
        raise ChainError(f"window {window} has not closed: block {seed_block} is not on the chain yet")
    metagraph = chain.metagraph()
    # a window its watch never looked at while it was open (the validator was down, and runs it late): nothing of it
    # can be judged, so nobody is scored (every uid "missing" would be a miss the miners did not make)
    uids = [uid for uid in metagraph.uids if uid != validator_uid][: hparams.max_peers] if watch.watched else []
    if not watch.watched:
        log.warning("window %d: this validator's watch never looked at it while it was open: nobody is scored",
                    window)
    # a watch that stopped looking before the close (the validator died, and came back after it) never saw what
    # landed after its last poll: a uid it saw nothing of is not judged ("missing" would be a miss nobody saw happen)
    sightings = watch.sightings()
    unjudged = [uid for uid in uids if uid not in sightings] if not watch.closed else []
    if unjudged:
        log.warning("window %d: this validator's watch stopped before the window closed: uids %s, of which it saw "
                    "nothing, are not judged", window, unjudged)
        uids = [uid for uid in uids if uid not in unjudged]
    hotkeys = {neuron.uid: neuron.hotkey for neuron in metagraph.neurons}
    theta = {name: p.detach() for name, p in parameters_of(model).items()}
    shapes = {name: tuple(p.shape) for name, p in theta.items()}

    gradients, reasons, strategy = {}, dict(watch.reasons()), strategy_of(hparams)
    banned = {uid: f"{BANNED} {r.banned_until}" for uid, r in ratings.by_uid.items()  # its files stay out of the peers
              if r.banned_until >= window and hotkeys.get(uid) == r.hotkey and uid in sightings}
    # the spot checks of window − 1 (the drawn miners put their states during this window), and again those of
    # window − 2 that found no state put: a failure is banned from this window on (rate_window), so its file of this
    # window is not used either; a pending check (no state put yet) zeroes it, unpaid until the state is put
    previous = own_report(own_bucket, window - 1, validator_uid) if hparams.spot_check_probability > 0 else None
    # files link to the records of window − 1; one it did not watch holds none, as if it had no report of it
    linked_to = previous if previous is None or previous.watched else None
    files = file_commitments(watch, hparams=hparams, uids=sightings) if hparams.spot_check_probability > 0 else {}
    # where a file links to nothing of its own, the others' reports of window − 1, read beside the checks below
    mend = mender(window, files=files, previous=linked_to, others=others, chain=chain, hparams=hparams,
                  published=lambda: own_report(own_bucket, window, validator_uid))
    check_window = functools.partial(spot_check_window, chain=chain, hotkeys=hotkeys, model=model, dataset=dataset,
                                     watch=watch, own_bucket=own_bucket, hparams=hparams, history=history)
    checks = check_window(previous)
    waiting = pending_checks(previous)
    again = check_window(own_report(own_bucket, window - 2, validator_uid), again=waiting) if waiting else {}
    for checked, results in ((window - 2, again), (window - 1, checks)):
        banned |= {uid: f"{BANNED} {window + hparams.spot_check_ban_windows - 1}: failed the spot check of window "
                        f"{checked}: {why}" for uid, why in results.items()
                   if is_failure(why) and uid in sightings and uid not in banned}
    checks |= {uid: why for uid, why in again.items() if why or uid not in checks}  # a failure over a pending one
    reasons |= banned | {uid: f"spot check {why}" for uid, why in checks.items()
                         if why.startswith(PENDING) and uid in sightings and uid not in banned}
    seen = sample_uids([uid for uid in uids if uid in sightings and uid not in banned], ratings, window,
                       hparams.scored_per_window, seed)
    unsampled = sorted(uid for uid in uids if uid in sightings and uid not in seen and uid not in banned)
    uids = [uid for uid in uids if uid not in unsampled]
    for uid in seen:
        try:
            gradients[uid] = strategy.read_gradient(watch.read(uid), window=window, uid=uid, shapes=shapes)
        except InvalidFile as error:
            reasons[uid] = f"invalid: {error}"
    fingerprint = state.fingerprint or model_fingerprint(theta)
    lags = sync_lags(window, gradients, theta, fingerprint, history, hparams)
    for uid, lag in lags.items():
        if isinstance(lag, str):
            reasons[uid] = lag
    commitments, unpaid = record_commitments(  # banned uids' files too: the next file after a ban links to them
        window, watch=watch, uids=sightings, hparams=hparams, hotkeys=hotkeys,
        previous={} if window == 0 else None if linked_to is None else linked_to.commitments,
        lags_of=lambda files: sync_lags(window, files, theta, fingerprint, history, hparams), files=files,
        mend=mend)
    reasons |= {uid: why for uid, why in unpaid.items() if uid in gradients and uid not in reasons}
    in_sync = {uid: g for uid, g in gradients.items() if isinstance(lags.get(uid), int)}
    random_ids = random_pages(window, f"{seed}:{validator_uid}", options.random_page_count or hparams.pages_per_window,
                              dataset.manifest.train_pages)
    random = dataset.tokens(random_ids)
    reference = strategy.reference(model, random, step=state.step) if in_sync else None  # the norm rule's, if any
    reasons |= screen(in_sync, model_hash=None, first_seen={uid: sightings[uid].block for uid in in_sync},
                      norm_rule=lambda gradient: strategy.norm_reason(gradient, reference))
    scratch = copy.deepcopy(model)
    random_before = evaluate_loss(model, random, hparams.batch_size)
    scores: dict[int, Score] = {}
    for uid in uids:
        if uid in reasons or uid not in gradients:
            scores[uid] = zero_score(uid, reasons.get(uid, "missing"))
            continue
        own = [dataset.tokens([page]) for page in dataset.miner_pages(window, uid, hparams.pages_per_window)]
        losses = evaluate_gradient(scratch, theta, gradients[uid], window=window, step=state.step, own=own,
                                   random=random, random_before=random_before, hparams=hparams, reference=reference)
        measured, lag = score_losses(uid, losses), lags[uid]
        scores[uid] = dataclasses.replace(measured, score=measured.score * (1 - lag / (hparams.sync_max_lag + 1)),
                                          sync_lag=lag)
    del scratch

    # a contribution too small for the network to use is neither used nor paid: small against the window's median
    # positive score, which a majority would have to move, not against its best, which one outlier sets (a single
    # file scoring 8× the rest put every honest miner below 0.2 of it: out of the peers list, unpaid)
    typical = statistics.median_low([s.score for s in scores.values() if not s.reason and s.score > 0] or [0.0])
    for uid, score in scores.items():
        if not score.reason and 0 < score.score < hparams.peer_score_ratio * typical:
            scores[uid] = dataclasses.replace(score, score=0.0, indicator=-1, reason=(
                f"score {score.score:.3g} below {hparams.peer_score_ratio:g} of the window's median {typical:.3g}"))
    positive = sorted((uid for uid, s in scores.items() if not s.reason and s.score > 0),
                      key=lambda uid: (-scores[uid].score, uid))
    chosen, reserves = sorted(positive[: hparams.topk_peers]), positive[hparams.topk_peers: 2 * hparams.topk_peers]
    peers = Peers(window=window, validator=validator_uid, uids=chosen, reserves=reserves,
                  sha256={uid: sightings[uid].sha256 for uid in chosen + reserves})
    report = EvaluationReport(window, validator_uid, state.step, random_before, chosen, scores, random_ids, seed_block,
                              unsampled, checks, commitments, watch.watched)
    keys = [publish_signed(chain, own_bucket, peers), evaluation_key(window, validator_uid)]
    own_bucket.put(keys[-1], write_evaluation(report))
    return WindowEvaluation(report, keys, time.perf_counter() - started, unjudged)


def publish_signed(chain: Chain, bucket: Bucket, peers: Peers) -> str:
    """Sign and publish a peers list, unless the bucket already holds this very list signed by us: signatures are
    randomised (sr25519), so re-running a window keeps the published bytes instead of signing them again."""
    try:
        published = fetch_peers(bucket, peers.window)
    except InvalidFile:
        published = None
    hotkey = chain.metagraph().hotkey(chain.uid)
    if published is not None and published.message() == peers.message() and hotkey is not None \
            and chain.verify(hotkey, published.message(), published.signature):
        return peers_key(peers.window)
    return publish_peers(bucket, dataclasses.replace(peers, signature=chain.sign(peers.message())))


def rate_window(report: EvaluationReport, ratings: Ratings, hotkeys: Mapping[int, str], hparams: HParams,
                banned: Mapping[int, str] | None = None) -> tuple[Ratings, dict[int, float] | None]:
    """Step 4: fold the window's scores into the ratings, banning `banned` (uid -> reason) and the uids whose spot
    check failed (the report's `checks`), each zero with a reason a miss; the weights they give (None: nothing
    positive)."""
    scores = report.scores
    new_ratings = update_ratings(ratings, report.window, {u: s.score for u, s in scores.items()},
                                 {u: s.indicator for u, s in scores.items()}, hotkeys, hparams, banned=banned,
                                 missed=[u for u, s in scores.items() if s.reason and not s.reason.startswith(BANNED)],
                                 failed_checks={uid: why for uid, why in report.checks.items() if is_failure(why)})
    return new_ratings, normalised_weights(new_ratings.final_scores(), hotkeys)


def ratings_before(window: int, *, store: StateStore, own_bucket: Bucket, validator: int, aggregator: Bucket,
                   hotkeys: Callable[[], Mapping[int, str]], hparams: HParams,
                   shapes: Mapping[str, tuple[int, ...]]) -> Ratings:
    """The ratings a validator goes on from in `window`: those after window − 1 (StateStore.latest_ratings: the
    latest it rated), with its own reports of the windows since then folded in (rate_window, banning what each
    window's aggregation found changed after scoring), where it evaluated them but did not rate them (its ratings
    step failed for good, or ratings run out of order): the bans of their failed checks stand. Nothing is saved;
    none to fold in (the usual case) reads nothing more. hotkeys(): the metagraph's now, asked only to fold one in."""
    ratings = store.latest_ratings(window - 1)
    for skipped in range(max(ratings.window + 1, window - RATINGS_LOOKBACK), window):
        if not own_bucket.exists(evaluation_key(skipped, validator)) or (
                report := own_report(own_bucket, skipped, validator)) is None:
            continue
        log.warning("window %d was evaluated but not rated here: its report is folded into the ratings", skipped)
        banned = swaps_found(aggregator, skipped - 1, shapes=shapes, hparams=hparams) if skipped > 0 else {}
        ratings, _ = rate_window(report, ratings, hotkeys(), hparams, banned=banned)
    return ratings


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
                   watch: Watch, own_bucket: Bucket, ratings: Ratings, hparams: HParams,
                   banned: Mapping[int, str] | None = None,
                   history: Callable[[int], Mapping[str, torch.Tensor] | None] = lambda window: None,
                   options: EvaluationOptions = EvaluationOptions(),
                   others: Callable[[int], Records] | None = None) -> ValidatorResult:
    """The whole validator window: evaluate (mending from `others`' reports: evaluate_window), rate (banning
    `banned`), set weights."""
    evaluation = evaluate_window(window, chain=chain, model=model, state=state, dataset=dataset, watch=watch,
                                 own_bucket=own_bucket, hparams=hparams, ratings=ratings, history=history,
                                 options=options, others=others)
    hotkeys = {neuron.uid: neuron.hotkey for neuron in chain.metagraph().neurons}
    new_ratings, weights = rate_window(evaluation.report, ratings, hotkeys, hparams, banned=banned)
    status = submit_weights(chain, weights)
    log.info("validator %d window %d: weights %s", evaluation.validator_uid, window, status)
    return ValidatorResult(evaluation, new_ratings, weights, status)


def swaps_found(aggregator: Bucket, window: int, *, shapes: Mapping[str, tuple[int, ...]],
                hparams: HParams) -> dict[int, str]:
    """The uids the aggregator of `window` left out because their file changed after it was scored, with the reason
    (to ban from window + 1 on); {} when there is no such aggregation (the first window, a node that joined late)."""
    limit = strategy_of(hparams).aggregation_limit(shapes)
    try:
        refused = read_refusals(aggregator.get(aggregation_key(window), max_bytes=limit), window=window,
                                max_bytes=limit)
    except (ObjectMissing, InvalidFile):
        return {}
    return {uid: reason for uid, reason in refused.items() if reason.startswith(CHANGED_AFTER_SCORING)}
