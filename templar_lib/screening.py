"""Screening of a window's valid gradient files before they are scored (DESIGN §2).

1. stale model  the header's fingerprint of θ_w differs from ours: the miner trained on another (old) model. The
                validator first asks how far behind (sync_lag, from the θ values the miner publishes at the window's
                probe positions): up to sync_max_lag outer steps it is scored with its score scaled down by the lag
                (roles/validator.py); further behind, or with θ_w's probe values but not its fingerprint, rejected.
2. norm         every parameter's values must have unit L2 norm (or be all zero), within UNIT_NORM_TOLERANCE of 1:
                miners send the direction of what they kept (roles.miner), since the aggregation normalises each
                peer and the outer step takes a sign, so magnitude carries nothing and the rule is a constant no
                majority can move (a window median of untrusted uploads can be moved by whoever sends most of them).
                A file whose every parameter is zero is empty.
3. copy         two gradients choose almost the same coefficients (overlap ≥ `copy_overlap` of positions) with
                almost the same values (cosine ≥ `copy_cosine` on the shared positions): the one the validator first
                saw later (watch.py: a block of the chain, not a time the miner reports) is the copy. Two first seen
                in the same poll are a tie: the order is unknown, so neither is rejected here; the copy still earns
                nothing, since what it improves is the other uid's pages (scoring.py).

Each rejected uid gets a one-line reason; the rest pass. Pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from templar_lib.wire import Gradient

UNIT_NORM_TOLERANCE = 0.02  # bf16 and int8 rounding of unit-norm values stay well inside it


def parameter_norms(gradient: Gradient) -> dict[str, float]:
    return {name: float(torch.linalg.vector_norm(s.vals.float())) for name, s in gradient.tensors.items()}


def norm_reason(gradient: Gradient, *, unit_norm: bool = True) -> str | None:
    """Why a gradient's values break the norm rules, or None: an all-zero file is empty; with unit_norm (the demo
    strategy) every parameter's values must have unit norm (or be all zero)."""
    norms = parameter_norms(gradient)
    if norms and all(norm == 0.0 for norm in norms.values()):
        return "empty: every value is zero"
    for name, norm in sorted(norms.items()) if unit_norm else ():
        if norm != 0.0 and abs(norm - 1.0) > UNIT_NORM_TOLERANCE:
            return f"norm: {name[:60]} has ‖values‖ {norm:.4g}, the protocol sends unit norms"
    return None


def sync_lag(probes: Sequence[float], history: Mapping[int, Sequence[float]]) -> int | None:
    """How many outer steps behind the θ a miner trained on is: the smallest lag whose θ has exactly the miner's
    probe values (history: lag -> that θ's values at the window's probe positions), or None for none of them."""
    for lag in sorted(history):
        if list(probes) == list(history[lag]):
            return lag
    return None


def similarity(a: Gradient, b: Gradient) -> tuple[float, float]:
    """(overlap, cosine): share of a's chosen (chunk, position) pairs that b also chose, and the cosine of the two
    value vectors on those shared pairs."""
    shared, total, dot, norm_a, norm_b = 0, 0, 0.0, 0.0, 0.0
    for name, sparse_a in a.tensors.items():
        sparse_b = b.tensors.get(name)
        if sparse_b is None:
            continue
        size = sparse_a.chunk_size
        rows = torch.arange(sparse_a.idx.shape[0])[:, None]
        keys_a = (rows * size + sparse_a.idx).reshape(-1)
        keys_b = (rows * size + sparse_b.idx).reshape(-1)
        order_b = torch.argsort(keys_b)
        position = torch.searchsorted(keys_b[order_b], keys_a).clamp_max(keys_b.numel() - 1)
        match = keys_b[order_b][position] == keys_a
        values_a = sparse_a.vals.float().reshape(-1)[match]
        values_b = sparse_b.vals.float().reshape(-1)[order_b][position[match]]
        shared += int(match.sum())
        total += keys_a.numel()
        dot += float((values_a * values_b).sum())
        norm_a += float(values_a.pow(2).sum())
        norm_b += float(values_b.pow(2).sum())
    overlap = shared / total if total else 0.0
    cosine = dot / (norm_a ** 0.5 * norm_b ** 0.5) if norm_a > 0 and norm_b > 0 else 0.0
    return overlap, cosine


def screen(gradients: Mapping[int, Gradient], *, model_hash: str | None,
           first_seen: Mapping[int, int] | None = None, copy_overlap: float = 0.95,
           copy_cosine: float = 0.98, norm_rule: Callable[[Gradient], str | None] = norm_reason) -> dict[int, str]:
    """Reasons for the uids to reject, by uid (the others pass). model_hash: θ_w's fingerprint every file must carry
    (None: the caller judged how far behind each is, sync_lag). first_seen: the block each file was first seen at by
    the validator (unknown: every pair is a tie). norm_rule: why a file's values break the strategy's norm rule
    (default: the demo strategy's unit norms)."""
    rejected: dict[int, str] = {}
    for uid, gradient in gradients.items():
        if model_hash is not None and gradient.model_hash != model_hash:
            rejected[uid] = (f"stale model: trained on θ {gradient.model_hash[:12] or '(none)'}, "
                             f"expected {model_hash[:12]}")
        elif (reason := norm_rule(gradient)) is not None:
            rejected[uid] = reason
    remaining = sorted(uid for uid in gradients if uid not in rejected)
    seen = first_seen or {}
    for index, first in enumerate(remaining):
        for second in remaining[index + 1:]:
            when_first, when_second = seen.get(first), seen.get(second)
            if when_first is None or when_second is None or when_first == when_second:
                continue  # a tie: neither is the copy of the other here
            overlap, cosine = similarity(gradients[first], gradients[second])
            if overlap >= copy_overlap and cosine >= copy_cosine:
                later, earlier = (first, second) if when_first > when_second else (second, first)
                rejected[later] = (f"copy of uid {earlier} (overlap {overlap:.2f}, cosine {cosine:.3f}, first seen "
                                   f"at block {seen[later]} after block {seen[earlier]})")
    return dict(sorted(rejected.items()))
