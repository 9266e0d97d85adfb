"""Checkpoint audit (DESIGN §6): is the newest published checkpoint sound?

1. checkpoint_matches_manifest: it loads, and its tensor file hashes to the sha256 in its manifest;
2. checkpoint_replays_from_previous: replaying the published aggregations from the previous checkpoint reproduces
   it bit for bit;
3. held_out_loss_within_threshold: its held-out loss did not rise by more than `max_regression` (relative) against
   the previous checkpoint.

Each check ends in a `Verdict`: passed, failed, or skipped when it could not be evaluated (the checkpoint does not
load, or there is no earlier checkpoint to compare with), always with its reason. Only an evaluated check that held
is passed, so an audit passes only when all three were evaluated and held. The same audit backs the Dagster asset
checks and `templar audit`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

import torch

from templar_lib.buckets import Bucket, BucketError
from templar_lib.checkpoints import (CatchUpError, ModelState, catch_up, checkpoint_windows, load_checkpoint,
                                     read_checkpoint_manifest, state_sha256)
from templar_lib.data import Dataset
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_
from templar_lib.training import held_out_loss
from templar_lib.wire import InvalidFile
from templar_lib.wire.keys import CHECKPOINT, CHECKPOINT_MANIFEST

MATCHES_MANIFEST = "checkpoint_matches_manifest"
REPLAYS = "checkpoint_replays_from_previous"
HELD_OUT_LOSS = "held_out_loss_within_threshold"
CHECKS = {  # name -> what it asserts (the descriptions of the Dagster asset checks)
    MATCHES_MANIFEST: "The newest published checkpoint loads: its manifest validates and its tensor file hashes to "
                      "the manifest's sha256, with the shapes and finite values it declares.",
    REPLAYS: "Replaying the published aggregations from the previous checkpoint reproduces this checkpoint bit for "
             "bit (same outer step, same tensors). Skipped, so not passed, when this checkpoint does not load or "
             "there is no earlier checkpoint.",
    HELD_OUT_LOSS: "Held-out loss did not rise more than max_regression (5 %) against the previous checkpoint. "
                   "Skipped, so not passed, when either checkpoint does not load or there is no earlier one.",
}
PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"


@dataclass(frozen=True)
class Verdict:
    """One check's outcome. status: passed | failed | skipped (could not be evaluated: never counted as passed);
    reason: what was measured, or why it failed or could not be evaluated."""

    name: str
    status: str
    reason: str

    @property
    def passed(self) -> bool:
        return self.status == PASSED


@dataclass(frozen=True)
class Audit:
    window: int | None  # the checkpoint audited (None: none published)
    previous_window: int | None  # the checkpoint before it, replayed from and compared with
    sha256: str  # state_sha256 of the audited checkpoint ("" when it does not load)
    held_out_loss: float | None
    previous_held_out_loss: float | None
    verdicts: tuple[Verdict, ...]  # one per CHECKS entry, in that order

    @property
    def passed(self) -> bool:
        return all(verdict.passed for verdict in self.verdicts)

    @property
    def reasons(self) -> list[str]:
        """Why each check that did not pass did not."""
        return [f"{v.name} {v.status}: {v.reason}" for v in self.verdicts if not v.passed]


def file_location(bucket: Bucket, key: str) -> str:
    """Where `key` lives, to name it in a reason: the bucket's URL (without its query) joined with the key."""
    return f"{bucket.url.partition('?')[0].rstrip('/')}/{key}"


def load_verified(bucket: Bucket, window: int, shapes: Mapping[str, tuple[int, ...]] | None = None
                  ) -> tuple[ModelState | None, str]:
    """(θ_window, "") from checkpoint-{window} (with these parameter shapes, if given), or (None, a reason naming the
    file that is wrong)."""
    try:
        read_checkpoint_manifest(bucket, window)
    except (InvalidFile, BucketError) as error:
        return None, f"{file_location(bucket, CHECKPOINT_MANIFEST.key(window))}: {error}"
    try:
        return load_checkpoint(bucket, window, shapes=shapes), ""
    except (InvalidFile, BucketError) as error:
        return None, f"{file_location(bucket, CHECKPOINT.key(window))}: {error}"


def _held_out_loss(state: ModelState, model: torch.nn.Module, dataset: Dataset, hparams: HParams) -> float:
    load_parameters_(model, state.parameters)
    return held_out_loss(model, dataset, batch_size=hparams.batch_size)


def _replay(before: ModelState, state: ModelState, aggregator: Bucket, hparams: HParams) -> Verdict:
    """Replay aggregation-{before.window} .. aggregation-{state.window − 1} onto `before` and compare with `state`."""
    last = f"..aggregation-{state.window - 1}" if state.window - before.window > 1 else ""
    span = f"aggregation-{before.window}{last}"
    try:
        replayed = catch_up(before, aggregator, state.window, hparams=hparams)
    except CatchUpError as error:
        return Verdict(REPLAYS, FAILED, f"replay from checkpoint-{before.window} failed: {error}")
    differing = [name for name, tensor in state.parameters.items()
                 if name not in replayed.parameters or not replayed.parameters[name].equal(tensor)]
    if replayed.step != state.step or differing:
        first = f" (first: {differing[0]})" if differing else ""
        return Verdict(REPLAYS, FAILED, f"{span} replayed onto checkpoint-{before.window} give outer step "
                                        f"{replayed.step} (checkpoint-{state.window}: {state.step}) and differ in "
                                        f"{len(differing)} of {len(state.parameters)} tensors{first}")
    return Verdict(REPLAYS, PASSED, f"{span} replayed onto checkpoint-{before.window} reproduce checkpoint-"
                                    f"{state.window} bit for bit (outer step {state.step})")


def _regression(loss: float, previous_loss: float, previous: int, max_regression: float) -> Verdict:
    change = loss / previous_loss - 1 if previous_loss > 0 else float("inf")
    status = PASSED if loss <= previous_loss * (1 + max_regression) else FAILED
    return Verdict(HELD_OUT_LOSS, status, f"held-out loss {loss:.4f} against {previous_loss:.4f} at checkpoint-"
                                          f"{previous}: {change:+.1%} (limit +{max_regression:.0%})")


def _not_published(aggregator: Bucket, window: int | None) -> Audit:
    found = f"no checkpoint-{window}" if window is not None else "no checkpoint"
    reason = f"{found} published in {aggregator.url}"
    return Audit(window, None, "", None, None, (Verdict(MATCHES_MANIFEST, FAILED, reason),
                                                Verdict(REPLAYS, SKIPPED, reason),
                                                Verdict(HELD_OUT_LOSS, SKIPPED, reason)))


def audit_checkpoint(aggregator: Bucket, *, hparams: HParams, model: torch.nn.Module, dataset: Dataset,
                     window: int | None = None, max_regression: float = 0.05) -> Audit:
    """Audit checkpoint-{window} (default: the newest that has a manifest) against the one before it; held-out
    losses are measured in `model` (the node's model object, overwritten)."""
    windows = checkpoint_windows(aggregator)
    window = windows[0] if window is None and windows else window
    if window is None or window not in windows:
        return _not_published(aggregator, window)
    previous = next((w for w in windows if w < window), None)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # a checkpoint of another model fails
    state, broken = load_verified(aggregator, window, shapes)
    if state is None:
        unevaluated = f"not evaluated: checkpoint-{window} does not load"
        return Audit(window, previous, "", None, None, (Verdict(MATCHES_MANIFEST, FAILED, broken),
                                                        Verdict(REPLAYS, SKIPPED, unevaluated),
                                                        Verdict(HELD_OUT_LOSS, SKIPPED, unevaluated)))
    loads = Verdict(MATCHES_MANIFEST, PASSED, f"{file_location(aggregator, CHECKPOINT.key(window))} hashes to the "
                                              f"sha256 in {CHECKPOINT_MANIFEST.key(window)} (outer step {state.step})")
    measure = partial(_held_out_loss, model=model, dataset=dataset, hparams=hparams)  # the one model object
    return _against_previous(aggregator, state, previous, loads, measure=measure, hparams=hparams,
                             shapes=shapes, max_regression=max_regression)


def _against_previous(aggregator: Bucket, state: ModelState, previous: int | None, loads: Verdict, *,
                      measure: Callable[[ModelState], float], hparams: HParams,
                      shapes: Mapping[str, tuple[int, ...]], max_regression: float) -> Audit:
    """The audit of a checkpoint that loads (`state`): replay from and held-out loss against checkpoint-{previous}."""
    loss, digest = measure(state), state_sha256(state)
    if previous is None:
        first = f"not evaluated: checkpoint-{state.window} is the first published, no earlier one to compare with"
        return Audit(state.window, None, digest, loss, None,
                     (loads, Verdict(REPLAYS, SKIPPED, first), Verdict(HELD_OUT_LOSS, SKIPPED, first)))
    before, broken = load_verified(aggregator, previous, shapes)
    if before is None:
        return Audit(state.window, previous, digest, loss, None,
                     (loads, Verdict(REPLAYS, FAILED, f"cannot start the replay: {broken}"),
                      Verdict(HELD_OUT_LOSS, SKIPPED, f"not evaluated: {broken}")))
    previous_loss = measure(before)
    return Audit(state.window, previous, digest, loss, previous_loss,
                 (loads, _replay(before, state, aggregator, hparams),
                  _regression(loss, previous_loss, previous, max_regression)))
