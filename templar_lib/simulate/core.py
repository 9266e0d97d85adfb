"""The bare training core: honest miners, each strategy's compression and outer step, with no chain and no validator.

Each window w (outer step w), every miner u trains on its own pages X_u = pages_for(w, u), the same tokens under
every strategy, and θ_{w+1} is made from what they send:

    demo          g_u = ∇L(θ_w; X_u); s_u = ErrorFeedback_u.step(g_u, lr_w) through the wire format (write + validated
                  read); θ_{w+1} = θ_w·(1 − lr_w·wd) − lr_w·sign(IDCT(aggregate(s_1..s_N)))     (Templar, March 2025)
    dense-sign    the same outer step on sign(mean_u g_u): no compression (the demo strategy's baseline)
    sparseloco    H inner AdamW steps from θ_w on X_u (inner.py): Δ_u = θ_w − θ_u; s_u, e_u = encode_delta(Δ_u, e_u)
                  through the wire format; θ_{w+1} = θ_w − outer_lr·combine_deltas(s_1..s_N)   (Templar, July 2025)
    local-sgd     the same inner steps, θ_{w+1} = θ_w − outer_lr·mean_u Δ_u: no compression (sparseloco's baseline)
    dense-adamw   one AdamW step per window on the mean gradient over every miner's rows at inner_learning_rate
                  (data-parallel AdamW: what a datacentre would run on the same tokens)

and the held-out loss of θ_{w+1} is measured on the dataset's held-out pages. Used by the convergence smoke tests,
`templar train --strategy` and bench/convergence.py. Bytes per miner per window are what it would upload: the wire
file for demo and sparseloco, a bf16 dense tensor for the uncompressed strategies (dense-adamw: a gradient).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from templar_lib.aggregation import aggregate_window, apply_aggregation_, learning_rate_at, outer_step_
from templar_lib.buckets import Bucket
from templar_lib.data import Dataset
from templar_lib.hparams import TRAINING_STRATEGIES, HParams
from templar_lib.inner import InnerState, adamw_step_, clip_gradients_, inner_steps
from templar_lib.model import build_model
from templar_lib.strategies import SparseLoCoStrategy, new_feedback
from templar_lib.training import HELD_OUT_PAGES, held_out_loss, loss_and_gradients, miner_autocast
from templar_lib.wire import Gradient, read_gradient, write_gradient
from templar_lib.wire.sparse import SparseAggregation


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowReport:
    window: int
    lr: float
    train_loss: float  # mean over miners, on θ_w and each miner's own pages (sparseloco: its first inner step)
    held_out_loss: float  # θ_{w+1} on the held-out pages
    bytes_per_miner: float  # what one miner uploads for this window (mean over miners)
    seconds: float


@dataclass(frozen=True)
class TrainingReport:
    strategy: str
    initial_held_out_loss: float
    windows: list[WindowReport] = field(default_factory=list)

    @property
    def final_held_out_loss(self) -> float:
        return self.windows[-1].held_out_loss if self.windows else self.initial_held_out_loss


def train(dataset: Bucket, *, miners: int, windows: int, hparams: HParams, strategy: str = "demo",
          preset: str = "tiny", seed: int = 0, held_out_pages: int = HELD_OUT_PAGES,
          on_window: Callable[[WindowReport], None] | None = None) -> TrainingReport:
    """Run `windows` outer steps of `miners` honest miners from a fresh model under `strategy`
    (hparams.TRAINING_STRATEGIES)."""
    if strategy not in TRAINING_STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(TRAINING_STRATEGIES)}, not {strategy!r}")
    data = Dataset.open(dataset)
    model = build_model(preset, seed=seed, vocab_size=data.vocab_size)
    parameters = dict(model.named_parameters())
    step = {"demo": _demo_window, "dense-sign": _demo_window, "sparseloco": _sparseloco_window,
            "local-sgd": _sparseloco_window, "dense-adamw": _adamw_window}[strategy]
    miner_state: dict = {}

    def held_out() -> float:
        return held_out_loss(model, data, batch_size=hparams.batch_size, pages=held_out_pages)

    report = TrainingReport(strategy, held_out())
    for window in range(windows):
        started = time.perf_counter()
        tokens = [data.tokens(data.miner_pages(window, uid, hparams.pages_per_window)) for uid in range(miners)]
        lr, losses, sent_bytes = step(strategy, window, model, parameters, tokens, hparams, miner_state)
        entry = WindowReport(window, lr, sum(losses) / len(losses), held_out(), sent_bytes / miners,
                             time.perf_counter() - started)
        report.windows.append(entry)
        log.info("%s window %d: lr %.2e train %.4f held-out %.4f (%.1fs)", strategy, window, lr, entry.train_loss,
                 entry.held_out_loss, entry.seconds)
        if on_window is not None:
            on_window(entry)
    return report


def _dense_bytes(parameters: dict[str, torch.Tensor]) -> int:
    return sum(p.numel() for p in parameters.values()) * 2  # bf16


def _demo_window(strategy, window, model, parameters, tokens, hparams, state) -> tuple[float, list[float], int]:
    shapes = {name: tuple(p.shape) for name, p in parameters.items()}
    lr, losses, sent, dense_sum, wire_bytes = learning_rate_at(window, hparams), [], {}, None, 0
    for uid, rows in enumerate(tokens):
        loss, gradients = loss_and_gradients(model, rows, hparams.batch_size)
        losses.append(loss)
        if strategy == "dense-sign":
            dense_sum = {n: g.clone() for n, g in gradients.items()} if dense_sum is None else \
                {n: dense_sum[n].add_(g) for n, g in gradients.items()}
            wire_bytes += _dense_bytes(parameters)
            continue
        feedback = state.setdefault(uid, new_feedback(parameters, hparams))
        file = write_gradient(Gradient.of(window, uid, feedback.step(gradients, lr=lr), hparams))
        wire_bytes += len(file)
        sent[uid] = read_gradient(file, window=window, uid=uid, shapes=shapes, topk=hparams.topk_compression,
                                  target_chunk=hparams.target_chunk, hparams_hash=hparams.protocol_hash()).tensors
    if strategy == "demo":
        aggregation = aggregate_window(window, window, lr, sent, list(shapes), hparams.protocol_hash())
        apply_aggregation_(parameters, aggregation, weight_decay=hparams.weight_decay)
    else:
        signs = {n: torch.sign(g) for n, g in dense_sum.items()}  # sign(mean) == sign(sum)
        outer_step_(parameters, signs, lr=lr, weight_decay=hparams.weight_decay)
    return lr, losses, wire_bytes


def _sparseloco_window(strategy, window, model, parameters, tokens, hparams, state
                       ) -> tuple[float, list[float], int]:
    """sparseloco through the network's own code (strategies.SparseLoCoStrategy: mine, the wire, the replay of an
    aggregation of every miner); local-sgd: the same inner steps, averaged uncompressed."""
    sparse, shapes = SparseLoCoStrategy(hparams), {name: tuple(p.shape) for name, p in parameters.items()}
    losses, sent, deltas, wire_bytes = [], {}, [], 0
    for uid, rows in enumerate(tokens):
        if strategy == "local-sgd":
            inner = state.setdefault(uid, InnerState.zeros_like(parameters))
            inner_losses, delta = inner_steps(model, inner, rows, step=window, hparams=hparams,
                                              autocast_dtype=miner_autocast(model))  # as sparseloco's miner
            losses.append(inner_losses[0])
            deltas.append(delta)
            wire_bytes += _dense_bytes(parameters)
            continue
        mined = sparse.mine(model, state.get(uid), rows, step=window)
        state[uid] = mined.state
        losses.append(mined.loss)
        file = sparse.write_gradient(window, uid, mined.sent)
        wire_bytes += len(file)
        sent[uid] = sparse.read_gradient(file, window=window, uid=uid, shapes=shapes)
    if strategy == "local-sgd":
        with torch.no_grad():
            for name, p in parameters.items():
                p.sub_(torch.stack([delta[name] for delta in deltas]).mean(0).to(p.dtype),
                       alpha=hparams.outer_learning_rate)
    else:
        peers = sorted(sent)
        sparse.replay_(parameters, SparseAggregation(window, window, hparams.outer_learning_rate, peers,
                                                     {name: [sent[uid].tensors[name] for uid in peers]
                                                      for name in shapes}))
    return hparams.outer_learning_rate, losses, wire_bytes


def _adamw_window(strategy, window, model, parameters, tokens, hparams, state) -> tuple[float, list[float], int]:
    inner = state.setdefault("adamw", InnerState.zeros_like(parameters))
    rows = torch.cat(tokens)
    loss, gradients = loss_and_gradients(model, rows, hparams.batch_size)
    clip_gradients_(gradients, hparams.inner_grad_clip)
    lr = hparams.inner_learning_rate
    adamw_step_(parameters, gradients, inner, lr=lr, weight_decay=hparams.inner_weight_decay,
                beta1=hparams.inner_beta1, beta2=hparams.inner_beta2)
    model.zero_grad(set_to_none=True)
    return lr, [loss], _dense_bytes(parameters) * len(tokens)
