"""A validator window over peers whose S3 buckets misbehave: it completes with the reachable peers, every other uid
gets a zero score and its reason, and no partial object is ever read as valid."""

import time

import torch

from templar_lib.buckets import LocalBucket, S3Bucket
from templar_lib.chain import LocalChain
from templar_lib.error_feedback import ErrorFeedback
from templar_lib.checkpoints import ModelState
from templar_lib.commitments import PeerBuckets
from templar_lib.data import Dataset
from templar_lib.hparams import HParams
from templar_lib.model import build_model
from templar_lib.roles.miner import compute_gradient
from templar_lib.roles.validator import evaluate_window
from templar_lib.watch import Watch
from templar_lib.wire import gradient_key, write_gradient
from tests.conftest import FAST_HPARAMS
from tests.s3 import FaultProxy

HEALTHY, FAILING_5XX, SLOW, TRUNCATED, NEVER_UPLOADED = 1, 2, 3, 4, 5


def test_validator_window_completes_with_the_reachable_peers(dataset, moto_server, s3_bucket, tmp_path):
    hparams = HParams.load(FAST_HPARAMS).replace(max_gradient_bytes=1 << 22)
    data = Dataset.open(dataset)
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    chain = LocalChain(tmp_path / "chain.sqlite")
    validator = chain.register(hotkey="validator", validator_permit=True)
    uids = [chain.register(hotkey=f"miner-{i}") for i in range(5)]
    for uid in uids[:-1]:  # the last one never uploads: its key stays a 404
        tokens = data.tokens(data.miner_pages(0, uid, hparams.pages_per_window))
        feedback = ErrorFeedback.zeros_like(dict(model.named_parameters()), topk=32, target_chunk=64,
                                            momentum_decay=0.999)
        _, gradient = compute_gradient(0, uid, model=model, step=0, feedback=feedback, tokens=tokens, hparams=hparams)
        s3_bucket.put(gradient_key(0, uid), write_gradient(gradient))

    upstream = int(moto_server.rsplit(":", 1)[1])
    proxies = {uid: FaultProxy(upstream) for uid in (FAILING_5XX, SLOW, TRUNCATED)}
    proxies[FAILING_5XX].inject("status", 100, 503)  # a 5xx burst longer than the retries
    proxies[SLOW].inject("delay", 100, 4.0)  # slower than the gather deadline
    proxies[TRUNCATED].inject("delay", 1, 0.0)  # the HEAD passes untouched,
    proxies[TRUNCATED].inject("truncate", 100, 0.6)  # then every body is cut short
    try:
        buckets = {uid: S3Bucket(s3_bucket.name, endpoint_url=proxies[uid].url, read_timeout=10)
                   if uid in proxies else s3_bucket for uid in uids}
        started = time.monotonic()
        state = ModelState(0, 0, {n: p.detach() for n, p in model.named_parameters()})
        watch = Watch(0, blocks_per_window=hparams.blocks_per_window, state=LocalBucket(tmp_path / "validator"),
                      peers=PeerBuckets.of(buckets), uids=uids, max_bytes=hparams.max_gradient_bytes,
                      poll_timeout=6.0)
        watch.poll(chain.block())  # the validator's look while window 0 is open
        chain.advance(hparams.blocks_per_window)  # window 0 closes
        assert watch.saw_close(chain.block())  # and the watch, still looking, saw it
        evaluation = evaluate_window(0, chain=chain.as_uid(validator), model=model, state=state, dataset=data,
                                     watch=watch, own_bucket=s3_bucket, hparams=hparams)
        elapsed = time.monotonic() - started
    finally:
        for proxy in proxies.values():
            proxy.close()
    scores = evaluation.scores
    assert evaluation.valid_uids == [HEALTHY]
    assert scores[FAILING_5XX].reason.startswith("unreachable") and "503" in scores[FAILING_5XX].reason
    assert scores[SLOW].reason.startswith("timeout")
    assert scores[TRUNCATED].reason.startswith("unreachable")  # a cut-short body is an error, never a short file
    assert scores[NEVER_UPLOADED].reason.startswith("missing")
    assert all(scores[uid].score == 0.0 for uid in (FAILING_5XX, SLOW, TRUNCATED, NEVER_UPLOADED))
    assert scores[HEALTHY].losses is not None and torch.isfinite(torch.tensor(scores[HEALTHY].score))
    assert all(proxy.faults_fired > 0 for proxy in proxies.values())  # every fault really happened
    assert elapsed < 60
