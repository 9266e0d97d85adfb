"""How long reading every validator's report of a window takes: what a spot-checked miner does before it mines, and
what a validator whose watch missed a file does beside its spot checks to mend it (roles/spot_checks.py
`validator_records`, `mender`).

    python bench/validator_reports.py [--validators 64] [--uids 256] [--delays-ms 0,25,100] [--repeats 3]

Each validator commits a bucket of its own on a real S3 server on loopback (moto) with read keys, as a subnet's
validators do, and holds its report of the window: --uids uids scored (losses on two own pages) and recorded
(commitments), the size a full subnet's report has. Every request goes through a proxy that holds it for the delay
given first (tests/s3.py FaultProxy): a stand-in for a bucket far away (one hold per request, so what it does not
model is a new TLS connection's handshakes, two or three round trips more per client). Per delay it prints the
medians over --repeats of

    clients     making the PeerBuckets from the commitments: one botocore client per validator, made one at a time
                (a botocore session is not thread-safe)
    reads       validator_records: every report, READERS at once, each parsed and checked
    total       both, as `BucketsResource.validator_records` runs them (the metagraph and commitments reads not
                counted: one chain query each)

against the budgets: a miner's deadline REPORTS_SECONDS, and a validator's wait past its spot checks
MEND_WAIT_SECONDS (the reads start before the checks, so the checks' time adds to what a read may take).
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import boto3  # noqa: E402

from bench.workspace import machine  # noqa: E402
from templar_lib.chain import Metagraph, Neuron  # noqa: E402
from templar_lib.commitments import BucketCommitment, peer_buckets  # noqa: E402
from templar_lib.roles.spot_checks import MEND_WAIT_SECONDS, READERS, REPORTS_SECONDS, validator_records  # noqa: E402
from templar_lib.scoring import Losses, Score  # noqa: E402
from templar_lib.wire import EvaluationReport, evaluation_key, write_evaluation  # noqa: E402
from templar_lib.wire.documents import Recorded  # noqa: E402
from tests.s3 import TEST_KEY_ID, TEST_SECRET, FaultProxy  # noqa: E402

WINDOW = 41


def report(validator: int, uids: int) -> bytes:
    """A full window's report: every uid scored on two own pages and recorded."""
    scores, recorded = {}, {}
    for uid in range(validator + 1, validator + 1 + uids):
        losses = Losses(4.1 + uid * 1e-4, 4.0, 4.2, 4.15, [(4.1, 4.0), (4.12, 4.01)])
        scores[uid] = Score(uid, 0.0123 + uid * 1e-6, 1, 0.024, 0.012, losses)
        recorded[uid] = Recorded(f"{uid:064x}", f"{uid + 1:064x}", 0, f"5F{uid:046d}")
    return write_evaluation(EvaluationReport(WINDOW, validator, WINDOW, 4.2, sorted(scores)[:32], scores,
                                             list(range(64)), (WINDOW + 1) * 7, [], {}, recorded))


def serve(connection, validators: int, uids: int) -> None:
    """In a process of its own (so that the server and the proxy do not share the reader's interpreter): moto on
    loopback behind a delaying proxy, a bucket and a report per validator; answers each delay asked with the
    commitments, until it is sent None."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = FaultProxy(port)
    admin = boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1",
                         aws_access_key_id=TEST_KEY_ID, aws_secret_access_key=TEST_SECRET)
    commitments, sizes = {}, []
    for validator in range(validators):
        name = f"validator-{validator}"
        admin.create_bucket(Bucket=name)
        data = report(validator, uids)
        sizes.append(len(data))
        admin.put_object(Bucket=name, Key=evaluation_key(WINDOW, validator), Body=data)
        commitments[validator] = BucketCommitment(f"s3://{name}?endpoint_url={proxy.url}&region=us-east-1",
                                                  TEST_KEY_ID, TEST_SECRET).encode()
    connection.send((commitments, statistics.median(sizes)))
    while (delay := connection.recv()) is not None:
        proxy.faults.clear()
        proxy.inject("delay", 1_000_000, delay)
        connection.send(True)
    proxy.close()
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--validators", type=int, default=64)
    parser.add_argument("--uids", type=int, default=256)
    parser.add_argument("--delays-ms", default="0,25,100")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(theirs, args.validators, args.uids),
                                                          daemon=True)
    server.start()
    try:
        commitments, size = ours.recv()
        metagraph = Metagraph(0, [Neuron(v, f"v{v}", 1000.0 - v, True) for v in range(args.validators)])
        print(f"machine: {machine()}; {args.validators} validators, reports of {args.uids} uids "
              f"({size / 1024:.0f} KiB each), {READERS} read at once; budgets: a miner "
              f"{REPORTS_SECONDS:g} s, a validator's mend {MEND_WAIT_SECONDS:g} s past its spot checks")
        print(f"{'delay/request':>14} {'clients s':>10} {'reads s':>8} {'total s':>8} {'read':>6}")
        for delay in (float(ms) / 1000 for ms in args.delays_ms.split(",")):
            ours.send(delay)
            ours.recv()
            made, read, got = [], [], 0
            for _ in range(args.repeats):
                started = time.perf_counter()
                peers = peer_buckets(commitments, allow_local=True)
                made.append(time.perf_counter() - started)
                started = time.perf_counter()
                records = validator_records(WINDOW, metagraph=metagraph, peers=peers)
                read.append(time.perf_counter() - started)
                got = sum(r is not None for r in records.reports.values())
            clients, reads = statistics.median(made), statistics.median(read)
            print(f"{delay * 1000:>11.0f} ms {clients:>10.2f} {reads:>8.2f} {clients + reads:>8.2f} "
                  f"{got:>3}/{args.validators}")
        ours.send(None)
    finally:
        server.join(timeout=10)
        if server.is_alive():
            server.kill()


if __name__ == "__main__":
    main()
