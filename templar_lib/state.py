"""Node-local state that outlives a run, and how it survives a kill: θ_w, each miner's error-feedback momentum, the
validator's ratings and weights, and the held-out losses people plot. File names: templar_lib.wire.keys.

    model-{window}.safetensors            θ at the start of `window` (+ outer step count)
    fingerprint-{window}.json             model_fingerprint(θ_window), recorded when θ_window was saved, so θ is
                                          hashed once per window, not once per role. Deleted before the θ file is
                                          replaced and written after it: it never describes another θ
    momentum-{uid}-{window}.safetensors   miner `uid`'s momentum after folding in window `window`
    momentum-{uid}-{window}.pending       that momentum file was promised by a write in the background
    carried-{uid}-{window}.json           the momentum after `window` is the one after window − 1 (the miner did not
                                          mine `window`: roles.miner.skip_window); loads follow it back
    pruned-momentum-{uid}.json            the windows whose momentum files keep_windows deleted
    ratings-{window}.json                 validator ratings after window `window`
    weights-{window}.json                 the chain weights those ratings give
    held-out-{window}.json                held-out loss of θ_window
    seen-{window}-{uid}.safetensors       the validator's copy of what its watch saw (watch.py); kept for the
                                          windows an evaluation reads (prune_seen), the seen-{window}.json records
                                          for good
    pruned-seen.json                      the newest window whose copies prune_seen deleted

The durability contract:

1. Every file is keyed by the window it belongs to and written atomically (LocalBucket: temp file, fsync, rename),
   so re-running window w reads the w − 1 files and rewrites the w files with the same bytes: runs are idempotent,
   and a killed run leaves the previous state intact. Tensors are written by safetensors straight into the
   temporary file and read through its mmap loader, never held in memory as one more buffer.
2. With `keep_windows` = K, saving θ_w deletes θ files of windows ≤ w − K, and saving a uid's momentum after w
   deletes its momentum files of windows ≤ w − K. An older θ is rebuilt by `sync_to`: the published aggregations
   replayed from the newest published checkpoint or θ file at or before it. A store with `keep_origin` (a node's:
   NodeResource) never deletes its oldest θ file, the node's origin (θ_0 of `templar init`, or the checkpoint it
   joined from), so θ of every window since, those before the first published checkpoint included, can be rebuilt:
   a backfill of any window reproduces it. The windows whose momentum was deleted are recorded
   (`pruned-momentum-{uid}.json`): loading one raises MomentumPruned (contract point 4's MomentumLost), and the miner
   recomputes it from θ_window and the momentum before it instead of starting from zeros, when both are here (re-running
   windows in order from the first whose momentum was deleted recomputes each in turn); when they are not, loading it
   raises MomentumUnrecoverable, never a silent restart from zeros that would upload other bytes than live.
3. A resident process (`templar node`) gives its stores one `WriteBehind` per state directory
   (`WriteBehind.for_directory`). A store with a writer writes θ and momentum in the background by default: the
   newest θ and each miner's newest momentum stay in memory for the next window, and their files are written by one
   background thread, off the window's critical path. `background=False` writes now, after any queued write of the
   same file. A store without a writer always writes now.
4. A momentum file promised in the background is marked `.pending` until it lands. If the process dies first, loading
   it raises MomentumLost (never a silent restart from zeros), and the miner recomputes it from θ_window and its pages
   (roles.miner.mine_window): mining is deterministic, so the recomputed file has the same bytes.
5. The resident process calls `WriteBehind.flush_all()` before it exits; a failed background write is retried once
   at its barrier and then raised.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file

from templar_lib.buckets import LocalBucket, ObjectMissing
from templar_lib.checkpoints import (CatchUpError, ModelState, catch_up, latest_checkpoint, model_fingerprint,
                                     state_file_contents, state_from_file)
from templar_lib.ratings import Ratings
from templar_lib.wire import keys

log = logging.getLogger(__name__)
RATINGS_LOOKBACK = 64  # windows a validator looks back for the ratings it goes on from (more than a 50-window ban)


class StateMissing(LookupError):
    """The state a window needs was never produced (an earlier window has not run)."""


class MomentumLost(StateMissing):
    """A momentum file this node promised (written behind) never landed: the process stopped before it did."""

    def __init__(self, uid: int, window: int) -> None:
        super().__init__(f"the momentum of uid {uid} after window {window} was being written behind when this node "
                         f"stopped, and never reached the disk")
        self.uid = uid
        self.window = window


class MomentumPruned(MomentumLost):
    """A momentum file this node wrote once and later deleted (keep_windows): a backfill of an old window needs it."""

    def __init__(self, uid: int, window: int, root: Path) -> None:
        StateMissing.__init__(self, f"the momentum of uid {uid} after window {window} was deleted from {root} "
                                    f"(only the newest keep_windows windows are kept)")
        self.uid = uid
        self.window = window


class MomentumUnrecoverable(RuntimeError):
    """A momentum file keep_windows deleted, which the miner cannot recompute exactly either (θ or the momentum before
    it is gone too): mining that window again would upload other bytes than it did live, so it is refused. Not a
    StateMissing: nothing may fall back to zeros."""


def pruned_momentum_key(uid: int) -> str:
    """The record of the windows whose momentum file of `uid` keep_windows deleted (templar_lib.wire.keys lists the
    other state files)."""
    return f"pruned-momentum-{uid}.json"


SEEN_PRUNED_KEY = "pruned-seen.json"
SEEN_COPY_WINDOWS = 3  # windows of the watch's copies an evaluation of w reads: w's, and the checks' of w − 1, w − 2

_RECORDS = threading.Lock()  # read-modify-write of the pruned-momentum records (the writer thread and the caller)


class WriteBehind:
    """A resident process's state writes, done in order on one background thread while the next window works.

    One per state directory and process (`for_directory`), shared by every run the process executes, so one window
    hands θ and momentum to the next in memory.

    Each queued write is the same put (temp file, fsync, rename) a synchronous save does, so the files are the same
    bytes and any window can be re-run from disk. The newest θ saved behind and each miner's newest momentum stay in
    memory (`model`, `momentum`) for the next window to take without reading them back.

    Barriers: `wait(key)` returns once the queued write of `key` has landed. A write that failed on the thread is
    tried once more there, synchronously; its error is raised if that fails too. `flush()` waits for every write (a
    resident node calls it before it exits; the executor's own exit hook finishes queued writes on a normal exit).
    """

    _shared: ClassVar[dict[str, WriteBehind]] = {}

    @classmethod
    def for_directory(cls, state_dir: str | Path) -> WriteBehind:
        """The process's writer for a state directory (created on first use)."""
        key = str(Path(state_dir).resolve())
        if key not in cls._shared:
            cls._shared[key] = cls()
        return cls._shared[key]

    @classmethod
    def flush_all(cls) -> None:
        """Wait until every file this process's writers queued has landed (raises the first write that failed)."""
        for writer in list(cls._shared.values()):
            writer.flush()

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="templar-state-write")
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Future, Callable[[], object]]] = {}
        self.model: ModelState | None = None
        self.momentum: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}  # uid -> (window, momentum after it)
        # uid -> (window, the momentum held, its state digest), as saved; handed over with it, once, and dropped with
        # it (StateStore.load_momentum_with_digest)
        self.digests: dict[int, tuple[int, dict[str, torch.Tensor], str]] = {}

    def submit(self, key: str, write: Callable[[], object]) -> None:
        entry = (self._executor.submit(write), write)
        with self._lock:
            self._pending = {k: e for k, e in self._pending.items() if not e[0].done() or e[0].exception()}
            self._pending[key] = entry

    def wait(self, key: str) -> None:
        with self._lock:
            entry = self._pending.get(key)
        if entry is None:
            return
        future, write = entry
        try:
            future.result()
        except Exception as error:  # noqa: BLE001 - one synchronous retry, then the caller sees the error
            log.warning("writing %s behind failed (%s: %s); writing it again now", key, type(error).__name__, error)
            write()
        finally:
            with self._lock:
                if self._pending.get(key) is entry:
                    del self._pending[key]

    def flush(self) -> None:
        with self._lock:
            keys = list(self._pending)
        for key in keys:
            self.wait(key)


class StateStore:
    """The state files of one node (the module docstring tells the whole contract)."""

    def __init__(self, root: str | Path, *, keep_windows: int | None = None, writer: WriteBehind | None = None,
                 keep_origin: bool = False) -> None:
        if keep_windows is not None and keep_windows < 1:
            raise ValueError(f"keep_windows must be >= 1 or None, got {keep_windows}")
        self.bucket = LocalBucket(root)
        self.root = self.bucket.root
        self.keep_windows = keep_windows
        self.writer = writer
        self.keep_origin = keep_origin

    def _prune(self, family: keys.Family, window: int, *, keep: int | None = None,
               through: Callable[[int], int] = lambda number: number) -> list[int]:
        """Delete the files of `family` that stand for no window after window − keep_windows (none when keep_windows
        is None), but not the one of window `keep`; a file of window n stands for the windows n to through(n) (a
        momentum file, for those carried over from it too: carry_momentum). Returns the windows deleted files stood
        for."""
        if self.keep_windows is None:
            return []
        deleted = []
        for key in self.bucket.list(family.prefix):
            number = family.window_of(key)
            if number is not None and number != keep and (last := through(number)) <= window - self.keep_windows:
                self.bucket.delete(key)
                deleted.extend(range(number, last + 1))
        return sorted(deleted)

    def origin(self) -> int | None:
        """The window of the oldest θ file here: with keep_origin, the one θ keep_windows never deletes."""
        windows = [keys.MODEL.window_of(key) for key in self.bucket.list(keys.MODEL.prefix)]
        return min((w for w in windows if w is not None), default=None)

    # ------------------------------------------------------------------ θ
    def save_model(self, state: ModelState, *, background: bool = True) -> str | None:
        """Save θ_{state.window}; returns the sha256 of the file (= checkpoints.state_sha256(state)), or None when
        the file was queued for the background (contract point 3). Callers must treat a saved state's parameters as
        read-only (the next load may return the same tensors)."""
        key = keys.MODEL.key(state.window)
        state = dataclasses.replace(state, fingerprint=state.fingerprint or model_fingerprint(state.parameters))
        if self.writer is None:
            return self._write_model(state)
        if self.writer.model is None or state.window >= self.writer.model.window:
            self.writer.model = state
        if background:
            self.writer.submit(key, lambda: self._write_model(state))
            return None
        self.writer.wait(key)  # a queued write of the same key must not land after this one
        return self._write_model(state)

    def _write_model(self, state: ModelState) -> str:
        key, record = keys.MODEL.key(state.window), keys.FINGERPRINT.key(state.window)
        tensors, metadata = state_file_contents(state)
        self.bucket.delete(record)
        self.bucket.put_file(key, lambda path: save_file(tensors, path, metadata=metadata))
        self.bucket.put(record, json.dumps({"window": state.window, "fingerprint": state.fingerprint}).encode())
        origin = self.origin() if self.keep_origin else None
        self._prune(keys.MODEL, state.window, keep=origin)
        self._prune(keys.FINGERPRINT, state.window, keep=origin)
        with self.bucket.local_path(key).open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def _held_model(self, window: int) -> ModelState | None:
        held = self.writer.model if self.writer is not None else None
        return held if held is not None and held.window == window else None

    def _fingerprint(self, window: int) -> str | None:
        """The fingerprint recorded when θ_window was saved; None when there is none (callers compute it)."""
        try:
            record = json.loads(self.bucket.get(keys.FINGERPRINT.key(window)))
        except (ObjectMissing, ValueError):
            return None
        fingerprint = record.get("fingerprint") if isinstance(record, dict) and record.get("window") == window else None
        return fingerprint if isinstance(fingerprint, str) else None

    def has_model(self, window: int) -> bool:
        return self._held_model(window) is not None or self.bucket.exists(keys.MODEL.key(window))

    def load_model(self, window: int) -> ModelState:
        held = self._held_model(window)
        if held is not None:
            return held
        if self.writer is not None:
            self.writer.wait(keys.MODEL.key(window))
        try:
            state = state_from_file(self.bucket.local_path(keys.MODEL.key(window)))
        except (ObjectMissing, FileNotFoundError):  # never written, or pruned (keep_windows) as it was opened
            raise StateMissing(f"θ_{window} is not in {self.root}: window {window - 1} has not been aggregated "
                               f"and checkpointed here, or it is older than the windows kept (run the windows in "
                               f"order, or catch up from a checkpoint)") from None
        return dataclasses.replace(state, fingerprint=self._fingerprint(window))

    def parameters_at(self, window: int) -> dict[str, torch.Tensor] | None:
        """θ_window's parameters when this node still has them (None otherwise): what a validator compares a lagging
        miner's probes with."""
        try:
            return self.load_model(window).parameters
        except StateMissing:
            return None

    def model_windows(self) -> list[int]:
        windows = {keys.MODEL.window_of(key) for key in self.bucket.list(keys.MODEL.prefix)} - {None}
        held = self.writer.model if self.writer is not None else None
        return sorted(windows | ({held.window} if held is not None else set()))

    # ------------------------------------------------------------------ momentum
    def save_momentum(self, uid: int, window: int, momentum: dict[str, torch.Tensor], *, background: bool = True,
                      digest: str | None = None) -> None:
        """Save a miner's momentum after `window`. In the background (contract points 3, 4) the tensors are kept, as
        they are, for the next window's load, and the file is queued: the caller must not modify them. digest: their
        state digest (spot_check.state_digest), kept with them for the next window (load_momentum_with_digest)."""
        key, carried = keys.momentum(uid).key(window), keys.carried(uid).key(window)
        if self.writer is None or not background:
            if self.writer is not None:
                self.writer.wait(key)  # a queued write of the same key must not land after this one
                self.writer.momentum.pop(uid, None)
                self.writer.digests.pop(uid, None)
            self._write_momentum(uid, window, momentum)
            self.bucket.delete(carried)  # mined after all: this state, not the one carried over
            return
        self.writer.momentum[uid] = (window, momentum)
        self.writer.digests.pop(uid, None)
        if digest is not None:
            self.writer.digests[uid] = (window, momentum, digest)
        # so that a write that never lands is told from a miner with no state
        self.bucket.put(keys.momentum_pending(uid).key(window), b"")
        self.bucket.delete(carried)  # after the marker: a write that never lands is recomputed, not carried
        self.writer.submit(key, lambda: self._write_momentum(uid, window, momentum))

    def carry_momentum(self, uid: int, window: int) -> None:
        """Record that uid's momentum after `window` is its momentum after window − 1: the miner did not mine
        `window`. Nothing is copied (a state is up to three times θ's size): loads of `window` follow the mark back to
        the newest window it mined, whose file (or write behind, or recomputation) stands for both and is kept as long
        as they are (keep_windows counts it as the last window it stands for), and a save of `window` (mining it
        after all) replaces the mark. A backfill through the gradients asset carries it again (roles.miner
        .skip_window), as the node did live."""
        self.bucket.put(keys.carried(uid).key(window), json.dumps({"uid": uid, "window": window,
                                                                   "carried_from": window - 1}).encode())

    def _mined(self, uid: int, window: int) -> int:
        """The newest window ≤ `window` whose momentum uid's miner made: `window` itself unless it was carried over
        (carry_momentum), possibly across several windows in a row."""
        while window >= 0 and self.bucket.exists(keys.carried(uid).key(window)) and not (
                self.bucket.exists(keys.momentum(uid).key(window))  # mined after all, killed before the mark went
                or self.bucket.exists(keys.momentum_pending(uid).key(window))):
            window -= 1
        return window

    def _write_momentum(self, uid: int, window: int, momentum: dict[str, torch.Tensor]) -> None:
        tensors = {name: m.detach().to("cpu").contiguous() for name, m in sorted(momentum.items())}
        self.bucket.put_file(keys.momentum(uid).key(window), lambda path: save_file(tensors, path))
        self.bucket.delete(keys.momentum_pending(uid).key(window))
        # a state is kept as long as the windows carried over from it, whose loads resolve to it; their marks stay (a
        # load of one resolves to the deleted file, and recomputes it where it can)
        self._record_pruned(uid, self._prune(keys.momentum(uid), window,
                                             through=lambda mined: self._carried_through(uid, mined)))
        self._prune(keys.momentum_pending(uid), window)

    def _carried_through(self, uid: int, window: int) -> int:
        """The last window uid's momentum after `window` stands for: `window`, and the windows carried over from it
        in a row (carry_momentum)."""
        while self.bucket.exists(keys.carried(uid).key(window + 1)):
            window += 1
        return window

    def _record_pruned(self, uid: int, windows: list[int]) -> None:
        """Add `windows` to the record of uid's momentum windows deleted (kept as [first, last] ranges)."""
        if not windows:
            return
        with _RECORDS:
            ranges = self._pruned_ranges(uid)
            for window in windows:
                ranges.append([window, window])
            merged: list[list[int]] = []
            for first, last in sorted(ranges):
                if merged and first <= merged[-1][1] + 1:
                    merged[-1][1] = max(merged[-1][1], last)
                else:
                    merged.append([first, last])
            document = {"uid": uid, "windows": merged}
            self.bucket.put(pruned_momentum_key(uid), json.dumps(document, sort_keys=True).encode())

    def _pruned_ranges(self, uid: int) -> list[list[int]]:
        try:
            document = json.loads(self.bucket.get(pruned_momentum_key(uid)))
        except (ObjectMissing, ValueError):
            return []
        ranges = document.get("windows") if isinstance(document, dict) else None
        return [[int(first), int(last)] for first, last in ranges] if isinstance(ranges, list) else []

    def momentum_pruned(self, uid: int, window: int) -> bool:
        """Whether uid's momentum after `window` was saved here once and then deleted by keep_windows."""
        return any(first <= window <= last for first, last in self._pruned_ranges(uid))

    def load_momentum(self, uid: int, window: int) -> dict[str, torch.Tensor] | None:
        """Momentum after `window`, or None when the miner has no state there (it starts from zeros).

        The caller may update the returned tensors in place (ErrorFeedback does): a momentum held in memory is
        handed over once its file has landed, and is no longer held. Raises MomentumLost when its background write
        never landed, MomentumPruned when keep_windows deleted it and it can be recomputed, MomentumUnrecoverable when
        it cannot (contract points 2 and 4)."""
        return self.load_momentum_with_digest(uid, window)[0]

    def load_momentum_with_digest(self, uid: int, window: int) -> tuple[dict[str, torch.Tensor] | None, str | None]:
        """load_momentum, and the state digest saved with the momentum (save_momentum's `digest`) where it is handed
        over from memory, so that a miner hashes its state once a window instead of twice (its state after w − 1 is
        its state before w); None where it is read from its file (hash it: the file has no checksum to trust). A
        window carried over (carry_momentum) is the newest one before it that the miner mined."""
        window = self._mined(uid, window)
        if window < 0:
            return None, None
        key = keys.momentum(uid).key(window)
        if self.writer is not None:
            self.writer.wait(key)
            held = self.writer.momentum.get(uid)
            if held is not None and held[0] == window:
                del self.writer.momentum[uid]
                saved = self.writer.digests.pop(uid, None)
                return held[1], saved[2] if saved is not None and saved[0] == window and saved[1] is held[1] else None
        try:
            return load_file(self.bucket.local_path(key)), None
        except ObjectMissing:
            if self.bucket.exists(keys.momentum_pending(uid).key(window)):
                raise MomentumLost(uid, window) from None
            if self.momentum_pruned(uid, window):
                self._pruned_momentum(uid, window)
            return None, None

    def check_momentum(self, uid: int, window: int) -> None:
        """Raise MomentumUnrecoverable when load_momentum(uid, window) would, without loading anything: a backfill
        checks its first window before it starts."""
        if (window := self._mined(uid, window)) < 0:
            return
        held = self.writer is not None and self.writer.momentum.get(uid, (None,))[0] == window
        if held or self.bucket.exists(keys.momentum(uid).key(window)):
            return
        if not self.bucket.exists(keys.momentum_pending(uid).key(window)) and self.momentum_pruned(uid, window):
            try:
                self._pruned_momentum(uid, window)
            except MomentumPruned:
                return

    def _pruned_momentum(self, uid: int, window: int) -> None:
        """Raise for uid's momentum after `window`, deleted by keep_windows: MomentumPruned when the miner can
        recompute it exactly (θ_window and the momentum before it are here), MomentumUnrecoverable otherwise."""
        before = self._mined(uid, window - 1)  # the state mining `window` started from
        held = self.writer is not None and self.writer.momentum.get(uid, (None,))[0] == before
        if self.has_model(window) and (before < 0 or held or self.bucket.exists(keys.momentum(uid).key(before))
                                       or not (self.momentum_pruned(uid, before)
                                               or self.bucket.exists(keys.momentum_pending(uid).key(before)))):
            raise MomentumPruned(uid, window, self.root) from None
        first = next(first for first, last in self._pruned_ranges(uid) if first <= window <= last)
        gone = f"θ_{window}" if not self.has_model(window) else f"its momentum after window {before}"
        raise MomentumUnrecoverable(
            f"the momentum of uid {uid} after window {window} was deleted from {self.root} (only the newest "
            f"keep_windows windows are kept) and cannot be recomputed exactly: {gone} is gone too. Mining window "
            f"{window + 1} again would upload other bytes than it did live: backfill the windows in order from "
            f"window {first + 1} (each recomputes the momentum the next one needs)") from None

    # ------------------------------------------------------------------ the watch's copies
    def prune_seen(self, window: int) -> list[int]:
        """After the evaluation of `window`: delete the watch's copies of the files of windows ≤ window −
        max(keep_windows, SEEN_COPY_WINDOWS) (each window holds up to one file of max_gradient_bytes per uid, so a
        validator's disk would fill) and record the newest such window; none with keep_windows None. The
        `seen-{w}.json` records stay. Returns the windows whose copies were deleted."""
        if self.keep_windows is None:
            return []
        horizon = window - max(self.keep_windows, SEEN_COPY_WINDOWS)
        if horizon < 0:
            return []
        if horizon > self.seen_pruned_through():  # first: a kill while deleting leaves no evaluation to re-run
            self.bucket.put(SEEN_PRUNED_KEY, json.dumps({"through": horizon}).encode())
        deleted = set()
        for key in self.bucket.list("seen-"):
            copied = keys.seen_bytes_window(key)
            if copied is not None and copied <= horizon:
                self.bucket.delete(key)
                deleted.add(copied)
        return sorted(deleted)

    def seen_pruned_through(self) -> int:
        """The newest window whose copies prune_seen deleted (−1: none): an evaluation of a window up to two after
        it cannot be made again as it was (its scores and checks read those copies)."""
        try:
            through = json.loads(self.bucket.get(SEEN_PRUNED_KEY)).get("through")
        except (ObjectMissing, ValueError, AttributeError):
            return -1
        return through if isinstance(through, int) else -1

    # ------------------------------------------------------------------ metrics
    def record_held_out_loss(self, window: int, loss: float) -> None:
        """Held-out loss of θ_window, kept for the loss-over-windows chart (one small file per window)."""
        self.bucket.put(keys.HELD_OUT.key(window), json.dumps({"window": window, "loss": loss}).encode())

    def held_out_losses(self, last: int = 30) -> dict[int, float]:
        """The most recent `last` recorded held-out losses by window."""
        windows = {keys.HELD_OUT.window_of(key) for key in self.bucket.list(keys.HELD_OUT.prefix)} - {None}
        return {w: float(json.loads(self.bucket.get(keys.HELD_OUT.key(w)))["loss"]) for w in sorted(windows)[-last:]}

    # ------------------------------------------------------------------ ratings and weights
    def save_ratings(self, ratings: Ratings, weights: dict[int, float] | None) -> None:
        """The ratings after `ratings.window` and the chain weights they give (None: nothing positive to set)."""
        self.bucket.put(keys.RATINGS.key(ratings.window), ratings.to_json())
        document = {"window": ratings.window, "weights": None if weights is None else
                    {str(uid): weight for uid, weight in sorted(weights.items())}}
        self.bucket.put(keys.WEIGHTS.key(ratings.window), json.dumps(document, sort_keys=True).encode())

    def load_ratings(self, window: int) -> Ratings:
        """Ratings after `window`; fresh ratings when there are none (before the first evaluated window)."""
        try:
            return Ratings.from_json(self.bucket.get(keys.RATINGS.key(window)))
        except ObjectMissing:
            return Ratings()

    def latest_ratings(self, window: int) -> Ratings:
        """The ratings a validator goes on from after `window`: those after `window`, or, where it did not rate
        `window` (the node was down, or a backfill runs out of order), those after the latest window before it that
        it rated, so that its history and bans stand (fresh ratings would drop both, and set weights from one
        window); fresh ratings when it rated none in the RATINGS_LOOKBACK windows up to `window` (older ones are
        another era: its weights would follow miners that may have left). What the windows it did not rate would
        have added, roles.validator.ratings_before folds in from its reports of them."""
        for earlier in range(window, max(-1, window - RATINGS_LOOKBACK) - 1, -1):
            try:
                ratings = Ratings.from_json(self.bucket.get(keys.RATINGS.key(earlier)))
            except ObjectMissing:
                continue
            if earlier < window:
                log.warning("no ratings of window %d in %s: going on from those of window %d", window, self.root,
                            earlier)
            return ratings
        return Ratings()

    def load_weights(self, window: int) -> dict[int, float] | None:
        """The weights saved with the ratings after `window` (None: nothing positive to set). StateMissing when the
        ratings of `window` were not saved here."""
        try:
            document = json.loads(self.bucket.get(keys.WEIGHTS.key(window)))
        except ObjectMissing:
            raise StateMissing(f"no ratings of window {window} in {self.root}: rate the window first") from None
        weights = document["weights"]
        return None if weights is None else {int(uid): float(weight) for uid, weight in weights.items()}


def sync_to(store: StateStore, aggregator, window: int, *, hparams,
            model_shapes: Callable[[], Mapping[str, tuple[int, ...]]] | None = None) -> ModelState:
    """θ_window for this node, resyncing when it is behind (a late joiner, or a node that missed windows).

    Start from the newest of: the node's own θ at or before `window` (its origin included, which a store with
    keep_origin keeps), and the newest valid published checkpoint at or before `window`; replay the published
    aggregations up to `window` (bit-identical to a node that ran them all live, on CPU) and save the result. Raises
    StateMissing when there is nothing to start from or an aggregation needed for the replay is missing or invalid.
    model_shapes(): the node's model's parameter shapes, asked for only when θ_window is not in the store (a node
    opens its dataset to know its vocabulary): a published checkpoint of other shapes is skipped (and its download
    bounded by them), where without them it would be adopted and saved.
    """
    if store.has_model(window):
        return store.load_model(window)
    local = [w for w in store.model_windows() if w <= window]
    published = latest_checkpoint(aggregator, at_most=window,
                                  shapes=model_shapes() if model_shapes else None)  # another model's is skipped
    if local and (published is None or local[-1] >= published.window):
        start = store.load_model(local[-1])
    elif published is not None:
        start = published
    else:
        raise StateMissing(f"θ_{window} is not in {store.root} and no checkpoint at or before window {window} is "
                           f"published: run the earlier windows, or wait for a checkpoint")
    try:
        state = catch_up(start, aggregator, window, hparams=hparams)
    except CatchUpError as error:
        raise StateMissing(f"θ_{window} is not in {store.root} and resyncing from window {start.window} failed: "
                           f"{error} (run the earlier windows first)") from None
    store.save_model(state)
    return store.load_model(window)  # with the fingerprint the save recorded
