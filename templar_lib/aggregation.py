"""Combine peers into the outer update and apply it (DESIGN §2, §5).

    direction = IDCT(scatter-mean over peers of vals / ‖vals‖₂)     (compression.combine, then the inverse DCT)
    θ ← θ · (1 − lr · weight_decay)                                  (decoupled weight decay)
    θ ← θ − lr · sign(direction)                                     (SGD on the sign)

with the learning rate of the window's outer step from `learning_rate_at(step)`: linear warm-up from
0.1·lr to lr over `warmup_steps`, then cosine annealing with warm restarts (T₀ = t_max, T_mult = 2,
floor 0.1·lr). This is the closed form of torch's SequentialLR(LinearLR, CosineAnnealingWarmRestarts) that
Templar used, so any node computes a window's rate from its step number alone.

Every operation is deterministic on CPU; peers are reduced in ascending uid order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import torch

from templar_lib.compression import Sparse, combine_many, idct_many, layout_groups, sparsify
from templar_lib.encodings import AggregationFormat
from templar_lib.hparams import HParams
from templar_lib.wire import Aggregation


def learning_rate_at(step: int, hparams: HParams) -> float:
    """Learning rate of outer step `step` (0-based): cosine_schedule of learning_rate, warmup_steps, t_max."""
    return cosine_schedule(step, base=hparams.learning_rate, warmup=hparams.warmup_steps, t_max=hparams.t_max,
                           floor_ratio=hparams.lr_floor_ratio)


def cosine_schedule(step: int, *, base: float, warmup: int, t_max: int, floor_ratio: float) -> float:
    """Rate of step `step` (0-based):

    1. warm-up (step < warmup):  base · (0.1 + 0.9 · step / warmup)
    2. then t = step − warmup within periods T₀, 2T₀, 4T₀, … (T₀ = t_max):  t_cur = t minus the whole periods before it
    3. cosine:  floor + (base − floor) · (1 + cos(π · t_cur / T_i)) / 2,   floor = floor_ratio · base
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup:
        return base * (0.1 + 0.9 * step / warmup)
    t_cur, period = step - warmup, t_max
    while t_cur >= period:
        t_cur -= period
        period *= 2
    floor = floor_ratio * base
    return floor + (base - floor) * (1 + math.cos(math.pi * t_cur / period)) / 2


def aggregate_window(window: int, step: int, lr: float, gradients_by_uid: Mapping[int, Mapping[str, Sparse]],
                     names: list[str], hparams_hash: str = "",
                     format: int = AggregationFormat.COEFFICIENTS) -> Aggregation:
    """The aggregation of a window: per parameter, the scatter-mean of the peers' normalised coefficients, as the
    combined coefficients (format 1) or the signs of the update they decode to (format 2, sign_directions).

    Peers are reduced in ascending uid order. A parameter that no peer sent is absent (it is only weight-decayed).
    """
    uids = sorted(gradients_by_uid)
    peers_by_name = {name: [gradients_by_uid[uid][name] for uid in uids if name in gradients_by_uid[uid]]
                     for name in names}
    peers_by_name = {name: peers for name, peers in peers_by_name.items() if peers}
    coefficients = combine_many(list(peers_by_name.values()))  # parameters of one layout combined together
    tensors = {name: sparsify(combined, peers[0].shape, peers[0].chunk)
               for (name, peers), combined in zip(peers_by_name.items(), coefficients)}
    aggregation = Aggregation(window=window, step=step, lr=lr, peers=uids, tensors=tensors, hparams_hash=hparams_hash,
                              format=AggregationFormat.COEFFICIENTS)
    if format == AggregationFormat.SIGNS:  # publish the update itself: nobody decodes it again
        return dataclasses.replace(aggregation, tensors={}, format=AggregationFormat.SIGNS,
                                   signs=sign_directions(aggregation))
    return aggregation


def sign_directions(aggregation: Aggregation) -> dict[str, torch.Tensor]:
    """sign(IDCT(coefficients)) per parameter: int8 tensors in {-1, 0, 1} of each parameter's shape.

    Parameters of one layout are decoded together (compression.layout_groups: the grouping every node must use), one
    group at a time, so only one group's coefficients and directions are dense at once: a 1b replay holds the signs
    (1 byte per parameter) and one group, not three float32 copies of θ's size. A format-2 file carries the signs."""
    if aggregation.signs is not None:
        return aggregation.signs
    names = list(aggregation.tensors)
    tensors = [aggregation.tensors[name] for name in names]
    shapes, chunks = [combined.shape for combined in tensors], [combined.chunk for combined in tensors]
    signs: dict[str, torch.Tensor] = {}
    for positions in layout_groups(shapes, chunks):
        directions = idct_many([tensors[p].dense for p in positions], [shapes[p] for p in positions],
                               [chunks[p] for p in positions])
        for position, direction in zip(positions, directions):
            signs[names[position]] = torch.sign(direction).to(torch.int8)
    return {name: signs[name] for name in names}


def apply_aggregation_(parameters: Mapping[str, torch.Tensor], aggregation: Aggregation, *,
                       weight_decay: float) -> None:
    """θ_{window+1} from θ_window in place: the outer step at the aggregation's own learning rate."""
    outer_step_(parameters, sign_directions(aggregation), lr=aggregation.lr, weight_decay=weight_decay)


@torch.no_grad()
def outer_step_(parameters: Mapping[str, torch.Tensor], signs: Mapping[str, torch.Tensor], *, lr: float,
                weight_decay: float) -> None:
    """In place: p ← p·(1 − lr·weight_decay), then p ← p − lr·sign for every parameter (sign 0 where absent)."""
    for name, p in parameters.items():
        p.mul_(1.0 - lr * weight_decay)
        if name in signs:
            p.add_(signs[name].to(device=p.device, dtype=p.dtype), alpha=-lr)


def update_norm(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """‖θ_after − θ_before‖₂ over every parameter (a number people read, not part of the protocol): one parameter's
    difference at a time, so a 1b model needs one parameter's temporary, not two copies of θ."""
    return math.sqrt(sum(float(torch.linalg.vector_norm(after[n].float() - before[n].float())) ** 2 for n in before))
