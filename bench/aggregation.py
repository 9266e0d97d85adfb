"""Aggregation of P peers' compressed gradients into the sign update, against a straightforward reference,
and against one local training step (the work it must stay small next to).

    reference: per parameter, densify each normalised peer, sum and count in dense (n_chunks, chunk) tensors,
               divide, inverse DCT with einsum, sign — a loop over peers as Templar's batch_decompress does.
    ours:      templar_lib.aggregation.aggregate_window + sign_directions (one scatter_add over all peers, batched
               inverse DCT). Writing aggregation-{window} (the scan for nonzeros into compressed rows + safetensors)
               is timed on its own: the sign update does not need it.
    replay:    what every node does with the published file each window to reach θ_{window+1} (`sync_to`, the
               checkpoint asset): read and validate aggregation-{window}, copy θ, decode and apply the outer step, on
               the CPU whatever --device says (the replay is bit-identical across nodes on CPU); and the same for
               an aggregation published as its signs (aggregation_format 2: nothing to decode; asserted same θ).

    python bench/aggregation.py [--preset tiny] [--peers 20] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
from pathlib import Path

import torch
from timing import timed  # bench/timing.py (the script's folder is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from templar_lib.aggregation import aggregate_window, apply_aggregation_, sign_directions  # noqa: E402
from templar_lib.compression import dct_matrix, encode, normalized_vals, sparsify  # noqa: E402
from templar_lib.model import build_model  # noqa: E402
from templar_lib.training import loss_and_gradients  # noqa: E402
from templar_lib.wire import AggregationFormat, read_aggregation, write_aggregation  # noqa: E402


def reference_direction(peers, shape, chunk):
    r, c = (1, chunk[0]) if len(chunk) == 1 else chunk
    n_chunks = peers[0].idx.shape[0]
    total = torch.zeros(n_chunks, r * c, device=peers[0].vals.device)
    count = torch.zeros_like(total)
    for peer in peers:
        dense = torch.zeros_like(total).scatter_(1, peer.idx.long(), normalized_vals(peer))
        total += dense
        count += torch.zeros_like(total).scatter_(1, peer.idx.long(), torch.ones_like(peer.vals.float()))
    coefficients = (total / count.clamp_min(1)).reshape(n_chunks, r, c)
    device = str(total.device)
    blocks = torch.einsum("nij,ik,jl->nkl", coefficients, dct_matrix(r, device), dct_matrix(c, device))
    if len(shape) == 1:
        return torch.sign(blocks.reshape(shape))
    rows, cols = shape
    return torch.sign(blocks.reshape(rows // r, cols // c, r, c).permute(0, 2, 1, 3).reshape(shape))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = build_model(args.preset, device=args.device)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    generator = torch.Generator(device=args.device).manual_seed(0)
    peers = {uid: {n: encode(torch.randn(s, generator=generator, device=args.device), 32, 64)
                   for n, s in shapes.items()} for uid in range(args.peers)}

    def ours():
        return sign_directions(aggregate_window(0, 0, 1e-3, peers, list(shapes)))

    def reference():
        return {n: reference_direction([peers[u][n] for u in sorted(peers)], s, peers[0][n].chunk)
                for n, s in shapes.items()}

    t_ours, t_reference = timed(ours, args.device), timed(reference, args.device)
    ours_signs, reference_signs = ours(), reference()  # once: not once per parameter
    agree = sum(int((ours_signs[n] == reference_signs[n]).sum()) for n in shapes) / sum(torch.Size(s).numel()
                                                                                        for s in shapes.values())
    del ours_signs, reference_signs
    print(f"{args.preset} on {args.device} ({platform.processor() or platform.machine()}"
          f"{', ' + torch.cuda.get_device_name() if args.device.startswith('cuda') else ''}): {args.peers} peers, "
          f"{sum(torch.Size(s).numel() for s in shapes.values()) / 1e6:.1f} M parameters")
    print(f"  reference (dense per peer): {t_reference * 1e3:9.1f} ms")
    print(f"  ours (one scatter, batched): {t_ours * 1e3:9.1f} ms   ratio {t_reference / t_ours:.2f}x  "
          f"(sign agreement {100 * agree:.4f} %)", flush=True)
    aggregation = aggregate_window(0, 0, 1e-3, peers, list(shapes))

    def write_file():  # fresh CombinedCoefficients objects each call: the nonzero scan is timed every time
        tensors = {n: sparsify(c.dense, c.shape, c.chunk) for n, c in aggregation.tensors.items()}
        return write_aggregation(dataclasses.replace(aggregation, tensors=tensors))

    t_file = timed(write_file, args.device)
    print(f"  writing aggregation-{{window}} (nonzero scan + safetensors): {t_file * 1e3:.1f} ms, "
          f"after the sign update, not on its path", flush=True)
    published, theta = write_file(), {n: p.detach().to("cpu") for n, p in model.named_parameters()}

    signs = write_aggregation(dataclasses.replace(aggregation, tensors={}, format=AggregationFormat.SIGNS,
                                                  signs=sign_directions(aggregation)))

    def replay(data):
        following = {n: p.clone() for n, p in theta.items()}
        apply_aggregation_(following, read_aggregation(data, window=0, shapes=shapes, max_bytes=len(data)),
                           weight_decay=0.1)
        return following

    repeats = 1 if args.preset == "1b" else 3  # 1b: ≈ 10 GB of copies per call
    t_replay = timed(lambda: replay(published), "cpu", repeats)
    print(f"  replay on every node (read {len(published) / 2**20:.1f} MiB, copy θ, decode, outer step; CPU, "
          f"{torch.get_num_threads()} threads): {t_replay * 1e3:.1f} ms = {100 * t_replay / 84:.2f} % of an 84 s "
          f"window", flush=True)
    t_replay_signs = timed(lambda: replay(signs), "cpu", repeats)
    assert all(torch.equal(a, b) for a, b in zip(replay(published).values(), replay(signs).values()))
    print(f"  with aggregation_format 2 (the signs, {len(signs) / 2**20:.1f} MiB = {len(signs) / len(published):.3f}x "
          f"the bytes; same θ): {t_replay_signs * 1e3:.1f} ms, {t_replay / t_replay_signs:.1f}x faster")
    if args.preset in ("tiny", "small") and args.device == "cpu":
        tokens = torch.randint(0, model.config.vocab_size, (12, 128), generator=torch.Generator().manual_seed(1))
        step = timed(lambda: loss_and_gradients(model, tokens, 6), args.device)
        print(f"  one miner training step (12 × 128 tokens): {step * 1e3:.1f} ms -> aggregation is "
              f"{100 * t_ours / step:.0f} % of it")


if __name__ == "__main__":
    main()
