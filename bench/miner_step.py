"""Miner step throughput: tokens/s and model FLOPs utilisation (MFU) of forward + backward with gradient
accumulation, in float32 on CPU or bf16 autocast + SDPA (flash) attention on GPU.

    python bench/miner_step.py                                   # tiny preset, CPU
    python bench/miner_step.py --preset 1b --device cuda --seq 2048 --batch 4 --batch 8 --peak-tflops 989 --compile

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
from templar_lib.training import loss_and_gradients, miner_autocast  # noqa: E402


def measure(model, tokens, batch: int, repeats: int, autocast, device: str) -> float:
    """Seconds per training step (forward + backward over all micro-batches), after one warm-up step."""
    loss_and_gradients(model, tokens, batch, autocast_dtype=autocast)  # warm-up (and compilation, if any)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        loss_and_gradients(model, tokens, batch, autocast_dtype=autocast)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, action="append", help="sequences per micro-batch (repeatable; default 6)")
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (H100 bf16: 989)")
    parser.add_argument("--compile", action="store_true", help="then time model.compile() at the last batch size")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_model(args.preset, device=args.device)
    config = model.config
    autocast = miner_autocast(model)
    flops_per_token = 6 * parameter_count(model) + 12 * config.num_hidden_layers * config.hidden_size * args.seq
    print(f"{args.preset} on {args.device} ({platform.processor() or platform.machine()}), "
          f"{'bf16 autocast' if autocast else 'float32'}, sdpa attention, {parameter_count(model) / 1e9:.3f} B "
          f"parameters, {flops_per_token / 1e9:.2f} GFLOP per token")
    if args.device.startswith("cuda"):
        print(f"  {torch.cuda.get_device_name()}, torch {torch.__version__}")
    variants = [(batch, False) for batch in (args.batch or [6])]
    if args.compile:
        variants.append((variants[-1][0], True))
    for batch, compiled in variants:
        if compiled:
            model.compile()  # in place, as a node with TEMPLAR_COMPILE=1 does (parameter names unchanged)
        tokens = torch.randint(0, config.vocab_size, (batch * args.micro_batches, args.seq))
        if args.device.startswith("cuda"):
            tokens = tokens.pin_memory()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        seconds = measure(model, tokens, batch, args.repeats, autocast, args.device)
        per_second = tokens.numel() / seconds
        achieved = per_second * flops_per_token / 1e12
        peak = (f", peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                if args.device.startswith("cuda") else "")
        print(f"  {'compiled' if compiled else 'eager':8s} {args.micro_batches} × {batch} × {args.seq} tokens: "
              f"{seconds * 1e3:.0f} ms per step, {per_second:,.0f} tokens/s, {achieved:.3f} TFLOP/s"
              + (f", MFU {100 * achieved / args.peak_tflops:.1f} %" if args.peak_tflops else "")
              + f"{peak} (measured in {time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
