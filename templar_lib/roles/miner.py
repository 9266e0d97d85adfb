"""Miner window step (DESIGN §2, §5): train on the window's own pages, compress, upload."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from templar_lib.buckets import Bucket, BucketError, ObjectMissing, ObjectTooLarge
from templar_lib.checkpoints import model_fingerprint, probe_values
from templar_lib.data import Dataset
from templar_lib.error_feedback import ErrorFeedback
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_, parameters_of
from templar_lib.roles.spot_checks import Records
from templar_lib.spot_check import ZEROS, Commitment, answer, committed, drawn, state_digest
from templar_lib.state import MomentumLost, MomentumUnrecoverable, StateMissing, StateStore
from templar_lib.strategies import fold_gradient, strategy_of
from templar_lib.wire import Gradient, InvalidFile, gradient_key, keys, parse_header
from templar_lib.wire.keys import miner_state_key
from templar_lib.wire.container import templar_header

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MinerResult:
    window: int
    uid: int
    loss: float  # mean loss of θ_w on the uid's pages
    tokens: int
    bytes: int  # size of the uploaded file
    compression_ratio: float  # dense float32 gradient bytes / uploaded bytes
    pages: list[int]
    key: str
    seconds: float
    momentum: str = "carried"  # where the momentum came from: carried (window − 1), zeros (no state), recomputed
    inner_losses: list[float] = dataclasses.field(default_factory=list)  # each inner step's (demo: the gradient's)
    # the miner's state after it (None: the published file is an earlier run's, whose state this run does not have)
    state: dict[str, torch.Tensor] | None = dataclasses.field(default=None, repr=False)
    state_digest: str | None = None  # of `state`, where the network spot-checks (what the file commits to after)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def window_pages(window: int, uid: int, *, dataset: Dataset, hparams: HParams) -> tuple[list[int], torch.Tensor]:
    """The pages `uid` trains on in `window` and their tokens."""
    pages = dataset.miner_pages(window, uid, hparams.pages_per_window)
    return pages, dataset.tokens(pages)


def compute_gradient(window: int, uid: int, *, model: torch.nn.Module, step: int, feedback: ErrorFeedback,
                     tokens: torch.Tensor, hparams: HParams, model_hash: str | None = None) -> tuple[float, Gradient]:
    """Loss and compressed gradient of θ_w (held by `model`) on `tokens`; folds into `feedback` in place.
    model_hash: θ_w's fingerprint when the caller already has it (one per window, however many uids it mines)."""
    loss, sparse = fold_gradient(model, feedback, tokens, step=step, hparams=hparams)
    parameters = parameters_of(model)
    model_hash = model_hash or model_fingerprint(parameters)
    return loss, Gradient.of(window, uid, sparse, hparams, model_hash, probes=probe_values(parameters, window))


def miner_step(window: int, uid: int, *, model: torch.nn.Module, step: int, state: dict[str, torch.Tensor] | None,
               dataset: Dataset, gradients: Bucket, hparams: HParams, model_hash: str | None = None,
               state_before: str | None = None) -> MinerResult:
    """One window of mining on θ_w (the model's current weights, outer step `step`; model_hash its fingerprint) under
    the hyper-parameters' strategy, from the miner's state after window − 1 (None: zeros); the state after this
    window is in the result (the caller saves it). The model holds θ_w again afterwards. state_before: the digest
    of `state`, where the caller has it (StateStore.load_momentum_with_digest); else it is hashed here."""
    started = time.perf_counter()
    strategy = strategy_of(hparams)
    pages, tokens = window_pages(window, uid, dataset=dataset, hparams=hparams)
    checked = hparams.spot_check_probability > 0
    # before mining: it updates the state's tensors in place
    before = (state_before if state is not None and state_before is not None else state_digest(state)) \
        if checked else None
    mined = strategy.mine(model, state, tokens, step=step)
    parameters = parameters_of(model)
    digests = (before, state_digest(mined.state)) if checked else None
    data = strategy.write_gradient(window, uid, mined.sent, model_hash=model_hash or model_fingerprint(parameters),
                                   probes=tuple(probe_values(parameters, window)), state=digests)
    key, ours = gradient_key(window, uid), data
    data = publish_once(gradients, key, data, max_bytes=hparams.max_gradient_bytes)
    after = mined.state
    if checked and data != ours and (kept := committed(data, window=window, uid=uid, hparams=hparams)) is not None \
            and kept.after != digests[1]:  # the published file commits to an earlier run's state
        log.warning("uid %d: kept an earlier run's file of window %d, whose state after is not this run's: this "
                    "run's state is not saved (the earlier run's, if it saved one, stays)", uid, window)
        after = None
    dense_bytes = sum(p.numel() for p in parameters.values()) * 4
    return MinerResult(window, uid, mined.loss, tokens.numel(), len(data), dense_bytes / len(data), pages, key,
                       time.perf_counter() - started, inner_losses=mined.inner_losses, state=after,
                       state_digest=digests[1] if digests is not None and after is not None else None)


def publish_once(gradients: Bucket, key: str, data: bytes, *, max_bytes: int) -> bytes:
    """Put a window's file unless the bucket already holds this very work: a file of the same kind, window, uid,
    protocol and θ_w, which an earlier attempt put (a run retried after its upload landed). Validators pin the first
    bytes they see, and a re-run's bytes can differ (a GPU's nondeterministic kernels, or code that changed between
    the runs): replaced, the file would be refused as changed after it was scored and the uid banned, so the first
    one stands. Anything else at the key (another network's file, an unreadable one) is replaced. Returns the bytes
    the bucket holds."""
    try:
        published = gradients.get(key, max_bytes=max_bytes)
    except (ObjectMissing, ObjectTooLarge):  # nothing there, or nothing a run of ours wrote: replaced
        published = None
    if published is not None and published != data and _same_work(published, data):
        log.warning("%s: kept the file an earlier run published for this window (this run's bytes differ: a "
                    "validator may have pinned the first ones)", key)
        return published
    gradients.put(key, data)
    return data


def _same_work(first: bytes, second: bytes) -> bool:
    """Whether two gradient files say they are the same uid's work for the same window, protocol and θ_w."""
    try:
        headers = [templar_header(parse_header(data, max_bytes=len(data))[1]) for data in (first, second)]
    except InvalidFile:
        return False
    return all(headers[0].get(field) == headers[1].get(field)
               for field in ("kind", "window", "uid", "hparams_hash", "model_hash"))


def mine_window(window: int, uids: list[int], *, model: torch.nn.Module, step: int, store: StateStore,
                dataset: Dataset, gradients: Bucket, hparams: HParams, model_hash: str | None = None,
                records: Records | None = None) -> list[MinerResult]:
    """miner_step for every uid this node serves, each from its state after window − 1 (zeros if none) in the
    node's StateStore, saving its state after `window`: re-running a window reproduces the same files. records:
    what the validators recorded of window − 1 (roles.spot_checks.validator_records), where the network
    spot-checks: a uid whose last file they did not record starts fresh (`continued`)."""
    results = []
    model_hash = model_hash or model_fingerprint(parameters_of(model))  # θ_w is the same for every uid of this node
    expected = strategy_of(hparams).state_shapes(parameters_of(model))  # what a state that fits holds
    for uid in sorted(uids):
        try:  # the digest it committed to after window − 1, where its state is handed over from memory
            before, digest = store.load_momentum_with_digest(uid, window - 1)
            source = "carried" if before is not None else "zeros"
        except MomentumLost as lost:
            before, digest = recompute_momentum(lost, model=model, store=store, dataset=dataset, hparams=hparams,
                                                gradients=gradients), None
            source = "recomputed" if before is not None else "zeros (lost, not recomputable)"
        before, zeroed = continued(before, uid, window, store=store, gradients=gradients, hparams=hparams,
                                   expected=expected, records=records)
        if zeroed is not None:
            log.warning("uid %d, window %d: %s: starting from zeros", uid, window, zeroed)
            source = f"zeros ({zeroed})"
        result = miner_step(window, uid, model=model, step=step, state=before, dataset=dataset,
                            gradients=gradients, hparams=hparams, model_hash=model_hash, state_before=digest)
        results.append(dataclasses.replace(result, momentum=source, state=None))
        if result.state is not None:  # None: the published file is an earlier run's, whose state stands
            store.save_momentum(uid, window, result.state, digest=result.state_digest)
    return results


def continued(before: dict[str, torch.Tensor] | None, uid: int, window: int, *, store: StateStore, gradients: Bucket,
              hparams: HParams, expected: dict[str, tuple[int, ...]], records: Records | None = None
              ) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The state `uid`'s mining of `window` starts from, given its saved state after window − 1 (`before`), and why
    it is zeros instead (None: it is `before`): a state that does not fit the model (`expected`: the strategy's
    state_shapes), or, where the network spot-checks, one that continues a file of window − 1 that is missing or
    landed after the close (no validator recorded it, so nothing would link to it), or one the validators
    (`records` of window − 1, where given) did not record and will not mend (Records.unrecorded: their watch missed
    a file that landed, its bucket failing them; without a fresh start every later file would score 0 with them)."""
    if before is None:
        return None, None
    if (misfit := state_misfit(before, expected)) is not None:
        return None, (f"a state that does not fit: its state after window {window - 1} is not a {hparams.strategy} "
                      f"miner's of this model ({misfit})")
    if hparams.spot_check_probability <= 0:
        return before, None
    missing = not gradients.exists(gradient_key(window - 1, uid))
    if missing or store.bucket.exists(keys.late_upload(uid).key(window - 1)):
        return None, "its previous file is missing or was late: no validator recorded it"
    if records is not None and records.window == window - 1:  # a bucket failing here fails the run (retried)
        own = _own_commitment(gradients, uid, window - 1, hparams)
        why = "its previous file commits to no state" if own is None else records.unrecorded(uid, own.after)
        if why is not None:
            return None, why
    return before, None


def _started_fresh(gradients: Bucket, uid: int, window: int, hparams: HParams) -> bool:
    """Whether uid's file of `window` committed to no state before it (mining started it fresh), where the network
    spot-checks and the file is there to say."""
    if hparams.spot_check_probability <= 0:
        return False
    try:
        own = _own_commitment(gradients, uid, window, hparams)
    except ObjectMissing:
        return False
    return own is not None and own.before == ZEROS


def _own_commitment(gradients: Bucket, uid: int, window: int, hparams: HParams) -> Commitment | None:
    """What uid's own file of `window` in its bucket commits to (None: it commits to no state, or is not this
    network's file); raises what the bucket raises."""
    return committed(gradients.get(gradient_key(window, uid), max_bytes=hparams.max_gradient_bytes), window=window,
                     uid=uid, hparams=hparams)


def skip_window(window: int, uids: list[int], *, store: StateStore, gradients: Bucket, hparams: HParams,
                planned: bool = True) -> list[int]:
    """A window that closed before the node's run started is not mined: no validator would see its files, so the
    compute is wasted, and a node down D windows would spend D windows' compute before it mined the present one.
    Returns the uids with no file of `window` in the bucket, which the caller does not mine. A uid an earlier attempt
    of the run put a file of is left to the caller to mine again: validators may have seen that file (the file
    stands: publish_once), and the state after it is the one that follows it.

    Where miners are spot-checked, the skipped uids are marked unmined, so no check of that window is answered for
    them (answer_spot_checks: none can be asked, nothing was recorded, and a state put is up to twice the miner's
    state in size); their next window starts from no state either way (`continued`: its previous file is missing).
    Where they are not, each skipped uid's state carries over the window (StateStore.carry_momentum): its state
    after `window` is its state after window − 1, as if the window had not been. Mining it instead would fold in a
    pseudo-gradient nobody applies and then subtract what it "sent" from the error feedback: carrying over loses
    nothing the network received.

    planned False (any other run: the window's live run, a backfill, `dagster job execute`): only the uids whose
    state a planned run carried over this window, and that have no file of it, are returned (nothing is written),
    so that re-running a window reproduces what the node did live."""
    if not planned:
        return [uid for uid in sorted(uids) if store.bucket.exists(keys.carried(uid).key(window))
                and not gradients.exists(gradient_key(window, uid))]
    unmined = [uid for uid in sorted(uids) if not gradients.exists(gradient_key(window, uid))]
    for uid in unmined:
        if hparams.spot_check_probability > 0:
            store.bucket.put(keys.unmined(uid).key(window), b'{"mined": false}')
        else:
            store.carry_momentum(uid, window)
    return unmined


def mark_late(window: int, uids: list[int], *, store: StateStore) -> None:
    """Mark the files of `window` as landed after its close (mine_window then starts the next window from zeros)."""
    for uid in uids:
        store.bucket.put(keys.late_upload(uid).key(window), b'{"late": true}')


def answer_spot_checks(window: int, uids: list[int], *, seed: str | None, store: StateStore, gradients: Bucket,
                       hparams: HParams, late: bool = False, model: torch.nn.Module | None = None,
                       dataset: Dataset | None = None) -> dict[int, list[str]]:
    """Put the states a spot check of `window` asks of the uids this node serves (spot_check.py): their states
    after window − 1 (and after `window`, with a tolerance), from the node's state store; seed: the hash of the
    window's closing block
    (None: not closed yet, nothing to answer). Run during window + 1, before mining it (which updates those states
    in place); `late`: during window + 2 instead, for the uids whose answer is not in the bucket (the node was down
    during window + 1, or its put failed: the validator asks once more before it bans; a bucket that fails then is
    logged, not raised). A state whose background write was lost is computed again where `model` (holding any θ;
    restored after) and `dataset` are given, as mining does; one the store no longer has is logged: the check will
    fail, and ban the uid."""
    put = {}
    if seed is None or hparams.spot_check_probability <= 0:
        return put
    for uid in sorted(uids):
        if not drawn(seed, window, uid, hparams.spot_check_probability):
            continue

        def state_after(of: int) -> dict[str, torch.Tensor] | None:
            try:
                return store.load_momentum(uid, of) if of >= 0 else None
            except MomentumLost as lost:  # a background write a crash lost: the same again, where it can be made
                if model is None or dataset is None:
                    raise
                again = recompute_momentum(lost, model=model, store=store, dataset=dataset, hparams=hparams,
                                           gradients=gradients)
                if again is None:
                    raise
                return again
        if store.bucket.exists(keys.unmined(uid).key(window)):  # no file: no validator recorded one to check
            log.info("uid %d: drawn for window %d, which this node did not mine: nothing to answer", uid, window)
            continue
        try:  # answered in time: the last side an answer puts is there
            if late and gradients.exists(miner_state_key(window, uid, "after" if hparams.spot_check_tolerance > 0
                                                          else "before")):
                continue
            # the state after the window only where the check has a tolerance (spot_check.answer)
            # a file that started fresh has no state before (`continued` zeroed it): none is loaded, or put
            before = None if _started_fresh(gradients, uid, window, hparams) else state_after(window - 1)
            after = state_after(window) if hparams.spot_check_tolerance > 0 else None
            put[uid] = answer(window, uid, seed=seed, before=before, after=after, bucket=gradients, hparams=hparams)
        except (StateMissing, MomentumUnrecoverable) as error:
            log.error("uid %d: drawn for a spot check of window %d, but its state is gone (%s): the check will fail",
                      uid, window, error)
        except BucketError as error:
            if not late:  # in time the run fails and is retried; late, the next window's run tries once more
                raise
            log.error("uid %d: could not answer the spot check of window %d late (%s)", uid, window, error)
    return put


def state_misfit(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]]) -> str | None:
    """Why a saved miner state cannot continue where a state holds `expected` (a strategy's state_shapes for the
    node's model): another strategy's, or another model's (a node whose settings changed under its state store);
    None if it fits."""
    if (extra := sorted(set(state) - set(expected))) or (missing := sorted(set(expected) - set(state))):
        return f"{len(extra)} unexpected tensors, e.g. {extra[:1]}" if extra else f"lacks {missing[:1]}"
    wrong = [key for key, shape in expected.items() if tuple(state[key].shape) != shape]
    return f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}" if wrong else None


def recompute_momentum(lost: MomentumLost, *, model: torch.nn.Module, store: StateStore, dataset: Dataset,
                       hparams: HParams, gradients: Bucket | None = None) -> dict[str, torch.Tensor] | None:
    """The miner state (momentum) a background write lost (state.py, contract point 4), computed again: mine the
    lost window on θ_window and the uid's pages from the state it started from, exactly as that window did (mining
    is deterministic given θ, pages, step and state; `continued`'s rules where `gradients` is given, as mine_window
    applied them), save it synchronously and return it. The model is restored to the θ it held. Falls back to None
    (zeros) only when θ_window is no longer in the store either; the warning says so."""
    uid, window = lost.uid, lost.window
    try:
        state = store.load_model(window)
        if gradients is not None and _started_fresh(gradients, uid, window, hparams):
            before = None  # as mining decided from what it read then (the validators' records, say)
        else:
            before = store.load_momentum(uid, window - 1)
            if gradients is not None:
                before, _ = continued(before, uid, window, store=store, gradients=gradients, hparams=hparams,
                                      expected=strategy_of(hparams).state_shapes(parameters_of(model)))
    except StateMissing as missing:
        log.warning("%s; it cannot be recomputed (%s): uid %d starts again from zero momentum", lost, missing, uid)
        return None
    log.warning("%s; recomputing it from θ_%d and the uid's pages", lost, window)
    current = {name: p.detach().clone() for name, p in parameters_of(model).items()}
    try:
        load_parameters_(model, state.parameters)
        _, tokens = window_pages(window, uid, dataset=dataset, hparams=hparams)
        after = strategy_of(hparams).mine(model, before, tokens, step=state.step).state
    finally:
        load_parameters_(model, current)
    store.save_momentum(uid, window, after, background=False)
    return after
