"""gather(): valid, missing, oversized, corrupt, late, slow and uncommitted peers, on local buckets and on each S3
server (moto, SeaweedFS)."""

import json

import pytest
import torch

from templar_lib.buckets import BucketAccessDenied, LocalBucket, ObjectMissing, S3Bucket
from templar_lib.compression import encode
from templar_lib.commitments import BucketCommitment, PeerBuckets, parse_commitment, peer_buckets
from templar_lib.gather import fetch_peers, gather, publish_peers
from templar_lib.hparams import HParams
from templar_lib.wire import Gradient, InvalidFile, Peers, gradient_key, peers_key, write_gradient
from tests.s3 import S3_SERVERS, FaultProxy

SHAPES = {"w": (64, 128), "b": (60,)}
HPARAMS = HParams(max_gradient_bytes=64 * 1024)
WINDOW = 4


def gradient_bytes(uid: int, window: int = WINDOW, scale: float = 1.0) -> bytes:
    generator = torch.Generator().manual_seed(uid)
    tensors = {n: encode(torch.randn(s, generator=generator) * scale, 32, 64) for n, s in SHAPES.items()}
    return write_gradient(Gradient(window, uid, tensors, HPARAMS.protocol_hash(), format=1, values="float32"))


@pytest.fixture(params=["local", *S3_SERVERS])
def make_bucket(request, tmp_path):
    if request.param == "local":
        return lambda uid: LocalBucket(tmp_path / f"uid{uid}")
    shared = request.getfixturevalue("new_s3_bucket")(request.param)
    return lambda uid: shared  # all peers in one S3 bucket: keys differ by uid


def test_gather_sorts_valid_from_skipped_with_reasons(make_bucket):
    buckets = {uid: make_bucket(uid) for uid in range(6)}
    buckets[0].put(gradient_key(WINDOW, 0), gradient_bytes(0))
    buckets[1].put(gradient_key(WINDOW, 1), gradient_bytes(1))
    # uid 2 uploads nothing
    buckets[3].put(gradient_key(WINDOW, 3), b"\0" * (HPARAMS.max_gradient_bytes + 1))
    buckets[4].put(gradient_key(WINDOW, 4), gradient_bytes(4)[:-10])  # truncated file
    buckets[5].put(gradient_key(WINDOW, 5), gradient_bytes(5, window=WINDOW - 1))  # replayed from another window
    result = gather(WINDOW, range(7), PeerBuckets.of(buckets), shapes=SHAPES, hparams=HPARAMS, timeout=30)
    assert sorted(result.gradients) == [0, 1]
    assert torch.equal(result.gradients[1].tensors["w"].idx, encode(
        torch.randn(SHAPES["w"], generator=torch.Generator().manual_seed(1)), 32, 64).idx)
    reasons = result.skipped
    assert reasons[2].startswith("missing")
    assert reasons[3].startswith("too big")
    assert reasons[4].startswith("invalid:")
    assert reasons[5].startswith("invalid: header window 3")
    assert reasons[6].startswith("no bucket")
    assert set(result.gradients) | set(result.skipped) == set(range(7))


def test_gather_gives_the_sha256_of_every_valid_file(tmp_path):
    import hashlib

    bucket = LocalBucket(tmp_path)
    data = gradient_bytes(0)
    bucket.put(gradient_key(WINDOW, 0), data)
    result = gather(WINDOW, [0], PeerBuckets.of({0: bucket}), shapes=SHAPES, hparams=HPARAMS)
    assert result.sha256 == {0: hashlib.sha256(data).hexdigest()}


def test_gather_deadline_skips_slow_peers_and_keeps_fast_ones(s3_server, server_bucket):
    proxy = FaultProxy(int(s3_server.rsplit(":", 1)[1]))
    try:
        slow = S3Bucket(server_bucket.name, endpoint_url=proxy.url, read_timeout=30)
        server_bucket.put(gradient_key(WINDOW, 0), gradient_bytes(0))
        server_bucket.put(gradient_key(WINDOW, 1), gradient_bytes(1))
        proxy.inject("delay", 1, 5.0)
        result = gather(WINDOW, [0, 1], PeerBuckets.of({0: server_bucket, 1: slow}), shapes=SHAPES, hparams=HPARAMS,
                        timeout=2.0)
        assert list(result.gradients) == [0]
        assert result.skipped[1].startswith("timeout") and result.seconds < 4.0
        assert proxy.faults_fired == 1
    finally:
        proxy.close()


def test_a_local_commitment_never_creates_a_directory_and_an_unopenable_path_is_its_uids_reason(tmp_path):
    """file:// commitments (a local network only) point wherever a miner likes: the validator reads there, it never
    creates a directory there, and a path it cannot open costs that uid its bucket, not every uid theirs."""
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    (tmp_path / "a-file").write_bytes(b"x")
    fresh = tmp_path / "created" / "by" / "a" / "miner"
    buckets, reasons = peer_buckets({1: BucketCommitment(url=fresh.as_uri()).encode(),
                                     2: BucketCommitment(url=(tmp_path / "a-file" / "x").as_uri()).encode(),
                                     3: BucketCommitment(url=(tmp_path / "loop-a" / "x").as_uri()).encode(),
                                     4: BucketCommitment(url=tmp_path.as_uri()).encode()}, allow_local=True)
    assert not (tmp_path / "created").exists()
    assert 4 in buckets and 3 not in buckets and "the path cannot be opened" in reasons[3]
    with pytest.raises(ObjectMissing):  # nothing there: as for any uid that never uploaded
        buckets[1].get("gradient-0-1.safetensors")
    with pytest.raises(BucketAccessDenied):  # gather's "access denied" reason
        buckets[2].get("gradient-0-1.safetensors")


def test_commitments_are_validated_and_opened(tmp_path):
    good = BucketCommitment(url=tmp_path.as_uri()).encode()
    s3 = BucketCommitment(url="s3://grads?endpoint_url=https://acct.r2.cloudflarestorage.com",
                          access_key_id="read-id", secret_access_key="read-secret")
    assert "read-secret" not in repr(s3)
    assert parse_commitment(s3.encode()) == s3
    buckets, reasons = peer_buckets({
        1: good, 2: s3.encode(), 3: "not json", 4: '{"v": 1, "gradients": "s3://xyz?endpoint_url=http://10.0.0.1"}',
        5: "x" * 5000, 6: '{"v": 1, "gradients": "ftp://x"}', 7: good,
        8: '{"v": 1, "gradients": "s3://bcu?endpoint_url=h://["}',  # found by the fuzzer: urlparse raised
    }, allow_local=False)
    assert sorted(buckets) == [2] and reasons[8].endswith("s3 endpoint does not parse")
    assert reasons[1].endswith("only accepted on a local network") and "not valid JSON" in reasons[3]
    assert "https" in reasons[4] and "at most" in reasons[5] and "unsupported" in reasons[6]
    local, _ = peer_buckets({1: good}, allow_local=True)
    assert isinstance(local[1], LocalBucket)


def test_peers_list_round_trip_and_validation(tmp_path):
    bucket = LocalBucket(tmp_path)
    assert fetch_peers(bucket, 3) is None
    digests = {uid: f"{uid:064x}" for uid in (1, 2, 5)}
    publish_peers(bucket, Peers(window=3, validator=0, uids=[5, 1, 2], sha256=digests, signature="ab" * 64))
    assert fetch_peers(bucket, 3) == Peers(window=3, validator=0, uids=[1, 2, 5], sha256=digests,
                                           signature="ab" * 64)
    valid = {"format": 2, "window": 3, "validator": 0, "uids": [1], "reserves": [4], "signature": "ab",
             "sha256": {"1": "0" * 64, "4": "1" * 64}}
    bucket.put(peers_key(3), json.dumps(valid).encode())
    assert fetch_peers(bucket, 3).reserves == [4]  # the document every change below breaks
    for change in ({"uids": [2, 2]}, {"window": 4}, {"uids": [-1]}, {"format": 1}, {"sha256": {}},
                   {"sha256": {"1": "xyz", "4": "1" * 64}}, {"signature": "not hex"}, {"signature": ""},
                   {"reserves": [1]}, {"reserves": [4, 4]}, {"sha256": {"1": "0" * 64}}):
        bucket.put(peers_key(3), json.dumps(valid | change).encode())
        with pytest.raises(InvalidFile):
            fetch_peers(bucket, 3)
    for bad in (b"[]", b"\xff", b'{"format":2,"window":3,"validator":0,"uids":[1],"uids":[2]}'):
        bucket.put(peers_key(3), bad)
        with pytest.raises(InvalidFile):
            fetch_peers(bucket, 3)
