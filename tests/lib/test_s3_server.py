"""What only a real S3 server answers: authentication, the server's own LastModified, large and multipart objects,
listings longer than one page. On SeaweedFS (a production store, access keys checked) and, where moto can answer
too, on both through `s3_server` (tests/conftest.py, tests/s3.py)."""

from __future__ import annotations

import hashlib
import io
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import boto3
import botocore.auth
import pytest
from boto3.s3.transfer import TransferConfig

from templar_lib.buckets import BucketAccessDenied, BucketError, ObjectMissing, ObjectTooLarge, S3Bucket, open_bucket
from templar_lib.transport import Guard, Limits
from tests.s3 import TEST_KEY_ID, TEST_SECRET

WRONG_SECRET = "not-the-secret-key"
_CLOCK = botocore.auth.get_current_datetime


def signing_clock_off_by(monkeypatch, offset: timedelta) -> None:
    """botocore signs (X-Amz-Date) with a clock `offset` away from this machine's."""
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: _CLOCK() + offset)


# ------------------------------------------------------------------------------------------------ authentication
def test_a_wrong_secret_is_refused_with_a_clear_error_and_writes_nothing(seaweedfs_server, new_s3_bucket,
                                                                          monkeypatch):
    own = new_s3_bucket(seaweedfs_server)
    own.put("gradient-1-1.safetensors", b"honest")
    # a peer's bucket read with its published keys (explicit credentials), and a node's own bucket through boto3's
    # credential chain (the environment): the two ways a node signs
    with_keys = S3Bucket(own.name, endpoint_url=seaweedfs_server, credentials=(TEST_KEY_ID, WRONG_SECRET))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", WRONG_SECRET)
    from_env = open_bucket(f"s3://{own.name}?endpoint_url={seaweedfs_server}")
    for bucket in (with_keys, from_env):
        started = time.monotonic()
        for call, code in ((lambda: bucket.get("gradient-1-1.safetensors"), "SignatureDoesNotMatch"),
                           (lambda: bucket.put("gradient-1-1.safetensors", b"forged"), "SignatureDoesNotMatch"),
                           (lambda: bucket.list("gradient-"), "SignatureDoesNotMatch"),
                           (lambda: bucket.delete("gradient-1-1.safetensors"), "SignatureDoesNotMatch"),
                           (lambda: bucket.get("gradient-9-9.safetensors"), "SignatureDoesNotMatch"),  # not "missing"
                           (lambda: bucket.stat("gradient-1-1.safetensors"), "403"),  # a HEAD answer has no body
                           (lambda: bucket.exists("gradient-1-1.safetensors"), "403")):  # refused, never False
            with pytest.raises(BucketAccessDenied, match=rf"access denied by s3://{own.name}/.*\({code}\)") as error:
                call()
            assert WRONG_SECRET not in str(error.value) and TEST_SECRET not in str(error.value)
        assert time.monotonic() - started < 5  # a 403 is final: not retried with backoff
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    assert own.get("gradient-1-1.safetensors") == b"honest"  # the refused put and delete changed nothing


def test_an_unknown_key_id_and_an_unsigned_read_are_refused(seaweedfs_server, new_s3_bucket):
    own = new_s3_bucket(seaweedfs_server)
    own.put("gradient-1-1.safetensors", b"honest")
    stranger = S3Bucket(own.name, endpoint_url=seaweedfs_server, credentials=("no-such-key-id", TEST_SECRET))
    with pytest.raises(BucketAccessDenied, match=r"\(InvalidAccessKeyId\)"):
        stranger.get("gradient-1-1.safetensors")
    # a peer that publishes no read keys is read unsigned (our credentials never go to a stranger's endpoint)
    unsigned = S3Bucket(own.name, endpoint_url=seaweedfs_server, guard=Guard(Limits(allow_private=True)))
    with pytest.raises(BucketAccessDenied, match=r"\(AccessDenied\)"):
        unsigned.get("gradient-1-1.safetensors")


def test_a_clock_more_than_15_minutes_off_is_refused_by_name(seaweedfs_server, new_s3_bucket, monkeypatch):
    bucket = new_s3_bucket(seaweedfs_server)
    signing_clock_off_by(monkeypatch, timedelta(minutes=20))
    with pytest.raises(BucketAccessDenied, match=r"\(RequestTimeTooSkewed\)"):
        bucket.put("k", b"v")
    signing_clock_off_by(monkeypatch, timedelta(minutes=-20))
    with pytest.raises(BucketAccessDenied, match=r"\(RequestTimeTooSkewed\)"):
        bucket.get("k")


def test_a_missing_bucket_is_told_apart_from_a_missing_key(s3_server, s3_env):
    absent = S3Bucket("no-such-bucket-here", endpoint_url=s3_server)
    for call in (lambda: absent.get("gradient-1-1.safetensors"), lambda: absent.list("gradient-1-")):
        with pytest.raises(BucketError, match="does not exist at the endpoint") as error:
            call()
        assert not isinstance(error.value, ObjectMissing)


# ----------------------------------------------------------------------------------------------------- LastModified
def test_last_modified_is_the_servers_clock_not_the_clients(s3_server, new_s3_bucket, monkeypatch):
    bucket = new_s3_bucket(s3_server)
    signing_clock_off_by(monkeypatch, timedelta(minutes=-10))  # inside SigV4's 15 minutes: accepted
    before = datetime.now(timezone.utc).replace(microsecond=0)
    bucket.put("gradient-1-1.safetensors", b"first")
    modified = bucket.stat("gradient-1-1.safetensors").modified
    assert modified.utcoffset() == timedelta(0)  # timezone-aware UTC
    assert before - timedelta(seconds=2) <= modified <= datetime.now(timezone.utc) + timedelta(seconds=2)
    time.sleep(1.05)  # HTTP dates have whole seconds
    bucket.put("gradient-1-1.safetensors", b"second")
    assert bucket.stat("gradient-1-1.safetensors").modified > modified  # an overwrite is stamped again


# ------------------------------------------------------------------------------------------- large and multipart
def test_large_and_multipart_objects_round_trip(s3_server, new_s3_bucket):
    bucket = new_s3_bucket(s3_server)
    threshold = TransferConfig().multipart_threshold  # boto3's: 8 MiB
    data = hashlib.sha256(b"seed").digest() * ((threshold + 4 * 2**20) // 32)  # 12 MiB
    # S3Bucket.put is one PutObject whatever the size (atomic; S3's limit for one is 5 GiB)
    bucket.put("aggregation-1.safetensors", data)
    assert bucket.get("aggregation-1.safetensors") == data
    # a peer that uploads with boto3's transfer manager (or aws s3 cp) above the threshold writes parts
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.upload_fileobj(io.BytesIO(data), bucket.name, "gradient-1-2.safetensors",
                          Config=TransferConfig(multipart_chunksize=8 * 2**20))
    etag = client.head_object(Bucket=bucket.name, Key="gradient-1-2.safetensors")["ETag"]
    assert etag.strip('"').endswith("-2")  # really a two-part upload
    assert bucket.stat("gradient-1-2.safetensors").size == len(data)
    assert bucket.get("gradient-1-2.safetensors", max_bytes=len(data)) == data
    with pytest.raises(ObjectTooLarge, match=f"{len(data)} bytes, larger than the limit"):
        bucket.get("gradient-1-2.safetensors", max_bytes=len(data) - 1)  # refused from Content-Length


# ---------------------------------------------------------------------------------------------------------- listing
def test_listing_more_than_one_page_under_a_prefix(seaweedfs_server, new_s3_bucket):
    # SeaweedFS only: moto pages at 1,000 too, but serves 1,100 PUTs from this process (≈ 8 s on 2 cores)
    bucket = new_s3_bucket(seaweedfs_server, prefix="run-1")  # keys live under run-1/ on the server
    wanted = [f"gradient-7-{uid}.safetensors" for uid in range(1100)]
    others = ["gradient-70-1.safetensors", "gradient-6-1.safetensors", "peers_7.json"]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda key: bucket.put(key, b"g"), wanted + others))
    client = boto3.client("s3", endpoint_url=seaweedfs_server, region_name="us-east-1")
    first = client.list_objects_v2(Bucket=bucket.name, Prefix="run-1/gradient-7-")
    assert first["KeyCount"] == 1000 and first["IsTruncated"]  # the server pages at 1,000: two pages are needed
    assert bucket.list("gradient-7-") == sorted(wanted)
    assert len(bucket.list()) == len(wanted) + len(others)
