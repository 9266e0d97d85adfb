"""A validator's first sight of each uid's gradient: the clock no miner controls (DESIGN §2).

While window w is open the validator polls every uid's bucket (`Watch.poll(block)`, `block` = the chain's block at
that moment): it reads each object's size and time; when they changed since its last look it downloads the file
(at most max_gradient_bytes), hashes it and, for content it has not seen before, records the sha256 and the block
of first sight and keeps the bytes in its own state store. `Watch.sightings()` gives each uid's newest content
first seen before the window closed: those are the bytes the validator scores, the sha256 it publishes in
peers_{w}.json, and the block decides lateness and which of two similar uploads is the copy.

Who controls what: the miner controls the bytes it serves and every time its bucket reports; it does not control
when the validator first saw the bytes. A backdated LastModified changes nothing, an upload after the close is
never seen (it is "missing"), and content that changes after the last look is caught by the aggregator, which
combines only files whose sha256 the validator published. Polls after the window closed record nothing, so a
watch re-run later (a backfill) keeps what was seen live. Two uploads first seen in the same poll are a tie: their
order is unknown, so neither is rejected as the other's copy (screening.py). A window no poll looked at while it
was open (the validator was down) is not `watched`: nothing of it can be judged, and the validator scores nobody
there (roles/validator.py) rather than every uid "missing".
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass

from templar_lib.buckets import (BucketAccessDenied, BucketError, BucketTimeout, LocalBucket, ObjectMissing,
                                 ObjectTooLarge)
from templar_lib.commitments import PeerBuckets
from templar_lib.gather import fetch_each
from templar_lib.wire import InvalidFile, gradient_key, keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sighting:
    """One uid's content for a window as the validator first saw it."""

    uid: int
    sha256: str
    block: int  # the chain block of the poll that first saw this content
    size: int
    modified: str  # the version the bucket reported, LastModified and ETag (the miner's claim; only used to
    # notice a change: S3 times have whole seconds, so two same-size writes within one differ by their ETag)


class Watch:
    """The first sightings of one window, persisted in a validator's state directory (`seen-{w}.json` and the bytes
    of each uid's newest content), so a watch that polls in one process is scored in another."""

    def __init__(self, window: int, *, blocks_per_window: int, state: LocalBucket, peers: PeerBuckets,
                 uids: Iterable[int], max_bytes: int, poll_timeout: float = 30.0) -> None:
        self.window = window
        self.opens, self.closes = window * blocks_per_window, (window + 1) * blocks_per_window
        self.state, self.peers, self.uids = state, peers, sorted(set(uids))
        self.max_bytes, self.poll_timeout = max_bytes, poll_timeout
        self._seen: dict[int, Sighting] = {}
        self._reasons: dict[int, str] = {}  # why a uid has nothing seen yet, from the last poll
        self.watched = False  # whether any poll looked while the window was open (its record is on disk)
        self._load()

    def at(self, window: int) -> Watch:
        """The watch of another window over the same state and buckets (what it recorded, if it ran)."""
        return Watch(window, blocks_per_window=self.closes - self.opens, state=self.state, peers=self.peers,
                     uids=self.uids, max_bytes=self.max_bytes, poll_timeout=self.poll_timeout)

    # ------------------------------------------------------------------ persistence
    def _record_key(self) -> str:
        return keys.SEEN.key(self.window)

    def _load(self) -> None:
        try:
            record = json.loads(self.state.get(self._record_key()))
        except ObjectMissing:
            return
        self.watched = True
        self._seen = {int(uid): Sighting(**entry) for uid, entry in record["seen"].items()}
        self._reasons = {int(uid): reason for uid, reason in record["reasons"].items()}

    def _save(self) -> None:
        record = {"window": self.window, "seen": {str(u): asdict(s) for u, s in sorted(self._seen.items())},
                  "reasons": {str(u): r for u, r in sorted(self._reasons.items())}}
        self.state.put(self._record_key(), json.dumps(record, sort_keys=True).encode())
        self.watched = True

    # ------------------------------------------------------------------ polling
    def poll(self, block: int) -> int:
        """Look at every uid's bucket once, at chain block `block`; returns how many new contents were seen. Nothing
        is recorded at or after the window's closing block (nor before it opened)."""
        if not self.opens <= block < self.closes:
            return 0
        looks, late = fetch_each(self.uids, lambda uid, deadline: self._look(uid, block, deadline), self.peers,
                                 timeout=self.poll_timeout)
        new = 0
        for uid, (sighting, reason) in looks.items():
            if sighting is not None:
                new += 1
                self._seen[uid] = sighting
                self._reasons.pop(uid, None)
            elif reason and uid not in self._seen:
                self._reasons[uid] = reason
        for uid in late:
            if uid not in self._seen:
                self._reasons[uid] = f"timeout: no answer within {self.poll_timeout:g}s"
        self._save()
        log.debug("watch of window %d at block %d: %d new", self.window, block, new)
        return new

    def _look(self, uid: int, block: int, deadline: float) -> tuple[Sighting | None, str | None]:
        """(a new sighting, None) when uid's content is new; (None, reason) when there is nothing to see."""
        bucket = self.peers.buckets.get(uid)
        if bucket is None:
            return None, self.peers.reason(uid)
        key = gradient_key(self.window, uid)
        try:
            info = bucket.stat(key, deadline=deadline)
            before = self._seen.get(uid)
            modified = info.modified.isoformat() + (f" {info.etag}" if info.etag else "")
            if before is not None and (before.size, before.modified) == (info.size, modified):
                return None, None  # unchanged since the last look
            data = bucket.get(key, max_bytes=self.max_bytes, deadline=deadline)
        except ObjectMissing:
            return None, f"missing: no {key}"
        except ObjectTooLarge as error:
            return None, f"too big: {error}"
        except BucketAccessDenied as error:
            return None, f"access denied: {error}"
        except BucketTimeout:
            return None, f"timeout: no answer within {self.poll_timeout:g}s"
        except BucketError as error:
            return None, f"unreachable: {error}"
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - what a stranger's endpoint makes a client raise: that uid's
            # look only, never the poll (which records nothing then: the window would go unwatched); a directory's
            # error on a local network is the operator's, and fails the poll as before
            if isinstance(bucket, LocalBucket):
                raise
            log.warning("uid %d: looking at %s raised %s", uid, key, type(error).__name__, exc_info=True)
            return None, f"unreachable: {type(error).__name__} looking at {key}"
        digest = hashlib.sha256(data).hexdigest()
        if before is not None and before.sha256 == digest:
            return None, None
        self.state.put(keys.seen_bytes_key(self.window, uid), data)
        return Sighting(uid, digest, block, len(data), modified), None

    # ------------------------------------------------------------------ results
    def sightings(self) -> dict[int, Sighting]:
        """Each uid's newest content first seen before the window closed, by uid."""
        return dict(sorted(self._seen.items()))

    def reasons(self) -> dict[int, str]:
        """Why each uid without a sighting has none (from the last poll that looked)."""
        return {uid: reason for uid, reason in sorted(self._reasons.items()) if uid not in self._seen}

    def read(self, uid: int) -> bytes:
        """The bytes of uid's sighting, as the validator kept them. Raises InvalidFile when they were lost or do not
        hash to the record (the validator's own disk failed)."""
        sighting = self._seen[uid]
        try:
            data = self.state.get(keys.seen_bytes_key(self.window, uid))
        except ObjectMissing:
            raise InvalidFile("the validator lost the bytes it saw") from None
        if hashlib.sha256(data).hexdigest() != sighting.sha256:
            raise InvalidFile("the validator's copy does not hash to what it saw")
        return data
