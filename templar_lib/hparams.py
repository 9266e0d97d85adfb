"""Hyper-parameters of a templar network (DESIGN §4).

Defaults are Templar's seed-era `hparams.json` (January–March 2025). One frozen `HParams` is passed explicitly
to every function that needs it; it loads from a JSON or YAML file and takes environment overrides
(`TEMPLAR_HP_<FIELD>`, e.g. `TEMPLAR_HP_LEARNING_RATE=1e-3`). Validation names the bad field.

`protocol_hash()` fingerprints the fields every node must agree on (compression, schedule, data layout): it is
written into every gradient file so a peer on different settings is rejected instead of silently mis-aggregated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from templar_lib.encodings import FLOAT_ENCODINGS, VALUE_ENCODINGS, AggregationFormat, GradientFormat

ENV_PREFIX = "TEMPLAR_HP_"
FILE_ENV = "TEMPLAR_HPARAMS_FILE"
HOME_FILE = "hparams.json"  # a network's hyper-parameters in its home, written by `templar init`
STRATEGIES = ("demo", "sparseloco")  # what a network runs (templar_lib/strategies.py)
# what `templar train` also runs beside them: uncompressed baselines on the same tokens (templar_lib/simulate/core.py)
TRAINING_STRATEGIES = (*STRATEGIES, "dense-adamw", "local-sgd", "dense-sign")
# what a gradient means: every node of a network must agree on these (protocol_hash)
PROTOCOL_FIELDS = ("topk_compression", "target_chunk", "gradient_format", "gradient_value_dtype", "blocks_per_window",
                   "pages_per_window", "batch_size", "sequence_length", "learning_rate", "weight_decay",
                   "warmup_steps", "t_max", "lr_floor_ratio", "spot_check_probability", "spot_check_tolerance")
# what a sparseloco gradient means beyond the shared fields: every node of such a network must agree on them
SPARSELOCO_FIELDS = ("strategy", "inner_steps", "inner_learning_rate", "inner_weight_decay", "inner_grad_clip",
                     "inner_beta1", "inner_beta2", "outer_learning_rate", "error_decay", "sparse_topk",
                     "quantization_bins", "quantization_range")
# fields that joined the protocol after networks had started, with the value they had implicitly before: hashed
# only when set to another, so a running network's hash (and its files) stay valid, and read at that value from a
# network's record written before they existed (HParams.load)
IMPLICIT_BEFORE = {"inner_beta2": 0.95, "inner_beta1": 0.9, "spot_check_probability": 0.0,
                   "spot_check_tolerance": 0.0}
# the inner AdamW's β₂ at most: the norm bound's allowance for it is measured up to 0.99 (honest files at 2.55× the
# validator's reference there, at 3.09× at 0.999; bench/RESULTS.md, "Inner AdamW β₂")
MAX_INNER_BETA2 = 0.99
# and its β₁: from the tuned 0.8 to Templar's 0.9, where the norm bound's allowance for it is measured
# (SparseLoCoStrategy.beta1_lag; bench/RESULTS.md, "Inner AdamW β₁")
MIN_INNER_BETA1, MAX_INNER_BETA1 = 0.8, 0.9
# and a spot check's tolerance, where checks are on: room a miner can steer its file in; at 0.02 steering toward the
# greediest file found earned no more than honest work, at 0.1 it earned 3.3× (docs/RELIABILITY.md, kind `steer`)
MAX_SPOT_CHECK_TOLERANCE = 0.02
# how a miner's state is digested where checks are on (spot_check.state_digest: sha256 over the sha256 of every this
# many bytes of each tensor), in the protocol hash there: nodes that digest otherwise (one sha256 stream, before
# 2026-12-07) refuse each other's files as another protocol's instead of banning honest miners whose states do not hash
STATE_DIGEST_CHUNK = 8 << 20


class HParamsError(ValueError):
    """A hyper-parameter file or override is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class HParams:
    # --- compression (DESIGN §5) ---
    topk_compression: int = 32  # coefficients kept per DCT chunk
    target_chunk: int = 64  # chunk side: the largest divisor of each dimension not above this
    momentum_decay: float = 0.999  # error-feedback decay: m <- decay*m + lr*g
    # transmitted values (templar_lib.encodings): float32 | bfloat16 | float16 | int8 (int8 needs format 2)
    gradient_value_dtype: str = "int8"
    gradient_format: int = int(GradientFormat.RICE)  # 1 rows of idx + values, 2 Rice-coded idx (wire/gradient.py)
    # aggregation-{window}: 1 the combined coefficients (every node decodes them), 2 the signs of the update,
    # bit-packed (the same θ, smaller, and nothing to decode: wire/aggregation.py). Readers take either by the header
    aggregation_format: int = int(AggregationFormat.COEFFICIENTS)
    # --- training strategy: "demo" (one accumulated gradient per window, DCT + top-k, sign-SGD: the fields above and
    # the outer optimiser below) or "sparseloco" (inner AdamW steps, 2-bit sparse pseudo-gradients: the fields below;
    # templar_lib/inner.py, sparseloco.py). Defaults measured on the tiny preset (bench/RESULTS.md, convergence)
    strategy: str = "demo"
    inner_steps: int = 3  # H: AdamW steps per window on the miner's own pages
    inner_learning_rate: float = 2e-3  # with the outer schedule's warm-up and cosine, in inner steps
    inner_weight_decay: float = 0.1
    inner_grad_clip: float = 1.0  # L2 norm over all parameters
    # AdamW's β₁. Templar runs 0.9; on the tiny preset 0.8 ends sparseloco 2.0 % lower over 200 rounds and four
    # seeds (lower on each; 0.7 −1.8 %, 0.6 no better): with three inner steps a window, a shorter memory of g lags
    # less. Honest files then reach a little further against the validator's reference, and the norm bound follows
    # (strategies.py, beta1_lag)
    inner_beta1: float = 0.8
    # AdamW's β₂. Templar runs 0.95; on the tiny preset 0.99 ends sparseloco 5 % lower over 200 rounds
    # (dense AdamW 2 %: an inner step sees few sequences, and 0.95's 20-step memory of g² is noisy). Its honest files
    # grow further against the validator's reference, and the norm bound follows (strategies.py, beta2_lag)
    inner_beta2: float = 0.99
    # plain SGD on the combined pseudo-gradients (no sign, no weight decay), and β of the error feedback
    # e <- β·e + Δ. Templar runs 0.4 / 0.95 at H = 30; at H = 3 on the tiny preset 0.5 / 0.99 ended lowest over
    # 200 rounds (4.192 against 4.432 at 1.0 / 0.95): a longer memory sends what the top-k leaves, and the mean
    # over choosers, which adds up the peers' disjoint picks, wants the smaller rate (bench/RESULTS.md)
    outer_learning_rate: float = 0.5
    error_decay: float = 0.99
    # values kept per chunk (no DCT; made even, at most the chunk). Templar runs 64; on the tiny preset over 200 rounds
    # 32 ended lowest at inner β₂ 0.95 (β 0.95: 16 4.458, 32 4.432, 64 4.582; β 0.99: 32 4.192, 64 4.262) for half
    # the bytes. At β₂ 0.99, top-64 at outer lr 0.4 ends 1.0 % lower over four seeds for 1.5× the bytes, with honest
    # files closer to the norm bound (1.28× against 1.38×): a setting, not the default (bench/RESULTS.md)
    sparse_topk: int = 32
    quantization_bins: int = 4  # 2-bit codes
    quantization_range: float = 6.0  # the bins span this many standard deviations of the kept values
    # --- windows and data (DESIGN §2, §3) ---
    blocks_per_window: int = 7  # chain blocks per window (12 s blocks -> 84 s windows)
    pages_per_window: int = 6  # dataset pages each miner trains on per window
    batch_size: int = 6  # sequences per micro-batch
    sequence_length: int = 128  # tokens per sequence (tiny preset)
    # --- outer optimiser (DESIGN §5) ---
    learning_rate: float = 4e-4
    weight_decay: float = 0.1  # decoupled: p <- p*(1 - lr*weight_decay)
    warmup_steps: int = 250  # linear warm-up from 0.1*lr to lr
    t_max: int = 5000  # first cosine period T0 (restarts with T_mult = 2)
    lr_floor_ratio: float = 0.1  # eta_min = lr_floor_ratio * learning_rate
    checkpoint_frequency: int = 100  # windows between published checkpoints
    # --- incentives (DESIGN §4) ---
    openskill_beta: float = 7.0
    openskill_tau: float = 0.1
    binary_score_ma_alpha: float = 0.05
    score_ema_alpha: float = 0.2  # weights follow this moving average of scores (ratings.py)
    ban_windows: int = 10  # windows a uid that changed its file after it was scored earns nothing
    miss_penalty: float = 0.8  # pay factor per miss among a uid's last miss_window evaluated windows (ratings.py)
    miss_window: int = 8
    miss_exclude: int = 6  # misses among them that reset the uid and exclude it until it does better
    topk_peers: int = 20  # peers aggregated per window
    # a score below this share of the window's median positive score counts as 0 (not aggregated, not paid): scores
    # are improvements the validator measures, which no upload can inflate, so only real work clears the floor
    peer_score_ratio: float = 0.2
    max_peers: int = 256  # uids a validator considers
    scored_per_window: int = 32  # uids a validator scores per window at most (sampled beyond: roles/validator.py)
    sync_max_lag: int = 2  # outer steps a miner's θ may lag and still be scored, at (1 − lag / (max + 1)) of it
    # spot checks (spot_check.py): each scored file is replayed from the miner's committed state with this
    # probability, drawn by the window's closing block; 0 turns them off (files then commit to no state)
    spot_check_probability: float = 0.0
    # the replay's relative L2 difference allowed, of the file's values (20 times it at a sparseloco fresh start)
    # and of each state tensor (spot_check.check). Other kernels, even another thread count, round otherwise: ≤ 4.8e-5
    # from a carried state, 0.0062 at a fresh start (small preset, CPU; bench/RESULTS.md "Replay tolerance"). 0 is bit
    # for bit: one process's kernels (a simulation). At most MAX_SPOT_CHECK_TOLERANCE. GPUs: not measured yet. A
    # protocol field where checks are on (a miner puts its state after the window too where it is above 0)
    spot_check_tolerance: float = 1e-3
    spot_check_ban_windows: int = 50  # windows a uid that failed a spot check earns nothing
    # --- limits for untrusted input ---
    max_gradient_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            expected = {"int": int, "float": (int, float), "str": str}[field.type]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise HParamsError(f"{field.name}: expected {field.type}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise HParamsError(f"{field.name}: must be finite, got {value!r}")
        positive = ("topk_compression", "target_chunk", "blocks_per_window", "pages_per_window", "batch_size",
                    "sequence_length", "t_max", "checkpoint_frequency", "topk_peers", "max_peers", "scored_per_window",
                    "max_gradient_bytes", "learning_rate", "openskill_beta", "ban_windows", "spot_check_ban_windows",
                    "miss_window",
                    "miss_exclude", "inner_steps", "inner_learning_rate", "inner_grad_clip", "outer_learning_rate",
                    "sparse_topk", "quantization_range")
        for name in positive:
            if getattr(self, name) <= 0:
                raise HParamsError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "weight_decay", "openskill_tau", "sync_max_lag", "inner_weight_decay"):
            if getattr(self, name) < 0:
                raise HParamsError(f"{name}: must be >= 0, got {getattr(self, name)!r}")
        for name in ("momentum_decay", "binary_score_ma_alpha", "lr_floor_ratio", "score_ema_alpha",
                     "peer_score_ratio", "miss_penalty", "error_decay", "spot_check_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise HParamsError(f"{name}: must be within [0, 1], got {getattr(self, name)!r}")
        if self.spot_check_tolerance < 0 or (self.spot_check_probability
                                             and self.spot_check_tolerance > MAX_SPOT_CHECK_TOLERANCE):
            raise HParamsError(f"spot_check_tolerance: must be within [0, {MAX_SPOT_CHECK_TOLERANCE}] (room a miner "
                               f"can steer its file in), got {self.spot_check_tolerance!r}")
        if not 0.0 <= self.inner_beta1 < 1.0:
            raise HParamsError(f"inner_beta1: must be within [0, 1), got {self.inner_beta1!r}")
        if self.strategy == "sparseloco" and not MIN_INNER_BETA1 <= self.inner_beta1 <= MAX_INNER_BETA1:
            raise HParamsError(f"inner_beta1: a sparseloco network's must be within [{MIN_INNER_BETA1}, "
                               f"{MAX_INNER_BETA1}] (the norm bound's allowance for it is measured there), got "
                               f"{self.inner_beta1!r}")
        if not 0.0 <= self.inner_beta2 <= MAX_INNER_BETA2:
            raise HParamsError(f"inner_beta2: must be within [0, {MAX_INNER_BETA2}] (the norm bound's allowance for "
                               f"it is measured that far), got {self.inner_beta2!r}")
        if self.learning_rate * self.weight_decay >= 1.0:
            raise HParamsError("weight_decay: learning_rate * weight_decay must be < 1")
        if self.gradient_value_dtype not in VALUE_ENCODINGS:
            raise HParamsError(f"gradient_value_dtype: one of {', '.join(VALUE_ENCODINGS)}, got "
                               f"{self.gradient_value_dtype!r}")
        for name, formats in (("gradient_format", GradientFormat), ("aggregation_format", AggregationFormat)):
            if getattr(self, name) not in tuple(formats):
                raise HParamsError(f"{name}: {' or '.join(str(int(f)) for f in formats)}, got "
                                   f"{getattr(self, name)!r}")
        if self.gradient_value_dtype not in FLOAT_ENCODINGS and self.gradient_format != GradientFormat.RICE:
            raise HParamsError("gradient_value_dtype: int8 values need gradient_format 2")
        if self.strategy not in STRATEGIES:
            raise HParamsError(f"strategy: one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.quantization_bins not in (2, 4, 16, 256):
            raise HParamsError(f"quantization_bins: 2, 4, 16 or 256 (codes of 1, 2, 4 or 8 bits), got "
                               f"{self.quantization_bins!r}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> HParams:
        """Build from a mapping; unknown keys are an error (a typo must not fall back to a default)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise HParamsError(f"{unknown[0]}: unknown hyper-parameter")
        coerced = {}
        for name, value in values.items():
            # JSON/YAML give ints for floats written as "4" and floats like 1e3 for ints: accept exact values.
            if known[name].type == "float" and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if known[name].type == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            coerced[name] = value
        return cls(**coerced)

    @classmethod
    def load(cls, path: str | Path | None = None, environ: Mapping[str, str] | None = None) -> HParams:
        """Defaults <- file (JSON or YAML, optional) <- `TEMPLAR_HP_<FIELD>` entries of `environ`."""
        values: dict[str, Any] = {}
        if path is not None:
            text = Path(path).read_text()
            try:
                loaded = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
            except (json.JSONDecodeError, yaml.YAMLError) as error:
                raise HParamsError(f"{path}: not valid JSON/YAML ({error})") from None
            if loaded is None:
                loaded = {}
            if not isinstance(loaded, dict):
                raise HParamsError(f"{path}: expected a mapping of hyper-parameters")
            values.update(_predating(loaded) | loaded)
        values.update(_environment_overrides(environ or {}))
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> HParams:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def protocol_settings(self) -> dict[str, Any]:
        """The fields that change what a gradient means, with their values: every node of a network must agree on
        them (a demo network's are the shared fields alone: its hash predates strategies and stays what it was)."""
        fields = PROTOCOL_FIELDS + (SPARSELOCO_FIELDS if self.strategy != "demo" else ())
        settings = {name: getattr(self, name) for name in fields}
        if not self.spot_check_probability:  # the tolerance of checks that never run: not part of the protocol
            del settings["spot_check_tolerance"]
        else:  # what a file's state commitment means
            settings["state_digest_chunk"] = STATE_DIGEST_CHUNK
        return settings

    def protocol_hash(self) -> str:
        """sha256 (16 hex digits) of protocol_settings, order-independent, a field of IMPLICIT_BEFORE only away from
        its old value."""
        canonical = json.dumps({name: value for name, value in self.protocol_settings().items()
                                if name not in IMPLICIT_BEFORE or value != IMPLICIT_BEFORE[name]}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _predating(loaded: Mapping[str, Any]) -> dict[str, Any]:
    """What a file that records a whole network says implicitly: a file that states every protocol field but some of
    IMPLICIT_BEFORE (as `templar init` writes a network's hparams.json: all fields) was written before those existed,
    so they take the value they had then, and the network's hash is the one its nodes have used. A partial file
    (a deployment's overrides) says nothing about them: the defaults apply."""
    older = set(PROTOCOL_FIELDS + SPARSELOCO_FIELDS) - set(IMPLICIT_BEFORE)
    if not older <= set(loaded):
        return {}
    return {name: value for name, value in IMPLICIT_BEFORE.items() if name not in loaded}


def _environment_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    fields = {f.name: f.type for f in dataclasses.fields(HParams)}
    overrides: dict[str, Any] = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        name = key[len(ENV_PREFIX):].lower()
        if name not in fields:
            raise HParamsError(f"{name}: unknown hyper-parameter (from environment {key})")
        try:
            overrides[name] = {"int": int, "float": float, "str": str}[fields[name]](raw)
        except ValueError:
            raise HParamsError(f"{name}: cannot parse {raw!r} as {fields[name]} (from environment {key})") from None
    return overrides


def hparams_file(home: Path, environ: Mapping[str, str]) -> Path | None:
    """The hyper-parameter file of a node whose home is `home`: TEMPLAR_HPARAMS_FILE, else the network's own file in
    its home (what `templar init` set up, so `make ui`, `templar audit` and `templar node` read the same), else None
    (the defaults)."""
    if environ.get(FILE_ENV):
        return Path(environ[FILE_ENV])
    own = Path(home) / HOME_FILE
    return own if own.is_file() else None
