"""What strangers' bucket endpoints can do to a gather, tried: hold every worker, keep the process from exiting, make
it buffer without end, point it at private addresses, or at files and pipes outside their own bucket."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from templar_lib.buckets import LocalBucket, S3Bucket
from templar_lib.chain import Metagraph, Neuron
from templar_lib.commitments import BucketCommitment, PeerBuckets, peer_buckets
from templar_lib.compression import encode, unit_norm
from templar_lib.gather import gather
from templar_lib.hparams import HParams
from templar_lib.roles.spot_checks import validator_records
from templar_lib.transport import Guard, Limits, address_refusal
from templar_lib.wire import EvaluationReport, Gradient, evaluation_key, gradient_key, write_evaluation, write_gradient
from templar_lib.wire.documents import Recorded
from tests.conftest import ROOT
from templar_lib.simulate.endpoints import HostileServer

SHAPES = {"w": (64, 128), "b": (60,)}
HPARAMS = HParams()
WINDOW = 4
LOCAL = Guard(Limits(allow_private=True))  # tests reach their servers on loopback


def honest_bytes(uid: int) -> bytes:
    generator = torch.Generator().manual_seed(uid)
    tensors = {n: unit_norm(encode(torch.randn(s, generator=generator), 32, 64)) for n, s in SHAPES.items()}
    return write_gradient(Gradient(WINDOW, uid, tensors, HPARAMS.protocol_hash()))


@pytest.fixture
def servers():
    made = []

    def make(mode: str) -> HostileServer:
        made.append(HostileServer(mode))
        return made[-1]

    yield make
    for server in made:
        server.close()


def peer(url: str, name: str = "grads") -> S3Bucket:
    return S3Bucket(name, endpoint_url=url, guard=Guard(Limits(allow_private=True)), max_attempts=2)


def test_sixteen_slow_endpoints_before_four_honest_ones_starve_no_one(servers, s3_bucket, moto_server):
    slow = servers("trickle")
    buckets = {uid: peer(slow.url) for uid in range(16)}  # uids 0..15 come first
    honest = {uid: S3Bucket(s3_bucket.name, endpoint_url=moto_server, guard=Guard(Limits(allow_private=True)),
                            credentials=("testing-key-id", "testing-secret-key")) for uid in range(16, 20)}
    for uid in honest:
        s3_bucket.put(gradient_key(WINDOW, uid), honest_bytes(uid))
    started = time.monotonic()
    result = gather(WINDOW, range(20), PeerBuckets.of(buckets | honest), shapes=SHAPES, hparams=HPARAMS, timeout=8)
    assert sorted(result.gradients) == [16, 17, 18, 19]
    assert time.monotonic() - started < 9
    assert all("too slow" in result.skipped[uid] or result.skipped[uid].startswith("timeout") for uid in range(16)), \
        result.skipped


GATHER_AND_EXIT = textwrap.dedent("""
    import sys, time
    import templar_lib.transport
    if "abort" in sys.argv[4:]:  # the reads no longer end when gather aborts them at its deadline
        templar_lib.transport.Guard.abort = lambda self: None
    if "deadline" in sys.argv[4:]:  # each read waits its full per-read limit, past gather's deadline
        templar_lib.transport._shorter = lambda limit, remaining: limit
    from templar_lib.buckets import S3Bucket
    from templar_lib.commitments import PeerBuckets
    from templar_lib.gather import gather
    from templar_lib.hparams import HParams
    from templar_lib.transport import Guard, Limits
    url, uids, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    limits = Limits(allow_private=True, connect_timeout=30.0, read_timeout=30.0)  # far past any deadline here
    buckets = {uid: S3Bucket("grads", endpoint_url=url, guard=Guard(limits)) for uid in range(uids)}
    result = gather(4, range(uids), PeerBuckets.of(buckets), shapes={"w": (64, 128), "b": (60,)}, hparams=HParams(),
                    timeout=timeout)
    print(time.monotonic(), flush=True)
    import resource
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)
    print(sorted(set(r.split(":")[0] for r in result.skipped.values())), flush=True)
""")


def run_gather(url: str, uids: int, timeout: float, *disabled: str) -> tuple[float, float, int, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ACCESS_KEY_ID": "testing-key-id",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1"}
    process = subprocess.run([sys.executable, "-c", GATHER_AND_EXIT, url, str(uids), str(timeout), *disabled], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=120)
    ended = time.monotonic()
    assert process.returncode == 0, process.stderr[-2000:]
    returned, peak_kib, reasons = process.stdout.split("\n")[:3]
    return float(returned), ended, int(peak_kib), reasons


def test_no_reader_holds_the_process_once_the_gather_returns(servers):
    """16 reads that never answer, each allowed 30 s per socket read, in a 3 s gather: the process ends in the time an
    interpreter takes to exit (≈ 1.1 s here idle, 2 s under the suite's load), not when the reads time out (28 s with
    both the abort and the deadline turned off). Each of the two alone is enough: the three processes (both, the
    deadline only, the abort only) run side by side."""
    import concurrent.futures

    silent = servers("silent")  # a HEAD / GET that never answers
    variants = {"both": (), "deadline only": ("abort",), "abort only": ("deadline",)}  # what each turns off
    with concurrent.futures.ThreadPoolExecutor(len(variants)) as pool:
        ran = {name: pool.submit(run_gather, silent.url, 16, 3.0, *off) for name, off in variants.items()}
    for name, future in ran.items():
        returned, ended, _, reasons = future.result()
        assert ended - returned <= 8.0, (name, ended - returned)
        assert reasons == "['timeout']", (name, reasons)


def test_sixteen_endless_bodies_at_once_stay_within_a_memory_bound(servers):
    endless = servers("endless")
    _, _, baseline_kib, _ = run_gather(servers("silent").url, 1, 0.5)
    _, _, peak_kib, reasons = run_gather(endless.url, 16, 10.0)
    # each body is cut at the largest file this model can have (≈ 1.1 MB here), whatever the endpoint sends
    assert (peak_kib - baseline_kib) < 64 * 1024, (peak_kib, baseline_kib)
    assert "too big" in reasons


@pytest.mark.parametrize("address, refused", [("127.0.0.1", True), ("::1", True), ("10.0.0.1", True),
                                              ("169.254.169.254", True), ("192.168.1.2", True),
                                              ("::ffff:127.0.0.1", True), ("0.0.0.0", True), ("8.8.8.8", False),
                                              ("2606:4700:4700::1111", False)])
def test_private_loopback_and_link_local_addresses_are_refused(address, refused):
    assert (address_refusal(address) is not None) == refused


def test_a_committed_endpoint_on_loopback_is_refused_in_production_and_read_on_a_local_network(servers, s3_bucket,
                                                                                               moto_server):
    s3_bucket.put(gradient_key(WINDOW, 1), honest_bytes(1))
    endpoint = moto_server.replace("http://", "https://")  # production accepts https endpoints only
    keys = {"access_key_id": "testing-key-id", "secret_access_key": "testing-secret-key"}  # published read keys
    commitment = BucketCommitment(f"s3://{s3_bucket.name}?endpoint_url={endpoint}", **keys).encode()
    production = gather(WINDOW, [1], peer_buckets({1: commitment}), shapes=SHAPES, hparams=HPARAMS, timeout=10)
    assert "refused: the endpoint's address 127.0.0.1 is loopback" in production.skipped[1]
    local = BucketCommitment(f"s3://{s3_bucket.name}?endpoint_url={moto_server}", **keys).encode()
    allowed = gather(WINDOW, [1], peer_buckets({1: local}, allow_local=True), shapes=SHAPES, hparams=HPARAMS,
                     timeout=10)
    assert list(allowed.gradients) == [1]


def test_local_peers_read_only_their_own_regular_files(tmp_path):
    secret = tmp_path / "private.key"
    secret.write_bytes(b"\x68\x65\x6c\x6c\x6f\x20\x73\x65\x63\x72\x65\x74" * 10)
    bucket_dir = tmp_path / "peer"
    bucket_dir.mkdir()
    (bucket_dir / gradient_key(WINDOW, 1)).symlink_to(secret)
    os.mkfifo(bucket_dir / gradient_key(WINDOW, 2))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / gradient_key(WINDOW, 3)).write_bytes(honest_bytes(3))
    (bucket_dir / "sub").symlink_to(outside, target_is_directory=True)
    commitments = {uid: BucketCommitment(bucket_dir.as_uri()).encode() for uid in (1, 2)}
    started = time.monotonic()
    result = gather(WINDOW, [1, 2], peer_buckets(commitments, allow_local=True), shapes=SHAPES, hparams=HPARAMS,
                    timeout=5)
    assert time.monotonic() - started < 3  # the FIFO was not waited on
    for uid in (1, 2):
        assert "not a regular file" in result.skipped[uid]
        assert str(int.from_bytes(secret.read_bytes()[:8], "little")) not in json.dumps(result.skipped)
    from templar_lib.buckets import BucketAccessDenied, LocalBucket
    with pytest.raises(BucketAccessDenied):
        LocalBucket(bucket_dir, peer=True).get(f"sub/{gradient_key(WINDOW, 3)}")


def test_an_endpoint_that_answers_without_a_size_or_a_time_costs_its_uid_a_reason_not_the_validator_its_poll(
        servers, tmp_path):
    """A HEAD answered 200 with neither Content-Length nor Last-Modified made the bucket raise KeyError, which the
    watch's poll let out: nothing was recorded, so a miner could leave a validator's window unwatched (nobody
    scored) or its view stale (later uploads "missing"), and a resident node's loop died. Now its own uid has a
    reason and every other uid is seen."""
    from templar_lib.buckets import BucketUnreachable
    from templar_lib.watch import Watch

    bare, honest = servers("bare"), LocalBucket(tmp_path / "honest")
    with pytest.raises(BucketUnreachable, match="without a valid size and time"):
        peer(bare.url).stat(gradient_key(WINDOW, 2))
    honest.put(gradient_key(WINDOW, 1), honest_bytes(1))
    watch = Watch(WINDOW, blocks_per_window=7, state=LocalBucket(tmp_path / "validator"),
                  peers=PeerBuckets.of({1: honest, 2: peer(bare.url)}), uids=[1, 2], max_bytes=1 << 20,
                  poll_timeout=5.0)
    assert watch.poll(WINDOW * 7 + 1) == 1
    assert watch.watched and list(watch.sightings()) == [1] and watch.reasons()[2].startswith("unreachable")


def test_a_miner_reads_the_validators_reports_by_its_deadline_whatever_their_endpoints_do(servers, tmp_path):
    """Before it mines, a spot-checked miner reads every validator's report of the last window (roles/spot_checks.py
    validator_records), side by side: validators whose endpoints trickle or never answer cost it the deadline at
    most (one that never answers held a read ≈ 20 s, retries included), and count as having recorded its file."""
    trickle, silent, honest = servers("trickle"), servers("silent"), LocalBucket(tmp_path / "validator-2")
    after = "a" * 64
    honest.put(evaluation_key(3, 2), write_evaluation(EvaluationReport(
        3, 2, 3, 1.0, [], {}, commitments={8: Recorded("b" * 64, "c" * 64, 0, "")})))  # recorded uid 8, not 7
    metagraph = Metagraph(0, [Neuron(0, "v0", 100.0, True), Neuron(1, "v1", 100.0, True),
                              Neuron(2, "v2", 300.0, True), Neuron(7, "m7", 0.0, False)])
    peers = PeerBuckets.of({0: peer(trickle.url), 1: peer(silent.url), 2: honest})
    started = time.monotonic()
    records = validator_records(3, metagraph=metagraph, peers=peers, seconds=2.0)
    assert time.monotonic() - started < 8.0
    assert records.reports[0] is None and records.reports[1] is None and records.reports[2] is not None
    assert records.unrecorded(7, after) is not None  # 300 of 500: the only report read holds the majority
    assert validator_records(3, metagraph=metagraph, peers=PeerBuckets.of({2: honest}), seconds=2.0).stakes == {
        0: 100.0, 1: 100.0, 2: 300.0}
