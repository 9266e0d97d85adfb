"""Gathering peers' files: concurrent, validated, time-limited downloads, and the validator's peers list.

`gather(window, uids, peers, ...)` downloads `gradient-{window}-{uid}` from each uid's bucket (commitments.py) on a
thread pool with one deadline for the whole gather and validates each file with `wire.read_gradient`. Result: the
valid gradients by uid with the sha256 of their bytes, and one reason for every uid skipped ("missing", "too big",
"invalid: ...", "unreachable", "timeout", or why it has no bucket). The aggregator gathers the files a validator
listed, passing the sha256 it published: other bytes are refused unparsed, as a swap.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from templar_lib.buckets import Bucket, BucketAccessDenied, BucketError, BucketTimeout, ObjectMissing, ObjectTooLarge
from templar_lib.commitments import PeerBuckets
from templar_lib.hparams import HParams
from templar_lib.strategies import strategy_of
from templar_lib.wire import (Gradient, InvalidFile, Peers, gradient_key, peers_key,
                              read_peers, write_peers)
from templar_lib.wire.aggregation import CHANGED_AFTER_SCORING
from templar_lib.wire.documents import MAX_PEERS_BYTES

log = logging.getLogger(__name__)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------------- gather
@dataclass(frozen=True)
class GatherResult:
    window: int
    gradients: dict[int, Gradient]  # valid files by uid
    skipped: dict[int, str]  # uid -> one-line reason
    bytes: dict[int, int]  # downloaded bytes by uid (valid or not)
    seconds: float
    sha256: dict[int, str] = field(default_factory=dict)  # of each valid file's bytes


MAX_WORKERS = 256  # a worker per uid up to a subnet's size: a slow peer never holds a slot another needs


def fetch_each(uids: Iterable[int], fetch: Callable[[int, float], T], peers: PeerBuckets, *,
               timeout: float) -> tuple[dict[int, T], list[int]]:
    """fetch(uid, deadline) for every uid at once, each in a worker of its own, all by one deadline
    (time.monotonic()); returns (results by uid, the uids still running at the deadline). Their buckets are aborted
    at the deadline (every socket shut down), so no worker is left reading once this returns."""
    uids = sorted(set(uids))
    deadline = time.monotonic() + timeout
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(MAX_WORKERS, len(uids))),
                                                     thread_name_prefix="fetch")
    try:
        futures = {executor.submit(fetch, uid, deadline): uid for uid in uids}
        done, pending = concurrent.futures.wait(futures, timeout=timeout)
        late = sorted(futures[future] for future in pending)
        for uid in late:
            bucket = peers.buckets.get(uid)
            if bucket is not None:
                bucket.abort()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
    return {futures[future]: future.result() for future in done}, late


def gather(window: int, uids: Iterable[int], peers: PeerBuckets, *,
           shapes: Mapping[str, tuple[int, ...]], hparams: HParams, timeout: float = 60.0,
           scored: Mapping[int, str] | None = None) -> GatherResult:
    """Download and validate `gradient-{window}-{uid}` for each uid within `timeout` seconds in total.

    Never raises for a peer's fault: every uid ends in `gradients` or in `skipped` with a reason. Times the buckets
    report are the miners' to set and decide nothing here (watch.py is the clock). A file may be as large as a real
    one of this model can be (wire.max_gradient_bytes), never more.
    scored: the sha256 a validator published for each uid (the aggregator's case). Bytes that hash to anything else
    are refused as CHANGED_AFTER_SCORING before they are parsed: a swap is proven by the hash alone, whether the new
    bytes are a valid file or garbage, and a swapped file costs no parsing.
    """
    started = time.perf_counter()
    strategy = strategy_of(hparams)
    limit = strategy.gradient_limit(shapes)

    def fetch(uid: int, deadline: float) -> tuple[Gradient | None, str | None, int, str | None]:
        bucket = peers.buckets.get(uid)
        if bucket is None:
            return None, peers.reason(uid), 0, None
        key = gradient_key(window, uid)
        try:
            data = bucket.get(key, max_bytes=limit, deadline=deadline)
            digest = hashlib.sha256(data).hexdigest()
            if scored is not None and digest != scored.get(uid):
                return None, f"{CHANGED_AFTER_SCORING}: sha256 {digest[:12]} is not the {scored.get(uid, '')[:12]} " \
                             f"a validator scored", len(data), None
            gradient = strategy.read_gradient(data, window=window, uid=uid, shapes=shapes)
            return gradient, None, len(data), digest
        except ObjectMissing:
            return None, f"missing: no {key}", 0, None
        except ObjectTooLarge as error:
            return None, f"too big: {error}", 0, None
        except InvalidFile as error:
            return None, f"invalid: {error}", 0, None
        except BucketAccessDenied as error:
            return None, f"access denied: {error}", 0, None
        except BucketTimeout:
            return None, f"timeout: not downloaded within {timeout:g}s", 0, None
        except BucketError as error:
            return None, f"unreachable: {error}", 0, None

    results, late = fetch_each(uids, fetch, peers, timeout=timeout)
    gradients: dict[int, Gradient] = {}
    skipped = {uid: f"timeout: not downloaded within {timeout:g}s" for uid in late}
    sizes, digests = {}, {}
    for uid, (gradient, reason, size, digest) in results.items():
        sizes[uid] = size
        if gradient is not None:
            gradients[uid], digests[uid] = gradient, digest
        else:
            skipped[uid] = reason
    for uid, reason in sorted(skipped.items()):
        log.info("window %d: skipping uid %d: %s", window, uid, reason)
    return GatherResult(window, dict(sorted(gradients.items())), dict(sorted(skipped.items())), sizes,
                        time.perf_counter() - started, dict(sorted(digests.items())))


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
