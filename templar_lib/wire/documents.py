"""The JSON files a validator publishes in its gradients bucket.

    peers_{window}.json                  {"format": 2, "window": w, "validator": v, "uids": [ascending],
                                          "reserves": [best first], "sha256": {uid: hex}, "signature": hex}
                                         the uids whose gradients the network uses for `window`, the next best to fill
                                         a place one of them leaves, the sha256 of the exact bytes the validator scored
                                         for each, and the validator's hotkey signature over the rest of the document
                                         (`Peers.message()`)
    evaluation-{window}-{validator}.json {"format": 1, "window": w, "validator": v, "step": s, "random_loss": x,
                                          "peers": [...], "uids": {uid: {score, indicator, improvement_own,
                                          improvement_random, losses: {own_before, ...} | null, reason}},
                                          "random_pages", "seed_block", "unsampled", and where they apply "checks",
                                          "commitments", "watched": false}
                                         what the validator measured, per uid ("watched": false: it never looked at
                                         the window while it was open, and scored nobody)

Both are written as sorted JSON (the same document gives the same bytes) and read with the schema checked: any
failure raises InvalidFile with a one-line reason.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

from templar_lib.scoring import Losses, Score
from templar_lib.wire.container import InvalidFile, expect, is_int, json_object, untrusted_reader

PEERS_FORMAT = 2
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2}){1,256}")
EVALUATION_FORMAT = 1
MAX_PEERS_BYTES = 1 << 20
MAX_EVALUATION_BYTES = 16 << 20


@dataclass(frozen=True)
class Peers:
    """peers_{window}.json: the uids whose gradients a validator accepts for `window`, ascending, the sha256 of the
    bytes it scored for each, and its signature of `message()` (empty until signed)."""

    window: int
    validator: int
    uids: list[int]
    sha256: dict[int, str] = field(default_factory=dict)
    signature: str = ""
    format: int = PEERS_FORMAT
    reserves: list[int] = field(default_factory=list)  # best first: they fill the places listed uids leave

    def _document(self) -> dict:
        return {"format": self.format, "window": self.window, "validator": self.validator, "uids": sorted(self.uids),
                "reserves": list(self.reserves), "sha256": {str(u): h for u, h in sorted(self.sha256.items())}}

    def message(self) -> bytes:
        """What the validator signs: everything but the signature, as canonical JSON."""
        return json.dumps(self._document(), sort_keys=True, separators=(",", ":")).encode()


def write_peers(peers: Peers) -> bytes:
    return json.dumps(peers._document() | {"signature": peers.signature}, sort_keys=True).encode()


@untrusted_reader
def read_peers(data: bytes, *, window: int, max_uids: int = 65536, max_bytes: int = MAX_PEERS_BYTES) -> Peers:
    """Parse and validate peers_{window}.json. Raises InvalidFile."""
    raw = _json_object(data, "peers file", max_bytes)
    expect(set(raw) == {"format", "window", "validator", "uids", "reserves", "sha256", "signature"},
           "peers file must have exactly format, window, validator, uids, reserves, sha256, signature")
    expect(raw["format"] == PEERS_FORMAT, f"unsupported format {str(raw['format'])[:20]!r}")
    expect(is_int(raw["window"]) and raw["window"] == window,
           f"peers window {str(raw['window'])[:20]!r} does not match {window}")
    expect(is_int(raw["validator"]) and raw["validator"] >= 0, "validator must be a uid")
    uids = raw["uids"]
    expect(isinstance(uids, list) and len(uids) <= max_uids and all(is_int(u) and 0 <= u < max_uids for u in uids)
           and uids == sorted(set(uids)), "uids must be ascending distinct uids")
    reserves = raw["reserves"]
    expect(isinstance(reserves, list) and len(reserves) <= max_uids
           and all(is_int(u) and 0 <= u < max_uids for u in reserves) and len(set(reserves)) == len(reserves)
           and not set(reserves) & set(uids), "reserves must be distinct uids not already listed")
    hashes = raw["sha256"]
    expect(isinstance(hashes, dict) and set(hashes) == {str(u) for u in uids + reserves}
           and all(isinstance(h, str) and _SHA256.fullmatch(h) for h in hashes.values()),
           "sha256 must give a hex digest for every listed uid")
    expect(isinstance(raw["signature"], str) and _HEX.fullmatch(raw["signature"]) is not None, "signature must be hex")
    return Peers(window=window, validator=raw["validator"], uids=uids, reserves=reserves,
                 sha256={int(uid): digest for uid, digest in hashes.items()}, signature=raw["signature"])


class Recorded(NamedTuple):
    """What an evaluation report records of one file seen (spot_check.py): the digests of its miner's state before
    and after the window, the outer steps its θ is behind θ_window, and the uid's hotkey then. In JSON, a list of the
    four in this order."""

    before: str
    after: str
    lag: int
    hotkey: str


@dataclass(frozen=True)
class EvaluationReport:
    """evaluation-{window}-{validator}.json: a validator's measurements of one window."""

    window: int
    validator: int
    step: int  # outer step of θ_window
    random_loss: float  # θ_window on the validator's random pages
    peers: list[int]
    scores: dict[int, Score]  # every uid considered, ascending
    random_pages: list[int] = field(default_factory=list)  # which: random_pages(seed of the closing block's hash)
    seed_block: int = -1  # the block whose hash seeded them (anyone can recompute the pages afterwards)
    unsampled: list[int] = field(default_factory=list)  # seen but not scored this window (roles/validator.py)
    # the spot checks of window − 1 made after this window closed, and those of window − 2 made again (spot_check.py):
    # uid -> "" passed, or why not ("pending: …": no state put yet, asked again a window later; not a failure)
    checks: dict[int, str] = field(default_factory=dict)
    # what each file seen this window commits to and the θ it names, where it links (spot_check.py); the files a
    # spot check of this window draws from
    commitments: dict[int, Recorded] = field(default_factory=dict)
    # False: the validator's watch never looked at the window while it was open (it was down), so it scored nobody;
    # its spot checks of earlier windows stand (written only when False: every other report keeps its bytes)
    watched: bool = True


def write_evaluation(report: EvaluationReport) -> bytes:
    rows = {}
    for uid, score in sorted(report.scores.items()):
        row = asdict(score)
        row.pop("uid")
        rows[str(uid)] = row
    return json.dumps({"format": EVALUATION_FORMAT, "window": report.window, "validator": report.validator,
                       "step": report.step, "random_loss": report.random_loss, "peers": report.peers, "uids": rows,
                       "random_pages": report.random_pages, "seed_block": report.seed_block,
                       "unsampled": report.unsampled} | (
                          {"checks": {str(uid): reason for uid, reason in sorted(report.checks.items())}}
                          if report.checks else {}) | (
                          {"commitments": {str(uid): list(c) for uid, c in sorted(report.commitments.items())}}
                          if report.commitments else {}) | ({} if report.watched else {"watched": False}),
                      sort_keys=True, indent=1).encode()


_SCORE_FIELDS = {f.name for f in fields(Score)} - {"uid"}
_LOSS_FIELDS = {f.name for f in fields(Losses)}


@untrusted_reader
def read_evaluation(data: bytes, *, window: int, validator: int,
                    max_bytes: int = MAX_EVALUATION_BYTES) -> EvaluationReport:
    """Parse evaluation-{window}-{validator}.json, validating its schema. Raises InvalidFile."""
    raw = _json_object(data, "evaluation file", max_bytes)
    optional = {"checks", "commitments", "watched"}  # written only where they apply
    expect(set(raw) - optional == {"format", "window", "validator", "step", "random_loss", "peers", "uids",
                                   "random_pages", "seed_block", "unsampled"}, "evaluation file has the wrong fields")
    checks, commitments, watched = raw.get("checks", {}), raw.get("commitments", {}), raw.get("watched", True)
    expect("watched" not in raw or (watched is False and not raw["uids"] and not raw["peers"] and not commitments),
           "watched, where present, must be false, in a report that scores and records nothing")
    expect(isinstance(checks, dict) and all(_uid_key(uid) and isinstance(why, str) for uid, why in checks.items()),
           "checks must map uids to reasons")
    expect(isinstance(commitments, dict) and all(
        _uid_key(uid) and isinstance(c, list) and len(c) == 4 and all(isinstance(d, str) and len(d) == 64
                                                                      for d in c[:2])
        and is_int(c[2]) and c[2] >= 0 and isinstance(c[3], str) and len(c[3]) <= 128
        for uid, c in commitments.items()), "commitments malformed")
    expect(raw["format"] == EVALUATION_FORMAT and raw["window"] == window and raw["validator"] == validator,
           "evaluation file is for another window or validator")
    expect(is_int(raw["step"]) and raw["step"] >= 0 and _is_number(raw["random_loss"]), "step or random loss malformed")
    expect(isinstance(raw["peers"], list) and all(is_int(uid) for uid in raw["peers"]), "peers must be uids")
    expect(isinstance(raw["random_pages"], list) and all(is_int(page) for page in raw["random_pages"])
           and is_int(raw["seed_block"]), "random pages or seed block malformed")
    expect(isinstance(raw["unsampled"], list) and all(is_int(uid) for uid in raw["unsampled"]), "unsampled malformed")
    expect(isinstance(raw["uids"], dict), "uids must be an object")
    scores = {}
    for key, row in raw["uids"].items():
        expect(_uid_key(key) and isinstance(row, dict) and set(row) == _SCORE_FIELDS, f"uid {key[:12]!r}: malformed")
        losses = row["losses"]
        expect(losses is None or (isinstance(losses, dict) and set(losses) == _LOSS_FIELDS
                                  and all(_is_number(losses[name]) for name in _LOSS_FIELDS - {"own_pages"})
                                  and isinstance(losses["own_pages"], list)
                                  and all(isinstance(pair, list) and len(pair) == 2 and all(map(_is_number, pair))
                                          for pair in losses["own_pages"])), f"uid {key}: malformed losses")
        expect(_is_number(row["score"]) and is_int(row["indicator"]) and isinstance(row["reason"], str)
               and is_int(row["sync_lag"]) and row["sync_lag"] >= 0
               and all(row[name] is None or _is_number(row[name]) for name in ("improvement_own",
                                                                              "improvement_random")),
               f"uid {key}: malformed score")
        scores[int(key)] = Score(uid=int(key), score=float(row["score"]), indicator=row["indicator"],
                                 improvement_own=row["improvement_own"], improvement_random=row["improvement_random"],
                                 losses=_losses(losses), reason=row["reason"], sync_lag=row["sync_lag"])
    return EvaluationReport(window, validator, raw["step"], float(raw["random_loss"]), list(raw["peers"]),
                            dict(sorted(scores.items())), list(raw["random_pages"]), raw["seed_block"],
                            list(raw["unsampled"]), dict(sorted((int(uid), reason) for uid, reason in checks.items())),
                            dict(sorted((int(uid), Recorded(*c)) for uid, c in commitments.items())), watched)


def _uid_key(key: str) -> bool:
    """A JSON object key that names a uid: ASCII digits, at most 12 (`str.isdigit` alone takes "²", which int()
    refuses, and int() refuses more than 4300 digits)."""
    return key.isascii() and key.isdigit() and len(key) <= 12


def _losses(raw: dict | None) -> Losses | None:
    if raw is None:
        return None
    return Losses(**{**raw, "own_pages": [tuple(pair) for pair in raw["own_pages"]]})


def _json_object(data: bytes, what: str, max_bytes: int) -> dict:
    expect(len(data) <= max_bytes, f"{what} of {len(data)} bytes exceeds the limit of {max_bytes}")
    return json_object(data, what)


def _is_number(value: object) -> bool:
    """A JSON number (NaN and infinities included: a diverged model's loss is still a measurement)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)

