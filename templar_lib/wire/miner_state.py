"""state-{window}-{uid}-{side}.safetensors: a miner's state before or after one window, which it puts when a spot
check draws it (spot_check.py). The templar header:

    {"format": 1, "kind": "miner-state", "window": w, "uid": u, "side": "before" | "after"}

and one tensor per entry of the strategy's state (strategy.state_shapes: demo's momentum, sparseloco's inner AdamW
moments, step count and error feedback), float32 (the step count float64: strategy.STATE_FLOAT64), finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from templar_lib.wire.container import (check_finite, expect, is_int, load_tensors, parse_templar_file,
                                        save_templar_file, set_difference, untrusted_reader)

STATE_FORMAT = 1
SIDES = ("before", "after")
STATE_DTYPES = {"F32": 4, "F64": 8}  # safetensors dtype -> item bytes
HEADER_BYTES = 1 << 20  # names and shapes: a few kB for the 1b preset


def write_miner_state(window: int, uid: int, side: str, state: Mapping[str, torch.Tensor]) -> bytes:
    """The file's bytes (deterministic: sorted names and JSON keys); tensors are moved to the CPU."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES}, not {side!r}")
    tensors = {name: state[name].detach().to("cpu").contiguous() for name in sorted(state)}
    return save_templar_file(tensors, {"format": STATE_FORMAT, "kind": "miner-state", "window": window, "uid": uid,
                                       "side": side})


def miner_state_limit(shapes: Mapping[str, tuple[int, ...]], float64: frozenset[str] = frozenset()) -> int:
    """The largest honest file for a state of these shapes: 4 bytes an element (8 for those in `float64`), and the
    header."""
    return HEADER_BYTES + 8 + sum((8 if name in float64 else 4) * math.prod(shape) for name, shape in shapes.items())


@untrusted_reader
def read_miner_state(data: bytes, *, window: int, uid: int, side: str, shapes: Mapping[str, tuple[int, ...]],
                     float64: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The state in a file expected from `uid` for `window` and `side`, with exactly the tensors and shapes of
    `shapes`, finite, float64 those named in `float64` (a step count) and float32 the others. Raises InvalidFile."""
    entries, header = parse_templar_file(data, kind="miner-state", formats=(STATE_FORMAT,), window=window,
                                         max_bytes=miner_state_limit(shapes, float64), max_header=HEADER_BYTES,
                                         dtypes=STATE_DTYPES)
    expect(is_int(header.get("uid")) and header["uid"] == uid, f"header uid {str(header.get('uid'))[:20]} is not "
                                                               f"{uid}")
    expect(header.get("side") == side, f"side {str(header.get('side'))[:20]!r} is not {side!r}")
    expect(set(entries) == set(shapes), set_difference("state tensors", set(entries), set(shapes)))
    for name, entry in entries.items():
        expect(entry["dtype"] == ("F64" if name in float64 else "F32") and tuple(entry["shape"]) == tuple(shapes[name]),
               f"{name[:80]}: {entry['dtype']} {entry['shape']} is not a state tensor of shape {shapes[name]}")
    tensors = load_tensors(data)
    for name, tensor in tensors.items():
        check_finite(name, tensor)
    return tensors
