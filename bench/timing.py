"""Shared timing helper for the bench scripts: warm-up once, then the median of `repeats` timed calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def timed(function: Callable[[], object], device: str, repeats: int = 5) -> float:
    """Seconds per call: the median over `repeats` calls (robust to a noisy neighbour on a shared machine),
    synchronising CUDA around each call."""
    function()
    durations = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        function()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        durations.append(time.perf_counter() - started)
    return statistics.median(durations)
