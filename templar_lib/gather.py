"""Gathering peers' files: where each uid's bucket is, and concurrent, validated, time-limited downloads.

Bucket discovery (as in Templar): every uid commits to the chain where its gradients can be read, as a small JSON
document `{"v": 1, "gradients": URL, "access_key_id": .., "secret_access_key": ..}`; the keys, when present, are
*read-only* keys the miner publishes on purpose so validators and the aggregator can read its bucket. They are
still kept out of logs and reprs. Commitments are untrusted: size-limited, schema-checked, https endpoints only
(file:// and http:// only when the caller allows a local network), and a bad one costs only that uid.

`gather(window, uids, buckets, ...)` downloads `gradient-{window}-{uid}` from each uid's bucket on a thread pool
with one deadline for the whole gather, validates each file with `wire.read_gradient`, and checks the upload
time against the window's time range when the bucket reports it. Result: the valid gradients by uid and one
reason for every uid skipped ("missing", "late", "too big", "invalid: ...", "unreachable", "timeout").
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import parse_qs, urlparse

from templar_lib.buckets import (Bucket, BucketAccessDenied, BucketError, ObjectMissing, ObjectTooLarge,
                                 open_bucket)
from templar_lib.hparams import HParams
from templar_lib.wire import (Gradient, InvalidFile, Peers, gradient_key, peers_key, read_gradient, read_peers,
                              write_peers)

log = logging.getLogger(__name__)

MAX_COMMITMENT_BYTES = 1024
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


# ---------------------------------------------------------------------------------------------------- discovery
@dataclass(frozen=True)
class BucketCommitment:
    """Where a uid's gradients can be read. The secret is excluded from repr and comparisons by value only."""

    url: str
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)

    def encode(self) -> str:
        document = {"v": 1, "gradients": self.url}
        if self.access_key_id:
            document |= {"access_key_id": self.access_key_id, "secret_access_key": self.secret_access_key}
        return json.dumps(document, sort_keys=True, separators=(",", ":"))


def parse_commitment(text: object, *, allow_local: bool = False) -> BucketCommitment:
    """Validate a commitment read from the chain. Raises InvalidFile(reason)."""
    if not isinstance(text, str) or len(text.encode()) > MAX_COMMITMENT_BYTES:
        raise InvalidFile(f"commitment must be text of at most {MAX_COMMITMENT_BYTES} bytes")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidFile("commitment is not JSON") from None
    if not isinstance(raw, dict) or raw.get("v") != 1 or not isinstance(raw.get("gradients"), str):
        raise InvalidFile("commitment must be {v: 1, gradients: URL, ...}")
    if set(raw) - {"v", "gradients", "access_key_id", "secret_access_key"}:
        raise InvalidFile("commitment has unknown fields")
    key_id, secret = raw.get("access_key_id"), raw.get("secret_access_key")
    if (key_id is None) != (secret is None) or not all(v is None or isinstance(v, str) for v in (key_id, secret)):
        raise InvalidFile("commitment credentials must be a pair of strings")
    url = raw["gradients"]
    try:
        parsed = urlparse(url)
        options = parse_qs(parsed.query, strict_parsing=bool(parsed.query))
    except ValueError:
        raise InvalidFile("bucket URL does not parse") from None
    if parsed.scheme == "file":
        if not allow_local:
            raise InvalidFile("file:// buckets are only accepted on a local network")
        if not parsed.path.startswith("/") or parsed.netloc or parsed.query:
            raise InvalidFile("file:// bucket must be an absolute path")
    elif parsed.scheme == "s3":
        if not _S3_BUCKET.fullmatch(parsed.netloc):
            raise InvalidFile("s3 bucket name is not valid")
        if set(options) - {"endpoint_url", "region"}:
            raise InvalidFile("s3 bucket URL has unknown options")
        endpoint = options.get("endpoint_url", [""])[-1]
        endpoint_scheme = urlparse(endpoint).scheme if endpoint else "https"
        if endpoint_scheme != "https" and not (allow_local and endpoint_scheme == "http"):
            raise InvalidFile("s3 endpoint must be https")
    else:
        raise InvalidFile(f"unsupported bucket scheme {parsed.scheme[:10]!r}")
    return BucketCommitment(url=url, access_key_id=key_id, secret_access_key=secret)


def open_commitment(commitment: BucketCommitment) -> Bucket:
    """The bucket a commitment points to, with its published read credentials when it has them."""
    credentials = (commitment.access_key_id, commitment.secret_access_key) if commitment.access_key_id else None
    return open_bucket(commitment.url, credentials=credentials)


def peer_buckets(commitments: Mapping[int, str], *, allow_local: bool = False) -> tuple[dict[int, Bucket],
                                                                                          dict[int, str]]:
    """Buckets of every uid with a valid commitment, and a reason for each uid whose commitment is unusable."""
    buckets, reasons = {}, {}
    for uid, text in sorted(commitments.items()):
        try:
            buckets[uid] = open_commitment(parse_commitment(text, allow_local=allow_local))
        except (InvalidFile, ValueError) as error:
            reasons[uid] = f"bad bucket commitment: {error}"
    return buckets, reasons


# ---------------------------------------------------------------------------------------------------- gather
@dataclass(frozen=True)
class GatherResult:
    window: int
    gradients: dict[int, Gradient]  # valid files by uid
    skipped: dict[int, str]  # uid -> one-line reason
    bytes: dict[int, int]  # downloaded bytes by uid (valid or not)
    seconds: float
    uploaded: dict[int, datetime] = field(default_factory=dict)  # when each valid file was written


def gather(window: int, uids: Iterable[int], buckets: Mapping[int, Bucket], *,
           shapes: Mapping[str, tuple[int, ...]], hparams: HParams, timeout: float = 60.0,
           time_range: tuple[datetime, datetime] | None = None, max_workers: int = 16) -> GatherResult:
    """Download and validate `gradient-{window}-{uid}` for each uid within `timeout` seconds in total.

    time_range: (start, end) of the window in UTC; an object written outside it is skipped as late (or early).
    Never raises for a peer's fault: every uid ends in `gradients` or in `skipped` with a reason.
    """
    started = time.perf_counter()
    uids = sorted(set(uids))
    gradients: dict[int, Gradient] = {}
    skipped: dict[int, str] = {}
    sizes: dict[int, int] = {}

    uploaded: dict[int, datetime] = {}

    def fetch(uid: int) -> tuple[Gradient | None, str | None, int]:
        bucket = buckets.get(uid)
        if bucket is None:
            return None, "no bucket: the uid has no usable bucket commitment", 0
        key = gradient_key(window, uid)
        try:
            modified = bucket.stat(key).modified
            reason = _upload_time_reason(modified, time_range) if time_range is not None else None
            if reason:
                return None, reason, 0
            data = bucket.get(key, max_bytes=hparams.max_gradient_bytes)
            gradient = read_gradient(data, window=window, uid=uid, shapes=shapes, topk=hparams.topk_compression,
                                     target_chunk=hparams.target_chunk, hparams_hash=hparams.protocol_hash(),
                                     max_bytes=hparams.max_gradient_bytes)
            uploaded[uid] = modified
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
                        time.perf_counter() - started, {uid: uploaded[uid] for uid in sorted(gradients)})


def _upload_time_reason(modified: datetime, time_range: tuple[datetime, datetime]) -> str | None:
    start, end = time_range
    if modified > end:
        return f"late: uploaded {modified.isoformat(timespec='seconds')}, window closed {end.isoformat(timespec='seconds')}"
    if modified < start:
        return f"early: uploaded {modified.isoformat(timespec='seconds')}, before the window opened " \
               f"{start.isoformat(timespec='seconds')}"
    return None


# ---------------------------------------------------------------------------------------------------- peers list
def publish_peers(bucket: Bucket, peers: Peers) -> str:
    key = peers_key(peers.window)
    bucket.put(key, write_peers(peers))
    return key


def fetch_peers(bucket: Bucket, window: int) -> Peers | None:
    """The validator's peers list for `window`, or None when absent. Raises InvalidFile when malformed."""
    try:
        return read_peers(bucket.get(peers_key(window), max_bytes=1 << 20), window=window)
    except ObjectMissing:
        return None
