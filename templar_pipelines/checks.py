"""Asset checks of the newest published checkpoint: one audit (templar_lib.audit), three verdicts.

A check that could not be evaluated (the checkpoint does not load, or there is no earlier checkpoint to replay from)
is reported as not passed, with `status: skipped` and the reason in its metadata: never as passed.
"""

from __future__ import annotations

import dagster as dg

from templar_lib.audit import CHECKS, HELD_OUT_LOSS, MATCHES_MANIFEST, SKIPPED, Audit, Verdict, audit_checkpoint
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


def check_result(audit: Audit, verdict: Verdict) -> dg.AssetCheckResult:
    """One verdict as a check result: passed only when passed; skipped and the advisory loss check at WARN."""
    advisory = verdict.status == SKIPPED or verdict.name == HELD_OUT_LOSS
    numbers = {"window": audit.window, "previous_window": audit.previous_window,
               "held_out_loss": audit.held_out_loss, "previous_held_out_loss": audit.previous_held_out_loss}
    metadata = {"status": verdict.status, "reason": verdict.reason, "sha256": audit.sha256,
                **{key: value for key, value in numbers.items() if value is not None}}
    return dg.AssetCheckResult(check_name=verdict.name, passed=verdict.passed, metadata=metadata,
                               description=f"{verdict.status}: {verdict.reason}",
                               severity=dg.AssetCheckSeverity.WARN if advisory else dg.AssetCheckSeverity.ERROR)


@dg.multi_asset_check(
    specs=[dg.AssetCheckSpec(name, asset=published_checkpoint, description=description,
                             blocking=name == MATCHES_MANIFEST)  # nothing downstream may consume a broken one
           for name, description in CHECKS.items()],
    description="The checkpoint audit (templar_lib.audit): the newest published checkpoint loads, replays from the "
                "previous one, and its held-out loss did not regress.")
def checkpoint_audit(buckets: BucketsResource, hparams: HParamsResource, training: TrainingResource):
    """Loads and sha256 matches the manifest; replay from the previous checkpoint reproduces it; held-out loss
    did not regress more than MAX_HELD_OUT_REGRESSION. Unevaluated checks are not passed."""
    audit = run_audit(buckets, hparams, training)
    for verdict in audit.verdicts:
        yield check_result(audit, verdict)
