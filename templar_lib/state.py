"""Node-local state that outlives a run: θ_w, each miner's error-feedback momentum, the validator's ratings.

    <root>/model-{window}.safetensors            θ at the start of `window` (+ outer step count)
    <root>/fingerprint-{window}.json             model_fingerprint(θ_window), recorded when θ_window was saved:
                                                 θ is hashed once per window, not once per role (≈ 5 GB for 1b).
                                                 Deleted before the θ file is replaced and written after it, so it
                                                 never describes another θ (a killed save leaves none)
    <root>/momentum-{uid}-{window}.safetensors   miner `uid`'s momentum after folding in window `window`
    <root>/ratings-{window}.json                 validator ratings after window `window`

With `keep_windows` = K, saving θ_w deletes θ files of windows ≤ w − K, and saving a uid's momentum after w deletes
its momentum files of windows ≤ w − K (for the 1b preset each is ≈ 5 GB: a node must not keep every window). An
older θ is rebuilt from published checkpoints by `sync_to`; an older window's momentum is gone, so re-running a miner
window more than K windows back starts that miner from zeros.

Every file is keyed by the window it belongs to and written atomically (LocalBucket: temp file + rename), so
re-running window w reads the w − 1 files and rewrites the w files with the same bytes: runs are idempotent, and a
killed run leaves the previous state intact. Files are written by safetensors straight to the temporary file and
read through its mmap loader: a 5 GB state is never held in memory as one more buffer.

A resident process (`templar node`) gives its stores one WriteBehind: θ replayed by `sync_to` and each miner's
momentum are then kept in memory for the next window and written on a background thread, off the window's
critical path (for 1b, ≈ 9 GB of fsynced writes per miner node per window). A momentum file promised that way is
marked `momentum-{uid}-{window}.pending` until it lands; if the process dies first, loading it raises MomentumLost
(never a silent restart from zeros) and the miner recomputes it (`roles.miner.mine_window`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from templar_lib.buckets import LocalBucket, ObjectMissing
from templar_lib.checkpoints import (CatchUpError, ModelState, catch_up, latest_checkpoint, model_fingerprint,
                                     state_file_contents, state_from_file)
from templar_lib.ratings import Ratings

log = logging.getLogger(__name__)


class StateMissing(LookupError):
    """The state a window needs was never produced (an earlier window has not run)."""


class MomentumLost(StateMissing):
    """A momentum file this node promised (written behind) never landed: the process stopped before it did."""

    def __init__(self, uid: int, window: int) -> None:
        super().__init__(f"the momentum of uid {uid} after window {window} was being written behind when this node "
                         f"stopped, and never reached the disk")
        self.uid = uid
        self.window = window


class WriteBehind:
    """A resident process's state writes, done in order on one background thread while the next window works.

    Each queued write is the same put (temp file, fsync, rename) a synchronous save does, so the files are the same
    bytes and any window can be re-run from disk. The newest θ saved behind and each miner's newest momentum stay in
    memory (`model`, `momentum`) for the next window to take without reading them back.

    Barriers: `wait(key)` returns once the queued write of `key` has landed. A write that failed on the thread is
    tried once more there, synchronously; its error is raised if that fails too. `flush()` waits for every write (a
    resident node calls it before it exits; the executor's own exit hook finishes queued writes on a normal exit).
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="templar-state-write")
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[Future, Callable[[], object]]] = {}
        self.model: ModelState | None = None
        self.momentum: dict[int, tuple[int, dict[str, torch.Tensor]]] = {}  # uid -> (window, momentum after it)

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
    def __init__(self, root: str | Path, *, keep_windows: int | None = None, behind: WriteBehind | None = None
                 ) -> None:
        if keep_windows is not None and keep_windows < 1:
            raise ValueError(f"keep_windows must be >= 1 or None, got {keep_windows}")
        self.bucket = LocalBucket(root)
        self.root = self.bucket.root
        self.keep_windows = keep_windows
        self.behind = behind

    def _prune(self, prefix: str, window: int, suffix: str = ".safetensors") -> None:
        """Delete `{prefix}{v}{suffix}` for v <= window − keep_windows (nothing when keep_windows is None)."""
        if self.keep_windows is None:
            return
        for key in self.bucket.list(prefix):
            number = key[len(prefix):-len(suffix)]
            if key.endswith(suffix) and number.isdigit() and int(number) <= window - self.keep_windows:
                self.bucket.delete(key)

    # ------------------------------------------------------------------ θ
    def save_model(self, state: ModelState, *, behind: bool = False) -> str | None:
        """Save θ_{state.window}; returns the sha256 of the file (= checkpoints.state_sha256(state)).

        behind: when this store writes behind, keep θ in memory and queue the file instead (returns None). Callers
        must treat a saved state's parameters as read-only (the next load may return the same tensors)."""
        key = f"model-{state.window}.safetensors"
        state = dataclasses.replace(state, fingerprint=state.fingerprint or model_fingerprint(state.parameters))
        if self.behind is None:
            return self._write_model(state)
        if self.behind.model is None or state.window >= self.behind.model.window:
            self.behind.model = state
        if behind:
            self.behind.submit(key, lambda: self._write_model(state))
            return None
        self.behind.wait(key)  # a queued write of the same key must not land after this one
        return self._write_model(state)

    def _write_model(self, state: ModelState) -> str:
        key, record = f"model-{state.window}.safetensors", f"fingerprint-{state.window}.json"
        tensors, metadata = state_file_contents(state)
        self.bucket.delete(record)
        self.bucket.put_file(key, lambda path: save_file(tensors, path, metadata=metadata))
        self.bucket.put(record, json.dumps({"window": state.window, "fingerprint": state.fingerprint}).encode())
        self._prune("model-", state.window)
        self._prune("fingerprint-", state.window, ".json")
        with self.bucket.local_path(key).open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def _held_model(self, window: int) -> ModelState | None:
        held = self.behind.model if self.behind is not None else None
        return held if held is not None and held.window == window else None

    def _fingerprint(self, window: int) -> str | None:
        """The fingerprint recorded when θ_window was saved; None when there is none (callers compute it)."""
        try:
            record = json.loads(self.bucket.get(f"fingerprint-{window}.json"))
        except (ObjectMissing, ValueError):
            return None
        fingerprint = record.get("fingerprint") if isinstance(record, dict) and record.get("window") == window else None
        return fingerprint if isinstance(fingerprint, str) else None

    def has_model(self, window: int) -> bool:
        return self._held_model(window) is not None or self.bucket.exists(f"model-{window}.safetensors")

    def load_model(self, window: int) -> ModelState:
        held = self._held_model(window)
        if held is not None:
            return held
        if self.behind is not None:
            self.behind.wait(f"model-{window}.safetensors")
        try:
            state = state_from_file(self.bucket.local_path(f"model-{window}.safetensors"))
        except (ObjectMissing, FileNotFoundError):  # never written, or pruned (keep_windows) as it was opened
            raise StateMissing(f"θ_{window} is not in {self.root}: window {window - 1} has not been aggregated "
                               f"and checkpointed here, or it is older than the windows kept (run the windows in "
                               f"order, or catch up from a checkpoint)") from None
        return dataclasses.replace(state, fingerprint=self._fingerprint(window))

    def model_windows(self) -> list[int]:
        windows = {int(key[len("model-"):-len(".safetensors")]) for key in self.bucket.list("model-")
                   if key.endswith(".safetensors")}
        held = self.behind.model if self.behind is not None else None
        return sorted(windows | ({held.window} if held is not None else set()))

    # ------------------------------------------------------------------ momentum
    def save_momentum(self, uid: int, window: int, momentum: dict[str, torch.Tensor], *, behind: bool = True
                      ) -> None:
        """Save a miner's momentum after `window`. When this store writes behind (and `behind`), the tensors are
        kept, as they are, for the next window's load, and the file is queued: the caller must not modify them."""
        key, marker = f"momentum-{uid}-{window}.safetensors", f"momentum-{uid}-{window}.pending"
        if self.behind is None or not behind:
            if self.behind is not None:
                self.behind.wait(key)  # a queued write of the same key must not land after this one
                self.behind.momentum.pop(uid, None)
            self._write_momentum(uid, window, momentum)
            return
        self.behind.momentum[uid] = (window, momentum)
        self.bucket.put(marker, b"")  # so that a write that never lands is told from a miner with no state
        self.behind.submit(key, lambda: self._write_momentum(uid, window, momentum))

    def _write_momentum(self, uid: int, window: int, momentum: dict[str, torch.Tensor]) -> None:
        tensors = {name: m.detach().to("cpu").contiguous() for name, m in sorted(momentum.items())}
        self.bucket.put_file(f"momentum-{uid}-{window}.safetensors", lambda path: save_file(tensors, path))
        self.bucket.delete(f"momentum-{uid}-{window}.pending")
        self._prune(f"momentum-{uid}-", window)
        self._prune(f"momentum-{uid}-", window, ".pending")

    def load_momentum(self, uid: int, window: int) -> dict[str, torch.Tensor] | None:
        """Momentum after `window`, or None when the miner has no state there (it starts from zeros).

        The caller may update the returned tensors in place (ErrorFeedback does): a momentum held in memory is
        handed over once its file has landed, and is no longer held. Raises MomentumLost when its write behind
        never landed."""
        key = f"momentum-{uid}-{window}.safetensors"
        if self.behind is not None:
            self.behind.wait(key)
            held = self.behind.momentum.get(uid)
            if held is not None and held[0] == window:
                del self.behind.momentum[uid]
                return held[1]
        try:
            return load_file(self.bucket.local_path(key))
        except ObjectMissing:
            if self.bucket.exists(f"momentum-{uid}-{window}.pending"):
                raise MomentumLost(uid, window) from None
            return None

    # ------------------------------------------------------------------ metrics
    def record_held_out_loss(self, window: int, loss: float) -> None:
        """Held-out loss of θ_window, kept for the loss-over-windows chart (one small file per window)."""
        self.bucket.put(f"held-out-{window}.json", json.dumps({"window": window, "loss": loss}).encode())

    def held_out_losses(self, last: int = 30) -> dict[int, float]:
        """The most recent `last` recorded held-out losses by window."""
        windows = sorted(int(key[len("held-out-"):-len(".json")]) for key in self.bucket.list("held-out-"))[-last:]
        return {w: float(json.loads(self.bucket.get(f"held-out-{w}.json"))["loss"]) for w in windows}

    # ------------------------------------------------------------------ ratings
    def save_ratings(self, ratings: Ratings) -> None:
        self.bucket.put(f"ratings-{ratings.window}.json", ratings.to_json())

    def load_ratings(self, window: int) -> Ratings:
        """Ratings after `window`; fresh ratings when there are none (before the first evaluated window)."""
        try:
            return Ratings.from_json(self.bucket.get(f"ratings-{window}.json"))
        except ObjectMissing:
            return Ratings()


def sync_to(store: StateStore, aggregator, window: int, *, hparams) -> ModelState:
    """θ_window for this node, resyncing when it is behind (a late joiner, or a node that missed windows).

    Start from the newest of: the node's own θ at or before `window`, and the newest valid published checkpoint at or
    before `window`; replay the published aggregations up to `window` (bit-identical to a node that ran them all
    live, on CPU) and save the result. Raises StateMissing when there is nothing to start from or an aggregation
    needed for the replay is missing or invalid.
    """
    if store.has_model(window):
        return store.load_model(window)
    local = [w for w in store.model_windows() if w <= window]
    published = latest_checkpoint(aggregator, at_most=window)
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
    store.save_model(state, behind=True)
    return store.load_model(window)  # with the fingerprint the save recorded
