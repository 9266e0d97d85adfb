"""Checkpoints of the shared model state, and catch-up by replaying published aggregations (DESIGN §2, §3).

    checkpoint-{window}.safetensors   θ_window: every parameter, in its training dtype
    checkpoint-{window}.json          manifest: format, window, step, sha256 and size of the tensor file,
                                      parameter shapes/dtypes, the hyper-parameters in force

`window` names the state at the *start* of that window: the aggregator that finishes window w writes
checkpoint-{w+1}. `step` counts the outer steps applied so far, which fixes the learning rate of the next one
(the whole optimiser state: the outer optimiser is stateless SGD on a sign, the schedule a function of step).

Saving writes the tensor file first and the manifest last, each atomically (temp + rename, or one PUT), so a
process killed at any point leaves either no manifest or a manifest whose hash does not match: a reader trusts
only a checkpoint whose manifest validates and whose tensor file hashes to it, and falls back to an older one.

Catch-up: θ_target = replay of aggregation-{w} for w = checkpoint window .. target − 1, through the same
`apply_aggregation_` the aggregator used live, so on CPU the result is bit-identical.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from templar_lib.buckets import Bucket, BucketError
from templar_lib.encodings import CODES, FLOAT_CODES, name_of
from templar_lib.hparams import HParams
from templar_lib.strategies import strategy_of
from templar_lib.wire import InvalidFile, aggregation_key, parse_header
from templar_lib.wire.container import json_object, load_tensors
from templar_lib.wire.keys import CHECKPOINT, CHECKPOINT_MANIFEST

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CHECKPOINT_BYTES = 64 * 1024 * 1024 * 1024


class CatchUpError(RuntimeError):
    """The published aggregations do not reach the target window (one is missing or invalid)."""


@dataclass(frozen=True)
class ModelState:
    """θ at the start of `window`, after `step` outer steps. parameters: name -> tensor (CPU or device).
    fingerprint: model_fingerprint(parameters) when already known (the node's state store keeps it beside θ)."""

    window: int
    step: int
    parameters: dict[str, torch.Tensor]
    fingerprint: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class CheckpointInfo:
    window: int
    step: int
    sha256: str
    bytes: int
    key: str


def state_file_contents(state: ModelState) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What the checkpoint tensor file of a state holds: (CPU tensors in name order, safetensors metadata)."""
    tensors = {name: p.detach().to("cpu").contiguous() for name, p in sorted(state.parameters.items())}
    # one metadata key, as in every templar file (wire.container.save_templar_file)
    header = json.dumps({"kind": "checkpoint", "window": state.window, "step": state.step}, sort_keys=True)
    return tensors, {"templar": header}


def state_bytes(state: ModelState) -> bytes:
    """The checkpoint tensor file of a state: deterministic safetensors bytes."""
    tensors, metadata = state_file_contents(state)
    return safetensors_save(tensors, metadata=metadata)


def state_from_file(path: Path) -> ModelState:
    """Inverse of state_bytes for a file this node wrote itself, read through safetensors' mmap (no whole-file
    buffer in memory). Files from a bucket go through load_checkpoint."""
    with safe_open(path, framework="pt") as handle:
        header = json.loads(handle.metadata()["templar"])
        parameters = {name: handle.get_tensor(name) for name in handle.keys()}
    return ModelState(window=int(header["window"]), step=int(header["step"]), parameters=parameters)


def state_sha256(state: ModelState) -> str:
    return hashlib.sha256(state_bytes(state)).hexdigest()


PROBES = 8  # θ values a miner publishes with its gradient (sync checks)


def probe_positions(window: int, shapes: Mapping[str, tuple[int, ...]]) -> list[tuple[str, int]]:
    """Where θ is probed in `window`: PROBES (parameter, flat index) pairs drawn from sha256 of the window. Public:
    they only tell which θ a miner trained on, not how to fake it (the fingerprint binds all of θ)."""
    names = sorted(shapes)
    positions = []
    for index in range(PROBES):
        digest = int.from_bytes(hashlib.sha256(f"probe:{window}:{index}".encode()).digest()[:16], "little")
        name = names[digest % len(names)]
        positions.append((name, (digest // len(names)) % math.prod(shapes[name])))
    return positions


def probe_values(parameters: Mapping[str, torch.Tensor], window: int) -> list[float]:
    """θ's values at the probe positions of `window`, as float32 numbers (exact: compared bit for bit)."""
    shapes = {name: tuple(p.shape) for name, p in parameters.items()}
    return [float(parameters[name].detach().reshape(-1)[index].float())
            for name, index in probe_positions(window, shapes)]


def model_fingerprint(parameters: Mapping[str, torch.Tensor]) -> str:
    """Equal iff θ is bit-identical: sha256 over, in name order, each parameter's name, dtype and sha256 of its raw
    bytes; 32 hex digits.

    Miners put it in their gradient header; a validator whose own θ_window differs rejects the gradient as trained
    on a stale (or diverged) model. Every node computes it every window, so the per-parameter digests run in threads
    (hashlib releases the GIL) straight over the tensors' memory: for the 1b preset that is ≈ 5 GB hashed in parallel
    instead of copied and hashed on one core.
    """
    names = sorted(parameters)

    def digest_of(name: str) -> bytes:
        tensor = parameters[name].detach().to("cpu").contiguous().reshape(-1)
        return hashlib.sha256(tensor.view(torch.uint8).numpy()).digest()

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        digests = list(pool.map(digest_of, names))
    digest = hashlib.sha256()
    for name, tensor_digest in zip(names, digests):
        digest.update(name.encode() + b"\0" + str(parameters[name].dtype).encode() + b"\0" + tensor_digest)
    return digest.hexdigest()[:32]


def save_checkpoint(bucket: Bucket, state: ModelState, hparams: HParams) -> CheckpointInfo:
    """Write checkpoint-{window}: tensor file first, then the manifest that makes it visible."""
    data = state_bytes(state)
    digest = hashlib.sha256(data).hexdigest()
    manifest = {
        "format": FORMAT_VERSION, "window": state.window, "step": state.step, "sha256": digest, "bytes": len(data),
        "tensors": {name: {"shape": list(p.shape), "dtype": name_of(p.dtype)}
                    for name, p in sorted(state.parameters.items())},
        "hparams": hparams.to_dict(),
    }
    bucket.put(CHECKPOINT.key(state.window), data)
    bucket.put(CHECKPOINT_MANIFEST.key(state.window), json.dumps(manifest, indent=1, sort_keys=True).encode())
    return CheckpointInfo(state.window, state.step, digest, len(data), CHECKPOINT.key(state.window))


def read_checkpoint_manifest(bucket: Bucket, window: int) -> dict:
    """The validated manifest of checkpoint-{window}. Raises InvalidFile or a BucketError."""
    return parse_manifest(bucket.get(CHECKPOINT_MANIFEST.key(window), max_bytes=MAX_MANIFEST_BYTES), window)


def parse_manifest(data: bytes, window: int) -> dict:
    """Validate the bytes of checkpoint-{window}.json. Raises InvalidFile."""
    manifest = json_object(data, f"checkpoint-{window}.json")
    fields = {"format": int, "window": int, "step": int, "sha256": str, "bytes": int, "tensors": dict, "hparams": dict}
    if set(manifest) != set(fields):
        raise InvalidFile(f"checkpoint-{window}.json: expected exactly the fields {sorted(fields)}")
    for name, kind in fields.items():
        if not isinstance(manifest[name], kind) or isinstance(manifest[name], bool):
            raise InvalidFile(f"checkpoint-{window}.json: {name} must be {kind.__name__}")
    if manifest["format"] != FORMAT_VERSION or manifest["window"] != window or manifest["step"] < 0:
        raise InvalidFile(f"checkpoint-{window}.json: format/window/step do not match")
    if not re.fullmatch(r"[0-9a-f]{64}", manifest["sha256"]) or not 0 < manifest["bytes"] <= MAX_CHECKPOINT_BYTES:
        raise InvalidFile(f"checkpoint-{window}.json: malformed sha256 or size")
    for name, item in manifest["tensors"].items():
        if not (isinstance(item, dict) and set(item) == {"shape", "dtype"} and isinstance(item["dtype"], str)
                and isinstance(item["shape"], list) and all(type(n) is int and n >= 0 for n in item["shape"])):
            raise InvalidFile(f"checkpoint-{window}.json: malformed entry for tensor {name[:60]!r}")
    return manifest


def load_checkpoint(bucket: Bucket, window: int, *, shapes: Mapping[str, tuple[int, ...]] | None = None) -> ModelState:
    """θ_window from checkpoint-{window}, after checking the manifest, the sha256 and (if given) the shapes."""
    manifest = read_checkpoint_manifest(bucket, window)
    data = bucket.get(CHECKPOINT.key(window), max_bytes=manifest["bytes"])
    if len(data) != manifest["bytes"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise InvalidFile(f"checkpoint-{window}: tensor file does not match its manifest's sha256")
    entries, _ = parse_header(data, max_bytes=manifest["bytes"])
    declared = {name: (entry["shape"], entry["dtype"]) for name, entry in entries.items()}
    expected = {name: (item["shape"], _dtype_code(item["dtype"])) for name, item in manifest["tensors"].items()}
    if declared != expected:
        raise InvalidFile(f"checkpoint-{window}: tensors differ from the manifest")
    if shapes is not None and {n: list(s) for n, s in shapes.items()} != {n: s for n, (s, _) in declared.items()}:
        raise InvalidFile(f"checkpoint-{window}: parameters differ from the model")
    parameters = load_tensors(data)
    for name, tensor in parameters.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidFile(f"checkpoint-{window}: {name} has non-finite values")
    return ModelState(window=window, step=manifest["step"], parameters=parameters)


def checkpoint_windows(bucket: Bucket) -> list[int]:
    """Windows that have a checkpoint manifest, newest first."""
    windows = (CHECKPOINT_MANIFEST.window_of(key) for key in bucket.list(CHECKPOINT_MANIFEST.prefix))
    return sorted((window for window in windows if window is not None), reverse=True)


def latest_checkpoint(bucket: Bucket, *, shapes: Mapping[str, tuple[int, ...]] | None = None,
                      at_most: int | None = None) -> ModelState | None:
    """The newest checkpoint (not after `at_most`) that validates; broken or half-written ones are skipped."""
    for window in checkpoint_windows(bucket):
        if at_most is not None and window > at_most:
            continue
        try:
            return load_checkpoint(bucket, window, shapes=shapes)
        except (InvalidFile, BucketError) as error:
            log.warning("skipping checkpoint-%d: %s", window, error)
    return None


def catch_up(state: ModelState, aggregations: Bucket, target_window: int, *, hparams: HParams) -> ModelState:
    """Replay aggregation-{w} for w in [state.window, target_window) onto a copy of state; returns θ_target."""
    if target_window < state.window:
        raise ValueError(f"cannot catch up backwards from window {state.window} to {target_window}")
    parameters = {name: p.clone() for name, p in state.parameters.items()}
    shapes = {name: tuple(p.shape) for name, p in parameters.items()}
    strategy = strategy_of(hparams)
    limit = strategy.aggregation_limit(shapes)
    step = state.step
    for window in range(state.window, target_window):
        try:
            aggregation = strategy.read_aggregation(aggregations.get(aggregation_key(window), max_bytes=limit),
                                                    window=window, shapes=shapes)
        except (InvalidFile, BucketError) as error:
            raise CatchUpError(f"cannot replay window {window}: {error}") from None
        if aggregation.step != step:
            raise CatchUpError(f"aggregation-{window} is outer step {aggregation.step}, expected {step}")
        strategy.replay_(parameters, aggregation)
        step += 1
    return ModelState(window=target_window, step=step, parameters=parameters)


def _dtype_code(name: object) -> str | None:
    """The safetensors code of a floating dtype named in a manifest ("float32" -> "F32"), None for any other."""
    return next((code for code in FLOAT_CODES if name == CODES[code]), None)
