"""The JSON files a validator publishes in its gradients bucket.

    peers_{window}.json                  {"format": 1, "window": w, "validator": v, "uids": [ascending]}
                                         the uids whose gradients the network uses for `window`
    evaluation-{window}-{validator}.json {"format": 1, "window": w, "validator": v, "step": s, "random_loss": x,
                                          "peers": [...], "uids": {uid: {score, indicator, improvement_own,
                                          improvement_random, losses: {own_before, ...} | null, reason}}}
                                         what the validator measured, per uid

Both are written as sorted JSON (the same document gives the same bytes) and read with the schema checked: any
failure raises InvalidFile with a one-line reason.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

from templar_lib.scoring import Losses, Score
from templar_lib.wire.container import InvalidFile, expect, is_int, no_duplicate_keys

PEERS_FORMAT = 1
EVALUATION_FORMAT = 1
MAX_PEERS_BYTES = 1 << 20
MAX_EVALUATION_BYTES = 16 << 20


@dataclass(frozen=True)
class Peers:
    """peers_{window}.json: the uids whose gradients a validator accepts for `window`, ascending."""

    window: int
    validator: int
    uids: list[int]
    format: int = PEERS_FORMAT


def write_peers(peers: Peers) -> bytes:
    return json.dumps({"format": peers.format, "window": peers.window, "validator": peers.validator,
                       "uids": sorted(peers.uids)}, sort_keys=True).encode()


def read_peers(data: bytes, *, window: int, max_uids: int = 65536, max_bytes: int = MAX_PEERS_BYTES) -> Peers:
    """Parse and validate peers_{window}.json. Raises InvalidFile."""
    raw = _json_object(data, "peers file", max_bytes)
    expect(set(raw) == {"format", "window", "validator", "uids"},
           "peers file must have exactly format, window, validator, uids")
    expect(raw["format"] == PEERS_FORMAT, f"unsupported format {raw['format']!r}")
    expect(is_int(raw["window"]) and raw["window"] == window, f"peers window {raw['window']!r} does not match {window}")
    expect(is_int(raw["validator"]) and raw["validator"] >= 0, "validator must be a uid")
    uids = raw["uids"]
    expect(isinstance(uids, list) and len(uids) <= max_uids and all(is_int(u) and 0 <= u < max_uids for u in uids)
           and uids == sorted(set(uids)), "uids must be ascending distinct uids")
    return Peers(window=window, validator=raw["validator"], uids=uids)


@dataclass(frozen=True)
class EvaluationReport:
    """evaluation-{window}-{validator}.json: a validator's measurements of one window."""

    window: int
    validator: int
    step: int  # outer step of θ_window
    random_loss: float  # θ_window on the validator's random pages
    peers: list[int]
    scores: dict[int, Score]  # every uid considered, ascending


def write_evaluation(report: EvaluationReport) -> bytes:
    rows = {}
    for uid, score in sorted(report.scores.items()):
        row = asdict(score)
        row.pop("uid")
        rows[str(uid)] = row
    return json.dumps({"format": EVALUATION_FORMAT, "window": report.window, "validator": report.validator,
                       "step": report.step, "random_loss": report.random_loss, "peers": report.peers, "uids": rows},
                      sort_keys=True, indent=1).encode()


_SCORE_FIELDS = {f.name for f in fields(Score)} - {"uid"}
_LOSS_FIELDS = {f.name for f in fields(Losses)}


def read_evaluation(data: bytes, *, window: int, validator: int,
                    max_bytes: int = MAX_EVALUATION_BYTES) -> EvaluationReport:
    """Parse evaluation-{window}-{validator}.json, validating its schema. Raises InvalidFile."""
    raw = _json_object(data, "evaluation file", max_bytes)
    expect(set(raw) == {"format", "window", "validator", "step", "random_loss", "peers", "uids"},
           "evaluation file has the wrong fields")
    expect(raw["format"] == EVALUATION_FORMAT and raw["window"] == window and raw["validator"] == validator,
           "evaluation file is for another window or validator")
    expect(is_int(raw["step"]) and raw["step"] >= 0 and _is_number(raw["random_loss"]), "step or random loss malformed")
    expect(isinstance(raw["peers"], list) and all(is_int(uid) for uid in raw["peers"]), "peers must be uids")
    expect(isinstance(raw["uids"], dict), "uids must be an object")
    scores = {}
    for key, row in raw["uids"].items():
        expect(key.isdigit() and isinstance(row, dict) and set(row) == _SCORE_FIELDS, f"uid {key[:12]!r}: malformed")
        losses = row["losses"]
        expect(losses is None or (isinstance(losses, dict) and set(losses) == _LOSS_FIELDS
                                  and all(_is_number(v) for v in losses.values())), f"uid {key}: malformed losses")
        expect(_is_number(row["score"]) and is_int(row["indicator"]) and isinstance(row["reason"], str)
               and all(row[name] is None or _is_number(row[name]) for name in ("improvement_own",
                                                                              "improvement_random")),
               f"uid {key}: malformed score")
        scores[int(key)] = Score(uid=int(key), score=float(row["score"]), indicator=row["indicator"],
                                 improvement_own=row["improvement_own"], improvement_random=row["improvement_random"],
                                 losses=Losses(**losses) if losses is not None else None, reason=row["reason"])
    return EvaluationReport(window, validator, raw["step"], float(raw["random_loss"]), list(raw["peers"]),
                            dict(sorted(scores.items())))


def _json_object(data: bytes, what: str, max_bytes: int) -> dict:
    expect(len(data) <= max_bytes, f"{what} of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        raw = json.loads(data, object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError, RecursionError) as error:
        raise InvalidFile(f"{what} is not valid JSON: {str(error)[:120]}") from None
    expect(isinstance(raw, dict), f"{what} must be a JSON object")
    return raw


def _is_number(value: object) -> bool:
    """A JSON number (NaN and infinities included: a diverged model's loss is still a measurement)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

