"""Combine peers into the outer update and apply it (DESIGN §2, §5).

    direction = IDCT(scatter-mean over peers of vals / ‖vals‖₂)     (compression.aggregate, per parameter)
    θ ← θ · (1 − lr · weight_decay)                                  (decoupled weight decay)
    θ ← θ − lr · sign(direction)                                     (SGD on the sign)

with the learning rate of the window's outer step from `learning_rate_at(step)`: linear warm-up from
0.1·lr to lr over `warmup_steps`, then cosine annealing with warm restarts (T₀ = t_max, T_mult = 2,
floor 0.1·lr). This is the closed form of torch's SequentialLR(LinearLR, CosineAnnealingWarmRestarts) that
Templar used, so any node computes a window's rate from its step number alone.

Every operation is deterministic on CPU; peers are reduced in ascending uid order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from templar_lib.compression import Sparse, aggregate
from templar_lib.hparams import HParams


def learning_rate_at(step: int, hparams: HParams) -> float:
    """Learning rate of outer step `step` (0-based).

    1. warm-up (step < warmup_steps):  lr · (0.1 + 0.9 · step / warmup_steps)
    2. then t = step − warmup_steps within periods T₀, 2T₀, 4T₀, …:  t_cur = t minus the whole periods before it
    3. cosine:  floor + (lr − floor) · (1 + cos(π · t_cur / T_i)) / 2,   floor = lr_floor_ratio · lr
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    base = hparams.learning_rate
    if step < hparams.warmup_steps:
        return base * (0.1 + 0.9 * step / hparams.warmup_steps)
    t_cur, period = step - hparams.warmup_steps, hparams.t_max
    while t_cur >= period:
        t_cur -= period
        period *= 2
    floor = hparams.lr_floor_ratio * base
    return floor + (base - floor) * (1 + math.cos(math.pi * t_cur / period)) / 2


def sign_direction(peers_by_uid: Mapping[int, Mapping[str, Sparse]], names: list[str]) -> dict[str, torch.Tensor]:
    """sign(aggregate(...)) for every parameter in `names`, peers taken in ascending uid order.

    A parameter no peer sent gets a zero direction (it is then only weight-decayed). Returns float32 tensors in
    {-1, 0, 1} of each parameter's shape; parameters absent from every peer are omitted.
    """
    directions = {}
    for name in names:
        peers = [peers_by_uid[uid][name] for uid in sorted(peers_by_uid) if name in peers_by_uid[uid]]
        if peers:
            directions[name] = torch.sign(aggregate(peers))
    return directions


@torch.no_grad()
def outer_step_(parameters: Mapping[str, torch.Tensor], signs: Mapping[str, torch.Tensor], *, lr: float,
                weight_decay: float) -> None:
    """In place: p ← p·(1 − lr·weight_decay), then p ← p − lr·sign for every parameter (sign 0 where absent)."""
    for name, p in parameters.items():
        p.mul_(1.0 - lr * weight_decay)
        if name in signs:
            p.add_(signs[name].to(device=p.device, dtype=p.dtype), alpha=-lr)
