"""Pure functions from templar_lib results to Dagster metadata (what a person checks in the UI)."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from templar_lib.hparams import HParams
from templar_lib.ratings import Ratings
from templar_lib.roles import AggregatorResult, MinerResult
from templar_lib.roles.spot_checks import is_failure
from templar_lib.roles.validator import WindowEvaluation
from templar_pipelines.health import NetworkHealth, WindowRecord


_COLUMN = dg.TableColumn
# Per-uid numeric keys (`uid_3_score`) are plotted over the window partitions by the UI, which draws at most 100
# numeric keys of an asset: the network asset's 3 series × PLOTTED_UIDS uids and its health numbers stay below that.
# The lowest uids are plotted, so each series stays the same uid's from window to window; tables hold every uid.
PLOTTED_UIDS = 24


def _table(columns: list[tuple[str, str]], rows: list[dict]) -> dg.TableMetadataValue:
    schema = dg.TableSchema(columns=[_COLUMN(name, kind) for name, kind in columns])
    return dg.MetadataValue.table(records=[dg.TableRecord(row) for row in rows], schema=schema)


def bar_chart(title: str, values: Mapping[int, float], unit: str = "", label: str = "uid",
              floor: float = 0.0) -> dg.MarkdownMetadataValue:
    """A text bar chart (the UI renders markdown), one bar per key; bars measure value − floor."""
    top = max((abs(v - floor) for v in values.values()), default=0.0) or 1.0
    lines = [f"**{title}**", "", "```"]
    for key, value in sorted(values.items()):
        lines.append(f"{label} {key:>4} {'█' * max(0, round(20 * (value - floor) / top)):<20} {value:.4g}{unit}")
    return dg.MetadataValue.md("\n".join(lines + ["```"]))


def pages_metadata(window: int, pages: Mapping[int, list[int]], tokens_per_page: int) -> dict:
    return {"window": window, "uids": len(pages), "token_count": tokens_per_page * sum(map(len, pages.values())),
            "pages": _table([("uid", "int"), ("pages", "string")],
                            [{"uid": uid, "pages": ",".join(map(str, ids))} for uid, ids in sorted(pages.items())])}


def protocol_metadata(hparams: HParams) -> dict:
    """What the files of a window mean: the strategy, the protocol hash in every file's header, and the settings it
    covers (HParams.protocol_settings; no secrets: hyper-parameters only)."""
    return {"strategy": hparams.strategy, "protocol_hash": hparams.protocol_hash(),
            "protocol": dg.MetadataValue.json(hparams.protocol_settings())}


def gradients_metadata(results: list[MinerResult]) -> dict:
    """Per miner: loss, throughput, bytes, and its inner-loss curve (sparseloco: one loss per inner AdamW step)."""
    rows = [{"uid": r.uid, "loss": round(r.loss, 5), "tokens_per_second": round(r.tokens_per_second, 1),
             "bytes": r.bytes, "compression_ratio": round(r.compression_ratio, 1), "momentum": r.momentum,
             "inner_losses": " → ".join(f"{loss:.4f}" for loss in r.inner_losses), "key": r.key} for r in results]
    return {
        "inner_loss_curves": dg.MetadataValue.md("\n".join(
            f"- uid {r.uid}: {_spark(r.inner_losses)} {r.inner_losses[0]:.4f} → {r.inner_losses[-1]:.4f}"
            for r in results if r.inner_losses) or "none"),
        "loss": sum(r.loss for r in results) / max(1, len(results)),
        "bytes": sum(r.bytes for r in results),
        "compression_ratio": sum(r.compression_ratio for r in results) / max(1, len(results)),
        "tokens_per_second": sum(r.tokens for r in results) / max(1e-9, sum(r.seconds for r in results)),
        "miners": _table([("uid", "int"), ("loss", "float"), ("tokens_per_second", "float"), ("bytes", "int"),
                          ("compression_ratio", "float"), ("momentum", "string"), ("inner_losses", "string"),
                          ("key", "string")], rows),
    }


def _spark(values: list[float]) -> str:
    """A text sparkline of a short series (the UI shows markdown, not charts, inside one materialisation)."""
    ticks, low, high = "▁▂▃▄▅▆▇█", min(values), max(values)
    return "".join(ticks[round((v - low) / (high - low) * 7) if high > low else 0] for v in values)


def evaluations_metadata(evaluation: WindowEvaluation) -> dict:
    rows = []
    for uid, score in evaluation.scores.items():
        losses = score.losses
        rows.append({"uid": uid, "loss_before": round(losses.random_before, 5) if losses else None,
                     "loss_after": round(losses.random_after, 5) if losses else None,
                     "own_before": round(losses.own_before, 5) if losses else None,
                     "own_after": round(losses.own_after, 5) if losses else None,
                     "score": round(score.score, 6), "indicator": score.indicator, "reason": score.reason})
    reasons = [f"- uid {uid}: {s.reason}" for uid, s in evaluation.scores.items() if s.reason]
    return {
        "watched": evaluation.report.watched,  # False: the watch never looked at the window, nobody is scored
        # uids not judged: the watch stopped before the close, and saw nothing of them
        "unjudged": ", ".join(map(str, evaluation.unjudged)) or "none",
        "valid_gradients": len(evaluation.valid_uids), "random_loss": evaluation.random_loss,
        "peers": ",".join(map(str, evaluation.peers)) or "(none)",
        "scores": _table([("uid", "int"), ("loss_before", "float"), ("loss_after", "float"), ("own_before", "float"),
                          ("own_after", "float"), ("score", "float"), ("indicator", "int"), ("reason", "string")],
                         rows),
        "zero_score_reasons": dg.MetadataValue.md("\n".join(reasons) or "none"),
        "spot_checks": spot_checks_line(evaluation.report),
        "keys_written": dg.MetadataValue.md("\n".join(f"- `{key}`" for key in evaluation.keys)),
        **per_uid("score", {uid: score.score for uid, score in evaluation.scores.items()}),
    }


def spot_checks_line(report) -> str:
    """The spot checks of the previous window this evaluation made (spot_check.py): how many passed, and each
    failure with its reason, and each check left pending (no state put yet: asked again a window later); "none" when
    none was drawn or the network does not check."""
    checks = report.checks
    if not checks:
        return "none"
    failed = [f"uid {uid} {'failed: ' if is_failure(reason) else ''}{reason}" for uid, reason in sorted(checks.items())
              if reason]
    passed = sum(1 for reason in checks.values() if not reason)
    return "; ".join([f"window {report.window - 1} (and window {report.window - 2}'s pending ones made again): "
                      f"{passed} passed"] + failed)


def sightings_metadata(watch) -> dict:
    rows = [{"uid": uid, "first_seen_block": s.block, "bytes": s.size, "sha256": s.sha256[:16]}
            for uid, s in watch.sightings().items()]
    return {"seen": len(rows), "closing_block": watch.closes, "watched": watch.watched, "closed": watch.closed,
            "sightings": _table([("uid", "int"), ("first_seen_block", "int"), ("bytes", "int"), ("sha256", "string")],
                                rows),
            "not_seen": dg.MetadataValue.md("\n".join(f"- uid {u}: {r}" for u, r in watch.reasons().items())
                                            or "none")}


def ratings_metadata(ratings: Ratings) -> dict:
    rows = [{"uid": uid, "mu": round(r.mu, 3), "sigma": round(r.sigma, 3), "ordinal": round(r.ordinal, 3),
             "binary_ma": round(r.binary_ma, 4), "score_ema": round(r.score_ema, 6),
             "banned_until": r.banned_until, "final": round(r.final, 6)} for uid, r in ratings.by_uid.items()]
    return {"window": ratings.window,
            "ratings": _table([("uid", "int"), ("mu", "float"), ("sigma", "float"), ("ordinal", "float"),
                               ("binary_ma", "float"), ("score_ema", "float"), ("banned_until", "int"),
                               ("final", "float")], rows),
            "final_scores": bar_chart("final = moving average of scores (0 while banned)", ratings.final_scores()),
            **per_uid("rating", {uid: rating.ordinal for uid, rating in ratings.by_uid.items()})}


def weights_metadata(weights: Mapping[int, float] | None, status: str, block: int, uids: list[int]) -> dict:
    """uids: every rated uid (a uid without weight plots as 0)."""
    return {"status": status, "block": block,
            "weights": bar_chart("weights set on the chain", dict(weights or {})),
            **per_uid("weight", {uid: (weights or {}).get(uid, 0.0) for uid in uids})}


def aggregation_metadata(result: AggregatorResult) -> dict:
    return {"peers_used": ",".join(map(str, result.peers)) or "(none)", "peer_count": len(result.peers),
            "lr": result.lr, "step": result.step, "bytes": result.bytes,
            "key": result.key,
            "skipped": dg.MetadataValue.md("\n".join(f"- uid {u}: {r}" for u, r in result.skipped.items()) or "none")}


def loss_chart(losses: Mapping[int, float]) -> dg.MarkdownMetadataValue:
    """Held-out loss over the recent windows (bars above the lowest value, so the trend is visible)."""
    floor = min(losses.values(), default=0.0) * 0.98
    return bar_chart("held-out loss of θ after each window", losses, label="θ_", floor=floor)


# ---------------------------------------------------------------------------------------------- views over windows
def per_uid(series: str, values: Mapping[int, float]) -> dict[str, float]:
    """`uid_{uid}_{series}` numeric keys, which the UI plots over the window partitions (first PLOTTED_UIDS uids)."""
    return {f"uid_{uid}_{series}": float(value) for uid, value in sorted(values.items())[:PLOTTED_UIDS]}


def human_bytes(count: int) -> str:
    """48123 -> "48.1 kB" (decimal units, three significant digits)."""
    if count < 1000:
        return f"{count} B"
    value, unit = float(count), "B"
    for unit in ("kB", "MB", "GB"):
        value /= 1000
        if value < 1000:
            break
    return f"{value:.3g} {unit}"


def miner_lines(results: list[MinerResult]) -> list[str]:
    """One step-log line per miner uid: pages, loss, upload size."""
    return [f"uid {r.uid}: {len(r.pages)} pages, loss {r.loss:.4g}, uploaded {human_bytes(r.bytes)}" for r in results]


def evaluation_lines(evaluation: WindowEvaluation, sizes: Mapping[int, int]) -> list[str]:
    """One step-log line per uid: what was downloaded (the watch's first sighting) and its score or why it is 0.
    sizes: uid -> bytes of the sighting scored."""
    lines = []
    for uid, score in evaluation.scores.items():
        got = f"downloaded {human_bytes(sizes[uid])}, " if uid in sizes else ""
        lines.append(f"uid {uid}: {got}zero, reason: {score.reason}" if score.reason
                     else f"uid {uid}: {got}scored {score.score:.3g}")
    unsampled = evaluation.report.unsampled
    unwatched = [] if evaluation.report.watched else [
        f"window {evaluation.report.window}: not watched while it was open (this validator was down): nobody scored"]
    unjudged = [f"uid {uid}: not judged: this validator's watch stopped before the window closed and saw nothing of "
                f"it" for uid in evaluation.unjudged]
    return unwatched + lines + unjudged + [f"uid {uid}: seen, not sampled this window (no score)"
                                           for uid in unsampled]


def aggregation_lines(result: AggregatorResult) -> list[str]:
    """One step-log line per uid of the peers list: combined, or refused and why."""
    lines = [f"uid {uid}: combined" for uid in result.peers]
    return lines + [f"uid {uid}: refused, reason: {reason}" for uid, reason in sorted(result.skipped.items())]


def network_metrics(health: NetworkHealth) -> dict[str, float | int]:
    """The window's health as numbers (plotted over windows; the same keys go to W&B)."""
    metrics: dict[str, float | int] = {
        "watched": int(health.watched), "miners_seen": health.seen, "valid": health.valid, "peers": health.peers,
        "valid_over_seen": health.valid / health.seen if health.seen else 0.0,
        "peers_over_valid": health.peers / health.valid if health.valid else 0.0,
        "chain_block": health.chain_block, "closing_block": health.closing_block,
        "lag_blocks": health.chain_block - health.closing_block}
    if health.weights_block is not None:
        metrics |= {"weights_block": health.weights_block,
                    "blocks_since_weights": health.chain_block - health.weights_block}
    return metrics


def uid_series(record: WindowRecord) -> dict[str, dict[int, float]]:
    """The window's per-uid series: score, rating (OpenSkill ordinal), weight."""
    return {"score": record.scores, "rating": record.ratings, "weight": record.weights}


def network_metadata(health: NetworkHealth, history: list[WindowRecord]) -> dict:
    """Health numbers and the per-uid series of the window (history[-1]), plotted over windows by the UI; the
    history table: one row per uid over the recorded windows (oldest first), with its latest zero-score reason."""
    now = history[-1]
    metadata: dict = {**network_metrics(health), "weights_status": health.weights_status}
    for series, values in uid_series(now).items():
        metadata |= per_uid(series, values)
    reasons = [f"- uid {uid}: {reason}" for uid, reason in sorted(now.reasons.items())]
    metadata["zero_score_reasons"] = dg.MetadataValue.md("\n".join(reasons) or "none")
    metadata["history_windows"] = f"{history[0].window}–{now.window}" if len(history) > 1 else str(now.window)
    metadata["history"] = _table(
        [("uid", "int"), ("scores", "string"), ("zero_windows", "int"), ("last_zero_reason", "string"),
         ("ratings", "string"), ("rating", "float"), ("weights", "string"), ("weight", "float")],
        [_history_row(uid, history) for uid in sorted({u for r in history for u in (*r.scores, *r.ratings)})])
    return metadata


def _history_row(uid: int, history: list[WindowRecord]) -> dict:
    def series(values: list[float | None]) -> str:
        known = [v for v in values if v is not None]
        spark = _spark(known) if known else ""
        return f"{spark}  " + " ".join("·" if v is None else f"{v:.3g}" for v in values)

    zeros = [r for r in history if uid in r.reasons]
    now = history[-1]
    return {"uid": uid, "scores": series([r.scores.get(uid) for r in history]), "zero_windows": len(zeros),
            "last_zero_reason": f"window {zeros[-1].window}: {zeros[-1].reasons[uid]}" if zeros else "",
            "ratings": series([r.ratings.get(uid) for r in history]), "rating": round(now.ratings.get(uid, 0.0), 4),
            "weights": series([r.weights.get(uid) for r in history]), "weight": round(now.weights.get(uid, 0.0), 4)}
