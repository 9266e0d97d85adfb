"""One driver over every wire format: each gradient and aggregation format written, read back and written again gives
the same bytes, and the receiver decodes what the sender meant (up to the value encoding's own rounding)."""

import dataclasses
import json
import struct

import pytest
import torch
from safetensors.torch import load, save

from templar_lib.aggregation import aggregate_window
from templar_lib.compression import decode, encode, round_values
from templar_lib.encodings import AggregationFormat, GradientFormat
from templar_lib.hparams import HParams
from templar_lib.wire import (Gradient, InvalidFile, read_aggregation, read_gradient, write_aggregation,
                              write_gradient)

SHAPES = {"layer.weight": (96, 128), "layer.bias": (300,), "tiny.weight": (8, 4)}
GRADIENT_ENCODINGS = [(GradientFormat.ROWS, values) for values in ("float32", "bfloat16", "float16")] + \
                     [(GradientFormat.RICE, values) for values in ("float32", "bfloat16", "float16", "int8")]


def sparse_tensors(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {name: encode(torch.randn(shape, generator=generator), topk=32, target_chunk=64)
            for name, shape in SHAPES.items()}


def read(data: bytes, **options) -> Gradient:
    return read_gradient(data, window=12, uid=3, shapes=SHAPES, topk=32, target_chunk=64, hparams_hash="h", **options)


@pytest.mark.parametrize("format, values", GRADIENT_ENCODINGS, ids=[f"{f.name}-{v}" for f, v in GRADIENT_ENCODINGS])
def test_gradient_round_trip_is_byte_identical_and_decodes_to_what_was_sent(format, values):
    sent = Gradient(12, 3, sparse_tensors(), "h", "m" * 32, format=format, values=values)
    data = write_gradient(sent)
    back = read(data)
    assert (back.format, back.values, back.model_hash) == (format, values, "m" * 32)
    assert write_gradient(back) == data  # one place decides the layout: the header's format is the file's
    for name, sparse in sent.tensors.items():
        meant = dataclasses.replace(sparse, vals=round_values(sparse.vals, values))
        torch.testing.assert_close(decode(back.tensors[name]), decode(meant), rtol=0, atol=1e-6)


def test_the_stable_default_is_the_protocol_default():
    gradient = Gradient(12, 3, sparse_tensors(), "h")
    assert (gradient.format, gradient.values) == (HParams().gradient_format, HParams().gradient_value_dtype)
    assert read(write_gradient(gradient)).format == HParams().gradient_format


def test_int8_scale_is_reused_only_for_its_own_multiples():
    data = write_gradient(Gradient(12, 3, sparse_tensors(), "h", format=GradientFormat.RICE, values="int8"))
    back = read(data)
    doubled = back.with_tensors({n: dataclasses.replace(s, vals=s.vals * 3.5) for n, s in back.tensors.items()})
    again = read(write_gradient(doubled))  # other values: a fresh scale, not the stale one
    for name, sparse in back.tensors.items():
        torch.testing.assert_close(again.tensors[name].vals, sparse.vals * 3.5, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("format, values", [(GradientFormat.ROWS, "int8"), (3, "float32"), (1, "float64")])
def test_impossible_encodings_are_refused_when_built(format, values):
    with pytest.raises(ValueError):
        Gradient(1, 1, {}, format=format, values=values)


def test_mixed_value_encodings_in_one_file_are_refused():
    data = write_gradient(Gradient(12, 3, sparse_tensors(), "h", format=GradientFormat.ROWS, values="float32"))
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(json.loads(data[8:8 + length])["__metadata__"]["templar"])
    tensors = load(data)
    tensors["layer.bias.vals"] = tensors["layer.bias.vals"].half()  # one parameter in float16, the rest float32
    with pytest.raises(InvalidFile, match="value dtypes differ"):
        read(save(tensors, metadata={"templar": json.dumps(header)}))


@pytest.mark.parametrize("format", list(AggregationFormat), ids=[f.name for f in AggregationFormat])
def test_aggregation_round_trip_is_byte_identical(format):
    shapes = dict(SHAPES)
    peers = {uid: sparse_tensors(uid) for uid in (1, 4, 7)}
    aggregation = aggregate_window(5, 5, 1e-3, peers, list(shapes), "h", format=format)
    data = write_aggregation(aggregation)
    back = read_aggregation(data, window=5, shapes=shapes, hparams_hash="h")
    assert (back.format, back.peers, back.step) == (format, [1, 4, 7], 5)
    assert write_aggregation(back) == data
