"""Local training primitives: the mean next-token loss over a set of sequences and its gradient.

    loss(θ; X) = (1 / n) Σᵢ CE(θ; Xᵢ)      X: (n, T) int64 token ids, Xᵢ one sequence, CE averaged over T − 1 tokens

Sequences are processed in micro-batches of `batch_size` rows; gradients accumulate in the parameters' .grad
(no extra copies) with each micro-batch weighted by its share of rows, so the result is independent of the
micro-batch size up to float rounding. On CPU the result is deterministic.

`held_out_loss` is the same loss on the dataset's held-out pages: how every checkpoint and training run is judged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from templar_lib.data import Dataset

HELD_OUT_PAGES = 8  # held-out loss is measured on the first 8 held-out pages (checkpoints, audit, training runs)


def micro_batches(tokens: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Consecutive row slices of tokens (n, T): (≤ batch_size, T) each."""
    for start in range(0, tokens.shape[0], batch_size):
        yield tokens[start:start + batch_size]


def miner_autocast(model: torch.nn.Module) -> torch.dtype | None:
    """The precision a miner computes its gradient in: bfloat16 autocast on a GPU (float32 weights, gradients and
    momentum; bf16 matmuls and flash attention), float32 on a CPU. Validators measure losses in float32."""
    return torch.bfloat16 if next(model.parameters()).device.type == "cuda" else None


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def loss_and_gradients(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, *,
                       autocast_dtype: torch.dtype | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """Mean loss over all rows of tokens (n, T) and its gradient: (loss, {name: float32 tensor}).

    The gradients are the parameters' own .grad tensors (valid until the next backward on this model).
    """
    device = next(model.parameters()).device
    model.train()
    model.zero_grad(set_to_none=True)
    rows = tokens.shape[0]
    losses = []  # (loss on the device, rows): read once at the end, so the GPU never waits for the host between
    for batch in micro_batches(tokens, batch_size):
        batch = batch.to(device, non_blocking=True)
        with _autocast(device, autocast_dtype):
            loss = model(input_ids=batch, labels=batch).loss
        (loss * (batch.shape[0] / rows)).backward()
        losses.append((loss.detach(), batch.shape[0]))
    gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return _mean(losses, rows), gradients


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, *,
                  autocast_dtype: torch.dtype | None = None) -> float:
    """Mean loss over all rows of tokens (n, T), without gradients."""
    device = next(model.parameters()).device
    model.eval()
    losses = []
    for batch in micro_batches(tokens, batch_size):
        batch = batch.to(device, non_blocking=True)
        with _autocast(device, autocast_dtype):
            losses.append((model(input_ids=batch, labels=batch).loss, batch.shape[0]))
    return _mean(losses, tokens.shape[0])


def _mean(losses: list[tuple[torch.Tensor, int]], rows: int) -> float:
    """Σ loss_b · rows_b / rows over micro-batches, summed in this order in Python floats (as a running total would)."""
    total = 0.0
    for loss, batch_rows in losses:
        total += float(loss) * batch_rows
    return total / rows


def held_out_loss(model: torch.nn.Module, dataset: Dataset, *, batch_size: int, pages: int = HELD_OUT_PAGES) -> float:
    """Mean loss of the θ `model` holds on the dataset's first `pages` held-out pages (never trained on)."""
    return evaluate_loss(model, dataset.held_out_tokens(pages), batch_size)
