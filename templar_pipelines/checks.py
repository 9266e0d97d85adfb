"""Asset checks of the newest published checkpoint: one audit (templar_lib.audit), three verdicts."""

from __future__ import annotations

import dagster as dg

from templar_lib.audit import Audit, audit_checkpoint
from templar_pipelines.assets.aggregator import published_checkpoint
from templar_pipelines.resources import BucketsResource, HParamsResource, TrainingResource

MAX_HELD_OUT_REGRESSION = 0.05  # relative rise of held-out loss tolerated between consecutive checkpoints


def run_audit(buckets: BucketsResource, hparams: HParamsResource, training: TrainingResource,
              window: int | None = None) -> Audit:
    """The audit of the configured deployment (its aggregator bucket, dataset and model preset on its device): what
    the checks and `templar audit` report."""
    dataset = buckets.dataset()
    return audit_checkpoint(buckets.aggregator(), hparams=hparams.load(), model=training.model(dataset.vocab_size),
                            dataset=dataset, window=window, max_regression=MAX_HELD_OUT_REGRESSION)


def _metadata(audit: Audit) -> dict:
    return {"window": audit.window if audit.window is not None else -1, "sha256": audit.sha256,
            "reason": "; ".join(audit.reasons) or "ok",
            "held_out_loss": audit.held_out_loss if audit.held_out_loss is not None else float("nan")}


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec("checkpoint_matches_manifest", asset=published_checkpoint, blocking=True),
           dg.AssetCheckSpec("checkpoint_replays_from_previous", asset=published_checkpoint),
           dg.AssetCheckSpec("held_out_loss_within_threshold", asset=published_checkpoint)])
def checkpoint_audit(buckets: BucketsResource, hparams: HParamsResource, training: TrainingResource):
    """Loads and sha256 matches the manifest; replay from the previous checkpoint reproduces it; held-out loss
    did not regress more than MAX_HELD_OUT_REGRESSION."""
    audit = run_audit(buckets, hparams, training)
    metadata = _metadata(audit)
    yield dg.AssetCheckResult(check_name="checkpoint_matches_manifest", passed=audit.loads, metadata=metadata)
    yield dg.AssetCheckResult(check_name="checkpoint_replays_from_previous", passed=audit.replay_matches is not False,
                              metadata=metadata)
    yield dg.AssetCheckResult(check_name="held_out_loss_within_threshold", passed=audit.regression_ok is not False,
                              metadata=metadata, severity=dg.AssetCheckSeverity.WARN)
