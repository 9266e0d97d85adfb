"""Wire bytes and convergence of the gradient formats, side by side in one run.

    baseline   int16 indices + bf16 values: 4 bytes per kept coefficient (the figure the targets are relative to)
    v1         format 1 as written by default (smallest integer index dtype + float32 values)
    v2 bf16    format 2: Golomb–Rice coded sorted indices + bf16 values (lossless for bf16 values)
    v2 int8    format 2 with per-parameter absmax int8 values (lossy; error feedback carries the rounding)

Bytes are measured on real gradients of the tiny preset (or --preset small / 1b on --device); convergence with
the smoke settings (4 miners, 20 windows) for each encoding.

    python bench/wire.py [--preset tiny] [--windows 20]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workspace import scratch_dataset  # noqa: E402
from templar_lib.error_feedback import ErrorFeedback  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.model import build_model  # noqa: E402
from templar_lib.simulate import train  # noqa: E402
from templar_lib.wire import Gradient, read_gradient, write_gradient  # noqa: E402

ENCODINGS = {"v1 float32": (1, "float32"), "v2 bfloat16": (2, "bfloat16"), "v2 int8": (2, "int8")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=20, help="convergence windows (0: bytes only)")
    args = parser.parse_args()
    model = build_model(args.preset, device=args.device if args.preset != "1b" else "meta")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    gradients = {n: torch.randn(s, generator=generator) * 1e-3 for n, s in shapes.items()}
    print(f"{args.preset}: {sum(torch.Size(s).numel() for s in shapes.values()) / 1e6:.1f} M parameters, "
          f"top-32 of 64×64 chunks; machine {platform.processor() or platform.machine()}")
    kept = None
    for label, (version, values) in ENCODINGS.items():
        feedback = ErrorFeedback.zeros_like(gradients, topk=32, target_chunk=64, momentum_decay=0.999,
                                            value_dtype=values)
        sent = feedback.step(gradients, lr=1.0)
        kept = sum(s.idx.numel() for s in sent.values())
        started = time.perf_counter()
        data = write_gradient(Gradient(0, 1, sent, "h", format=version, values=values))
        written = time.perf_counter() - started
        started = time.perf_counter()
        read_gradient(data, window=0, uid=1, shapes=shapes, topk=32)
        read = time.perf_counter() - started
        print(f"  {label:<12} {len(data):>10} bytes  {8 * len(data) / kept:5.1f} bits/coefficient  "
              f"ratio to int16+bf16: {len(data) / (4 * kept):.3f}  (write {written * 1e3:.0f} ms, "
              f"read+validate {read * 1e3:.0f} ms)")
    print(f"  baseline     {4 * kept:>10} bytes  32.0 bits/coefficient (int16 index + bf16 value)")
    if args.windows <= 0:
        return
    with scratch_dataset("bench-wire-") as (work, dataset):
        print(f"convergence: 4 miners, {args.windows} windows, lr 2e-3 without warm-up (held-out loss)")
        for label, (version, values) in ENCODINGS.items():
            hparams = HParams(learning_rate=2e-3, warmup_steps=0, gradient_format=version,
                              gradient_value_dtype=values)
            report = train(dataset, miners=4, windows=args.windows, hparams=hparams)
            print(f"  {label:<12} {report.initial_held_out_loss:.4f} -> {report.final_held_out_loss:.4f}  "
                  f"({report.windows[-1].bytes_per_miner * 4:.0f} bytes per window)")


if __name__ == "__main__":
    main()
