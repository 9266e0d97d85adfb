"""The validator's watch: first sightings by the chain's block, whatever times a miner's bucket reports."""

import dataclasses
import hashlib
import os
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
