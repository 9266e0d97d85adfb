"""Bucket contract, run against LocalBucket on a temp dir and S3Bucket on each real S3 server on loopback (moto and
SeaweedFS, tests/s3.py); the fault tests put a fault-injecting proxy in front of moto."""

import threading
from datetime import datetime, timedelta, timezone

import pytest

from templar_lib.buckets import (BucketAccessDenied, BucketUnreachable, LocalBucket, ObjectMissing, ObjectTooLarge,
                                 S3Bucket, open_bucket, validate_key)
from tests.s3 import S3_SERVERS, FaultProxy


@pytest.fixture(params=["local", *S3_SERVERS])
def bucket(request, tmp_path):
    if request.param == "local":
        return LocalBucket(tmp_path / "bucket")
    return request.getfixturevalue("new_s3_bucket")(request.param)


def test_put_get_list_delete(bucket):
    bucket.put("gradient-1-2.safetensors", b"abc")
    bucket.put("gradient-1-3.safetensors", b"defg")
    bucket.put("peers_1.json", b"{}")
    bucket.put("gradient-1-2.safetensors", b"xyz!")  # overwrite
    assert bucket.get("gradient-1-2.safetensors") == b"xyz!"
    assert bucket.list("gradient-1-") == ["gradient-1-2.safetensors", "gradient-1-3.safetensors"]
    assert bucket.list() == ["gradient-1-2.safetensors", "gradient-1-3.safetensors", "peers_1.json"]
    assert bucket.exists("peers_1.json") and not bucket.exists("peers_2.json")
    info = bucket.stat("gradient-1-3.safetensors")
    assert info.size == 4 and abs(info.modified - datetime.now(timezone.utc)) < timedelta(minutes=5)
    bucket.delete("peers_1.json")
    assert not bucket.exists("peers_1.json")
    bucket.delete("peers_1.json")  # deleting a missing key is not an error


def test_missing_key_and_size_limit(bucket):
    with pytest.raises(ObjectMissing, match="no such object"):
        bucket.get("gradient-9-9.safetensors")
    with pytest.raises(ObjectMissing):
        bucket.stat("gradient-9-9.safetensors")
    bucket.put("big", b"x" * 1000)
    with pytest.raises(ObjectTooLarge, match="limit of 999"):
        bucket.get("big", max_bytes=999)
    assert bucket.get("big", max_bytes=1000) == b"x" * 1000


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../../b", "a\\b", "", "a b", "x" * 600, "a//b", "."])
def test_unsafe_keys_are_refused(bucket, key):
    with pytest.raises(ValueError, match="invalid bucket key"):
        bucket.put(key, b"")
    assert validate_key("checkpoints/checkpoint-5.json")


def test_local_writes_are_atomic_under_concurrent_readers(tmp_path):
    bucket = LocalBucket(tmp_path)
    big_a, big_b = b"a" * 2_000_000, b"b" * 2_000_000
    bucket.put("obj", big_a)
    seen, stop = set(), threading.Event()

    def reader():
        while not stop.is_set():
            seen.add(bucket.get("obj"))

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(20):
        bucket.put("obj", big_b)
        bucket.put("obj", big_a)
    stop.set()
    thread.join()
    assert seen <= {big_a, big_b} and seen  # never a partial object
    assert bucket.list() == ["obj"]  # no temporary files left behind


def test_open_bucket_urls(tmp_path, s3_env):
    assert isinstance(open_bucket(tmp_path.as_uri()), LocalBucket)
    s3 = open_bucket("s3://name/some/prefix?endpoint_url=http://127.0.0.1:1&region=auto")
    assert isinstance(s3, S3Bucket) and s3.prefix == "some/prefix/" and s3.endpoint_url == "http://127.0.0.1:1"
    with pytest.raises(ValueError, match="unsupported"):
        open_bucket("ftp://x")
    with pytest.raises(ValueError, match="unknown s3"):
        open_bucket("s3://name?secret=1")


@pytest.fixture
def proxied(moto_server, s3_bucket):
    """The same moto bucket reached through a fault-injecting proxy."""
    proxy = FaultProxy(int(moto_server.rsplit(":", 1)[1]))
    yield proxy, S3Bucket(s3_bucket.name, endpoint_url=proxy.url, max_attempts=4, read_timeout=2.0)
    proxy.close()


def test_s3_retries_5xx_bursts_and_slow_responses(proxied):
    proxy, bucket = proxied
    bucket.put("k", b"payload")
    proxy.inject("status", 2, 503)
    assert bucket.get("k") == b"payload"  # two 503s, then success: botocore retried
    proxy.inject("status", 1, 500)
    proxy.inject("delay", 1, 3.0)  # longer than the 2 s read timeout
    assert bucket.get("k") == b"payload"
    assert proxy.faults_fired == 4 and not proxy.faults


def test_s3_gives_up_after_bounded_retries_with_a_clear_error(proxied):
    proxy, bucket = proxied
    bucket.put("k", b"payload")
    proxy.inject("status", 10, 503)
    with pytest.raises(BucketUnreachable, match="k: .* answered"):
        bucket.get("k")
    assert proxy.faults_fired == 4  # max_attempts, not forever
    proxy.faults.clear()


def test_s3_truncated_body_is_never_returned(proxied):
    proxy, bucket = proxied
    bucket.put("k", b"0123456789" * 1000)
    proxy.inject("truncate", 5, 0.5)  # every attempt is cut short
    with pytest.raises(BucketUnreachable):
        bucket.get("k")
    proxy.faults.clear()


def test_s3_unreachable_endpoint_and_access_denied(s3_env, moto_server, s3_bucket):
    with socket_closed_port() as port:
        dead = S3Bucket("x", endpoint_url=f"http://127.0.0.1:{port}", max_attempts=2, connect_timeout=0.5)
        with pytest.raises(BucketUnreachable, match="cannot reach"):
            dead.get("k")
    proxy = FaultProxy(int(moto_server.rsplit(":", 1)[1]))
    try:
        proxy.inject("status", 1, 403)
        with pytest.raises(BucketAccessDenied, match="access denied"):
            S3Bucket(s3_bucket.name, endpoint_url=proxy.url).get("k")
    finally:
        proxy.close()


def test_s3_credentials_never_appear_in_errors_or_repr(s3_bucket):
    for text in (repr(s3_bucket), s3_bucket.url):
        assert "testing-secret-key" not in text and "testing-key-id" not in text
    with pytest.raises(ObjectMissing) as error:
        s3_bucket.get("nope")
    assert "testing-secret-key" not in str(error.value) and "testing-key-id" not in str(error.value)


class socket_closed_port:
    """A loopback port with nothing listening on it."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]

    def __exit__(self, *args) -> None:
        pass


def test_node_buckets_from_urls_and_local_default(tmp_path, s3_env):
    from templar_lib.buckets import Buckets

    local = Buckets.local(tmp_path)
    local.gradients.put("g", b"1")
    assert (tmp_path / "gradients" / "g").read_bytes() == b"1"
    assert {type(b) for b in (local.dataset, local.aggregator)} == {LocalBucket}
    mixed = Buckets.from_urls(gradients="s3://grads?endpoint_url=https://acct.r2.cloudflarestorage.com",
                              dataset=(tmp_path / "d").as_uri(), aggregator="s3://agg/run-1")
    assert isinstance(mixed.gradients, S3Bucket) and mixed.aggregator.prefix == "run-1/"


def test_s3_connection_resets_are_retried(proxied):
    proxy, bucket = proxied
    bucket.put("k", b"payload" * 100)
    proxy.inject("reset", 2)  # the connection is torn down mid-request, twice
    assert bucket.get("k") == b"payload" * 100
    assert proxy.faults_fired == 2
