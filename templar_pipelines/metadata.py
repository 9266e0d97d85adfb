"""Pure functions from templar_lib results to Dagster metadata (what a person checks in the UI)."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg

from templar_lib.ratings import Ratings
from templar_lib.roles import AggregatorResult, MinerResult
from templar_lib.roles.validator import WindowEvaluation

_COLUMN = dg.TableColumn


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


def gradients_metadata(results: list[MinerResult]) -> dict:
    rows = [{"uid": r.uid, "loss": round(r.loss, 5), "tokens_per_second": round(r.tokens_per_second, 1),
             "bytes": r.bytes, "compression_ratio": round(r.compression_ratio, 1), "momentum": r.momentum,
             "key": r.key} for r in results]
    return {
        "loss": sum(r.loss for r in results) / max(1, len(results)),
        "bytes": sum(r.bytes for r in results),
        "compression_ratio": sum(r.compression_ratio for r in results) / max(1, len(results)),
        "tokens_per_second": sum(r.tokens for r in results) / max(1e-9, sum(r.seconds for r in results)),
        "miners": _table([("uid", "int"), ("loss", "float"), ("tokens_per_second", "float"), ("bytes", "int"),
                          ("compression_ratio", "float"), ("momentum", "string"), ("key", "string")], rows),
    }


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
        "valid_gradients": len(evaluation.valid_uids), "random_loss": evaluation.random_loss,
        "peers": ",".join(map(str, evaluation.peers)) or "(none)",
        "scores": _table([("uid", "int"), ("loss_before", "float"), ("loss_after", "float"), ("own_before", "float"),
                          ("own_after", "float"), ("score", "float"), ("indicator", "int"), ("reason", "string")],
                         rows),
        "zero_score_reasons": dg.MetadataValue.md("\n".join(reasons) or "none"),
        "keys_written": dg.MetadataValue.md("\n".join(f"- `{key}`" for key in evaluation.keys)),
    }


def sightings_metadata(watch) -> dict:
    rows = [{"uid": uid, "first_seen_block": s.block, "bytes": s.size, "sha256": s.sha256[:16]}
            for uid, s in watch.sightings().items()]
    return {"seen": len(rows), "closing_block": watch.closes,
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
            "final_scores": bar_chart("final = moving average of scores (0 while banned)", ratings.final_scores())}


def weights_metadata(weights: Mapping[int, float] | None, status: str, block: int) -> dict:
    return {"status": status, "block": block,
            "weights": bar_chart("weights set on the chain", dict(weights or {}))}


def aggregation_metadata(result: AggregatorResult) -> dict:
    return {"peers_used": ",".join(map(str, result.peers)) or "(none)", "peer_count": len(result.peers),
            "lr": result.lr, "step": result.step, "bytes": result.bytes,
            "key": result.key,
            "skipped": dg.MetadataValue.md("\n".join(f"- uid {u}: {r}" for u, r in result.skipped.items()) or "none")}


def loss_chart(losses: Mapping[int, float]) -> dg.MarkdownMetadataValue:
    """Held-out loss over the recent windows (bars above the lowest value, so the trend is visible)."""
    floor = min(losses.values(), default=0.0) * 0.98
    return bar_chart("held-out loss of θ after each window", losses, label="θ_", floor=floor)
