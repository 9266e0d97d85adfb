"""A validator's spot checks (templar_lib/spot_check.py has the protocol): what it records of each window's files,
and the checks of a window it makes once the next one has closed. Both read only the validator's own records: its
evaluation reports, its copies of the files it saw (the watch's state) and the θ it kept (`history`). And what a
miner reads of those records (`Records`): whether the validators recorded its last file, so that what it sends
next links to something."""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import torch

from templar_lib.buckets import Bucket, BucketError, ObjectMissing
from templar_lib.chain import Chain, Metagraph
from templar_lib.commitments import PeerBuckets
from templar_lib.data import Dataset
from templar_lib.hparams import HParams
from templar_lib.spot_check import ZEROS, Commitment, check, committed, drawn, linked
from templar_lib.transport import TransferRefused
from templar_lib.watch import Watch
from templar_lib.wire import EvaluationReport, InvalidFile, evaluation_key, read_evaluation
from templar_lib.wire.documents import MAX_EVALUATION_BYTES
from templar_lib.wire.documents import Recorded
from templar_lib.wire.keys import SEEN

log = logging.getLogger(__name__)
BANNED = "banned until window"  # a banned uid's zero: not scored, and not a miss (its ban is the penalty)
# a check whose miner put no state during the window after: asked again for one more window, not yet a failure
PENDING = "pending: "


def kept_windows(keep: int, hparams: HParams) -> int:
    """The windows of θ a node's state store keeps, `keep` asked: where the network spot-checks, at least
    sync_max_lag + 3, since a check made again a window late (PENDING) replays a file of window − 2 on the θ it names,
    up to sync_max_lag windows before (with fewer, the check could not be made and a cheat that did not answer in
    time would go unbanned)."""
    return keep if hparams.spot_check_probability <= 0 else max(keep, hparams.sync_max_lag + 3)


def is_failure(why: str) -> bool:
    """Whether a report's `checks` entry bans its uid: a reason that is not a pending check's ("" passed)."""
    return bool(why) and not why.startswith(PENDING)


def pending_checks(report: EvaluationReport | None) -> set[int]:
    """The uids whose spot check `report` left pending (no state put yet), to be made again a window later."""
    return set() if report is None else {uid for uid, why in report.checks.items() if why.startswith(PENDING)}


def own_report(bucket: Bucket, window: int, validator: int) -> EvaluationReport | None:
    """This validator's evaluation report of `window` (None: it has none, or none it can read)."""
    if window < 0:
        return None
    try:
        return read_evaluation(bucket.get(evaluation_key(window, validator)), window=window, validator=validator)
    except (ObjectMissing, InvalidFile) as error:
        log.info("no evaluation report of window %d to read (%s)", window, error)
        return None


@dataclass(frozen=True)
class Records:
    """What the validators recorded of one window's files, as a miner reads them before it mines the next window
    and a validator that missed a file mends it from them: each permit holder's evaluation report of `window` (None:
    none read in time) and its stake."""

    window: int
    reports: Mapping[int, EvaluationReport | None]
    stakes: Mapping[int, float]  # every validator-permit holder's
    seed: str | None = None  # the hash of `window`'s closing block (None: not known), which drew its checks

    def _weights(self) -> dict[int, float]:
        """Each validator's weight: its stake, every permit holder's and every reporter's (no stake anywhere, a
        local network's validators: one each)."""
        weight = {v: max(0.0, self.stakes.get(v, 0.0)) for v in set(self.stakes) | set(self.reports)}
        return weight if sum(weight.values()) else dict.fromkeys(weight, 1.0)

    def mendable(self, uid: int, probability: float) -> Recorded | None:
        """The record of `uid`'s file of `window` that a validator whose watch missed that file links the uid's next
        file to (record_commitments' `mend`): the state after and hotkey that validators holding at least half of all
        validators' stake recorded, the one such record, counting only reports that hold the uid in good standing (not
        banned, no check of it failed or pending: the others' ban keeps the validator that missed the file from mending
        it; a report not read counts as not recording it), where the draw (`seed`, `probability`) did not pick the file.
        A drawn one is not: its check, which the validator that missed it cannot make, may yet fail. Safe otherwise: the
        state was committed to before θ_{window+1} existed, by a file exposed to the same draw as every recorded one, so
        it is no more made up than the others' own links; only validators holding half the stake, who decide consensus
        anyway, could agree on a record made up."""
        if self.seed is None or drawn(self.seed, self.window, uid, probability):
            return None
        weight = self._weights()
        held: dict[tuple[str, str], float] = {}  # (state after, hotkey) -> the stake that recorded it
        records: dict[tuple[str, str], Recorded] = {}
        for validator, report in sorted(self.reports.items()):
            if report is not None and uid in report.commitments and _in_good_standing(report, uid):
                record = report.commitments[uid]
                key = (record.after, record.hotkey)
                held[key] = held.get(key, 0.0) + weight[validator]
                records.setdefault(key, record)
        agreed = [key for key, stake in held.items() if stake >= 0.5 * sum(weight.values())]
        return records[agreed[0]] if len(agreed) == 1 else None

    def unrecorded(self, uid: int, after: str) -> str | None:
        """Why `uid`, whose file of `window` committed to the state `after`, must start its next window fresh
        (None: it carries its state on). A validator that recorded files of `window` but not this one with that
        state (its watch never saw it, its copy is another file, or it did not link) links nothing the uid sends on
        from that state: every later file would score 0 there until the uid starts fresh, which always links
        (record_commitments). Let s be the share of all validators' stake such validators hold. s ≥ 1/2: fresh
        now. 0 < s < 1/2: fresh in the first window w + 1 ≡ −uid (mod P(s)), P(s) = 2^⌈log₂(MINORITY_RESET_WINDOWS
        / s)⌉ (`reset_period`). So a miss is mended within P(s) < 2·MINORITY_RESET_WINDOWS / s windows (the pay
        lost meanwhile, s a window, is under 2·MINORITY_RESET_WINDOWS windows' worth), and validators holding a
        share S, however they miss, can make the uid give up its state at most once every P(S) ≥
        MINORITY_RESET_WINDOWS / S windows (the periods are powers of two: a smaller share's reset windows are
        among a larger one's). A validator whose report was not read in time, or that recorded nothing (checks
        off; no records of its own, when it links anything), counts as having recorded it: one slow to publish
        cannot make the uid give up its state. A minority's miss is mostly mended by those validators themselves
        (`mendable`), within a window or two; the schedule is the net under it, whatever a miner predicts of their
        mend (its reads of the reports may differ from theirs), so that the bound holds: a reset it makes needlessly
        comes with probability ≈ (windows until the mend) / P(s)."""
        weight = self._weights()
        missed = [v for v, report in sorted(self.reports.items()) if report is not None and report.commitments
                  and (uid not in report.commitments or report.commitments[uid].after != after)]
        share = sum(weight[v] for v in missed) / sum(weight.values()) if weight else 0.0
        why = (f"validators {missed} ({share:.0%} of the stake) did not record its file of window {self.window}: "
               f"nothing it sends on from that state would link there")
        if share >= 0.5:
            return why
        if share >= MIN_RESET_SHARE and (self.window + 1 + uid) % (period := reset_period(share)) == 0:
            return f"{why} (a minority's miss, mended in every {period}th window)"
        return None


def _in_good_standing(report: EvaluationReport, uid: int) -> bool:
    """Whether `report` holds `uid` in good standing: not banned there, no spot check of it failed or pending."""
    score = report.scores.get(uid)
    return not report.checks.get(uid) and not (score is not None and score.reason.startswith((BANNED, "spot check")))


# a coalition of validators holding a share S of the stake can make a miner start fresh, by missing its files, at
# most once every MINORITY_RESET_WINDOWS / S windows; a miss by a share s is mended within 2 · it / s windows. At
# least what one fresh start costs a miner (≈ 20-25 windows of its pay: bench/RESULTS.md "What one fresh start
# costs"), so that a coalition's resets cost a miner no more than the coalition's share of its pay
MINORITY_RESET_WINDOWS = 32.0


MIN_RESET_SHARE = 1e-12  # below it a miss is not mended (R / s would overflow a float; 5e-17 is one rao's share)


def reset_period(share: float) -> int:
    """P(s) = 2^⌈log₂(MINORITY_RESET_WINDOWS / s)⌉ for MIN_RESET_SHARE ≤ s < 1/2 (Records.unrecorded): the spacing
    of the windows in which a miss by validators holding the share s of the stake makes a miner start fresh."""
    return 1 << max(0, math.ceil(math.log2(MINORITY_RESET_WINDOWS / share)))


# how long a miner node's reads of the validators' reports (all at once) may take before it mines: the deadline of
# every read from a committed bucket (its guard cuts it; a retry's back-off and the parsing come on top)
REPORTS_SECONDS = 10.0
READERS = 64  # reads at once: a subnet's validator permits (bittensor's max_allowed_validators, 64 by default)


def validator_records(window: int, *, metagraph: Metagraph, peers: PeerBuckets, shared: Bucket | None = None,
                      seconds: float = REPORTS_SECONDS) -> Records:
    """Every validator's report of `window` from the bucket it commits, read side by side within `seconds` (each
    bounded like any stranger's file; None where it has none, or none that reads in time), with every validator's
    stake: what a miner node checks its last file against (Records). shared: where a validator that commits no
    bucket writes (a local network's validators write to the bucket its miners share); elsewhere it holds no
    report of theirs, so such a validator counts as having recorded everything."""
    deadline = time.monotonic() + seconds

    def read(validator: int) -> EvaluationReport | None:
        bucket = peers.buckets.get(validator, shared)
        if bucket is None:
            return None
        try:
            data = bucket.get(evaluation_key(window, validator), max_bytes=MAX_EVALUATION_BYTES, deadline=deadline)
            return read_evaluation(data, window=window, validator=validator)
        except (BucketError, InvalidFile, TransferRefused) as error:
            log.info("validator %d: no report of window %d read (%s)", validator, window, error)
            return None

    stakes = {n.uid: n.stake for n in metagraph.neurons if n.validator_permit}
    # the most staked first: where there are more permit holders than threads, those that decide are read first
    validators = sorted(metagraph.validators, key=lambda v: (-stakes.get(v, 0.0), v))
    with ThreadPoolExecutor(max_workers=max(1, min(READERS, len(validators)))) as pool:
        reports = dict(zip(validators, pool.map(read, validators)))
    return Records(window, reports, stakes)


def record_commitments(window: int, *, watch: Watch, uids: Iterable[int], hparams: HParams,
                       previous: Mapping[int, Recorded] | None, hotkeys: Mapping[int, str],
                       lags_of: Callable[[Mapping[int, Commitment]], Mapping[int, int | str]],
                       mend: Callable[[int], Recorded | None] | None = None,
                       files: Mapping[int, Commitment] | None = None) -> tuple[dict[int, Recorded], dict[int, str]]:
    """What `window`'s files commit to, as the report records it (uid -> Recorded), for every file seen (`uids`:
    sampled for scoring or not, banned or not) whose header commits to a state, names a θ the validator has
    (`lags_of`: steps behind θ_window, or why not) and links (spot_check.linked) to `previous`
    (the commitments the report of window − 1 recorded, {} in window 0); and why each other file with a commitment
    is not paid (the caller zeroes the ones it scores). Without a report of window − 1 (the validator was down),
    its own copies of that window's files stand in; without those either, a file that does not start fresh is
    recorded (so its miner can go on) but not paid this window: nothing can tell whether its state was made up,
    unless validators holding half the stake agree on another record of the uid's last file (`mend`): then it is
    refused.
    mend(uid): the record of the uid's file of window − 1 that the other validators agreed on, for a file that does
    not start fresh where this validator recorded nothing of the uid in window − 1 (its watch missed the uid's last
    file, or it has no records), asked only then (Records.mendable: validators holding half the stake recorded it in
    good standing and the draw did not pick it); a file that links to it is recorded and paid as if this validator
    had recorded it: without it, every later file of the uid would score 0 here until the uid started fresh. Not
    where this validator recorded another state after for the uid: a miner that showed validators different files
    would otherwise move a minority onto a state only the others could check. Nothing is recorded where the
    network does not spot-check. files: file_commitments of `uids`, where the caller has them."""
    if hparams.spot_check_probability <= 0:
        return {}, {}
    if previous is None and watch.state.exists(SEEN.key(window - 1)):  # its own copies of window − 1 stand in
        previous = {uid: Recorded(c.before, c.after, 0, hotkeys.get(uid, ""))
                    for uid, c in file_commitments(watch.at(window - 1), hparams=hparams).items()}
    files = file_commitments(watch, hparams=hparams, uids=uids) if files is None else files
    lags, recorded, reasons = lags_of(files), {}, {}
    for uid, commitment in files.items():
        own = previous is not None and linked(commitment, previous, uid, hotkeys.get(uid))
        agreed = mend(uid) if not own and mend is not None and _missed(uid, commitment, previous) else None
        if agreed is not None and linked(commitment, {uid: agreed}, uid, hotkeys.get(uid)):
            log.info("uid %d: its file of window %d links to the record the validators holding half the stake made "
                     "of its last file (this validator had none)", uid, window)
        elif not own and (previous is not None or agreed is not None):
            # with no records of its own, a state other than the one the others agree on is not taken on trust
            reasons[uid] = (f"state: it continues a state no file of window {window - 1} this validator saw "
                            f"committed to (a fresh start or its last file's state after)" if previous is not None
                            else f"state: it continues another state than the one validators holding half the "
                                 f"stake recorded of its file of window {window - 1}")
            continue
        elif previous is None and commitment.before != ZEROS:
            reasons[uid] = f"state: this validator has no record of window {window - 1} to link it to"
        if isinstance(lags.get(uid), int):
            recorded[uid] = Recorded(commitment.before, commitment.after, lags[uid], hotkeys.get(uid, ""))
    return recorded, reasons


_REFUSED = Recorded(ZEROS, "", 0, "")  # a record no file links to (a state after is 64 hex digits)


def _missed(uid: int, commitment: Commitment, previous: Mapping[int, Recorded] | None) -> bool:
    """Whether a file that does not start fresh finds no record of its uid at all in `previous` (this validator's
    records of the window before; None: it has none): a miss, which the others' records may mend. A record of its
    own that does not link is no miss: the miner showed this validator another file."""
    return commitment.before != ZEROS and (previous is None or uid not in previous)


# how long a validator waits for the others' reports past its spot checks, which they are read beside, before it
# records the window without mending (a miner can make it read them every window; an endpoint can take the deadline)
MEND_WAIT_SECONDS = 2.0


def mender(window: int, *, files: Mapping[int, Commitment], previous: EvaluationReport | None,
           others: Callable[[int], Records] | None, chain: Chain, hparams: HParams,
           published: Callable[[], EvaluationReport | None] = lambda: None
           ) -> Callable[[int], Recorded | None] | None:
    """record_commitments' `mend` for a validator's evaluation of `window`, or None where nothing needs one: some
    file of `files` that does not start fresh and whose uid its own report of window − 1 (`previous`) does not
    record. others(window − 1) (the validators' reports) is then read at once on a daemon thread, beside the spot
    checks, and waited for at most MEND_WAIT_SECONDS when first asked; not ready, or failing in any way, nothing is
    mended this window (logged; the miner's schedule is the net), and an unfinished read holds up neither the
    evaluation nor its process's exit. The draw it excludes is window − 1's closing hash. published(): this
    validator's own report of `window` where an earlier run wrote one: a re-run takes the decisions it made instead
    (linked to the record, recorded unpaid, or refused: so it gives the same bytes, whatever the reads give now)."""
    recorded = None if previous is None else previous.commitments
    if others is None or window <= 0 or hparams.spot_check_probability <= 0 or not any(
            _missed(uid, commitment, recorded) for uid, commitment in files.items()):
        return None
    if (done := published()) is not None:
        def again(uid: int) -> Recorded | None:  # the earlier run's decision: the record it linked the file to
            # (recorded, not unpaid for its state), none (recorded unpaid) or one it does not link to (refused)
            record, score = done.commitments.get(uid), done.scores.get(uid)
            if record is None:
                return _REFUSED
            unpaid = score is not None and score.reason.startswith("state:")
            return None if unpaid else Recorded(ZEROS, record.before, 0, record.hotkey)
        return again
    seed = chain.block_hash(window * hparams.blocks_per_window)
    future: Future[Records] = Future()

    def read() -> None:
        try:
            future.set_result(others(window - 1))
        except BaseException as error:  # handed to the evaluation, which decides what it means
            future.set_exception(error)
    threading.Thread(target=read, name=f"validator-reports-{window - 1}", daemon=True).start()

    @functools.cache
    def records() -> Records | None:
        try:
            return dataclasses.replace(future.result(timeout=MEND_WAIT_SECONDS), seed=seed)
        except MemoryError:
            raise
        except FutureTimeout:
            log.warning("the validators' reports of window %d not read within %g s of asking: nothing mended",
                        window - 1, MEND_WAIT_SECONDS)
        except Exception:  # noqa: BLE001 - a mend is optional: whatever a chain or a bucket raises, none is made
            log.warning("the validators' reports of window %d not read: nothing mended", window - 1, exc_info=True)
        return None

    def mend(uid: int) -> Recorded | None:
        return None if (read := records()) is None else read.mendable(uid, hparams.spot_check_probability)
    return mend


def file_commitments(watch: Watch, *, hparams: HParams, uids: Iterable[int] | None = None
                     ) -> dict[int, Commitment]:
    """What the files a watch saw (the validator's own copies; of `uids`, or every uid seen) commit to, for those
    that commit to a state; a copy the validator lost commits to nothing here."""
    files = {}
    for uid in sorted(watch.sightings() if uids is None else uids):
        try:
            commitment = committed(watch.read(uid), window=watch.window, uid=uid, hparams=hparams)
        except InvalidFile:
            continue
        if commitment is not None:
            files[uid] = commitment
    return files


def spot_check_window(report: EvaluationReport | None, *, chain: Chain, hotkeys: Mapping[int, str],
                      model: torch.nn.Module, dataset: Dataset, watch: Watch, own_bucket: Bucket, hparams: HParams,
                      history: Callable[[int], Mapping[str, torch.Tensor] | None],
                      again: Collection[int] | None = None) -> dict[int, str]:
    """The spot checks of the window of `report` (this validator's report of it; None: it has none), made once the
    next window has closed (the drawn miners put their states during it): uid -> "" when the replay gave its file,
    else why not. Drawn among the files the report recorded (record_commitments) whose uid still has the hotkey
    (`hotkeys`: the metagraph now), each replayed on the θ it names (θ_window, or up to sync_max_lag steps before:
    `history`, at that window's outer step). A state not put, or a bucket that does not give it, leaves the check
    PENDING: the miner's node may have been down, and it is asked again a window later (`again`: the uids to check
    again, a window after their first check), when the same is a failure. A check the validator cannot make for want
    of its own records is logged and skipped."""
    if hparams.spot_check_probability <= 0 or report is None:
        return {}
    window = report.window
    seed = chain.block_hash((window + 1) * hparams.blocks_per_window)
    if seed is None:
        return {}
    files, results = watch.at(window), {}
    for uid, (_, _, lag, hotkey) in sorted(report.commitments.items()):
        if not drawn(seed, window, uid, hparams.spot_check_probability) or (again is not None and uid not in again):
            continue
        if hotkeys.get(uid) != hotkey:  # registered anew since: the file was someone else's
            log.info("uid %d: no spot check of window %d, its hotkey changed since", uid, window)
            continue
        trained_on = report if lag == 0 else own_report(own_bucket, window - lag, chain.uid)
        theta = history(window - lag)
        bucket = watch.peers.buckets.get(uid)
        try:
            scored = files.read(uid)
        except (KeyError, InvalidFile) as error:
            scored = None
            log.warning("uid %d: no spot check of window %d, the validator lost its copy (%s)", uid, window, error)
        if trained_on is None or theta is None or scored is None:
            log.warning("uid %d: no spot check of window %d%s, the validator lacks θ_%d or its records", uid, window,
                        " (made again: the pending check is dropped)" if again else "", window - lag)
            continue
        tokens = dataset.tokens(dataset.miner_pages(window, uid, hparams.pages_per_window))
        try:
            if bucket is None:
                raise ObjectMissing(f"no bucket: {watch.peers.reason(uid)}")
            results[uid] = check(window, uid, hparams=hparams, model=model, theta=theta, step=trained_on.step,
                                 tokens=tokens, scored=scored,
                                 fetch=lambda key, limit: bucket.get(key, max_bytes=limit)) or ""
        except (ObjectMissing, BucketError) as error:  # nothing put, or a bucket that did not give it
            got = f"{type(error).__name__}: {error}"
            results[uid] = (f"{PENDING}no state put for window {window} ({got}): asked again during window "
                            f"{window + 2}") if again is None else (
                f"no state put for window {window} during windows {window + 1} and {window + 2} ({got})")
        except InvalidFile as error:
            results[uid] = f"{type(error).__name__}: {error}"
        log.info("uid %d: spot check of window %d%s %s", uid, window, " (again)" if again else "",
                 results[uid] or "passed")
    return results
