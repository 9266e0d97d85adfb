"""How things are encoded on the wire, in one table: the file formats, the dtypes a templar file may hold, and how
a gradient's kept values travel. Torch-free on import (hyper-parameters validate against it).

    GradientFormat     1 rows: (n_chunks, k) index and value tensors; 2 Rice: Rice-coded sorted indices
    SPARSELOCO_FORMAT  3: the sparseloco strategy's gradient and aggregation files (wire/sparse.py)
    AggregationFormat  1 coefficients: the combined coefficients; 2 signs: the update's signs, bit-packed

    code   dtype      bytes   held by
    F32    float32    4       gradient values, aggregation values, int8 scales, checkpoint parameters
    BF16   bfloat16   2       gradient values, checkpoint parameters
    F16    float16    2       gradient values, checkpoint parameters
    I8     int8       1       int8-quantised gradient values
    U8     uint8      1       indices of chunks of at most 256 positions, Rice streams, sign bitmaps
    I16    int16      2       indices of chunks of at most 32768 positions
    I32    int32      4       larger indices, per-chunk counts

Value encodings (HParams.gradient_value_dtype; a miner rounds its values to one before its momentum update):

    float32 / bfloat16 / float16   the values cast to that dtype
    int8                           per parameter q = round(v / scale), scale = max|v| / 127 (gradient format 2 only)
"""

from __future__ import annotations

from enum import IntEnum


class GradientFormat(IntEnum):
    ROWS = 1  # {name}.idx / {name}.vals (n_chunks, k)
    RICE = 2  # Rice-coded sorted indices, values in any encoding (int8 included)


class AggregationFormat(IntEnum):
    COEFFICIENTS = 1  # the combined coefficients in compressed rows
    SIGNS = 2  # the signs of the update, bit-packed


SPARSELOCO_FORMAT = 3  # both file kinds of the sparseloco strategy; formats 1 and 2 are the demo strategy's


CODES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I8": "int8", "U8": "uint8", "I16": "int16",
         "I32": "int32"}  # safetensors code -> dtype name
ITEM_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I8": 1, "U8": 1, "I16": 2, "I32": 4}
FLOAT_CODES = ("F32", "BF16", "F16")  # the floating dtypes of values and checkpoint parameters
VALUE_ENCODINGS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "int8": "I8"}  # encoding -> tensor code
FLOAT_ENCODINGS = ("float32", "bfloat16", "float16")  # encodings that are a plain cast (gradient format 1 too)


def torch_dtype(code_or_name: str):
    """The torch dtype of a safetensors code ("BF16") or a dtype name ("bfloat16")."""
    import torch

    return getattr(torch, CODES.get(code_or_name, code_or_name))


def name_of(dtype) -> str:
    """"float32" for torch.float32."""
    return str(dtype).removeprefix("torch.")


def code_of(dtype) -> str:
    """The safetensors code of a torch dtype ("F32" for torch.float32); KeyError for one no file may hold."""
    name = name_of(dtype)
    return next(code for code, dtype_name in CODES.items() if dtype_name == name)
