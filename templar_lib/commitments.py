"""Where each uid's gradients can be read: bucket commitments on the chain (as in Templar).

Every uid commits to the chain a small JSON document `{"v": 1, "gradients": URL, "access_key_id": ..,
"secret_access_key": ..}`; the keys, when present, are *read-only* keys the miner publishes on purpose so that
validators and the aggregator can read its bucket. They are still kept out of logs and reprs. Commitments are
untrusted: size-limited, schema-checked, https endpoints only (file:// and http:// only when the caller allows a local
network), and a bad one costs only that uid: `peer_buckets` returns the buckets of the usable ones and a reason for
each of the others, together (`PeerBuckets`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import parse_qs, urlparse

from templar_lib.buckets import Bucket, open_bucket
from templar_lib.transport import Guard, Limits
from templar_lib.wire import InvalidFile
from templar_lib.wire.container import json_object

MAX_COMMITMENT_BYTES = 1024
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


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
    raw = json_object(text, "commitment")  # any miner writes one: deep nesting included, InvalidFile
    if raw.get("v") != 1 or not isinstance(raw.get("gradients"), str):
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
        try:
            endpoint_scheme = urlparse(endpoint).scheme if endpoint else "https"
        except ValueError:  # e.g. an unclosed "[" of an IPv6 host (found by the fuzzer)
            raise InvalidFile("s3 endpoint does not parse") from None
        if endpoint_scheme != "https" and not (allow_local and endpoint_scheme == "http"):
            raise InvalidFile("s3 endpoint must be https")
    else:
        raise InvalidFile(f"unsupported bucket scheme {parsed.scheme[:10]!r}")
    return BucketCommitment(url=url, access_key_id=key_id, secret_access_key=secret)


def open_commitment(commitment: BucketCommitment, *, limits: Limits = Limits()) -> Bucket:
    """The bucket a commitment points to, with its published read credentials when it has them, read as a stranger's
    (transport.Guard with these limits; a local directory only through its regular files)."""
    credentials = (commitment.access_key_id, commitment.secret_access_key) if commitment.access_key_id else None
    return open_bucket(commitment.url, credentials=credentials, guard=Guard(limits), peer=True)


class PeerBuckets(NamedTuple):
    """Each uid's bucket, and why the others have none."""

    buckets: dict[int, Bucket]
    skipped: dict[int, str]  # uid -> "bad bucket commitment: ..."

    @classmethod
    def of(cls, buckets: Mapping[int, Bucket]) -> PeerBuckets:
        """Buckets known without commitments (tests, a local network)."""
        return cls(dict(buckets), {})

    def reason(self, uid: int) -> str:
        """Why `uid` has no bucket."""
        return self.skipped.get(uid, "no bucket: the uid has no usable bucket commitment")


def peer_buckets(commitments: Mapping[int, str], *, allow_local: bool = False,
                 limits: Limits | None = None) -> PeerBuckets:
    """Buckets of every uid with a valid commitment, and a reason for each uid whose commitment is unusable.
    allow_local: file:// and http:// commitments and loopback / private addresses are accepted (a local network
    only); limits: the transfer limits (transport.Limits; default: production's, with allow_local)."""
    limits = limits or Limits(allow_private=allow_local)
    if limits.allow_private and not allow_local:
        raise ValueError("private addresses are only for a local network (allow_local)")
    buckets, reasons = {}, {}
    for uid, text in sorted(commitments.items()):
        try:
            buckets[uid] = open_commitment(parse_commitment(text, allow_local=allow_local), limits=limits)
        except (InvalidFile, ValueError) as error:
            reasons[uid] = f"bad bucket commitment: {error}"
        except (OSError, RuntimeError) as error:  # a file:// path that cannot be resolved (a symlink loop, ...)
            reasons[uid] = f"bad bucket commitment: the path cannot be opened ({type(error).__name__})"
    return PeerBuckets(buckets, reasons)


def register_local_network(chain, miners: int, gradients_url: str) -> tuple[int, list[int]]:
    """Register a validator (with permit) and `miners` miners on a LocalChain, each miner committing the local
    gradients bucket; idempotent (hotkeys are fixed names). Returns (validator uid, miner uids)."""
    validator_uid = chain.register(hotkey="validator", stake=1000.0, validator_permit=True)
    uids = [chain.register(hotkey=f"miner-{index}") for index in range(miners)]
    for uid in uids:
        chain.as_uid(uid).commit(BucketCommitment(gradients_url).encode())
    return validator_uid, uids
