"""The validator's watch: first sightings by the chain's block, whatever times a miner's bucket reports."""

import dataclasses
import functools
import hashlib
import json
import os
import threading
import time

import pytest
import torch

from templar_lib.buckets import LocalBucket
from templar_lib.commitments import PeerBuckets
from templar_lib.compression import encode
from templar_lib.watch import Watch
from templar_lib.wire import Gradient, InvalidFile, gradient_key, write_gradient
from tests.s3 import S3_SERVERS

WINDOW, BPW = 3, 7  # window 3 is blocks 21..27


def gradient_bytes(uid: int, seed: int = 0) -> bytes:
    generator = torch.Generator().manual_seed(seed * 100 + uid)
    tensors = {"w": encode(torch.randn(64, 128, generator=generator), 32, 64)}
    return write_gradient(Gradient(WINDOW, uid, tensors, "h"))


@pytest.fixture(params=["local", *S3_SERVERS])
def miner_bucket(request, tmp_path):
    if request.param == "local":
        return LocalBucket(tmp_path / "miner")
    return request.getfixturevalue("new_s3_bucket")(request.param)


def watch_of(tmp_path, bucket, uids=(1, 2)) -> Watch:
    return Watch(WINDOW, blocks_per_window=BPW, state=LocalBucket(tmp_path / "validator"),
                 peers=PeerBuckets.of({uid: bucket for uid in uids}), uids=uids, max_bytes=1 << 20)


def test_first_sight_is_the_block_of_the_poll_that_saw_it(tmp_path, miner_bucket):
    watch = watch_of(tmp_path, miner_bucket)
    watch.poll(21)
    assert watch.sightings() == {} and watch.reasons()[1].startswith("missing")
    first = gradient_bytes(1)
    miner_bucket.put(gradient_key(WINDOW, 1), first)
    watch.poll(22)
    miner_bucket.put(gradient_key(WINDOW, 2), gradient_bytes(2))
    watch.poll(24)
    watch.poll(25)  # nothing changed: the first sight stands
    seen = watch.sightings()
    assert (seen[1].block, seen[2].block) == (22, 24)
    assert seen[1].sha256 == hashlib.sha256(first).hexdigest() and watch.read(1) == first


def test_a_new_content_is_a_new_sighting_and_the_newest_before_the_close_counts(tmp_path):
    bucket = LocalBucket(tmp_path / "miner")
    watch = watch_of(tmp_path, bucket, uids=(1,))
    bucket.put(gradient_key(WINDOW, 1), gradient_bytes(1, seed=0))
    watch.poll(21)
    second = gradient_bytes(1, seed=1)
    bucket.put(gradient_key(WINDOW, 1), second)
    watch.poll(23)
    assert watch.sightings()[1].block == 23 and watch.read(1) == second
    bucket.put(gradient_key(WINDOW, 1), gradient_bytes(1, seed=2))  # a swap after the last look before the close
    assert watch.poll(28) == 0 and watch.read(1) == second  # the window has closed: nothing more is recorded


def test_a_same_size_change_within_the_second_is_a_new_sighting(tmp_path, miner_bucket):
    """S3 LastModified has whole seconds: the watch tells the two writes apart by the bucket's ETag."""
    watch = watch_of(tmp_path, miner_bucket, uids=(1,))
    first = gradient_bytes(1, seed=0)
    second = next(data for data in map(lambda seed: gradient_bytes(1, seed), range(1, 50)) if len(data) == len(first))
    time.sleep(1 - time.time() % 1)  # at the start of a second: both uploads and the poll between fit in it
    miner_bucket.put(gradient_key(WINDOW, 1), first)
    watch.poll(21)
    miner_bucket.put(gradient_key(WINDOW, 1), second)  # same size, within the second of the first upload
    if not isinstance(miner_bucket, LocalBucket) and (  # a local file's time has nanoseconds: never the same
            miner_bucket.stat(gradient_key(WINDOW, 1)).modified.isoformat()
            != watch.sightings()[1].modified.split(" ")[0]):
        pytest.skip("the two uploads fell in different seconds (a slow machine): not the case under test")
    watch.poll(23)
    assert watch.sightings()[1].block == 23 and watch.read(1) == second


def test_backdating_the_file_changes_nothing(tmp_path):
    bucket = LocalBucket(tmp_path / "miner")
    watch = watch_of(tmp_path, bucket, uids=(1,))
    bucket.put(gradient_key(WINDOW, 1), gradient_bytes(1))
    os.utime(bucket.local_path(gradient_key(WINDOW, 1)), (1_000_000, 1_000_000))  # "uploaded in 1970"
    watch.poll(26)
    assert watch.sightings()[1].block == 26


def test_uploads_after_the_close_are_never_seen_and_sightings_survive_the_process(tmp_path):
    bucket = LocalBucket(tmp_path / "miner")
    watch = watch_of(tmp_path, bucket)
    bucket.put(gradient_key(WINDOW, 1), gradient_bytes(1))
    watch.poll(27)
    bucket.put(gradient_key(WINDOW, 2), gradient_bytes(2))
    watch.poll(28)
    again = watch_of(tmp_path, bucket)  # the validator's scoring run, in another process
    assert list(again.sightings()) == [1] and again.reasons()[2].startswith("missing")
    (tmp_path / "validator" / "seen-3-1.safetensors").write_bytes(b"tampered")
    with pytest.raises(InvalidFile, match="does not hash"):
        again.read(1)


def test_a_window_no_poll_looked_at_while_it_was_open_is_not_watched(tmp_path):
    """The validator was down: polls before the window opened or after it closed record nothing, and the window
    stays unwatched (the validator then scores nobody there); one poll in the window, even one that found nothing,
    makes it watched, for any process that opens the watch later. Its report says so and reads back; a report
    that says so while scoring or recording anything is refused."""
    from templar_lib.scoring import zero_score
    from templar_lib.wire import EvaluationReport, read_evaluation, write_evaluation
    from templar_lib.wire.documents import Recorded

    bucket = LocalBucket(tmp_path / "miner")
    bucket.put(gradient_key(WINDOW, 1), gradient_bytes(1))
    watch = watch_of(tmp_path, bucket)
    for block in (20, 28, 40):
        watch.poll(block)
    assert not watch.watched and not watch_of(tmp_path, bucket).watched and watch.sightings() == {}
    bucket.delete(gradient_key(WINDOW, 1))
    watch.poll(27)
    assert watch.watched and watch_of(tmp_path, bucket).watched and watch.sightings() == {}
    unwatched = EvaluationReport(WINDOW, 0, 3, 7.5, peers=[], scores={}, checks={2: ""}, watched=False)
    data = write_evaluation(unwatched)
    assert read_evaluation(data, window=WINDOW, validator=0) == unwatched
    assert b"watched" not in write_evaluation(EvaluationReport(WINDOW, 0, 3, 7.5, [], {}))  # bytes kept otherwise
    for scored in ({"scores": {1: zero_score(1, "missing")}}, {"peers": [1]},
                   {"commitments": {1: Recorded("a" * 64, "b" * 64, 0, "")}}):
        with pytest.raises(InvalidFile, match="watched"):
            read_evaluation(write_evaluation(dataclasses.replace(unwatched, **scored)), window=WINDOW, validator=0)


def test_a_watch_is_closed_only_where_the_process_that_polled_saw_the_close(tmp_path):
    """A watch that polled and then saw the chain reach the close is `closed` (a uid it saw nothing of is then
    "missing"); one whose process died after its last poll, and a process that opens it only after the close and
    polls nothing, leave it open (the uids it saw nothing of are not judged). A retry that polls again before the
    close closes it: a file that landed while the first process was down is seen by that poll. A record written
    before the field existed counts as closed, as it was judged then."""
    bucket = LocalBucket(tmp_path / "miner")
    watch = watch_of(tmp_path, bucket)
    watch.poll(22)
    bucket.put(gradient_key(WINDOW, 1), gradient_bytes(1))  # after the last poll of a process that died here
    after = watch_of(tmp_path, bucket)  # the validator came back after the close
    assert not after.saw_close(28) and not watch_of(tmp_path, bucket).closed and after.watched
    assert after.reasons() == {1: f"missing: no {gradient_key(WINDOW, 1)}", 2: f"missing: no {gradient_key(WINDOW, 2)}"}
    assert not watch.saw_close(27 - 1)  # not yet closed: the block before the close
    started = time.monotonic()
    assert not after.wait_closed(0.3) and time.monotonic() - started >= 0.3  # its last poll may still be running
    record = tmp_path / "validator" / "seen-3.json"
    os.utime(record, (time.time() - 60, time.time() - 60))  # written a minute ago: nobody is polling it any more
    started = time.monotonic()
    assert not after.wait_closed(30) and time.monotonic() - started < 1
    retried, evaluation = watch_of(tmp_path, bucket), watch_of(tmp_path, bucket)
    retried.poll(26)
    assert not evaluation.closed and evaluation.sightings() == {}  # opened by the evaluation before the close
    closing = threading.Timer(0.3, retried.saw_close, args=(28,))  # the watch's run, still in its last poll
    closing.start()
    assert evaluation.wait_closed(10) and list(evaluation.sightings()) == [1]  # what that poll saw, too
    closing.join()
    assert retried.closed and watch_of(tmp_path, bucket).closed and list(retried.sightings()) == [1]
    record = json.loads((tmp_path / "validator" / "seen-3.json").read_text())
    assert "closed" not in record  # written only while open: a closed record has the bytes it had before the field
    record["closed"] = False
    (tmp_path / "validator" / "seen-3.json").write_text(json.dumps(record))
    assert not watch_of(tmp_path, bucket).closed


def test_a_validator_whose_watch_stopped_before_the_close_judges_only_the_uids_it_saw(dataset, tmp_path):
    """The validator's process died after its watch's last poll of window 0 and came back after the close: uid 1,
    seen, is scored; uid 2, whose file landed after that poll, and uid 3, who never uploaded, are not judged (no
    score, their ratings stand). A validator whose watch looked until the close scores both "missing"."""
    from templar_lib.chain import LocalChain
    from templar_lib.checkpoints import ModelState
    from templar_lib.data import Dataset
    from templar_lib.hparams import HParams
    from templar_lib.model import build_model
    from templar_lib.ratings import Ratings
    from templar_lib.roles.miner import mine_window
    from templar_lib.roles.validator import evaluate_window, rate_window
    from templar_lib.state import StateStore
    from tests.conftest import FAST_HPARAMS

    data, hparams = Dataset.open(dataset), HParams.load(FAST_HPARAMS)
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    bpw = hparams.blocks_per_window
    chain = LocalChain(tmp_path / "chain.sqlite", blocks_per_window=bpw)
    validator = chain.register(hotkey="v", stake=100.0, validator_permit=True)
    miners = [chain.register(hotkey=f"miner-{i}") for i in range(3)]
    gradients, store = LocalBucket(tmp_path / "gradients"), StateStore(tmp_path / "miner-state")
    watches = {name: Watch(0, blocks_per_window=bpw, state=LocalBucket(tmp_path / name),
                           peers=PeerBuckets.of({uid: gradients for uid in miners}), uids=miners,
                           max_bytes=hparams.max_gradient_bytes) for name in ("died", "stayed")}
    mine = functools.partial(mine_window, 0, model=model, step=0, store=store, dataset=data, gradients=gradients,
                             hparams=hparams)
    mine(miners[:1])
    for watch in watches.values():
        watch.poll(1)
    mine(miners[1:2])  # after the last poll of the validator that died
    watches["stayed"].poll(bpw - 1)
    chain.advance(bpw)
    assert watches["stayed"].saw_close(chain.block())
    state = ModelState(0, 0, {n: p.detach().clone() for n, p in model.named_parameters()})
    results = {}
    for name in watches:  # each evaluates in another process, as the evaluations asset does
        watch = Watch(0, blocks_per_window=bpw, state=LocalBucket(tmp_path / name),
                      peers=PeerBuckets.of({uid: gradients for uid in miners}), uids=miners,
                      max_bytes=hparams.max_gradient_bytes)
        results[name] = evaluate_window(0, chain=chain.as_uid(validator), model=model, state=state, dataset=data,
                                        watch=watch, own_bucket=LocalBucket(tmp_path / f"{name}-reports"),
                                        hparams=hparams)
    died, stayed = results["died"], results["stayed"]
    assert sorted(died.scores) == miners[:1] and not died.scores[miners[0]].reason and died.unjudged == miners[1:]
    assert sorted(stayed.scores) == miners and stayed.unjudged == []
    assert not stayed.scores[miners[1]].reason and stayed.scores[miners[2]].reason.startswith("missing")
    hotkeys = {uid: f"miner-{i}" for i, uid in enumerate(miners)}
    rated, _ = rate_window(died.report, Ratings(), hotkeys, hparams)
    assert sorted(rated.by_uid) == miners[:1]  # nothing about the unjudged changes
    missed, _ = rate_window(stayed.report, Ratings(), hotkeys, hparams)
    assert missed.by_uid[miners[2]].recent.endswith("1")


def test_a_look_that_outlives_its_poll_never_leaves_a_copy_the_record_does_not_hold(tmp_path):
    """A poll's worker may still be at work when the poll's deadline passes. One already writing its copy of a new
    content finishes, and the poll records that content (at its block); one that has not started writing by then
    writes nothing. Either way the record and the copy the evaluation reads agree (before, a copy written after the
    deadline replaced the copy of the content the record held: that uid's file "does not hash", scored 0)."""
    bucket = LocalBucket(tmp_path / "miner")
    watch = watch_of(tmp_path, bucket, uids=(1,))
    watch.poll_timeout = 0.3
    first, second, third = (gradient_bytes(1, seed=seed) for seed in range(3))
    bucket.put(gradient_key(WINDOW, 1), first)
    watch.poll(21)
    real_put, real_get = watch.state.put, bucket.get

    def slow_copy(key, data):  # the validator's disk is slow: the copy lands after the poll's deadline
        if key.endswith(".safetensors"):
            time.sleep(1.0)
        real_put(key, data)

    bucket.put(gradient_key(WINDOW, 1), second)
    watch.state.put = slow_copy
    watch.poll(23)
    watch.state.put = real_put
    assert watch.sightings()[1].block == 23 and watch.read(1) == second

    def slow_download(key, **kwargs):  # the worker has the bytes only after the deadline, before any copy is written
        data = real_get(key, **kwargs)
        bucket.get = real_get
        time.sleep(1.0)
        return data

    bucket.put(gradient_key(WINDOW, 1), third)
    bucket.get = slow_download
    watch.poll(24)
    assert watch.sightings()[1].block == 23 and watch.read(1) == second
    # the next poll starts at once and is still writing its own copy when poll 24's worker wakes: that one writes
    # nothing (its poll is over), so the newest content's copy stands
    fourth = gradient_bytes(1, seed=3)
    bucket.put(gradient_key(WINDOW, 1), fourth)
    watch.poll_timeout, watch.state.put = 5.0, slow_copy
    watch.poll(25)
    watch.state.put = real_put
    time.sleep(0.5)  # poll 24's worker is done by now
    assert watch.sightings()[1].block == 25 and watch.read(1) == fourth
    assert watch.reasons() == {}
