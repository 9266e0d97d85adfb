"""A SparseLoCo miner's inner loop: H AdamW steps on its own pages from θ_w, and the pseudo-gradient they make.

Per window w, outer step s, from θ_w and the miner's AdamW state (m, v, t) carried over windows:

    the window's token rows (n, T) are dealt into H slices, every H-th row from row h (n ≥ H), one per inner step
    h = 0..H−1 (inner_slices: a page's consecutive rows, one stretch of text, go to different steps):
        g = ∇ mean loss of the slice (micro-batches of batch_size)       float32, training.loss_and_gradients
        g ← g · min(1, inner_grad_clip / ‖g‖₂)                            over all parameters together
        θ ← AdamW(θ, g; lr_t, betas (inner_beta1, inner_beta2), eps 1e-8, weight decay inner_weight_decay)
        lr_t = inner_learning_rate_at(s·H + h): warm-up + cosine of the outer schedule, in inner steps
    Δ = θ_w − θ_after                                                    the pseudo-gradient, what the miner sends
    θ ← θ_w                                                              the model holds θ_w again

The state travels as flat float32 tensors (InnerState.tensors: "adam_m.{name}", "adam_v.{name}", "adam_t") so the
node's state store saves it like any other (atomic, write-behind), and a run that restarts from it continues bit
for bit on a CPU: the update is written out here rather than through torch.optim, whose state is a pickled dict.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from templar_lib.aggregation import cosine_schedule
from templar_lib.hparams import HParams
from templar_lib.model import parameters_of
from templar_lib.training import loss_and_gradients

EPS = 1e-8


def inner_slices(tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """The rows (n, T) of each of `steps` inner steps: rows h, h + steps, h + 2·steps, … for h = 0..steps−1 (fewer
    steps when there are fewer rows). A window's rows come page by page, and a page's rows are one stretch of text:
    dealt out like this, each step sees as many pages as it can instead of one (bench/RESULTS.md, "Inner steps
    across pages")."""
    steps = min(steps, tokens.shape[0])
    return [tokens[h::steps].contiguous() for h in range(steps)]


def inner_learning_rate_at(inner_step: int, hparams: HParams) -> float:
    """The inner AdamW rate of inner step `inner_step` (= outer step · H + h): the outer schedule's shape (warm-up,
    cosine with restarts, floor) with inner_learning_rate, measured in inner steps."""
    steps = hparams.inner_steps
    return cosine_schedule(inner_step, base=hparams.inner_learning_rate, warmup=hparams.warmup_steps * steps,
                           t_max=hparams.t_max * steps, floor_ratio=hparams.lr_floor_ratio)


@dataclass
class InnerState:
    """AdamW's moments per parameter (float32, the parameter's shape) and the number of steps taken."""

    m: dict[str, torch.Tensor]
    v: dict[str, torch.Tensor]
    t: int = 0

    @classmethod
    def zeros_like(cls, parameters: Mapping[str, torch.Tensor]) -> InnerState:
        return cls({n: torch.zeros_like(p, dtype=torch.float32) for n, p in parameters.items()},
                   {n: torch.zeros_like(p, dtype=torch.float32) for n, p in parameters.items()})

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """As flat tensors for the state store."""
        return ({f"adam_m.{n}": m for n, m in self.m.items()} | {f"adam_v.{n}": v for n, v in self.v.items()}
                | {"adam_t": torch.tensor([self.t], dtype=torch.float64)})

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], parameters: Mapping[str, torch.Tensor]) -> InnerState:
        """From InnerState.tensors, each moment moved to its parameter's device; ValueError if one is missing."""
        missing = [n for n in parameters if f"adam_m.{n}" not in tensors or f"adam_v.{n}" not in tensors]
        if missing or "adam_t" not in tensors:
            raise ValueError(f"inner state lacks {missing[:3] or ['adam_t']}")
        device = {n: p.device for n, p in parameters.items()}
        return cls({n: tensors[f"adam_m.{n}"].float().to(device[n]) for n in parameters},
                   {n: tensors[f"adam_v.{n}"].float().to(device[n]) for n in parameters}, int(tensors["adam_t"][0]))


@torch.no_grad()
def adamw_step_(parameters: Mapping[str, torch.Tensor], gradients: Mapping[str, torch.Tensor], state: InnerState, *,
                lr: float, weight_decay: float, beta1: float, beta2: float) -> None:
    """One AdamW step in place (Loshchilov & Hutter; torch.optim.AdamW's update, bias-corrected):
    p ← p·(1 − lr·wd);  m ← β₁m + (1 − β₁)g;  v ← β₂v + (1 − β₂)g²;  p ← p − lr·m̂ / (√v̂ + ε)."""
    state.t += 1
    t = state.t
    correction1, correction2 = 1 - beta1 ** t, 1 - beta2 ** t
    for name, p in parameters.items():
        g = gradients.get(name)
        if g is None:
            continue
        m, v = state.m[name], state.v[name]
        m.mul_(beta1).add_(g, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.mul_(1 - lr * weight_decay)
        denominator = (v / correction2).sqrt_().add_(EPS)
        p.addcdiv_(m, denominator, value=-lr / correction1)


def clip_gradients_(gradients: Mapping[str, torch.Tensor], max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / ‖g‖₂) (the norm over all of them); returns the norm before."""
    norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in gradients.values()))
    if norm > max_norm:
        for g in gradients.values():
            g.mul_(max_norm / (norm + 1e-6))
    return norm


def inner_steps(model: torch.nn.Module, state: InnerState, tokens: torch.Tensor, *, step: int,
                hparams: HParams, autocast_dtype: torch.dtype | None = None
                ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """H AdamW steps from the model's θ_w on the rows of `tokens` (n, T), then θ_w restored; returns (the loss of
    each inner step, Δ = θ_w − θ_after float32 per parameter). `state` is advanced in place. autocast_dtype: the
    forward and backward's precision on CUDA (a miner's: training.miner_autocast); weights, gradients, moments and
    Δ stay float32."""
    if tokens.shape[0] == 0:
        raise ValueError("no rows to train on")
    parameters = parameters_of(model)
    start = {n: p.detach().clone() for n, p in parameters.items()}
    losses = []
    try:
        # H slices; fewer when there are fewer rows (only a miner that skips most of its pages has)
        for h, rows in enumerate(inner_slices(tokens, hparams.inner_steps)):
            loss, gradients = loss_and_gradients(model, rows, hparams.batch_size, autocast_dtype=autocast_dtype)
            clip_gradients_(gradients, hparams.inner_grad_clip)
            adamw_step_(parameters, gradients, state, lr=inner_learning_rate_at(step * hparams.inner_steps + h,
                                                                                hparams),
                        weight_decay=hparams.inner_weight_decay, beta1=hparams.inner_beta1, beta2=hparams.inner_beta2)
            losses.append(loss)
        model.zero_grad(set_to_none=True)
        delta = {n: (start[n] - p.detach()).float() for n, p in parameters.items()}
    finally:
        with torch.no_grad():
            for n, p in parameters.items():
                p.copy_(start[n])
    return losses, delta
