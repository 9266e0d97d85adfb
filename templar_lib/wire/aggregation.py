"""Aggregation files: `aggregation-{window}.safetensors`, the aggregator's update of one window.

The templar header of both formats:

    {"format": f, "kind": "aggregation", "window": w, "step": s, "lr": lr, "peers": [uids ascending],
     "refused": {uid: reason}, "hparams_hash": "...", "params": {name: {...}, ...}}

`refused` names the uids of the validator's peers list the aggregator left out, and why (their bytes no longer hash
to what the validator scored, the file is gone, ...): the validator reads it to penalise a swap after scoring.

Format 1, coefficients (`AggregationFormat.COEFFICIENTS`): per parameter the combined coefficients in compressed
rows, `{name}.idx` (nnz,) U8/I16/I32, `{name}.vals` (nnz,) F32, `{name}.counts` (n_chunks,) I32 (chunk i's entries
at [Σ counts[:i], Σ counts[:i+1]), positions increasing within a chunk); "shape" and "chunk" per parameter. Every
replaying node decodes them into the signs of the update.

Format 2, signs (`AggregationFormat.SIGNS`): per parameter `{name}.positive`, the bits sign > 0 packed 8 to a byte
(numpy.packbits, big-endian bit order, zero padding), and `{name}.zero`, the bits sign == 0, only for a parameter that
has any; "shape" per parameter. The outer step needs nothing else, so a replaying node decodes nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from templar_lib.compression import CombinedCoefficients, chunk_shape
from templar_lib.encodings import SPARSELOCO_FORMAT, AggregationFormat
from templar_lib.hparams import HParams
from templar_lib.wire.container import (DEFAULT_MAX_BYTES, MAX_HEADER_BYTES, check_finite, check_step, declared_layout,
                                        expect, index_code, index_dtype, load_tensors, parse_templar_file,
                                        save_templar_file, untrusted_reader)


@dataclass(frozen=True)
class Aggregation:
    """The combined update of one window: θ_{window+1} = outer_step(θ_window) with these coefficients at `lr`.

    step: the outer step's index (θ_window has had `step` steps applied); peers: uids combined, ascending.
    Format 1 carries the combined coefficients (`tensors`); format 2 the decoded signs (`signs`: name -> int8 tensor
    in {-1, 0, 1} of the parameter's shape) and no coefficients.
    """

    window: int
    step: int
    lr: float
    peers: list[int]
    tensors: dict[str, CombinedCoefficients]
    hparams_hash: str = ""
    format: int = HParams.aggregation_format
    signs: dict[str, torch.Tensor] | None = None
    refused: dict[int, str] = field(default_factory=dict)  # listed uids left out, and why


CHANGED_AFTER_SCORING = "changed after it was scored"  # a refusal that proves a swap: the validator bans the uid


@untrusted_reader
def read_refusals(data: bytes, *, window: int, max_bytes: int) -> dict[int, str]:
    """The `refused` entry of an aggregation file's header, without loading its tensors. Raises InvalidFile."""
    _, header = parse_templar_file(data, kind="aggregation", formats=(*AggregationFormat, SPARSELOCO_FORMAT),
                                   window=window, max_bytes=max_bytes)
    refused = header.get("refused")
    expect(isinstance(refused, dict) and all(key.isascii() and key.isdigit() and isinstance(reason, str)
                                             for key, reason in refused.items()), "refused must map uids to reasons")
    return {int(uid): reason[:500] for uid, reason in refused.items()}


def max_aggregation_bytes(shapes: Mapping[str, tuple[int, ...]], *, target_chunk: int, topk: int, peers: int
                          ) -> int:
    """The largest aggregation-{window} file a combination of `peers` top-`topk` gradients can make for a model of
    these parameter shapes; readers refuse a larger one before downloading it.

    Per parameter of n_chunks chunks of c coefficients: at most min(c, peers · topk) kept per chunk, each an index
    (index_dtype(c)) and a float32 value, plus one int32 count per chunk; plus the header (≤ MAX_HEADER_BYTES) and its
    8-byte length; or a format-2 file of the same shapes (two bitmaps per parameter), if larger. It grows with the
    model, unlike a gradient's max_gradient_bytes. With peers ≥ c / topk (128 for 64×64 chunks of top-32) this is the
    dense bound, 6 bytes per parameter.
    """
    coefficients = signs = MAX_HEADER_BYTES + 8
    for shape in shapes.values():
        chunk_size = math.prod(chunk_shape(shape, target_chunk))
        n_chunks = math.prod(shape) // chunk_size
        kept = min(chunk_size, peers * topk)
        coefficients += n_chunks * (kept * (index_dtype(chunk_size).itemsize + 4) + 4)
        signs += 2 * -(-math.prod(shape) // 8)  # format 2: two bitmaps at most
    return max(coefficients, signs)


# ---------------------------------------------------------------------------------------------------- writing
def write_aggregation(aggregation: Aggregation) -> bytes:
    """Serialise to safetensors bytes in `aggregation.format`. Deterministic."""
    if aggregation.format == AggregationFormat.SIGNS:
        tensors, params = _signs_tensors(aggregation.signs)
    else:
        tensors, params = _coefficient_tensors(aggregation.tensors)
    header = {"format": int(aggregation.format), "kind": "aggregation", "window": aggregation.window,
              "step": aggregation.step, "lr": aggregation.lr, "peers": list(aggregation.peers),
              "refused": {str(uid): reason for uid, reason in sorted(aggregation.refused.items())},
              "hparams_hash": aggregation.hparams_hash, "params": params}
    return save_templar_file(tensors, header)


def _coefficient_tensors(combined_by_name: Mapping[str, CombinedCoefficients]) -> tuple[dict, dict]:
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    for name in sorted(combined_by_name):
        combined = combined_by_name[name]
        chunk_size = math.prod(combined.chunk)
        tensors[f"{name}.idx"] = combined.idx.to(device="cpu", dtype=index_dtype(chunk_size)).contiguous()
        tensors[f"{name}.vals"] = combined.vals.detach().to(device="cpu", dtype=torch.float32).contiguous()
        tensors[f"{name}.counts"] = combined.counts.to(device="cpu", dtype=torch.int32).contiguous()
        params[name] = {"shape": list(combined.shape), "chunk": list(combined.chunk)}
    return tensors, params


def _signs_tensors(signs_by_name: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    tensors: dict[str, torch.Tensor] = {}
    params = {}
    for name in sorted(signs_by_name):
        sign = signs_by_name[name].detach().to("cpu").reshape(-1).numpy()
        tensors[f"{name}.positive"] = torch.from_numpy(np.packbits(sign > 0))
        if (sign == 0).any():
            tensors[f"{name}.zero"] = torch.from_numpy(np.packbits(sign == 0))
        params[name] = {"shape": list(signs_by_name[name].shape)}
    return tensors, params


# ---------------------------------------------------------------------------------------------------- reading
@untrusted_reader
def read_aggregation(data: bytes, *, window: int, shapes: Mapping[str, tuple[int, ...]], target_chunk: int = 64,
                     hparams_hash: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Aggregation:
    """Parse and validate an aggregation file (format 1 or 2) for `window` against the model's parameter shapes.
    Raises InvalidFile."""
    entries, header = parse_templar_file(data, kind="aggregation", formats=tuple(AggregationFormat), window=window,
                                         max_bytes=max_bytes)
    peers = check_step(header)
    refused = header.get("refused")
    expect(isinstance(refused, dict) and len(refused) <= 65536
           and all(key.isascii() and key.isdigit() and isinstance(reason, str) and len(reason) <= 500
                   for key, reason in refused.items()), "refused must map uids to reasons")
    expect(isinstance(header.get("hparams_hash"), str), "hparams_hash missing")
    if hparams_hash is not None:
        expect(header["hparams_hash"] == hparams_hash,
               f"hparams hash {header['hparams_hash']!r} differs from ours {hparams_hash!r}")
    params = header.get("params")
    expect(isinstance(params, dict) and set(params) <= set(shapes),
           "params must be an object naming model parameters")
    fields = dict(window=window, step=header["step"], lr=header["lr"], peers=peers,
                  hparams_hash=header["hparams_hash"], format=header["format"],
                  refused={int(uid): reason for uid, reason in refused.items()})
    if header["format"] == AggregationFormat.SIGNS:
        return Aggregation(tensors={}, signs=_read_signs(data, entries, params, shapes), **fields)
    return Aggregation(tensors=_read_coefficients(data, entries, params, shapes, target_chunk), **fields)


def _read_coefficients(data: bytes, entries: dict[str, dict], params: dict, shapes: Mapping[str, tuple[int, ...]],
                       target_chunk: int) -> dict[str, CombinedCoefficients]:
    """The combined coefficients of a format-1 file, after checking every parameter's rows."""
    expect(set(entries) == {f"{n}.{part}" for n in params for part in ("idx", "vals", "counts")},
           "tensors do not match the declared parameters")
    layout = {}
    for name in sorted(params):
        shape = tuple(shapes[name])
        chunk, chunk_size, n_chunks = declared_layout(name, params[name], {"shape", "chunk"}, shape, target_chunk)
        idx, vals, counts = (entries[f"{name}.{part}"] for part in ("idx", "vals", "counts"))
        expect(idx["dtype"] == index_code(chunk_size) and vals["dtype"] == "F32" and counts["dtype"] == "I32",
               f"{name}: unexpected dtypes")
        expect(counts["shape"] == [n_chunks], f"{name}: counts for {counts['shape']} chunks, expected {n_chunks}")
        expect(len(idx["shape"]) == 1 and idx["shape"] == vals["shape"], f"{name}: idx/vals shapes differ")
        layout[name] = (shape, chunk)
    loaded = load_tensors(data)
    tensors = {}
    for name, (shape, chunk) in layout.items():
        idx, counts = loaded[f"{name}.idx"].long(), loaded[f"{name}.counts"].long()
        vals = loaded[f"{name}.vals"]
        chunk_size = math.prod(chunk)
        expect(bool((counts >= 0).all()) and bool((counts <= chunk_size).all()) and int(counts.sum()) == idx.numel(),
               f"{name}: counts inconsistent with the coefficients")
        if idx.numel():
            expect(int(idx.min()) >= 0 and int(idx.max()) < chunk_size, f"{name}: index outside [0, {chunk_size})")
            rows = torch.repeat_interleave(torch.arange(counts.numel()), counts)
            order = rows * chunk_size + idx  # strictly increasing iff positions rise within every chunk
            expect(bool((order[1:] > order[:-1]).all()), f"{name}: positions not increasing within a chunk")
        check_finite(name, vals)
        tensors[name] = CombinedCoefficients(idx, vals, counts, shape, chunk)
    return tensors


def _read_signs(data: bytes, entries: dict[str, dict], params: dict, shapes: Mapping[str, tuple[int, ...]]
                ) -> dict[str, torch.Tensor]:
    """The int8 signs of a format-2 file, after checking every packed bitmap's size, padding and consistency."""
    expected = set()
    for name in sorted(params):
        expect(isinstance(params[name], dict) and set(params[name]) == {"shape"}
               and params[name]["shape"] == list(shapes[name]), f"{name}: shape does not match the model")
        packed = -(-math.prod(shapes[name]) // 8)
        for part in ("positive", "zero"):
            entry = entries.get(f"{name}.{part}")
            if part == "positive" or entry is not None:
                expect(entry is not None and entry["dtype"] == "U8" and entry["shape"] == [packed],
                       f"{name}: {part} bits must be {packed} bytes of U8")
                expected.add(f"{name}.{part}")
    expect(set(entries) == expected, "tensors do not match the declared parameters")
    loaded = load_tensors(data)
    signs = {}
    for name in sorted(params):
        size = math.prod(shapes[name])
        positive = np.unpackbits(loaded[f"{name}.positive"].numpy(), count=None)
        zero = np.unpackbits(loaded[f"{name}.zero"].numpy()) if f"{name}.zero" in loaded else None
        expect(not positive[size:].any() and (zero is None or not zero[size:].any()), f"{name}: nonzero padding")
        sign = positive[:size].astype(np.int8) * 2 - 1
        if zero is not None:
            expect(not (zero[:size] & positive[:size]).any(), f"{name}: a coefficient both zero and positive")
            sign[zero[:size].astype(bool)] = 0
        signs[name] = torch.from_numpy(sign).reshape(shapes[name])
    return signs
