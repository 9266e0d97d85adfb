"""Aggregator window steps (DESIGN §2, §5): combine exactly what a validator scored, publish it, advance θ.

    aggregator_step   peers_{w}.json, signed by a uid with a validator permit (else nothing is aggregated: the
                      schedule runs the validator first, and a forged or missing list must never fall back to
                      unscored files) -> gather the listed uids' files (at most topk_peers) -> keep those whose
                      bytes hash to the sha256 the validator published; the list's reserves, best first, fill the
                      places of any left out -> combine (scatter-mean of normalised coefficients, uids ascending)
                      -> aggregation-{w}.safetensors, with every listed uid left out and why (`refused`)
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
from dataclasses import dataclass

import torch

from templar_lib.aggregation import update_norm
from templar_lib.buckets import Bucket
from templar_lib.chain import Chain
from templar_lib.checkpoints import CheckpointInfo, ModelState, catch_up, save_checkpoint
from templar_lib.commitments import PeerBuckets
from templar_lib.data import Dataset
from templar_lib.gather import fetch_peers, gather
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_
from templar_lib.state import StateStore
from templar_lib.strategies import strategy_of
from templar_lib.training import held_out_loss
from templar_lib.wire import Gradient, InvalidFile, Peers, aggregation_key
from templar_lib.wire.aggregation import CHANGED_AFTER_SCORING

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AggregatorResult:
    window: int
    step: int
    lr: float
    peers: list[int]  # uids combined
    skipped: dict[int, str]  # listed uid -> reason it was left out
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


class PeersListError(RuntimeError):
    """There is no peers list for the window that a validator with a permit signed (not yet published, forged,
    malformed): the window cannot be aggregated yet."""


def signed_peers(chain: Chain, peers_list: Bucket, window: int) -> Peers:
    """The validator's peers list of `window`, after checking its signature against the hotkey of the uid it names,
    which must hold a validator permit. Raises PeersListError."""
    try:
        listed = fetch_peers(peers_list, window)
    except InvalidFile as error:
        raise PeersListError(f"peers_{window}.json is invalid: {error}") from None
    if listed is None:
        raise PeersListError(f"no validator has published peers_{window}.json yet")
    graph = chain.metagraph()
    hotkey = graph.hotkey(listed.validator)
    if listed.validator not in graph.validators or hotkey is None:
        raise PeersListError(f"peers_{window}.json names uid {listed.validator}, which holds no validator permit")
    if not chain.verify(hotkey, listed.message(), listed.signature):
        raise PeersListError(f"peers_{window}.json is not signed by validator {listed.validator}'s hotkey")
    return listed


def _scored_files(window: int, uids: list[int], listed: Peers, peers: PeerBuckets, shapes: dict, hparams: HParams,
                  timeout: float) -> tuple[dict[int, Gradient], dict[int, str]]:
    """The gradients of `uids` whose bytes hash to what the validator scored, and why the others were left out."""
    gathered = gather(window, uids, peers, shapes=shapes, hparams=hparams, timeout=timeout, scored=listed.sha256)
    return gathered.gradients, gathered.skipped


def aggregator_step(window: int, *, state: ModelState, chain: Chain, peers: PeerBuckets, aggregator: Bucket,
                    hparams: HParams, peers_list: Bucket, gather_timeout: float = 60.0) -> AggregatorResult:
    """Publish aggregation-{window} from the files a validator scored, on θ_w (state.window must equal `window`).
    peers_list: the bucket holding the validator's peers_{window}.json. Raises PeersListError."""
    if state.window != window:
        raise ValueError(f"aggregator holds θ_{state.window}, cannot aggregate window {window}")
    started = time.perf_counter()
    listed = signed_peers(chain, peers_list, window)
    shapes = {name: tuple(p.shape) for name, p in state.parameters.items()}
    started_at = time.monotonic()
    accepted, refused = _scored_files(window, listed.uids, listed, peers, shapes, hparams, gather_timeout)
    missing = len(listed.uids) - len(accepted)
    if missing and listed.reserves:  # the next best fill the places the listed left, in their order
        remaining = max(1.0, gather_timeout - (time.monotonic() - started_at))
        backups, backup_refused = _scored_files(window, listed.reserves, listed, peers, shapes, hparams, remaining)
        filled = [uid for uid in listed.reserves if uid in backups][:missing]
        accepted |= {uid: backups[uid] for uid in filled}
        refused |= {uid: reason for uid, reason in backup_refused.items()
                    if reason.startswith(CHANGED_AFTER_SCORING)}
    combined, lr, data = strategy_of(hparams).aggregate(window, state.step, accepted, list(shapes), refused)
    aggregator.put(aggregation_key(window), data)
    return AggregatorResult(window, state.step, lr, combined, dict(sorted(refused.items())),
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
