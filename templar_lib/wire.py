"""Gradient files on the wire: safetensors + a JSON header, validated field by field (DESIGN §3, §8).

Three kinds of file share the container and its checks:

    gradient-{window}-{uid}.safetensors   a miner's top-k coefficients (below)
    aggregation-{window}.safetensors      the aggregator's combined coefficients: per parameter {name}.idx (nnz,),
                                          {name}.vals (nnz,) float32, {name}.counts (n_chunks,) int32, plus the peers
                                          used, the outer step number and its learning rate
    peers_{window}.json                   a validator's list of uids whose gradients the network uses (JSON only)

A gradient file is a standard safetensors file (8-byte little-endian header length, JSON header, raw tensors).
For every parameter `name` it holds two tensors:

    {name}.idx    (n_chunks, k)  uint8 / int16 / int32: the smallest integer dtype that holds the chunk size
    {name}.vals   (n_chunks, k)  float32 / bfloat16 / float16

and `__metadata__["templar"]` is a JSON object (format 1, the default):

    {"format": 1, "kind": "gradient", "window": w, "uid": u, "hparams_hash": "...",
     "params": {name: {"shape": [R, C], "chunk": [r, c]}, ...}}

Format 2 (`write_gradient(g, version=2)`, compact: ≈ 0.77× of int16 + bf16 with bf16 values, ≈ 0.52× with
int8 values) stores each parameter's indices sorted and Golomb–Rice coded (index_coding.py) in two byte tensors
`{name}.unary` / `{name}.rem`, the values in the same sorted order as `{name}.vals` (BF16 / F16 / F32, or I8 with
a per-parameter float32 `{name}.scale`: value = q · scale), and per parameter "k", "rice" and "values" in the
header. `read_gradient` reads both formats and returns the same Sparse tensors.

Everything read from a bucket is untrusted. `read_gradient` checks, before trusting a single byte: the size
limit, the header length and JSON (no duplicate keys), the schema, the window/uid against the object key, the
parameter set and shapes against the model, the chunking rule, dtypes, tensor sizes against the declared
offsets, then index ranges, repeated indices and finiteness. Any failure raises `InvalidFile(reason)` with a
one-line reason that the validator records as the uid's zero-score reason. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

import numpy as np

from templar_lib.compression import Combined, Sparse, chunk_shape, dequantize_int8, quantize_int8
from templar_lib.index_coding import decode_indices, encode_indices, sort_rows

FORMAT_VERSION = 1
COMPACT_FORMAT = 2  # gradients: Rice-coded indices
SIGNS_FORMAT = 2  # aggregations: the sign update itself, bit-packed
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 16 * 1024 * 1024
VALUE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
INDEX_DTYPES = {"U8": torch.uint8, "I16": torch.int16, "I32": torch.int32}
_ITEM_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "U8": 1, "I8": 1, "I16": 2, "I32": 4}
_V2_VALUES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int8": "I8"}


class InvalidFile(ValueError):
    """A file from a bucket failed validation. str(error) is a one-line reason."""


@dataclass(frozen=True)
class Gradient:
    """One miner's compressed gradient for one window: Sparse coefficients by parameter name."""

    window: int
    uid: int
    tensors: dict[str, Sparse]
    hparams_hash: str = ""
    model_hash: str = ""  # fingerprint of the θ_window the miner trained on (checkpoints.model_fingerprint)
    format: int = FORMAT_VERSION


@dataclass(frozen=True)
class Aggregation:
    """The combined update of one window: θ_{window+1} = outer_step(θ_window) with these coefficients at `lr`.

    step: the outer step's index (θ_window has had `step` steps applied); peers: uids combined, ascending.
    Format 1 carries the combined coefficients (`tensors`; every node decodes them). Format 2 (SIGNS_FORMAT) carries
    the decoded signs (`signs`: name -> int8 tensor in {-1, 0, 1} of the parameter's shape) and no coefficients: the
    outer step needs nothing else, and nodes replaying it decode nothing.
    """

    window: int
    step: int
    lr: float
    peers: list[int]
    tensors: dict[str, Combined]
    hparams_hash: str = ""
    format: int = FORMAT_VERSION
    signs: dict[str, torch.Tensor] | None = None


@dataclass(frozen=True)
class Peers:
    """peers_{window}.json: the uids whose gradients a validator accepts for `window`, ascending."""

    window: int
    validator: int
    uids: list[int]
    format: int = FORMAT_VERSION


def gradient_key(window: int, uid: int) -> str:
    return f"gradient-{window}-{uid}.safetensors"


def aggregation_key(window: int) -> str:
    return f"aggregation-{window}.safetensors"


def peers_key(window: int) -> str:
    return f"peers_{window}.json"


def evaluation_key(window: int, validator_uid: int) -> str:
    return f"evaluation-{window}-{validator_uid}.json"


def index_dtype(chunk_size: int) -> torch.dtype:
    """Smallest integer dtype holding every index of a chunk: ≤256 -> uint8, ≤32768 -> int16, else int32."""
    if chunk_size <= 1 << 8:
        return torch.uint8
    if chunk_size <= 1 << 15:
        return torch.int16
    return torch.int32


def max_aggregation_bytes(shapes: Mapping[str, tuple[int, ...]], *, target_chunk: int, topk: int, peers: int
                          ) -> int:
    """The largest aggregation-{window} file a combination of `peers` top-`topk` gradients can make for a model of
    these parameter shapes; readers refuse a larger one before downloading it.

    Per parameter of n_chunks chunks of c coefficients: at most min(c, peers · topk) kept per chunk, each an index
    (index_dtype(c)) and a float32 value, plus one int32 count per chunk; plus the header (≤ MAX_HEADER_BYTES) and its
    8-byte length; or a format-2 file of the same shapes (two bitmaps per parameter), if larger. It grows with the
    model, unlike a gradient's max_gradient_bytes (256 MiB): a 1b aggregation of
    20 peers of top-32 is ≈ 1.08 GB. With peers ≥ c / topk (128 for 64×64 chunks of top-32) this is the dense bound,
    6 bytes per parameter (≈ 7.4 GB for 1b).
    """
    coefficients = signs = MAX_HEADER_BYTES + 8
    for shape in shapes.values():
        chunk_size = math.prod(chunk_shape(shape, target_chunk))
        n_chunks = math.prod(shape) // chunk_size
        kept = min(chunk_size, peers * topk)
        coefficients += n_chunks * (kept * (index_dtype(chunk_size).itemsize + 4) + 4)
        signs += 2 * -(-math.prod(shape) // 8)  # format 2: two bitmaps at most
    return max(coefficients, signs)


def _index_code(chunk_size: int) -> str:
    return {torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32"}[index_dtype(chunk_size)]


# ---------------------------------------------------------------------------------------------------- writing
def write_gradient(gradient: Gradient, *, version: int = FORMAT_VERSION, values: str = "bfloat16") -> bytes:
    """Serialise to safetensors bytes. Deterministic: the same gradient gives the same bytes.

    version 2 writes the compact encoding with `values` in float32, bfloat16, float16 or int8 (lossy for values
    that are not already representable: senders quantise before error feedback, see ErrorFeedback(value_dtype)).
    """
    if version == COMPACT_FORMAT:
        return _write_compact(gradient, values)
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    for name in sorted(gradient.tensors):
        sparse = gradient.tensors[name]
        if sparse.vals.dtype not in VALUE_DTYPES.values():
            raise ValueError(f"{name}: values must be float32, bfloat16 or float16, not {sparse.vals.dtype}")
        tensors[f"{name}.idx"] = sparse.idx.to(device="cpu", dtype=index_dtype(sparse.chunk_size)).contiguous()
        tensors[f"{name}.vals"] = sparse.vals.detach().to("cpu").contiguous()
        params[name] = {"shape": list(sparse.shape), "chunk": list(sparse.chunk)}
    header = {"format": gradient.format, "kind": "gradient", "window": gradient.window, "uid": gradient.uid,
              "hparams_hash": gradient.hparams_hash, "model_hash": gradient.model_hash, "params": params}
    return safetensors_save(tensors, metadata={"templar": json.dumps(header, sort_keys=True)})


def _write_compact(gradient: Gradient, values: str) -> bytes:
    if values not in _V2_VALUES:
        raise ValueError(f"values must be one of {sorted(_V2_VALUES)}")
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    for name in sorted(gradient.tensors):
        sparse = gradient.tensors[name]
        idx, vals = sort_rows(sparse.idx.detach().to("cpu").long(), sparse.vals.detach().to("cpu"))
        unary, remainders, rice = encode_indices(idx, sparse.chunk_size)
        tensors[f"{name}.unary"] = torch.from_numpy(np.frombuffer(unary, dtype=np.uint8).copy())
        tensors[f"{name}.rem"] = torch.from_numpy(np.frombuffer(remainders, dtype=np.uint8).copy())
        if values == "int8":
            tensors[f"{name}.vals"], tensors[f"{name}.scale"] = quantize_int8(vals)
        else:
            tensors[f"{name}.vals"] = vals.to(VALUE_DTYPES[_V2_VALUES[values]]).contiguous()
        params[name] = {"shape": list(sparse.shape), "chunk": list(sparse.chunk), "k": int(idx.shape[1]),
                        "rice": rice, "values": values}
    header = {"format": COMPACT_FORMAT, "kind": "gradient", "window": gradient.window, "uid": gradient.uid,
              "hparams_hash": gradient.hparams_hash, "model_hash": gradient.model_hash, "params": params}
    return safetensors_save(tensors, metadata={"templar": json.dumps(header, sort_keys=True)})


# ---------------------------------------------------------------------------------------------------- reading
def read_gradient(data: bytes, *, window: int, uid: int, shapes: Mapping[str, tuple[int, ...]],
                  topk: int | None = None, target_chunk: int = 64, hparams_hash: str | None = None,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> Gradient:
    """Parse and validate a gradient file expected from `uid` for `window`.

    shapes: the model's parameter shapes; the file must carry exactly these parameters.
    topk: when given, every parameter must keep exactly min(topk, chunk size) coefficients per chunk.
    hparams_hash: when given, the file's hash must match (a peer on other hyper-parameters is rejected).
    Returns a Gradient whose Sparse tensors have int64 idx and the file's value dtype. Raises InvalidFile.
    """
    entries, header = _parse_templar_file(data, kind="gradient", window=window, max_bytes=max_bytes)
    _expect(_is_int(header.get("uid")) and header["uid"] == uid, f"header uid {header.get('uid')!r} does not match {uid}")
    _expect(isinstance(header.get("hparams_hash"), str), "hparams_hash missing")
    if hparams_hash is not None:
        _expect(header["hparams_hash"] == hparams_hash,
                f"hparams hash {header['hparams_hash'][:32]!r} differs from ours {hparams_hash!r}")
    model_hash = header.get("model_hash", "")
    _expect(isinstance(model_hash, str) and len(model_hash) <= 64, "model_hash must be a short string")
    params = header.get("params")
    _expect(isinstance(params, dict), "params must be an object")
    _expect(set(params) == set(shapes), _set_difference("parameters", set(params), set(shapes)))
    if header["format"] == COMPACT_FORMAT:
        tensors = _read_compact(data, entries, params, shapes, topk, target_chunk)
        return Gradient(window=window, uid=uid, tensors=tensors, hparams_hash=header["hparams_hash"],
                        model_hash=model_hash, format=COMPACT_FORMAT)
    _expect(set(entries) == {f"{n}.{part}" for n in params for part in ("idx", "vals")},
            "tensors do not match the declared parameters")

    layout = {}
    for name in sorted(params):
        layout[name] = _check_parameter(name, params[name], entries, tuple(shapes[name]), topk, target_chunk)

    loaded = _load_tensors(data)

    tensors = {}
    for name, (shape, chunk) in layout.items():
        idx, vals = loaded[f"{name}.idx"].long(), loaded[f"{name}.vals"]
        chunk_size = math.prod(chunk)
        if idx.numel():
            _expect(int(idx.min()) >= 0 and int(idx.max()) < chunk_size,
                    f"{name}: index outside [0, {chunk_size})")
            ordered = idx.sort(dim=1).values
            _expect(bool((ordered[:, 1:] != ordered[:, :-1]).all()), f"{name}: repeated index within a chunk")
        _expect(bool(torch.isfinite(vals).all()), f"{name}: non-finite value")
        tensors[name] = Sparse(idx=idx, vals=vals, shape=shape, chunk=chunk)
    return Gradient(window=window, uid=uid, tensors=tensors, hparams_hash=header["hparams_hash"], model_hash=model_hash)


def _read_compact(data: bytes, entries: dict[str, dict], params: dict, shapes: Mapping[str, tuple[int, ...]],
                  topk: int | None, target_chunk: int) -> dict[str, Sparse]:
    """Tensors of a format-2 gradient file, validated before and after decoding the index streams."""
    layout = {}
    expected_entries = set()
    for name in sorted(params):
        declared = params[name]
        shape = tuple(shapes[name])
        chunk, chunk_size, n_chunks = _declared_layout(name, declared, {"shape", "chunk", "k", "rice", "values"},
                                                       shape, target_chunk)
        k, rice, values = declared["k"], declared["rice"], declared["values"]
        _expect(_is_int(k) and 1 <= k <= chunk_size and (topk is None or k == min(topk, chunk_size)),
                f"{name}: {k!r} coefficients per chunk")
        _expect(_is_int(rice) and 0 <= rice <= 30, f"{name}: bad rice parameter")
        _expect(values in _V2_VALUES, f"{name}: value encoding {str(values)[:20]!r} not allowed")
        _expect(entries.get(f"{name}.vals", {}).get("dtype") == _V2_VALUES[values]
                and entries[f"{name}.vals"]["shape"] == [n_chunks, k], f"{name}: values tensor mismatch")
        for part in ("unary", "rem"):
            _expect(entries.get(f"{name}.{part}", {}).get("dtype") == "U8"
                    and len(entries[f"{name}.{part}"]["shape"]) == 1, f"{name}: {part} stream mismatch")
        parts = {"unary", "rem", "vals"} | ({"scale"} if values == "int8" else set())
        if values == "int8":
            _expect(entries.get(f"{name}.scale", {}).get("dtype") == "F32"
                    and entries[f"{name}.scale"]["shape"] == [1], f"{name}: scale mismatch")
        expected_entries |= {f"{name}.{part}" for part in parts}
        layout[name] = (shape, chunk, n_chunks, k, rice, values)
    _expect(set(entries) == expected_entries, "tensors do not match the declared parameters")
    loaded = _load_tensors(data)
    tensors = {}
    for name, (shape, chunk, n_chunks, k, rice, values) in layout.items():
        try:
            idx = decode_indices(loaded[f"{name}.unary"].numpy().tobytes(), loaded[f"{name}.rem"].numpy().tobytes(),
                                 rice, n_chunks, k, math.prod(chunk))
        except ValueError as error:
            raise InvalidFile(f"{name}: index streams invalid: {error}") from None
        vals = loaded[f"{name}.vals"]
        if values == "int8":
            scale = loaded[f"{name}.scale"]
            _expect(bool(torch.isfinite(scale).all()) and float(scale) > 0, f"{name}: bad scale")
            vals = dequantize_int8(vals, scale)
        _expect(bool(torch.isfinite(vals.float()).all()), f"{name}: non-finite value")
        tensors[name] = Sparse(idx=idx, vals=vals, shape=shape, chunk=chunk)
    return tensors


def write_aggregation(aggregation: Aggregation) -> bytes:
    """Serialise to safetensors bytes. Deterministic. Format 2 writes `aggregation.signs` (write_signs)."""
    if aggregation.format == SIGNS_FORMAT:
        return _write_signs(aggregation)
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    for name in sorted(aggregation.tensors):
        combined = aggregation.tensors[name]
        chunk_size = math.prod(combined.chunk)
        tensors[f"{name}.idx"] = combined.idx.to(device="cpu", dtype=index_dtype(chunk_size)).contiguous()
        tensors[f"{name}.vals"] = combined.vals.detach().to(device="cpu", dtype=torch.float32).contiguous()
        tensors[f"{name}.counts"] = combined.counts.to(device="cpu", dtype=torch.int32).contiguous()
        params[name] = {"shape": list(combined.shape), "chunk": list(combined.chunk)}
    header = {"format": aggregation.format, "kind": "aggregation", "window": aggregation.window,
              "step": aggregation.step, "lr": aggregation.lr, "peers": list(aggregation.peers),
              "hparams_hash": aggregation.hparams_hash, "params": params}
    return safetensors_save(tensors, metadata={"templar": json.dumps(header, sort_keys=True)})


def _write_signs(aggregation: Aggregation) -> bytes:
    """Format 2: per parameter `{name}.positive`, the bits sign > 0 packed 8 to a byte (numpy.packbits, big-endian
    bit order, zero padding), and `{name}.zero`, the bits sign == 0, only for a parameter that has any. 1b: ≈ 155 MB
    against ≈ 1.08 GB of combined coefficients for 20 peers."""
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    for name in sorted(aggregation.signs):
        sign = aggregation.signs[name].detach().to("cpu").reshape(-1).numpy()
        tensors[f"{name}.positive"] = torch.from_numpy(np.packbits(sign > 0))
        if (sign == 0).any():
            tensors[f"{name}.zero"] = torch.from_numpy(np.packbits(sign == 0))
        params[name] = {"shape": list(aggregation.signs[name].shape)}
    header = {"format": SIGNS_FORMAT, "kind": "aggregation", "window": aggregation.window,
              "step": aggregation.step, "lr": aggregation.lr, "peers": list(aggregation.peers),
              "hparams_hash": aggregation.hparams_hash, "params": params}
    return safetensors_save(tensors, metadata={"templar": json.dumps(header, sort_keys=True)})


def _read_signs(data: bytes, entries: dict[str, dict], params: dict, shapes: Mapping[str, tuple[int, ...]]
                ) -> dict[str, torch.Tensor]:
    """The int8 signs of a format-2 file, after checking every packed bitmap's size, padding and consistency."""
    expected = set()
    for name in sorted(params):
        _expect(isinstance(params[name], dict) and set(params[name]) == {"shape"}
                and params[name]["shape"] == list(shapes[name]), f"{name}: shape does not match the model")
        packed = -(-math.prod(shapes[name]) // 8)
        for part in ("positive", "zero"):
            entry = entries.get(f"{name}.{part}")
            if part == "positive" or entry is not None:
                _expect(entry is not None and entry["dtype"] == "U8" and entry["shape"] == [packed],
                        f"{name}: {part} bits must be {packed} bytes of U8")
                expected.add(f"{name}.{part}")
    _expect(set(entries) == expected, "tensors do not match the declared parameters")
    loaded = _load_tensors(data)
    signs = {}
    for name in sorted(params):
        size = math.prod(shapes[name])
        positive = np.unpackbits(loaded[f"{name}.positive"].numpy(), count=None)
        zero = np.unpackbits(loaded[f"{name}.zero"].numpy()) if f"{name}.zero" in loaded else None
        _expect(not positive[size:].any() and (zero is None or not zero[size:].any()), f"{name}: nonzero padding")
        sign = positive[:size].astype(np.int8) * 2 - 1
        if zero is not None:
            _expect(not (zero[:size] & positive[:size]).any(), f"{name}: a coefficient both zero and positive")
            sign[zero[:size].astype(bool)] = 0
        signs[name] = torch.from_numpy(sign).reshape(shapes[name])
    return signs


def read_aggregation(data: bytes, *, window: int, shapes: Mapping[str, tuple[int, ...]], target_chunk: int = 64,
                     hparams_hash: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Aggregation:
    """Parse and validate an aggregation file (format 1 or 2) for `window` against the model's parameter shapes.
    Raises InvalidFile."""
    entries, header = _parse_templar_file(data, kind="aggregation", window=window, max_bytes=max_bytes)
    _expect(_is_int(header.get("step")) and header["step"] >= 0, "step must be a non-negative integer")
    _expect(isinstance(header.get("lr"), float) and math.isfinite(header["lr"]) and header["lr"] >= 0,
            "lr must be a finite non-negative number")
    peers = header.get("peers")
    _expect(isinstance(peers, list) and all(_is_int(uid) and uid >= 0 for uid in peers)
            and peers == sorted(set(peers)), "peers must be ascending distinct uids")
    _expect(isinstance(header.get("hparams_hash"), str), "hparams_hash missing")
    if hparams_hash is not None:
        _expect(header["hparams_hash"] == hparams_hash,
                f"hparams hash {header['hparams_hash']!r} differs from ours {hparams_hash!r}")
    params = header.get("params")
    _expect(isinstance(params, dict) and set(params) <= set(shapes),
            "params must be an object naming model parameters")
    if header["format"] == SIGNS_FORMAT:
        return Aggregation(window=window, step=header["step"], lr=header["lr"], peers=peers, tensors={},
                           hparams_hash=header["hparams_hash"], format=SIGNS_FORMAT,
                           signs=_read_signs(data, entries, params, shapes))
    _expect(set(entries) == {f"{n}.{part}" for n in params for part in ("idx", "vals", "counts")},
            "tensors do not match the declared parameters")
    layout = {}
    for name in sorted(params):
        shape = tuple(shapes[name])
        chunk, chunk_size, n_chunks = _declared_layout(name, params[name], {"shape", "chunk"}, shape, target_chunk)
        idx, vals, counts = (entries[f"{name}.{part}"] for part in ("idx", "vals", "counts"))
        _expect(idx["dtype"] == _index_code(chunk_size) and vals["dtype"] == "F32" and counts["dtype"] == "I32",
                f"{name}: unexpected dtypes")
        _expect(counts["shape"] == [n_chunks], f"{name}: counts for {counts['shape']} chunks, expected {n_chunks}")
        _expect(len(idx["shape"]) == 1 and idx["shape"] == vals["shape"], f"{name}: idx/vals shapes differ")
        layout[name] = (shape, chunk)
    loaded = _load_tensors(data)
    tensors = {}
    for name, (shape, chunk) in layout.items():
        idx, vals, counts = (loaded[f"{name}.{part}"].long() if part != "vals" else loaded[f"{name}.vals"]
                             for part in ("idx", "vals", "counts"))
        chunk_size = math.prod(chunk)
        _expect(bool((counts >= 0).all()) and bool((counts <= chunk_size).all()) and int(counts.sum()) == idx.numel(),
                f"{name}: counts inconsistent with the coefficients")
        if idx.numel():
            _expect(int(idx.min()) >= 0 and int(idx.max()) < chunk_size, f"{name}: index outside [0, {chunk_size})")
            rows = torch.repeat_interleave(torch.arange(counts.numel()), counts)
            order = rows * chunk_size + idx  # strictly increasing iff positions rise within every chunk
            _expect(bool((order[1:] > order[:-1]).all()), f"{name}: positions not increasing within a chunk")
        _expect(bool(torch.isfinite(vals).all()), f"{name}: non-finite value")
        tensors[name] = Combined(idx, vals, counts, shape, chunk)
    return Aggregation(window=window, step=header["step"], lr=header["lr"], peers=peers, tensors=tensors,
                       hparams_hash=header["hparams_hash"])


def write_peers(peers: Peers) -> bytes:
    return json.dumps({"format": peers.format, "window": peers.window, "validator": peers.validator,
                       "uids": sorted(peers.uids)}, sort_keys=True).encode()


def read_peers(data: bytes, *, window: int, max_uids: int = 65536, max_bytes: int = 1 << 20) -> Peers:
    """Parse and validate peers_{window}.json. Raises InvalidFile."""
    _expect(len(data) <= max_bytes, f"peers file of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        raw = json.loads(data, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise InvalidFile(f"peers file is not valid JSON: {str(error)[:120]}") from None
    _expect(isinstance(raw, dict) and set(raw) == {"format", "window", "validator", "uids"},
            "peers file must have exactly format, window, validator, uids")
    _expect(raw["format"] == FORMAT_VERSION, f"unsupported format {raw['format']!r}")
    _expect(_is_int(raw["window"]) and raw["window"] == window, f"peers window {raw['window']!r} does not match {window}")
    _expect(_is_int(raw["validator"]) and raw["validator"] >= 0, "validator must be a uid")
    uids = raw["uids"]
    _expect(isinstance(uids, list) and len(uids) <= max_uids and all(_is_int(u) and 0 <= u < max_uids for u in uids)
            and uids == sorted(set(uids)), "uids must be ascending distinct uids")
    return Peers(window=window, validator=raw["validator"], uids=uids)


def parse_header(data: bytes, *, max_bytes: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Safetensors header of untrusted bytes, validated: (tensor entries by name, __metadata__).

    Checks the size limit, header length, JSON without duplicate keys, entry schema, dtypes, that every tensor's
    byte range matches its shape and lies inside the file, and that ranges neither overlap nor leave gaps.
    """
    _expect(isinstance(data, (bytes, bytearray, memoryview)), "not bytes")
    _expect(len(data) <= max_bytes, f"file of {len(data)} bytes exceeds the limit of {max_bytes}")
    _expect(len(data) >= 8, "file shorter than a safetensors header")
    (header_length,) = struct.unpack("<Q", bytes(data[:8]))
    _expect(header_length <= min(MAX_HEADER_BYTES, len(data) - 8),
            f"declared header length {header_length} exceeds the file or the header limit")
    try:
        header = json.loads(bytes(data[8:8 + header_length]), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as error:
        raise InvalidFile(f"header is not valid JSON: {str(error)[:120]}") from None
    _expect(isinstance(header, dict), "header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    _expect(isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values()),
            "__metadata__ must map strings to strings")
    body = len(data) - 8 - header_length
    spans = []
    for name, entry in header.items():
        _expect(isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"},
                f"tensor {name[:80]!r}: malformed entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        _expect(dtype in _ITEM_BYTES, f"tensor {name[:80]!r}: dtype {str(dtype)[:20]!r} not allowed")
        _expect(isinstance(shape, list) and len(shape) <= 4 and all(_is_int(n) and n >= 0 for n in shape),
                f"tensor {name[:80]!r}: malformed shape")
        _expect(isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= body, f"tensor {name[:80]!r}: data offsets outside the file")
        _expect(offsets[1] - offsets[0] == math.prod(shape) * _ITEM_BYTES[dtype],
                f"tensor {name[:80]!r}: declared size does not match its shape")
        spans.append(tuple(offsets))
    position = 0
    for start, end in sorted(spans):
        _expect(start == position, "tensor data overlaps or leaves gaps")
        position = end
    _expect(position == body, "trailing bytes after the tensor data")
    return header, metadata


def _declared_layout(name: str, declared: object, fields: set[str], shape: tuple[int, ...],
                     target_chunk: int) -> tuple[tuple[int, ...], int, int]:
    """Check a header's param entry (exactly `fields`) against the model: (chunk, chunk size, number of chunks)."""
    _expect(isinstance(declared, dict) and set(declared) == fields, f"{name}: malformed param entry")
    _expect(declared["shape"] == list(shape), f"{name}: shape {str(declared['shape'])[:40]} differs from the model's "
                                              f"{list(shape)}")
    chunk = chunk_shape(shape, target_chunk)
    _expect(declared["chunk"] == list(chunk), f"{name}: chunk {str(declared['chunk'])[:40]} differs from {list(chunk)}")
    return chunk, math.prod(chunk), math.prod(shape) // math.prod(chunk)


def _check_parameter(name: str, declared: object, entries: dict[str, dict], shape: tuple[int, ...],
                     topk: int | None, target_chunk: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    chunk, chunk_size, n_chunks = _declared_layout(name, declared, {"shape", "chunk"}, shape, target_chunk)
    idx, vals = entries[f"{name}.idx"], entries[f"{name}.vals"]
    _expect(idx["dtype"] == _index_code(chunk_size), f"{name}: index dtype {idx['dtype']} for chunk size {chunk_size}")
    _expect(vals["dtype"] in VALUE_DTYPES, f"{name}: value dtype {vals['dtype']} not allowed")
    _expect(len(idx["shape"]) == 2 and idx["shape"] == vals["shape"], f"{name}: idx/vals shapes differ")
    rows, k = idx["shape"]
    _expect(rows == n_chunks, f"{name}: {rows} chunks, expected {n_chunks}")
    expected_k = min(topk, chunk_size) if topk is not None else None
    _expect(1 <= k <= chunk_size and (expected_k is None or k == expected_k),
            f"{name}: {k} coefficients per chunk, expected {expected_k or f'1..{chunk_size}'}")
    return shape, chunk


def _load_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """The tensors of a file whose header has been validated; InvalidFile for anything safetensors rejects."""
    try:
        return safetensors_load(data)
    except Exception as error:  # safetensors raises SafetensorError
        raise InvalidFile(f"safetensors rejected the file: {str(error).splitlines()[0][:200]}") from None


def _parse_templar_file(data: bytes, *, kind: str, window: int, max_bytes: int) -> tuple[dict[str, dict], dict]:
    """Container checks shared by every templar file: safetensors header, then kind, format and window."""
    entries, metadata = parse_header(data, max_bytes=max_bytes)
    header = _templar_header(metadata)
    _expect(header.get("kind") == kind, f"kind is {str(header.get('kind'))[:40]!r}, expected {kind!r}")
    accepted = {"gradient": (FORMAT_VERSION, COMPACT_FORMAT), "aggregation": (FORMAT_VERSION, SIGNS_FORMAT)}.get(
        kind, (FORMAT_VERSION,))
    _expect(header.get("format") in accepted and _is_int(header.get("format")),
            f"unsupported format {str(header.get('format'))[:20]!r}")
    _expect(_is_int(header.get("window")) and header["window"] == window,
            f"header window {str(header.get('window'))[:20]} does not match {window}")
    return entries, header


def _templar_header(metadata: dict[str, str]) -> dict:
    _expect("templar" in metadata, "no templar header in __metadata__")
    try:
        header = json.loads(metadata["templar"], object_pairs_hook=_no_duplicate_keys)
    except (json.JSONDecodeError, ValueError) as error:
        raise InvalidFile(f"templar header is not valid JSON: {str(error)[:120]}") from None
    _expect(isinstance(header, dict), "templar header is not a JSON object")
    return header


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [key for key, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError("duplicate key in JSON object")
    return dict(pairs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _set_difference(what: str, found: set[str], expected: set[str]) -> str:
    missing, extra = sorted(expected - found), sorted(found - expected)
    return f"{what} differ from the model: missing {missing[:3]}, unexpected {[e[:60] for e in extra[:3]]}"


def _expect(condition: bool, reason: str) -> None:
    if not condition:
        raise InvalidFile(reason)
