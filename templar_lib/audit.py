"""Checkpoint audit (DESIGN §6): is the newest published checkpoint sound?

1. it loads, and its tensor file hashes to the sha256 in its manifest;
2. replaying the published aggregations from the previous checkpoint reproduces it bit for bit;
3. its held-out loss did not regress by more than `max_regression` (relative) against the previous checkpoint.

The same checks back the Dagster asset checks and `templar audit`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from templar_lib.buckets import Bucket, BucketError
from templar_lib.checkpoints import (CatchUpError, ModelState, catch_up, checkpoint_windows, load_checkpoint,
                                     state_sha256)
from templar_lib.data import Manifest, load_pages
from templar_lib.hparams import HParams
from templar_lib.model import build_model, load_parameters_
from templar_lib.training import evaluate_loss
from templar_lib.wire import InvalidFile


@dataclass(frozen=True)
class Audit:
    window: int | None  # the checkpoint audited (None: none published)
    previous_window: int | None
    loads: bool
    replay_matches: bool | None  # None: no previous checkpoint to replay from
    held_out_loss: float | None
    previous_held_out_loss: float | None
    regression_ok: bool | None
    sha256: str
    reasons: list[str]

    @property
    def passed(self) -> bool:
        return self.loads and self.replay_matches is not False and self.regression_ok is not False


def held_out_loss(state: ModelState, *, preset: str, dataset: Bucket, manifest: Manifest, hparams: HParams,
                  pages: int = 8, model: torch.nn.Module | None = None) -> float:
    """Mean loss of θ (state) on the first `pages` held-out pages; in `model` (overwritten) when given, else in a
    CPU model built for the preset."""
    model = model if model is not None else build_model(preset, vocab_size=manifest.vocab_size)
    load_parameters_(model, state.parameters)
    return evaluate_loss(model, load_pages(dataset, manifest, manifest.held_out[:pages]), hparams.batch_size)


def audit_checkpoint(aggregator: Bucket, *, hparams: HParams, preset: str, dataset: Bucket, manifest: Manifest,
                     window: int | None = None, max_regression: float = 0.05) -> Audit:
    """Audit checkpoint-{window} (default: the newest that has a manifest) against the one before it."""
    windows = checkpoint_windows(aggregator)
    if window is None:
        window = windows[0] if windows else None
    if window is None:
        return Audit(None, None, False, None, None, None, None, "", ["no checkpoint published"])
    previous = next((w for w in windows if w < window), None)
    reasons = []
    try:
        state = load_checkpoint(aggregator, window)
    except (InvalidFile, BucketError) as error:
        return Audit(window, previous, False, None, None, None, None, "", [f"checkpoint-{window}: {error}"])
    digest = state_sha256(state)
    loss = held_out_loss(state, preset=preset, dataset=dataset, manifest=manifest, hparams=hparams)
    replay_matches = previous_loss = regression_ok = None
    if previous is not None:
        before = None
        try:
            before = load_checkpoint(aggregator, previous)
            replayed = catch_up(before, aggregator, window, hparams=hparams)
            replay_matches = replayed.step == state.step and all(
                replayed.parameters[n].equal(state.parameters[n]) for n in state.parameters)
            if not replay_matches:
                reasons.append(f"replaying windows {previous}..{window - 1} does not reproduce checkpoint-{window}")
        except (InvalidFile, BucketError, CatchUpError) as error:
            replay_matches = False
            reasons.append(f"replay from checkpoint-{previous} failed: {error}")
        if before is not None:
            previous_loss = held_out_loss(before, preset=preset, dataset=dataset, manifest=manifest, hparams=hparams)
            regression_ok = loss <= previous_loss * (1 + max_regression)
            if not regression_ok:
                reasons.append(f"held-out loss rose from {previous_loss:.4f} to {loss:.4f}")
    return Audit(window, previous, True, replay_matches, loss, previous_loss, regression_ok, digest, reasons)
