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
from templar_lib.data import Dataset
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_
from templar_lib.training import held_out_loss
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


def _held_out_loss(state: ModelState, model: torch.nn.Module, dataset: Dataset, hparams: HParams) -> float:
    load_parameters_(model, state.parameters)
    return held_out_loss(model, dataset, batch_size=hparams.batch_size)


def audit_checkpoint(aggregator: Bucket, *, hparams: HParams, model: torch.nn.Module, dataset: Dataset,
                     window: int | None = None, max_regression: float = 0.05) -> Audit:
    """Audit checkpoint-{window} (default: the newest that has a manifest) against the one before it; held-out
    losses are measured in `model` (the node's model object, overwritten)."""
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
    loss = _held_out_loss(state, model, dataset, hparams)
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
            previous_loss = _held_out_loss(before, model, dataset, hparams)
            regression_ok = loss <= previous_loss * (1 + max_regression)
            if not regression_ok:
                reasons.append(f"held-out loss rose from {previous_loss:.4f} to {loss:.4f}")
    return Audit(window, previous, True, replay_matches, loss, previous_loss, regression_ok, digest, reasons)
