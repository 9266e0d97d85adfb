"""Gathering peers' files: concurrent, validated, time-limited downloads, and the validator's peers list.

`gather(window, uids, peers, ...)` downloads `gradient-{window}-{uid}` from each uid's bucket (commitments.py) on a
thread pool with one deadline for the whole gather and validates each file with `wire.read_gradient`. Result: the
valid gradients by uid with the sha256 of their bytes, and one reason for every uid skipped ("missing", "too big",
"invalid: ...", "unreachable", "timeout", or why it has no bucket). The aggregator gathers the files a validator
listed and keeps those whose sha256 it published.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from templar_lib.buckets import Bucket, BucketAccessDenied, BucketError, ObjectMissing, ObjectTooLarge
from templar_lib.commitments import PeerBuckets
from templar_lib.hparams import HParams
from templar_lib.wire import Gradient, InvalidFile, Peers, gradient_key, peers_key, read_gradient, read_peers, \
    write_peers
from templar_lib.wire.documents import MAX_PEERS_BYTES

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------------- gather
@dataclass(frozen=True)
class GatherResult:
    window: int
    gradients: dict[int, Gradient]  # valid files by uid
    skipped: dict[int, str]  # uid -> one-line reason
    bytes: dict[int, int]  # downloaded bytes by uid (valid or not)
    seconds: float
    sha256: dict[int, str] = field(default_factory=dict)  # of each valid file's bytes


def gather(window: int, uids: Iterable[int], peers: PeerBuckets, *,
           shapes: Mapping[str, tuple[int, ...]], hparams: HParams, timeout: float = 60.0,
           max_workers: int = 16) -> GatherResult:
    """Download and validate `gradient-{window}-{uid}` for each uid within `timeout` seconds in total.

    Never raises for a peer's fault: every uid ends in `gradients` or in `skipped` with a reason. Times the buckets
    report are the miners' to set and decide nothing here (watch.py is the clock).
    """
    started = time.perf_counter()
    uids = sorted(set(uids))
    gradients: dict[int, Gradient] = {}
    skipped: dict[int, str] = {}
    sizes: dict[int, int] = {}
    digests: dict[int, str] = {}

    def fetch(uid: int) -> tuple[Gradient | None, str | None, int]:
        bucket = peers.buckets.get(uid)
        if bucket is None:
            return None, peers.reason(uid), 0
        key = gradient_key(window, uid)
        try:
            data = bucket.get(key, max_bytes=hparams.max_gradient_bytes)
            gradient = read_gradient(data, window=window, uid=uid, shapes=shapes, topk=hparams.topk_compression,
                                     target_chunk=hparams.target_chunk, hparams_hash=hparams.protocol_hash(),
                                     max_bytes=hparams.max_gradient_bytes)
            digests[uid] = hashlib.sha256(data).hexdigest()
            return gradient, None, len(data)
        except ObjectMissing:
            return None, f"missing: no {key}", 0
        except ObjectTooLarge as error:
            return None, f"too big: {error}", 0
        except InvalidFile as error:
            return None, f"invalid: {error}", 0
        except BucketAccessDenied as error:
            return None, f"access denied: {error}", 0
        except BucketError as error:
            return None, f"unreachable: {error}", 0

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(uids) or 1)),
                                                     thread_name_prefix=f"gather-{window}")
    try:
        futures = {executor.submit(fetch, uid): uid for uid in uids}
        done, pending = concurrent.futures.wait(futures, timeout=timeout)
        for future in done:
            uid = futures[future]
            gradient, reason, size = future.result()
            sizes[uid] = size
            if gradient is not None:
                gradients[uid] = gradient
            else:
                skipped[uid] = reason
        for future in pending:
            skipped[futures[future]] = f"timeout: not downloaded within {timeout:g}s"
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    for uid, reason in sorted(skipped.items()):
        log.info("window %d: skipping uid %d: %s", window, uid, reason)
    return GatherResult(window, dict(sorted(gradients.items())), dict(sorted(skipped.items())), sizes,
                        time.perf_counter() - started, {uid: digests[uid] for uid in sorted(gradients)})


# ---------------------------------------------------------------------------------------------------- peers list
def publish_peers(bucket: Bucket, peers: Peers) -> str:
    key = peers_key(peers.window)
    bucket.put(key, write_peers(peers))
    return key


def fetch_peers(bucket: Bucket, window: int) -> Peers | None:
    """The validator's peers list for `window`, or None when absent. Raises InvalidFile when malformed."""
    try:
        return read_peers(bucket.get(peers_key(window), max_bytes=MAX_PEERS_BYTES), window=window)
    except ObjectMissing:
        return None
