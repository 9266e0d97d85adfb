"""Compression round trip: templar_lib vs a straightforward reference of the same math, same inputs, one run.

Round trip per parameter = error feedback (m ← β·m + lr·g) + chunked DCT-II encode + top-k + decode + m ← m − t.

reference: the Templar v0.2 formulation — rearrange into (Y, X, r, c) blocks, `einsum("...ij, jb, ik -> ...kb")`
           with the DCT bases, top-k over the flattened blocks, scatter into zeros, inverse einsum, rearrange back.
ours:      templar_lib.compression.ErrorFeedback (batched matmul D_r·B·D_cᵀ on a (n_chunks, r, c) view).

    python bench/compression.py                          # tiny + small preset shapes on the CPU
    python bench/compression.py --preset 1b --device cuda
"""

from __future__ import annotations

import argparse
import platform

import torch
from timing import timed  # bench/timing.py (the script's folder is on sys.path)

from templar_lib.compression import ErrorFeedback, chunk_shape, dct_matrix
from templar_lib.model import build_model


def reference_round_trip(m: torch.Tensor, g: torch.Tensor, lr: float, decay: float, topk: int, target: int):
    """Templar-style einsum implementation (the baseline)."""
    m.mul_(decay).add_(g, alpha=lr)
    if m.dim() == 1:
        (c,) = chunk_shape(m.shape, target)
        f = dct_matrix(c, str(m.device)).T  # x @ f == DCT
        blocks = m.reshape(-1, c)
        encoded = blocks @ f
        flat = encoded
    else:
        (r, c) = chunk_shape(m.shape, target)
        rows, cols = m.shape
        blocks = m.reshape(rows // r, r, cols // c, c).permute(0, 2, 1, 3)  # y h x w -> y x h w
        fr, fc = dct_matrix(r, str(m.device)).T, dct_matrix(c, str(m.device)).T
        encoded = torch.einsum("...ij, jb, ik -> ...kb", blocks, fc, fr)
        flat = encoded.reshape(*encoded.shape[:2], r * c)
    k = min(topk, flat.shape[-1])
    idx = flat.abs().topk(k, dim=-1, sorted=False).indices
    vals = flat.gather(-1, idx)
    dense = torch.zeros_like(flat).scatter_(-1, idx, vals)
    if m.dim() == 1:
        decoded = (dense @ f.T).reshape(m.shape)
    else:
        dense = dense.reshape(encoded.shape)
        decoded = torch.einsum("...ij, jb, ik -> ...kb", dense, fc.T, fr.T)
        decoded = decoded.permute(0, 2, 1, 3).reshape(m.shape)
    m.sub_(decoded)
    return idx, vals


def shapes_of(preset: str, device: str) -> dict[str, tuple[int, ...]]:
    model = build_model(preset, device="meta") if preset == "1b" else build_model(preset)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def run(preset: str, device: str, repeats: int, topk: int, target: int) -> None:
    shapes = shapes_of(preset, device)
    generator = torch.Generator(device=device).manual_seed(0)
    gradients = {n: torch.randn(s, generator=generator, device=device) for n, s in shapes.items()}
    momentum = {n: torch.zeros(s, device=device) for n, s in shapes.items()}
    reference_momentum = {n: t.clone() for n, t in momentum.items()}
    ours = ErrorFeedback(momentum, topk=topk, target_chunk=target, momentum_decay=0.999)
    lr = 4e-4

    def reference():
        for name, g in gradients.items():
            reference_round_trip(reference_momentum[name], g, lr, 0.999, topk, target)

    def optimised():
        ours.step(gradients, lr=lr)

    t_reference = timed(reference, device, repeats)
    t_ours = timed(optimised, device, repeats)
    worst = max((ours.momentum[n] - reference_momentum[n]).abs().max().item() for n in shapes)
    elements = sum(g.numel() for g in gradients.values())
    # bytes touched at least once: read g, read+write m (fp32) for the fold, read m for encode, read+write m on subtract
    bytes_moved = elements * 4 * 6
    print(f"{preset} on {device} ({platform.processor() or platform.machine()}): {len(shapes)} tensors, "
          f"{elements / 1e6:.1f} M elements, topk {topk}, chunk {target}")
    print(f"  reference (einsum):  {t_reference * 1e3:9.2f} ms")
    print(f"  ours (batched mm):   {t_ours * 1e3:9.2f} ms   ({bytes_moved / t_ours / 1e9:.1f} GB/s effective)")
    print(f"  ratio reference/ours: {t_reference / t_ours:.2f}x   (max |Δm| after the same steps: {worst:.2e})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", action="append", help="tiny, small, 1b (repeatable; default tiny and small)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--target-chunk", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    for preset in args.preset or ["tiny", "small"]:
        run(preset, args.device, args.repeats, args.topk, args.target_chunk)


if __name__ == "__main__":
    main()
