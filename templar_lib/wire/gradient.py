"""Gradient files: `gradient-{window}-{uid}.safetensors`, a miner's top-k coefficients of one window.

The templar header of both formats:

    {"format": f, "kind": "gradient", "window": w, "uid": u, "hparams_hash": "...", "model_hash": "...",
     "probes": [θ values at checkpoints.probe_positions(w)], ["state": [sha256 before, after],]
     "params": {name: {"shape": [R, C], "chunk": [r, c], ...}, ...}}

Format 1, rows (`GradientFormat.ROWS`): per parameter `name`

    {name}.idx    (n_chunks, k)  U8 / I16 / I32: the smallest integer dtype that holds the chunk size
    {name}.vals   (n_chunks, k)  F32 / BF16 / F16, one dtype for every parameter of the file

Format 2, Rice (`GradientFormat.RICE`, the protocol default): per parameter the indices of each chunk sorted and
Golomb–Rice coded (index_coding.py) into two byte streams `{name}.unary` / `{name}.rem`, the values in the same sorted
order as `{name}.vals` (BF16 / F16 / F32, or I8 with a per-parameter F32 `{name}.scale`: value = q · scale), and "k",
"rice" and "values" (the encoding) per parameter in the header. bench/RESULTS.md has its size against int16 indices
and bf16 values.

`Gradient.format` and `Gradient.values` decide how a gradient is written, nowhere else; their defaults are the
protocol's (HParams). `read_gradient` returns a Gradient that `write_gradient` turns back into the same bytes.

`read_gradient` checks, before trusting a single byte: the container (container.py), the uid against the object
key, the hyper-parameters hash, the parameter set and shapes against the model, the chunking rule, dtypes, tensor
sizes against the declared offsets, then index ranges, repeated indices and finiteness.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from templar_lib.compression import Sparse, chunk_shape, dequantize_int8, quantize_int8
from templar_lib.encodings import CODES, FLOAT_CODES, FLOAT_ENCODINGS, VALUE_ENCODINGS, GradientFormat, torch_dtype
from templar_lib.hparams import HParams
from templar_lib.index_coding import decode_indices, encode_indices, rice_parameter, sort_rows
from templar_lib.wire.container import (DEFAULT_MAX_BYTES, InvalidFile, check_finite, check_indices, check_sender,
                                        check_state, declared_layout, expect, index_code, index_dtype, is_int,
                                        load_tensors, parse_templar_file, save_templar_file, set_difference,
                                        state_header, untrusted_reader)


@dataclass(frozen=True)
class Gradient:
    """One miner's compressed gradient for one window: Sparse coefficients by parameter name.

    format, values: how it is written (values: float32 | bfloat16 | float16 | int8; int8 needs format 2).
    scales: the int8 scale per parameter a file was read with; a writer reuses it for values that are exactly its
    multiples (a file read back writes the same bytes) and computes a fresh one otherwise.
    """

    window: int
    uid: int
    tensors: dict[str, Sparse]
    hparams_hash: str = ""
    model_hash: str = ""  # fingerprint of the θ_window the miner trained on (checkpoints.model_fingerprint)
    format: int = HParams.gradient_format
    values: str = HParams.gradient_value_dtype
    probes: tuple[float, ...] = ()  # that θ's values at the window's probe positions (how far behind it is)
    scales: dict[str, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    state: tuple[str, str] | None = None  # digests of the miner's state before and after the window (spot_check.py)

    def __post_init__(self) -> None:
        if self.format not in tuple(GradientFormat):
            raise ValueError(f"gradient format must be one of {[int(f) for f in GradientFormat]}, not {self.format}")
        if self.values not in VALUE_ENCODINGS:
            raise ValueError(f"values must be one of {sorted(VALUE_ENCODINGS)}, not {self.values!r}")
        if self.format == GradientFormat.ROWS and self.values not in FLOAT_ENCODINGS:
            raise ValueError(f"{self.values} values need gradient format {int(GradientFormat.RICE)}")

    @classmethod
    def of(cls, window: int, uid: int, tensors: dict[str, Sparse], hparams: HParams, model_hash: str = "",
           probes: tuple[float, ...] = (), state: tuple[str, str] | None = None) -> Gradient:
        """A gradient in the wire format and value encoding `hparams` prescribe."""
        return cls(window, uid, tensors, hparams.protocol_hash(), model_hash, hparams.gradient_format,
                   hparams.gradient_value_dtype, probes=tuple(probes), state=state)

    def with_tensors(self, tensors: dict[str, Sparse], **changes) -> Gradient:
        """The same file with other coefficients (and any other field changed)."""
        return dataclasses.replace(self, tensors=tensors, **changes)


GRADIENT_HEADER_BYTES = 1 << 20  # a gradient's JSON header: a few kB for the 1b preset


def max_gradient_bytes(shapes: Mapping[str, tuple[int, ...]], *, target_chunk: int, topk: int) -> int:
    """The largest gradient file any honest miner can write for a model of these shapes: readers refuse a larger one
    before reading past it, so an endless body costs the size of a real file, not a fixed cap.

    Per chunk of c positions keeping k: format 1 at most an int32 index and a float32 value per kept coefficient;
    format 2 at most (c + 31 k) / 8 bytes of index streams (unary gaps and remainders of up to 30 bits) and 4 bytes per
    value; plus an int8 scale per parameter and the header."""
    total = GRADIENT_HEADER_BYTES + 8
    for shape in shapes.values():
        chunk_size = math.prod(chunk_shape(shape, target_chunk))
        k = min(topk, chunk_size)
        per_chunk = max(8 * k, -(-(chunk_size + 31 * k) // 8) + 4 * k)
        total += (math.prod(shape) // chunk_size) * per_chunk + 64
    return total


def gradient_byte_limit(shapes: Mapping[str, tuple[int, ...]], hparams: HParams) -> int:
    """What a reader of this network's gradients accepts: the model's bound, within the deployment's cap."""
    return min(hparams.max_gradient_bytes, max_gradient_bytes(shapes, target_chunk=hparams.target_chunk,
                                                              topk=hparams.topk_compression))


# ---------------------------------------------------------------------------------------------------- writing
def write_gradient(gradient: Gradient) -> bytes:
    """Serialise to safetensors bytes in `gradient.format`. Deterministic: the same gradient gives the same bytes.
    Lossy only where the values are not already representable in `gradient.values` (miners round before their
    error feedback, see ErrorFeedback(value_dtype))."""
    if gradient.format == GradientFormat.RICE:
        tensors, params = _rice_tensors(gradient)
    else:
        tensors, params = _rows_tensors(gradient)
    header = {"format": int(gradient.format), "kind": "gradient", "window": gradient.window, "uid": gradient.uid,
              "hparams_hash": gradient.hparams_hash, "model_hash": gradient.model_hash,
              "probes": [float(value) for value in gradient.probes], "params": params} | state_header(gradient.state)
    return save_templar_file(tensors, header)


def _rows_tensors(gradient: Gradient) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    dtype = torch_dtype(gradient.values)
    for name in sorted(gradient.tensors):
        sparse = gradient.tensors[name]
        tensors[f"{name}.idx"] = sparse.idx.to(device="cpu", dtype=index_dtype(sparse.chunk_size)).contiguous()
        tensors[f"{name}.vals"] = sparse.vals.detach().to(device="cpu", dtype=dtype).contiguous()
        params[name] = {"shape": list(sparse.shape), "chunk": list(sparse.chunk)}
    return tensors, params


def _rice_tensors(gradient: Gradient) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    for name in sorted(gradient.tensors):
        sparse = gradient.tensors[name]
        idx, vals = sort_rows(sparse.idx.detach().to("cpu").long(), sparse.vals.detach().to("cpu"))
        unary, remainders, rice = encode_indices(idx, sparse.chunk_size)
        tensors[f"{name}.unary"] = torch.from_numpy(np.frombuffer(unary, dtype=np.uint8).copy())
        tensors[f"{name}.rem"] = torch.from_numpy(np.frombuffer(remainders, dtype=np.uint8).copy())
        if gradient.values == "int8":
            tensors[f"{name}.vals"], tensors[f"{name}.scale"] = _quantize(vals, (gradient.scales or {}).get(name))
        else:
            tensors[f"{name}.vals"] = vals.to(torch_dtype(gradient.values)).contiguous()
        params[name] = {"shape": list(sparse.shape), "chunk": list(sparse.chunk), "k": int(idx.shape[1]),
                        "rice": rice, "values": gradient.values}
    return tensors, params


def _quantize(vals: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and scale of `vals`: the given scale when vals are exactly its multiples, else a fresh one."""
    if scale is not None:
        q = torch.round(vals.float() / scale).clamp(-127, 127).to(torch.int8)
        if torch.equal(dequantize_int8(q, scale), vals.float()):
            return q, scale.reshape(1).float()
    return quantize_int8(vals)


# ---------------------------------------------------------------------------------------------------- reading
@untrusted_reader
def read_gradient(data: bytes, *, window: int, uid: int, shapes: Mapping[str, tuple[int, ...]],
                  topk: int | None = None, target_chunk: int = 64, hparams_hash: str | None = None,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> Gradient:
    """Parse and validate a gradient file expected from `uid` for `window`.

    shapes: the model's parameter shapes; the file must carry exactly these parameters.
    topk: when given, every parameter must keep exactly min(topk, chunk size) coefficients per chunk.
    hparams_hash: when given, the file's hash must match (a peer on other hyper-parameters is rejected).
    Returns a Gradient whose Sparse tensors have int64 idx and the file's value dtype (int8: the float32 q · scale).
    Raises InvalidFile.
    """
    entries, header = parse_templar_file(data, kind="gradient", formats=tuple(GradientFormat), window=window,
                                         max_bytes=max_bytes, max_header=GRADIENT_HEADER_BYTES)
    model_hash, probes = check_sender(header, uid, hparams_hash)
    state = check_state(header)
    params = header.get("params")
    expect(isinstance(params, dict), "params must be an object")
    expect(set(params) == set(shapes), set_difference("parameters", set(params), set(shapes)))
    read = _read_rice if header["format"] == GradientFormat.RICE else _read_rows
    tensors, values, scales = read(data, entries, params, shapes, topk, target_chunk)
    return Gradient(window=window, uid=uid, tensors=tensors, hparams_hash=header["hparams_hash"],
                    model_hash=model_hash, format=header["format"], values=values, scales=scales,
                    probes=probes, state=state)


def _read_rows(data: bytes, entries: dict[str, dict], params: dict, shapes: Mapping[str, tuple[int, ...]],
               topk: int | None, target_chunk: int) -> tuple[dict[str, Sparse], str, None]:
    """Tensors of a format-1 file, and their value encoding."""
    expect(set(entries) == {f"{n}.{part}" for n in params for part in ("idx", "vals")},
           "tensors do not match the declared parameters")
    layout = {}
    for name in sorted(params):
        chunk, chunk_size, n_chunks = declared_layout(name, params[name], {"shape", "chunk"}, tuple(shapes[name]),
                                                      target_chunk)
        idx, vals = entries[f"{name}.idx"], entries[f"{name}.vals"]
        expect(idx["dtype"] == index_code(chunk_size), f"{name}: index dtype {idx['dtype']} for chunk size "
                                                       f"{chunk_size}")
        expect(vals["dtype"] in FLOAT_CODES, f"{name}: value dtype {vals['dtype']} not allowed")
        expect(len(idx["shape"]) == 2 and idx["shape"] == vals["shape"], f"{name}: idx/vals shapes differ")
        rows, k = idx["shape"]
        expect(rows == n_chunks, f"{name}: {rows} chunks, expected {n_chunks}")
        expected_k = min(topk, chunk_size) if topk is not None else None
        expect(1 <= k <= chunk_size and (expected_k is None or k == expected_k),
               f"{name}: {k} coefficients per chunk, expected {expected_k or f'1..{chunk_size}'}")
        layout[name] = (tuple(shapes[name]), chunk)
    codes = {entries[f"{name}.vals"]["dtype"] for name in params}
    expect(len(codes) <= 1, f"value dtypes differ between parameters: {sorted(codes)}")
    loaded = load_tensors(data)
    tensors = {}
    for name, (shape, chunk) in layout.items():
        idx, vals = loaded[f"{name}.idx"].long(), loaded[f"{name}.vals"]
        check_indices(name, idx, math.prod(chunk))
        check_finite(name, vals)
        tensors[name] = Sparse(idx=idx, vals=vals, shape=shape, chunk=chunk)
    return tensors, CODES[codes.pop()] if codes else HParams.gradient_value_dtype, None


def _read_rice(data: bytes, entries: dict[str, dict], params: dict, shapes: Mapping[str, tuple[int, ...]],
               topk: int | None, target_chunk: int) -> tuple[dict[str, Sparse], str, dict[str, torch.Tensor]]:
    """Tensors of a format-2 file, validated before and after decoding the index streams; their value encoding and
    (int8) scales."""
    layout = {}
    expected_entries = set()
    for name in sorted(params):
        declared = params[name]
        shape = tuple(shapes[name])
        chunk, chunk_size, n_chunks = declared_layout(name, declared, {"shape", "chunk", "k", "rice", "values"},
                                                      shape, target_chunk)
        k, rice, values = declared["k"], declared["rice"], declared["values"]
        expect(is_int(k) and 1 <= k <= chunk_size and (topk is None or k == min(topk, chunk_size)),
               f"{name}: {k!r} coefficients per chunk")
        # the writer's b is a function of (chunk size, k): any other inflates the remainders (and their decoding)
        expect(is_int(rice) and rice == rice_parameter(chunk_size, k), f"{name}: rice parameter, expected "
                                                                        f"{rice_parameter(chunk_size, k)}")
        expect(values in VALUE_ENCODINGS, f"{name}: value encoding {str(values)[:20]!r} not allowed")
        expect(entries.get(f"{name}.vals", {}).get("dtype") == VALUE_ENCODINGS[values]
               and entries[f"{name}.vals"]["shape"] == [n_chunks, k], f"{name}: values tensor mismatch")
        for part in ("unary", "rem"):
            expect(entries.get(f"{name}.{part}", {}).get("dtype") == "U8"
                   and len(entries[f"{name}.{part}"]["shape"]) == 1, f"{name}: {part} stream mismatch")
        parts = {"unary", "rem", "vals"} | ({"scale"} if values == "int8" else set())
        if values == "int8":
            expect(entries.get(f"{name}.scale", {}).get("dtype") == "F32"
                   and entries[f"{name}.scale"]["shape"] == [1], f"{name}: scale mismatch")
        expected_entries |= {f"{name}.{part}" for part in parts}
        layout[name] = (shape, chunk, n_chunks, k, rice, values)
    expect(set(entries) == expected_entries, "tensors do not match the declared parameters")
    encodings = {values for *_, values in layout.values()}
    expect(len(encodings) <= 1, f"value encodings differ between parameters: {sorted(encodings)}")
    loaded = load_tensors(data)
    tensors, scales = {}, {}
    for name, (shape, chunk, n_chunks, k, rice, values) in layout.items():
        try:
            idx = decode_indices(loaded[f"{name}.unary"].numpy().tobytes(), loaded[f"{name}.rem"].numpy().tobytes(),
                                 rice, n_chunks, k, math.prod(chunk))
        except ValueError as error:
            raise InvalidFile(f"{name}: index streams invalid: {error}") from None
        vals = loaded[f"{name}.vals"]
        if values == "int8":
            scale = loaded[f"{name}.scale"]
            expect(bool(torch.isfinite(scale).all()) and float(scale) > 0, f"{name}: bad scale")
            vals = dequantize_int8(vals, scale)
            scales[name] = scale
        check_finite(name, vals)
        tensors[name] = Sparse(idx=idx, vals=vals, shape=shape, chunk=chunk)
    return tensors, encodings.pop() if encodings else HParams.gradient_value_dtype, scales or None

