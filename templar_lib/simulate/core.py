"""The bare training core: honest miners, compression and the outer step, with no chain and no validator.

Each window w, with lr = learning_rate_at(w):

    every miner u:  X_u = pages_for(w, u)  ->  (loss, g_u) on θ_w
    compressed:     s_u = ErrorFeedback_u.step(g_u, lr), sent through the wire format (write + validated read)
                    θ_{w+1} = outer_step(θ_w, sign(aggregate(s_1..s_N)))
    dense:          θ_{w+1} = outer_step(θ_w, sign(mean_u g_u))         (baseline: no compression, same optimiser)

and the held-out loss of θ_{w+1} is measured on the dataset's held-out pages. Used by the convergence smoke test and
`templar train` (`--mode dense` is the uncompressed baseline).
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
from templar_lib.hparams import HParams
from templar_lib.model import build_model
from templar_lib.roles.miner import new_feedback
from templar_lib.training import HELD_OUT_PAGES, held_out_loss, loss_and_gradients
from templar_lib.wire import Gradient, read_gradient, write_gradient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowReport:
    window: int
    lr: float
    train_loss: float  # mean over miners, on θ_w and each miner's own pages
    held_out_loss: float  # θ_{w+1} on the held-out pages
    gradient_bytes: int  # total wire bytes of this window's gradients (0 when dense)
    seconds: float


@dataclass(frozen=True)
class TrainingReport:
    mode: str
    initial_held_out_loss: float
    windows: list[WindowReport] = field(default_factory=list)

    @property
    def final_held_out_loss(self) -> float:
        return self.windows[-1].held_out_loss if self.windows else self.initial_held_out_loss


def train(dataset: Bucket, *, miners: int, windows: int, hparams: HParams, mode: str = "compressed",
          preset: str = "tiny", seed: int = 0, held_out_pages: int = HELD_OUT_PAGES,
          on_window: Callable[[WindowReport], None] | None = None) -> TrainingReport:
    """Run `windows` outer steps of `miners` honest miners from a fresh model. mode: "compressed" | "dense"."""
    if mode not in ("compressed", "dense"):
        raise ValueError(f"mode must be 'compressed' or 'dense', not {mode!r}")
    data = Dataset.open(dataset)
    model = build_model(preset, seed=seed, vocab_size=data.vocab_size)
    parameters = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in parameters.items()}
    feedback = {uid: new_feedback(parameters, hparams) for uid in range(miners)}

    def held_out() -> float:
        return held_out_loss(model, data, batch_size=hparams.batch_size, pages=held_out_pages)

    report = TrainingReport(mode, held_out())
    for window in range(windows):
        started = time.perf_counter()
        lr = learning_rate_at(window, hparams)
        losses, sent, dense_sum, wire_bytes = [], {}, None, 0
        for uid in range(miners):
            tokens = data.tokens(data.miner_pages(window, uid, hparams.pages_per_window))
            loss, gradients = loss_and_gradients(model, tokens, hparams.batch_size)
            losses.append(loss)
            if mode == "dense":
                dense_sum = {n: g.clone() for n, g in gradients.items()} if dense_sum is None else \
                    {n: dense_sum[n].add_(g) for n, g in gradients.items()}
                continue
            file = write_gradient(Gradient.of(window, uid, feedback[uid].step(gradients, lr=lr), hparams))
            wire_bytes += len(file)
            sent[uid] = read_gradient(file, window=window, uid=uid, shapes=shapes, topk=hparams.topk_compression,
                                      target_chunk=hparams.target_chunk,
                                      hparams_hash=hparams.protocol_hash()).tensors
        if mode == "compressed":
            aggregation = aggregate_window(window, window, lr, sent, list(shapes), hparams.protocol_hash())
            apply_aggregation_(parameters, aggregation, weight_decay=hparams.weight_decay)
        else:
            signs = {n: torch.sign(g) for n, g in dense_sum.items()}  # sign(mean) == sign(sum)
            outer_step_(parameters, signs, lr=lr, weight_decay=hparams.weight_decay)
        entry = WindowReport(window, lr, sum(losses) / len(losses), held_out(), wire_bytes,
                             time.perf_counter() - started)
        report.windows.append(entry)
        log.info("%s window %d: lr %.2e train %.4f held-out %.4f (%.1fs)", mode, window, lr, entry.train_loss,
                 entry.held_out_loss, entry.seconds)
        if on_window is not None:
            on_window(entry)
    return report
