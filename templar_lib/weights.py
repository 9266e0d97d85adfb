"""Chain weights from ratings (DESIGN §2).

    w_u = max(0, final_u) / Σ_v max(0, final_v)        over registered uids

Rules: uids not in the metagraph get nothing (deregistered); uids without a rating yet get nothing (new); when no
uid has a positive final score the result is None and the validator sets no weights this window (the chain keeps
its previous weights rather than receiving an arbitrary split). Deterministic: sorted by uid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping


def normalised_weights(final_scores: Mapping[int, float], registered: Iterable[int]) -> dict[int, float] | None:
    registered = set(registered)
    positive = {uid: score for uid, score in sorted(final_scores.items()) if uid in registered and score > 0}
    total = sum(positive.values())
    if not positive or total <= 0:
        return None
    return {uid: score / total for uid, score in positive.items()}
