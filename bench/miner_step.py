"""Miner step throughput: tokens/s and model FLOPs utilisation (MFU) of forward + backward with gradient
accumulation, in float32 on CPU or bf16 autocast + SDPA (flash) attention on GPU.

    python bench/miner_step.py                                   # tiny preset, CPU
    python bench/miner_step.py --preset 1b --device cuda --seq 2048 --batch 4 --peak-tflops 989

FLOPs per token ≈ 6 · parameters + 12 · layers · hidden · sequence (attention), the usual estimate (PaLM, nanoGPT).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from templar_lib.model import build_model, parameter_count  # noqa: E402
from templar_lib.training import loss_and_gradients  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=6, help="sequences per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (H100 bf16: 989)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.preset, device=args.device)
    config = model.config
    autocast = torch.bfloat16 if args.device.startswith("cuda") else None
    tokens = torch.randint(0, config.vocab_size, (args.batch * args.micro_batches, args.seq))
    loss_and_gradients(model, tokens, args.batch, autocast_dtype=autocast)  # warm-up
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.repeats):
        loss_and_gradients(model, tokens, args.batch, autocast_dtype=autocast)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / args.repeats
    per_second = tokens.numel() / seconds
    flops_per_token = 6 * parameter_count(model) + 12 * config.num_hidden_layers * config.hidden_size * args.seq
    achieved = per_second * flops_per_token / 1e12
    print(f"{args.preset} on {args.device} ({platform.processor() or platform.machine()}), "
          f"{'bf16 autocast' if autocast else 'float32'}, {args.micro_batches} × {args.batch} × {args.seq} tokens")
    print(f"  {seconds * 1e3:.0f} ms per step, {per_second:,.0f} tokens/s, {achieved:.3f} TFLOP/s"
          + (f", MFU {100 * achieved / args.peak_tflops:.1f} %" if args.peak_tflops else ""))


if __name__ == "__main__":
    main()
