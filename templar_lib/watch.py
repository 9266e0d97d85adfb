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
there (roles/validator.py) rather than every uid "missing". A watch that looked, then stopped before the close (the
process died or the node went down, and came back after it) is not `closed`: a file uploaded after its last poll was
never seen, so a uid it saw nothing of is not judged there (roles/validator.py), where it would have been "missing".
`closed` is recorded only by a process that polled the window and then saw the chain reach its close
(`saw_close`; a resident node that lost the chain meanwhile drops its watch instead), and the evaluation, in
another run, waits for it a poll's length (`wait_closed`); a miner cannot keep it from being recorded, since no
endpoint can make a poll fail or outlast poll_timeout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
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
        self.closed = False  # whether the process that polled last was still looking when the window closed
        self._polled = False  # whether this object polled while the window was open
        # a poll's workers write each new content's copy; one whose worker outlived the poll's deadline wrote it all
        # the same: the poll waits for the copies being written and records what they hold (_copies)
        self._copying = threading.Condition()
        self._writers = 0  # copies being written now
        self._generation = 0  # the poll running now, or the last: a worker of an earlier one writes nothing
        self._copies: dict[int, Sighting] = {}  # what this poll's workers wrote, by uid
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
        self.closed = record.get("closed", True) is not False  # absent: closed, or written before the field (judged
        # whole, as it was then)
        self._seen = {int(uid): Sighting(**entry) for uid, entry in record["seen"].items()}
        self._reasons = {int(uid): reason for uid, reason in record["reasons"].items()}

    def _save(self) -> None:
        record = {"window": self.window, "seen": {str(u): asdict(s) for u, s in sorted(self._seen.items())},
                  "reasons": {str(u): r for u, r in sorted(self._reasons.items())}} | (
                      {} if self.closed else {"closed": False})  # written only while open: a closed record's bytes
        # are those of a record written before the field
        self.state.put(self._record_key(), json.dumps(record, sort_keys=True).encode())
        self.watched = True

    # ------------------------------------------------------------------ polling
    def poll(self, block: int) -> int:
        """Look at every uid's bucket once, at chain block `block`; returns how many new contents were seen. Nothing
        is recorded at or after the window's closing block (nor before it opened), nor once the close is recorded (a
        chain handle a block behind another must not reopen it)."""
        if self.closed or not self.opens <= block < self.closes:
            return 0
        with self._copying:
            self._generation += 1
            generation, self._copies = self._generation, {}
        try:
            looks, late = fetch_each(self.uids, lambda uid, deadline: self._look(uid, block, deadline, generation),
                                     self.peers, timeout=self.poll_timeout)
        finally:
            with self._copying:  # no copy is written after this poll, and none is left half-way
                self._generation += 1
                self._copying.wait_for(lambda: self._writers == 0)
        new = 0
        for uid, (sighting, reason) in looks.items():
            if sighting is not None:
                new += 1
                self._seen[uid] = sighting
                self._reasons.pop(uid, None)
            elif reason and uid not in self._seen:
                self._reasons[uid] = reason
        for uid in late:
            if uid in self._copies:  # its worker wrote the copy after the deadline: the copy is what it saw
                new += 1
                self._seen[uid] = self._copies[uid]
                self._reasons.pop(uid, None)
            elif uid not in self._seen:
                self._reasons[uid] = f"timeout: no answer within {self.poll_timeout:g}s"
        self._polled = True
        self._save()
        log.debug("watch of window %d at block %d: %d new", self.window, block, new)
        return new

    def saw_close(self, block: int) -> bool:
        """Record that this watch's process, having polled the window, was still looking when the chain reached its
        close (`block` ≥ the closing block): no file landed between its last poll and the close unlooked-for but by
        the ordinary interval between two polls. Called by the loop that polls (the gradient_sightings asset, the
        resident node, the simulation); a process that did not poll the window (a run after the close) records
        nothing. Returns whether the watch is closed."""
        if block >= self.closes and self._polled and not self.closed:
            self.closed = True
            self._save()
        return self.closed

    def lost_sight(self) -> None:
        """The polling process could not look for a while (it could not read the chain's block): a close it sees
        next is recorded only after it has looked again (saw_close)."""
        self._polled = False

    def wait_closed(self, seconds: float, *, sleep: Callable[[float], None] = time.sleep) -> bool:
        """Where the watch looked but its record is not closed, read the record again until the process polling it
        records the close, for at most `seconds` (its last poll may still be running: a poll lasts up to
        poll_timeout, then the loop sleeps before it sees the close). The evaluation runs in another process than the
        watch and may start as the window closes; without this wait it would judge only what it saw so far, and
        leave every uid it had not seen unjudged. Every poll rewrites the record, so one written more than `seconds`
        ago has nobody polling it any more (the process died): no wait then. Returns whether the watch is closed."""
        deadline = time.monotonic() + seconds
        while self.watched and not self.closed and time.monotonic() < deadline and self._record_age() < seconds:
            sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            self._load()
        return self.closed

    def _record_age(self) -> float:
        """Seconds since the record was last written (a poll's end, or the close)."""
        try:
            return time.time() - self.state.stat(self._record_key()).modified.timestamp()
        except ObjectMissing:
            return float("inf")

    def _look(self, uid: int, block: int, deadline: float, generation: int) -> tuple[Sighting | None, str | None]:
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
        sighting = Sighting(uid, digest, block, len(data), modified)
        with self._copying:
            # a copy starts being written only within its poll, by its deadline: its poll waits for it (a disk's
            # time, one file each); a worker past either writes nothing, and the next poll looks again
            if generation != self._generation or time.monotonic() > deadline:
                return None, None
            self._writers += 1
        written = False
        try:
            self.state.put(keys.seen_bytes_key(self.window, uid), data)  # atomic: on failure the old copy stands
            written = True
        finally:
            with self._copying:
                if written:
                    self._copies[uid] = sighting
                self._writers -= 1
                self._copying.notify_all()
        return sighting, None

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
