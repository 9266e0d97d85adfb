"""Aggregator window step (DESIGN §2, §5): combine the window's valid gradients into θ_{w+1} and publish it.

    gather -> screen (stale / norm / copies) -> keep the uids of peers_{w}.json when a validator published it
    -> combine (scatter-mean of normalised coefficients, uids ascending) -> aggregation-{w}.safetensors
    -> θ_{w+1} = outer_step(θ_w) through the same `apply_aggregation_` every replaying node uses
    -> checkpoint-{w+1} when (w + 1) is a multiple of checkpoint_frequency

Re-running a window gives byte-identical files: inputs are read, never mutated, and every reduction is ordered.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from templar_lib.aggregation import (apply_aggregation_, combine_peers, learning_rate_at, sign_directions,
                                     update_norm)
from templar_lib.buckets import Bucket
from templar_lib.checkpoints import CheckpointInfo, ModelState, model_fingerprint, save_checkpoint
from templar_lib.gather import fetch_peers, gather
from templar_lib.hparams import HParams
from templar_lib.screening import screen
from templar_lib.wire import SIGNS_FORMAT, InvalidFile, aggregation_key, write_aggregation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorResult:
    window: int
    step: int
    lr: float
    peers: list[int]  # uids combined
    skipped: dict[int, str]  # uid -> reason it was left out
    update_norm: float | None  # ‖θ_{w+1} − θ_w‖₂ (None when the step did not advance θ)
    key: str
    bytes: int
    checkpoint: CheckpointInfo | None
    seconds: float


def aggregator_step(window: int, *, state: ModelState, uids: Iterable[int], peer_buckets: Mapping[int, Bucket],
                    aggregator: Bucket, hparams: HParams, peers_bucket: Bucket | None = None,
                    time_range: tuple[datetime, datetime] | None = None, gather_timeout: float = 60.0,
                    skipped_commitments: Mapping[int, str] | None = None,
                    advance: bool = True) -> tuple[AggregatorResult, ModelState | None]:
    """Publish aggregation-{window} and advance θ_w (state.window must equal `window`) by one outer step; returns
    the result and θ_{w+1}. advance=False stops after publishing (returns None for θ): the Dagster `checkpoint` asset
    then computes θ_{w+1} once, by replaying the published file as every other node does, and checkpoints it."""
    if state.window != window:
        raise ValueError(f"aggregator holds θ_{state.window}, cannot aggregate window {window}")
    started = time.perf_counter()
    shapes = {name: tuple(p.shape) for name, p in state.parameters.items()}
    gathered = gather(window, uids, peer_buckets, shapes=shapes, hparams=hparams, timeout=gather_timeout,
                      time_range=time_range)
    skipped = {**(skipped_commitments or {}), **gathered.skipped,
               **screen(gathered.gradients, model_hash=state.fingerprint or model_fingerprint(state.parameters),
                        upload_times=gathered.uploaded)}
    accepted = {uid: g for uid, g in gathered.gradients.items() if uid not in skipped}
    if peers_bucket is not None:
        try:
            listed = fetch_peers(peers_bucket, window)
        except InvalidFile as error:  # a broken list must not stop the network: aggregate every accepted uid
            log.warning("window %d: ignoring peers list: %s", window, error)
            listed = None
        if listed is not None:
            for uid in sorted(set(accepted) - set(listed.uids)):
                skipped[uid] = f"not in peers_{window}.json"
            accepted = {uid: g for uid, g in accepted.items() if uid in listed.uids}

    lr = learning_rate_at(state.step, hparams)
    aggregation = combine_peers(window, state.step, lr, {uid: g.tensors for uid, g in accepted.items()},
                                list(shapes), hparams.protocol_hash())
    if hparams.aggregation_format == SIGNS_FORMAT:  # publish the update itself: nobody decodes it again
        aggregation = dataclasses.replace(aggregation, tensors={}, format=SIGNS_FORMAT,
                                          signs=sign_directions(aggregation))
    data = write_aggregation(aggregation)
    aggregator.put(aggregation_key(window), data)

    following, update, checkpoint = None, None, None
    if advance:
        parameters = {name: p.clone() for name, p in state.parameters.items()}
        apply_aggregation_(parameters, aggregation, weight_decay=hparams.weight_decay)
        following = ModelState(window + 1, state.step + 1, parameters)
        update = update_norm(state.parameters, parameters)
        if following.window % hparams.checkpoint_frequency == 0:
            checkpoint = save_checkpoint(aggregator, following, hparams)
    result = AggregatorResult(window, state.step, lr, aggregation.peers, dict(sorted(skipped.items())), update,
                              aggregation_key(window), len(data), checkpoint, time.perf_counter() - started)
    return result, following
