"""Screening of a window's valid gradient files before they are scored or aggregated.

The seed-era score (scoring.py) cannot see three cheap attacks, so this adds the countermeasures Templar used
later (sync checks, norm bounds, overlap/similarity penalties):

1. stale model   the header's fingerprint of θ_w differs from ours: the miner trained on another (old) model.
2. norm outlier  ‖vals‖₂ over the whole gradient is more than `norm_ratio` × the window's median, or less than
                 the median / `norm_ratio` (scaled or near-empty uploads). Needs ≥ 3 gradients to have a median.
3. copy          two gradients choose almost the same coefficients (overlap ≥ `copy_overlap` of positions) with
                 almost the same values (cosine ≥ `copy_cosine` on the shared positions): the later upload is the
                 copy; when the upload times are equal or unknown, both are rejected.

Each rejected uid gets a one-line reason; the rest pass. Pure function of its inputs.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from datetime import datetime

import torch

from templar_lib.wire import Gradient


def gradient_norm(gradient: Gradient) -> float:
    return float(torch.sqrt(sum(s.vals.float().pow(2).sum() for s in gradient.tensors.values())))


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


def screen(gradients: Mapping[int, Gradient], *, model_hash: str, upload_times: Mapping[int, datetime] | None = None,
           norm_ratio: float = 4.0, copy_overlap: float = 0.95, copy_cosine: float = 0.98) -> dict[int, str]:
    """Reasons for the uids to reject, by uid (the others pass)."""
    rejected: dict[int, str] = {}
    for uid, gradient in gradients.items():
        if gradient.model_hash != model_hash:
            rejected[uid] = (f"stale model: trained on θ {gradient.model_hash[:12] or '(none)'}, "
                             f"expected {model_hash[:12]}")
    remaining = {uid: g for uid, g in gradients.items() if uid not in rejected}
    norms = {uid: gradient_norm(g) for uid, g in remaining.items()}
    if len(norms) >= 3:
        median = statistics.median(norms.values())
        for uid, norm in norms.items():
            if norm > norm_ratio * median or norm * norm_ratio < median:
                rejected[uid] = f"norm outlier: ‖vals‖ {norm:.3g} vs window median {median:.3g}"
    remaining = sorted(uid for uid in remaining if uid not in rejected)
    times = upload_times or {}
    for index, first in enumerate(remaining):
        for second in remaining[index + 1:]:
            overlap, cosine = similarity(gradients[first], gradients[second])
            if overlap < copy_overlap or cosine < copy_cosine:
                continue
            when_first, when_second = times.get(first), times.get(second)
            if when_first is not None and when_second is not None and when_first != when_second:
                later, earlier = (first, second) if when_first > when_second else (second, first)
                rejected[later] = f"copy of uid {earlier} (overlap {overlap:.2f}, cosine {cosine:.3f}, uploaded later)"
            else:
                for uid, other in ((first, second), (second, first)):
                    rejected[uid] = f"copy of uid {other} (overlap {overlap:.2f}, cosine {cosine:.3f})"
    return dict(sorted(rejected.items()))
