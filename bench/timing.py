"""Shared timing helper for the bench scripts: warm-up once, then the mean of `repeats` timed calls."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def timed(function: Callable[[], object], device: str, repeats: int = 3) -> float:
    """Seconds per call, synchronising CUDA around the timed loop."""
    function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        function()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats
