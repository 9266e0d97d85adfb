"""Miner window step (DESIGN §2, §5): train on the window's own pages, compress, upload."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch

from templar_lib.aggregation import learning_rate_at
from templar_lib.buckets import Bucket
from templar_lib.checkpoints import model_fingerprint, probe_values
from templar_lib.compression import unit_norm
from templar_lib.data import Dataset
from templar_lib.error_feedback import ErrorFeedback
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_, parameters_of
from templar_lib.state import MomentumLost, StateMissing, StateStore
from templar_lib.training import loss_and_gradients, miner_autocast
from templar_lib.wire import Gradient, gradient_key, write_gradient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MinerResult:
    window: int
    uid: int
    loss: float  # mean loss of θ_w on the uid's pages
    tokens: int
    bytes: int  # size of the uploaded file
    compression_ratio: float  # dense float32 gradient bytes / uploaded bytes
    pages: list[int]
    key: str
    seconds: float
    momentum: str = "carried"  # where the momentum came from: carried (window − 1), zeros (no state), recomputed

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def new_feedback(parameters, hparams: HParams, momentum: dict[str, torch.Tensor] | None = None) -> ErrorFeedback:
    """A miner's error feedback under these hyper-parameters: from `momentum` (moved to the parameters' device:
    a state file loads on the CPU), or zeros shaped like `parameters`."""
    settings = dict(topk=hparams.topk_compression, target_chunk=hparams.target_chunk,
                    momentum_decay=hparams.momentum_decay, value_dtype=hparams.gradient_value_dtype)
    if momentum is None:
        return ErrorFeedback.zeros_like(parameters, **settings)
    return ErrorFeedback({name: m.to(parameters[name].device) if name in parameters else m
                          for name, m in momentum.items()}, **settings)


def window_pages(window: int, uid: int, *, dataset: Dataset, hparams: HParams) -> tuple[list[int], torch.Tensor]:
    """The pages `uid` trains on in `window` and their tokens."""
    pages = dataset.miner_pages(window, uid, hparams.pages_per_window)
    return pages, dataset.tokens(pages)


def fold_gradient(model: torch.nn.Module, feedback: ErrorFeedback, tokens: torch.Tensor, *, step: int,
                  hparams: HParams) -> tuple[float, dict]:
    """Loss of the model's θ on `tokens`, and its gradient folded into `feedback` at outer step `step`'s learning
    rate (in place); returns what to transmit: each parameter's kept coefficients at unit norm (the momentum keeps
    what was actually taken out of it)."""
    loss, gradients = loss_and_gradients(model, tokens, hparams.batch_size, autocast_dtype=miner_autocast(model))
    sent = feedback.step(gradients, lr=learning_rate_at(step, hparams))
    return loss, {name: unit_norm(sparse) for name, sparse in sent.items()}


def compute_gradient(window: int, uid: int, *, model: torch.nn.Module, step: int, feedback: ErrorFeedback,
                     tokens: torch.Tensor, hparams: HParams, model_hash: str | None = None) -> tuple[float, Gradient]:
    """Loss and compressed gradient of θ_w (held by `model`) on `tokens`; folds into `feedback` in place.
    model_hash: θ_w's fingerprint when the caller already has it (one per window, however many uids it mines)."""
    loss, sparse = fold_gradient(model, feedback, tokens, step=step, hparams=hparams)
    parameters = parameters_of(model)
    model_hash = model_hash or model_fingerprint(parameters)
    return loss, Gradient.of(window, uid, sparse, hparams, model_hash, probes=probe_values(parameters, window))


def miner_step(window: int, uid: int, *, model: torch.nn.Module, step: int, feedback: ErrorFeedback,
               dataset: Dataset, gradients: Bucket, hparams: HParams, model_hash: str | None = None) -> MinerResult:
    """One window of mining on θ_w (the model's current weights, outer step `step`; model_hash its fingerprint)."""
    started = time.perf_counter()
    pages, tokens = window_pages(window, uid, dataset=dataset, hparams=hparams)
    loss, gradient = compute_gradient(window, uid, model=model, step=step, feedback=feedback, tokens=tokens,
                                      hparams=hparams, model_hash=model_hash)
    data = write_gradient(gradient)
    key = gradient_key(window, uid)
    gradients.put(key, data)
    dense_bytes = sum(math.prod(s.shape) for s in gradient.tensors.values()) * 4
    return MinerResult(window, uid, loss, tokens.numel(), len(data), dense_bytes / len(data), pages, key,
                       time.perf_counter() - started)


def mine_window(window: int, uids: list[int], *, model: torch.nn.Module, step: int, store: StateStore,
                dataset: Dataset, gradients: Bucket, hparams: HParams,
                model_hash: str | None = None) -> list[MinerResult]:
    """miner_step for every uid this node serves, each from its momentum after window − 1 (zeros if none) in the
    node's StateStore, saving the momentum after `window`: re-running a window reproduces the same files."""
    results = []
    parameters = parameters_of(model)
    model_hash = model_hash or model_fingerprint(parameters)  # θ_w is the same for every uid of this node
    for uid in sorted(uids):
        try:
            momentum = store.load_momentum(uid, window - 1)
            source = "carried" if momentum is not None else "zeros"
        except MomentumLost as lost:
            momentum = recompute_momentum(lost, model=model, store=store, dataset=dataset, hparams=hparams)
            source = "recomputed" if momentum is not None else "zeros (lost, not recomputable)"
        feedback = new_feedback(parameters, hparams, momentum=momentum)
        result = miner_step(window, uid, model=model, step=step, feedback=feedback, dataset=dataset,
                            gradients=gradients, hparams=hparams, model_hash=model_hash)
        results.append(dataclasses.replace(result, momentum=source))
        store.save_momentum(uid, window, feedback.momentum)
    return results


def recompute_momentum(lost: MomentumLost, *, model: torch.nn.Module, store: StateStore, dataset: Dataset,
                       hparams: HParams) -> dict[str, torch.Tensor] | None:
    """The momentum a background write lost (state.py, contract point 4), computed again: fold the lost window's
    gradient of θ_window on the uid's pages into the momentum before it, exactly as that window did (mining is
    deterministic given θ, pages, step and momentum), save it synchronously and return it. The model is restored to
    the θ it held. Falls back to None (zeros) only when θ_window is no longer in the store either; the warning says
    so."""
    uid, window = lost.uid, lost.window
    try:
        state = store.load_model(window)
        before = store.load_momentum(uid, window - 1)
    except StateMissing as missing:
        log.warning("%s; it cannot be recomputed (%s): uid %d starts again from zero momentum", lost, missing, uid)
        return None
    log.warning("%s; recomputing it from θ_%d and the uid's pages", lost, window)
    current = {name: p.detach().clone() for name, p in parameters_of(model).items()}
    try:
        load_parameters_(model, state.parameters)
        feedback = new_feedback(parameters_of(model), hparams, momentum=before)
        _, tokens = window_pages(window, uid, dataset=dataset, hparams=hparams)
        fold_gradient(model, feedback, tokens, step=state.step, hparams=hparams)
    finally:
        load_parameters_(model, current)
    store.save_momentum(uid, window, feedback.momentum, background=False)
    return feedback.momentum
