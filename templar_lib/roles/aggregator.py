"""Aggregator window steps (DESIGN §2, §5): combine the window's valid gradients, publish the update, advance θ.

    aggregator_step   gather -> screen (stale / norm / copies) -> keep the uids of peers_{w}.json when a validator
                      published it -> combine (scatter-mean of normalised coefficients, uids ascending)
                      -> aggregation-{w}.safetensors
    advance_window    θ_{w+1} = replay of aggregation-{w} onto θ_w, exactly as every other node computes it
                      -> checkpoint-{w+1} when (w + 1) is a multiple of checkpoint_frequency -> the node's state
                      -> held-out loss of θ_{w+1}

The aggregator itself computes θ_{w+1} only by replaying the file it published (advance_window), once per window,
so its θ is the network's by construction. Re-running a window gives byte-identical files: inputs are read, never
mutated, and every reduction is ordered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import torch

from templar_lib.aggregation import aggregate_window, learning_rate_at, update_norm
from templar_lib.buckets import Bucket
from templar_lib.checkpoints import CheckpointInfo, ModelState, catch_up, model_fingerprint, save_checkpoint
from templar_lib.commitments import PeerBuckets
from templar_lib.data import Dataset
from templar_lib.gather import fetch_peers, gather
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_
from templar_lib.screening import screen
from templar_lib.state import StateStore
from templar_lib.training import held_out_loss
from templar_lib.wire import InvalidFile, aggregation_key, write_aggregation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorResult:
    window: int
    step: int
    lr: float
    peers: list[int]  # uids combined
    skipped: dict[int, str]  # uid -> reason it was left out
    key: str
    bytes: int
    seconds: float


@dataclass(frozen=True)
class WindowAdvance:
    """θ_{window+1} as this node replayed it, and what it measured."""

    window: int
    state: ModelState  # θ_{window+1}
    sha256: str  # of its state file (checkpoints.state_sha256)
    held_out_loss: float
    update_norm: float  # ‖θ_{window+1} − θ_window‖₂
    checkpoint: CheckpointInfo | None  # published this window


def aggregator_step(window: int, *, state: ModelState, uids: Iterable[int], peers: PeerBuckets, aggregator: Bucket,
                    hparams: HParams, peers_list: Bucket | None = None,
                    time_range: tuple[datetime, datetime] | None = None,
                    gather_timeout: float = 60.0) -> AggregatorResult:
    """Publish aggregation-{window} from the gradients of `uids` on θ_w (state.window must equal `window`).
    peers_list: the bucket holding a validator's peers_{window}.json, when the network has one."""
    if state.window != window:
        raise ValueError(f"aggregator holds θ_{state.window}, cannot aggregate window {window}")
    started = time.perf_counter()
    shapes = {name: tuple(p.shape) for name, p in state.parameters.items()}
    gathered = gather(window, uids, peers, shapes=shapes, hparams=hparams, timeout=gather_timeout,
                      time_range=time_range)
    skipped = {**gathered.skipped,
               **screen(gathered.gradients, model_hash=state.fingerprint or model_fingerprint(state.parameters),
                        upload_times=gathered.uploaded)}
    accepted = {uid: g for uid, g in gathered.gradients.items() if uid not in skipped}
    if peers_list is not None:
        try:
            listed = fetch_peers(peers_list, window)
        except InvalidFile as error:  # a broken list must not stop the network: aggregate every accepted uid
            log.warning("window %d: ignoring peers list: %s", window, error)
            listed = None
        if listed is not None:
            for uid in sorted(set(accepted) - set(listed.uids)):
                skipped[uid] = f"not in peers_{window}.json"
            accepted = {uid: g for uid, g in accepted.items() if uid in listed.uids}

    lr = learning_rate_at(state.step, hparams)
    aggregation = aggregate_window(window, state.step, lr, {uid: g.tensors for uid, g in accepted.items()},
                                   list(shapes), hparams.protocol_hash(), format=hparams.aggregation_format)
    data = write_aggregation(aggregation)
    aggregator.put(aggregation_key(window), data)
    return AggregatorResult(window, state.step, lr, aggregation.peers, dict(sorted(skipped.items())),
                            aggregation_key(window), len(data), time.perf_counter() - started)


def advance_window(window: int, *, state: ModelState, aggregator: Bucket, store: StateStore, model: torch.nn.Module,
                   dataset: Dataset, hparams: HParams) -> WindowAdvance:
    """θ_{window+1} from θ_window (`state`) and the published aggregation-{window}; published as a checkpoint every
    checkpoint_frequency windows, saved in the node's store, and measured on the held-out pages in `model` (the
    node's model object on its device; overwritten with θ_{window+1}).

    The checkpoint is published before the local save: a run killed in between redoes the window and publishes the
    same bytes again."""
    following = catch_up(state, aggregator, window + 1, hparams=hparams)
    checkpoint = None
    if following.window % hparams.checkpoint_frequency == 0:
        checkpoint = save_checkpoint(aggregator, following, hparams)
    sha256 = store.save_model(following, background=False)  # the file's digest: no second serialisation
    load_parameters_(model, following.parameters)
    loss = held_out_loss(model, dataset, batch_size=hparams.batch_size)
    store.record_held_out_loss(following.window, loss)
    return WindowAdvance(window, following, sha256, loss, update_norm(state.parameters, following.parameters),
                         checkpoint)
