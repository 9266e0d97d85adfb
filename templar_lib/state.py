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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from templar_lib.buckets import LocalBucket, ObjectMissing
from templar_lib.checkpoints import (CatchUpError, ModelState, catch_up, latest_checkpoint, model_fingerprint,
                                     state_file_contents, state_from_file)
from templar_lib.ratings import Ratings


class StateMissing(LookupError):
    """The state a window needs was never produced (an earlier window has not run)."""


class StateStore:
    def __init__(self, root: str | Path, *, keep_windows: int | None = None) -> None:
        if keep_windows is not None and keep_windows < 1:
            raise ValueError(f"keep_windows must be >= 1 or None, got {keep_windows}")
        self.bucket = LocalBucket(root)
        self.root = self.bucket.root
        self.keep_windows = keep_windows

    def _prune(self, prefix: str, window: int, suffix: str = ".safetensors") -> None:
        """Delete `{prefix}{v}{suffix}` for v <= window − keep_windows (nothing when keep_windows is None)."""
        if self.keep_windows is None:
            return
        for key in self.bucket.list(prefix):
            number = key[len(prefix):-len(suffix)]
            if key.endswith(suffix) and number.isdigit() and int(number) <= window - self.keep_windows:
                self.bucket.delete(key)

    # ------------------------------------------------------------------ θ
    def save_model(self, state: ModelState) -> str:
        """Save θ_{state.window}; returns the sha256 of the file (= checkpoints.state_sha256(state))."""
        key = f"model-{state.window}.safetensors"
        tensors, metadata = state_file_contents(state)
        record = f"fingerprint-{state.window}.json"
        self.bucket.delete(record)
        self.bucket.put_file(key, lambda path: save_file(tensors, path, metadata=metadata))
        fingerprint = state.fingerprint or model_fingerprint(state.parameters)
        self.bucket.put(record, json.dumps({"window": state.window, "fingerprint": fingerprint}).encode())
        self._prune("model-", state.window)
        self._prune("fingerprint-", state.window, ".json")
        with self.bucket.local_path(key).open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def _fingerprint(self, window: int) -> str | None:
        """The fingerprint recorded when θ_window was saved; None when there is none (callers compute it)."""
        try:
            record = json.loads(self.bucket.get(f"fingerprint-{window}.json"))
        except (ObjectMissing, ValueError):
            return None
        fingerprint = record.get("fingerprint") if isinstance(record, dict) and record.get("window") == window else None
        return fingerprint if isinstance(fingerprint, str) else None

    def has_model(self, window: int) -> bool:
        return self.bucket.exists(f"model-{window}.safetensors")

    def load_model(self, window: int) -> ModelState:
        try:
            path = self.bucket.local_path(f"model-{window}.safetensors")
        except ObjectMissing:
            raise StateMissing(f"θ_{window} is not in {self.root}: window {window - 1} has not been aggregated "
                               f"and checkpointed here (run the windows in order, or catch up from a checkpoint)"
                               ) from None
        return dataclasses.replace(state_from_file(path), fingerprint=self._fingerprint(window))

    def model_windows(self) -> list[int]:
        return sorted(int(key[len("model-"):-len(".safetensors")]) for key in self.bucket.list("model-"))

    # ------------------------------------------------------------------ momentum
    def save_momentum(self, uid: int, window: int, momentum: dict[str, torch.Tensor]) -> None:
        tensors = {name: m.detach().to("cpu").contiguous() for name, m in sorted(momentum.items())}
        self.bucket.put_file(f"momentum-{uid}-{window}.safetensors", lambda path: save_file(tensors, path))
        self._prune(f"momentum-{uid}-", window)

    def load_momentum(self, uid: int, window: int) -> dict[str, torch.Tensor] | None:
        """Momentum after `window`, or None when the miner has no state there (it starts from zeros)."""
        try:
            return load_file(self.bucket.local_path(f"momentum-{uid}-{window}.safetensors"))
        except ObjectMissing:
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
    store.save_model(state)
    return store.load_model(window)  # with the fingerprint the save recorded
