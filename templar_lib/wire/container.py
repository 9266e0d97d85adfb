"""The container every templar file shares: a standard safetensors file whose `__metadata__["templar"]` is a JSON
object, and the checks that run on untrusted bytes before a single tensor is trusted.

    8 bytes   little-endian header length
    header    JSON: {tensor name: {dtype, shape, data_offsets}, "__metadata__": {"templar": "<JSON>"}}
    body      the raw tensors, back to back

`parse_header` checks the size limit, the header length, JSON without duplicate keys, each entry's schema, the dtypes
(the table in templar_lib.encodings), that each tensor's byte range matches its shape and lies inside the file, and that
the ranges neither overlap nor leave gaps. `parse_templar_file` then checks the templar header's kind, format and
window. Every failure raises InvalidFile with a one-line reason that never quotes more than a few bytes of the file.
Nothing is ever unpickled.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import struct
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from templar_lib.compression import chunk_shape
from templar_lib.encodings import ITEM_BYTES

logger = logging.getLogger(__name__)
Read = TypeVar("Read", bound=Callable)

DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # a gradient file (HParams.max_gradient_bytes has the same default)
MAX_HEADER_BYTES = 16 * 1024 * 1024


class InvalidFile(ValueError):
    """A file from a bucket failed validation. str(error) is a one-line reason."""


def index_dtype(chunk_size: int) -> torch.dtype:
    """Smallest integer dtype holding every index of a chunk: ≤256 -> uint8, ≤32768 -> int16, else int32."""
    if chunk_size <= 1 << 8:
        return torch.uint8
    if chunk_size <= 1 << 15:
        return torch.int16
    return torch.int32


def index_code(chunk_size: int) -> str:
    return {torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32"}[index_dtype(chunk_size)]


# ---------------------------------------------------------------------------------------------------- writing
def save_templar_file(tensors: dict[str, torch.Tensor], header: dict) -> bytes:
    """Safetensors bytes with `header` as the templar metadata: deterministic (sorted JSON keys, one metadata key:
    safetensors keeps metadata in a hash map whose order, and so the bytes, varies with several)."""
    return safetensors_save(tensors, metadata={"templar": json.dumps(header, sort_keys=True)})


# ---------------------------------------------------------------------------------------------------- reading
def parse_header(data: bytes, *, max_bytes: int, max_header: int = MAX_HEADER_BYTES,
                 dtypes: Mapping[str, int] = ITEM_BYTES) -> tuple[dict[str, dict], dict[str, str]]:
    """Safetensors header of untrusted bytes, validated: (tensor entries by name, __metadata__).
    max_header: the longest JSON header accepted, checked before parsing (parsing costs ≈ 25× the header's bytes in
    Python objects: a reader of a kind of file whose honest headers are small passes a small bound). dtypes: the
    tensor dtypes allowed, with their item sizes."""
    expect(isinstance(data, (bytes, bytearray, memoryview)), "not bytes")
    expect(len(data) <= max_bytes, f"file of {len(data)} bytes exceeds the limit of {max_bytes}")
    expect(len(data) >= 8, "file shorter than a safetensors header")
    (header_length,) = struct.unpack("<Q", bytes(data[:8]))
    expect(header_length <= min(max_header, MAX_HEADER_BYTES, len(data) - 8),
           "declared header length exceeds the file or the header limit")  # the number would echo the file
    header = json_object(bytes(data[8:8 + header_length]), "header")
    metadata = header.pop("__metadata__", {})
    expect(isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()),
           "__metadata__ must map strings to strings")
    body = len(data) - 8 - header_length
    spans = []
    for name, entry in header.items():
        expect(isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"},
               f"tensor {name[:80]!r}: malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        expect(dtype in dtypes, f"tensor {name[:80]!r}: dtype {str(dtype)[:20]!r} not allowed")
        expect(isinstance(shape, list) and len(shape) <= 4 and all(is_int(n) and n >= 0 for n in shape),
               f"tensor {name[:80]!r}: malformed shape")
        expect(isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
               and 0 <= offsets[0] <= offsets[1] <= body, f"tensor {name[:80]!r}: data offsets outside the file")
        expect(offsets[1] - offsets[0] == math.prod(shape) * dtypes[dtype],
               f"tensor {name[:80]!r}: declared size does not match its shape")
        spans.append(tuple(offsets))
    position = 0
    for start, end in sorted(spans):
        expect(start == position, "tensor data overlaps or leaves gaps")
        position = end
    expect(position == body, "trailing bytes after the tensor data")
    return header, metadata


def parse_templar_file(data: bytes, *, kind: str, formats: Iterable[int], window: int, max_bytes: int,
                       max_header: int = MAX_HEADER_BYTES, dtypes: Mapping[str, int] = ITEM_BYTES
                       ) -> tuple[dict[str, dict], dict]:
    """Container checks shared by every templar file: safetensors header, then kind, format and window.
    Returns (tensor entries by name, the templar header)."""
    entries, metadata = parse_header(data, max_bytes=max_bytes, max_header=max_header, dtypes=dtypes)
    header = templar_header(metadata)
    expect(header.get("kind") == kind, f"kind is {str(header.get('kind'))[:40]!r}, expected {kind!r}")
    expect(is_int(header.get("format")) and header["format"] in tuple(formats),
           f"unsupported format {str(header.get('format'))[:20]!r}")
    expect(is_int(header.get("window")) and header["window"] == window,
           f"header window {str(header.get('window'))[:20]} does not match {window}")
    return entries, header


def templar_header(metadata: dict[str, str]) -> dict:
    expect("templar" in metadata, "no templar header in __metadata__")
    return json_object(metadata["templar"], "templar header")


def load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a file whose header has been validated; InvalidFile for anything safetensors rejects."""
    try:
        return safetensors_load(data)
    except Exception as error:  # safetensors raises SafetensorError
        raise InvalidFile(f"safetensors rejected the file: {str(error).splitlines()[0][:200]}") from None


def declared_layout(name: str, declared: object, fields: set[str], shape: tuple[int, ...],
                    target_chunk: int) -> tuple[tuple[int, ...], int, int]:
    """Check a header's param entry (exactly `fields`) against the model: (chunk, chunk size, number of chunks)."""
    expect(isinstance(declared, dict) and set(declared) == fields, f"{name}: malformed param entry")
    expect(declared["shape"] == list(shape), f"{name}: shape {str(declared['shape'])[:40]} differs from the model's "
                                             f"{list(shape)}")
    chunk = chunk_shape(shape, target_chunk)
    expect(declared["chunk"] == list(chunk), f"{name}: chunk {str(declared['chunk'])[:40]} differs from {list(chunk)}")
    return chunk, math.prod(chunk), math.prod(shape) // math.prod(chunk)


def check_indices(name: str, idx: torch.Tensor, chunk_size: int) -> None:
    """Indices within a chunk, (rows, k) int64: each in [0, chunk_size), none repeated within a row."""
    if idx.numel():
        expect(int(idx.min()) >= 0 and int(idx.max()) < chunk_size, f"{name}: index outside [0, {chunk_size})")
        ordered = idx.sort(dim=1).values
        expect(bool((ordered[:, 1:] != ordered[:, :-1]).all()), f"{name}: repeated index within a chunk")


def check_finite(name: str, values: torch.Tensor) -> None:
    expect(bool(torch.isfinite(values.float()).all()), f"{name}: non-finite value")


# ---------------------------------------------------------------------------------------------------- JSON helpers
def json_object(data: bytes | str, what: str) -> dict:
    """An untrusted JSON object, duplicate keys refused; InvalidFile with a short reason for anything else. Deep
    nesting ("[[[[...") makes json raise RecursionError, not ValueError: caught here too, or a 1 kB text would
    escape every reader's `except InvalidFile` and take the caller (a whole gather, a validator's window) down."""
    try:
        raw = json.loads(data, object_pairs_hook=no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as error:  # JSONDecodeError is a ValueError
        raise InvalidFile(f"{what} is not valid JSON: {str(error)[:120]}") from None
    expect(isinstance(raw, dict), f"{what} is not a JSON object")
    return raw


def no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key in JSON object")
    return dict(pairs)


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def set_difference(what: str, found: set[str], expected: set[str]) -> str:
    missing, extra = sorted(expected - found), sorted(found - expected)
    return f"{what} differ from the model: missing {missing[:3]}, unexpected {[e[:60] for e in extra[:3]]}"


def untrusted_reader(read: Read) -> Read:
    """The contract of every reader of a file from a bucket: InvalidFile for anything wrong with the bytes. A reader's
    checks are meant to get there on their own; an exception that slips past them (a library raising something new
    on input nobody thought of) is still the file's fault, so it becomes InvalidFile too, logged with its traceback
    as the reader's bug it is, instead of taking down the gather or the validator's window every other peer is in.
    MemoryError is the node's, not a verdict on the file: it propagates."""
    @functools.wraps(read)
    def checked(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        except (InvalidFile, MemoryError):
            raise
        except Exception as error:
            logger.exception("%s let %s through: the file is refused as invalid", read.__name__,
                             type(error).__name__)
            raise InvalidFile(f"unreadable ({type(error).__name__})") from None
    return checked  # type: ignore[return-value]


def expect(condition: bool, reason: str) -> None:
    if not condition:
        raise InvalidFile(reason)


MAX_PROBES = 64  # θ values a gradient header may carry (checkpoints.PROBES are published)


def check_sender(header: dict, uid: int, hparams_hash: str | None) -> tuple[str, tuple[float, ...]]:
    """A gradient header's uid, hyper-parameters hash (when given, it must be ours), model hash and probes:
    (model_hash, probes). Raises InvalidFile."""
    expect(is_int(header.get("uid")) and header["uid"] == uid,
           f"header uid {str(header.get('uid'))[:20]} does not match {uid}")
    expect(isinstance(header.get("hparams_hash"), str), "hparams_hash missing")
    if hparams_hash is not None:
        expect(header["hparams_hash"] == hparams_hash,
               f"hparams hash {header['hparams_hash'][:32]!r} differs from ours {hparams_hash!r}")
    model_hash = header.get("model_hash", "")
    expect(isinstance(model_hash, str) and len(model_hash) <= 64, "model_hash must be a short string")
    probes = header.get("probes", [])
    expect(isinstance(probes, list) and len(probes) <= MAX_PROBES
           and all(isinstance(v, float) and math.isfinite(v) for v in probes), "probes must be a few finite numbers")
    return model_hash, tuple(probes)


def check_state(header: dict) -> tuple[str, str] | None:
    """A gradient header's commitment to the miner's state (spot_check.py): None, or the sha256 hex digests of the
    state before and after the window. Raises InvalidFile."""
    state = header.get("state")
    if state is None:
        return None
    expect(isinstance(state, list) and len(state) == 2 and all(
        isinstance(digest, str) and len(digest) == 64 and set(digest) <= set("0123456789abcdef") for digest in state),
        "state must be two sha256 hex digests")
    return state[0], state[1]


def state_header(state: tuple[str, str] | None) -> dict:
    """The header entry that commits a gradient to its miner's state ({} when it commits to none)."""
    return {} if state is None else {"state": list(state)}


def check_step(header: dict) -> list[int]:
    """An aggregation header's outer step (≥ 0), learning rate (finite, ≥ 0) and peers (ascending distinct uids):
    the peers. Raises InvalidFile."""
    expect(is_int(header.get("step")) and header["step"] >= 0, "step must be a non-negative integer")
    expect(isinstance(header.get("lr"), float) and math.isfinite(header["lr"]) and header["lr"] >= 0,
           "lr must be a finite non-negative number")
    peers = header.get("peers")
    expect(isinstance(peers, list) and all(is_int(uid) and uid >= 0 for uid in peers)
           and peers == sorted(set(peers)), "peers must be ascending distinct uids")
    return peers
