"""Compression round trip: templar_lib vs a straightforward reference of the same math, same inputs, one run.

Round trip per parameter = error feedback (m ← β·m + lr·g) + chunked DCT-II encode + top-k + decode + m ← m − t.

reference: the Templar v0.2 formulation — rearrange into (Y, X, r, c) blocks, `einsum("...ij, jb, ik -> ...kb")`
           with the DCT bases, top-k over the flattened blocks, scatter into zeros, inverse einsum, rearrange back.
ours:      templar_lib.error_feedback.ErrorFeedback: torch path (batched matmul D_r·B·D_cᵀ on a (n_chunks, r, c) view),
           and on CUDA the fused Triton path (templar_lib.kernels: two passes over the momentum), also replayed
           as one CUDA graph to show what Python launches cost.

    python bench/compression.py                          # tiny + small preset shapes on the CPU
    python bench/compression.py --preset 1b --device cuda
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

import torch
from timing import timed  # bench/timing.py (the script's folder is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from templar_lib import kernels  # noqa: E402
from templar_lib.compression import chunk_shape, dct_matrix  # noqa: E402
from templar_lib.error_feedback import ErrorFeedback  # noqa: E402
from templar_lib.model import build_model  # noqa: E402


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


def copy_bandwidth(device: str) -> float:
    """Device memory bandwidth in bytes/s, counting bytes read plus written, of a 1 GiB tensor copy."""
    source = torch.randn(2**28, device=device)
    target = torch.empty_like(source)
    seconds = timed(lambda: target.copy_(source), device, 10)
    return 2 * source.numel() * 4 / seconds


def graph_replay(step, device: str):
    """A CUDA graph of `step` (one error-feedback step over every parameter): the same kernels without a Python
    launch in between. Warmed up twice on a side stream first (compilation, cached bases), as torch's docs advise."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def run(preset: str, device: str, repeats: int, topk: int, target: int) -> None:
    shapes = shapes_of(preset, device)
    generator = torch.Generator(device=device).manual_seed(0)
    gradients = {n: torch.randn(s, generator=generator, device=device) for n, s in shapes.items()}
    lr, decay = 4e-4, 0.999

    def zeros():
        return {n: torch.zeros(s, device=device) for n, s in shapes.items()}

    reference_momentum = zeros()

    def reference():
        for name, g in gradients.items():
            reference_round_trip(reference_momentum[name], g, lr, decay, topk, target)

    variants = {"ours (batched mm)": dict(fused=False)}
    if kernels.available(device):
        variants["ours fused (tf32x3)"] = dict(fused=True, precision="tf32x3")  # the default
        variants["ours fused (ieee)"] = dict(fused=True, precision="ieee")
        variants["ours fused (tf32)"] = dict(fused=True, precision="tf32")
    elements = sum(g.numel() for g in gradients.values())
    print(f"{preset} on {device} ({platform.processor() or platform.machine()}"
          f"{', ' + torch.cuda.get_device_name() if device.startswith('cuda') else ''}): {len(shapes)} tensors, "
          f"{elements / 1e6:.1f} M elements, topk {topk}, chunk {target}", flush=True)
    t_reference = timed(reference, device, repeats)
    print(f"  reference (einsum):    {t_reference * 1e3:9.2f} ms", flush=True)
    bandwidth = copy_bandwidth(device) if device.startswith("cuda") else None
    essential = elements * 4 * 3  # read g, read and write m: the least any round trip moves
    for label, settings in variants.items():
        ours = ErrorFeedback(zeros(), topk=topk, target_chunk=target, momentum_decay=decay, **settings)
        seconds = timed(lambda: ours.step(gradients, lr=lr), device, repeats)
        worst = max((ours.momentum[n] - reference_momentum[n]).abs().max().item() for n in shapes)
        print(result_line(label, seconds, t_reference, essential, bandwidth)
              + f"   max |Δm| vs reference after the same steps {worst:.2e}", flush=True)
        if settings.get("fused") and device.startswith("cuda"):
            replay = graph_replay(lambda ours=ours: ours.step(gradients, lr=lr), device)
            seconds = timed(replay, device, repeats)
            print(result_line(label[:-1] + ", graph)", seconds, t_reference, essential, bandwidth), flush=True)
    if bandwidth:
        print(f"  device copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    for value_dtype in ("float32", "int8"):
        agreement(gradients, shapes, topk, target, lr, decay, device,
                  [dict(settings, value_dtype=value_dtype) for settings in variants.values()])


def result_line(label: str, seconds: float, reference: float, essential: int, bandwidth: float | None) -> str:
    """One line: time, ratio to the reference, and (on a GPU) the bandwidth of the essential 12 B/element."""
    line = f"  {label + ':':22s} {seconds * 1e3:9.2f} ms   ratio reference/ours {reference / seconds:5.2f}x"
    if bandwidth:
        rate = essential / seconds
        line += f"   {rate / 1e9:7.1f} GB/s of 12 B/element = {100 * rate / bandwidth:.0f} %"
    return line


def agreement(gradients, shapes, topk, target, lr, decay, device, variants) -> None:
    """One step of each variant from the same random momentum: share of identical kept positions and the largest
    momentum difference, against the torch path."""
    generator = torch.Generator(device=device).manual_seed(1)
    start = {n: torch.randn(s, generator=generator, device=device) for n, s in shapes.items()}
    outputs = []
    for settings in variants:
        ours = ErrorFeedback({n: t.clone() for n, t in start.items()}, topk=topk, target_chunk=target,
                             momentum_decay=decay, **settings)
        outputs.append((settings, ours.step(gradients, lr=lr), ours.momentum))
    (_, base, base_momentum) = outputs[0]
    for settings, sparse, momentum in outputs[1:]:
        same = total = 0
        for name in shapes:
            a, b = base[name].idx.sort(dim=1).values, sparse[name].idx.sort(dim=1).values
            same += (a == b).all(dim=1).sum().item()
            total += a.shape[0]
        worst = max((momentum[n] - base_momentum[n]).abs().max().item() for n in shapes)
        print(f"  agreement with the torch path, {settings}: {same}/{total} chunks kept the same positions, "
              f"max |Δm| {worst:.2e}", flush=True)


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
