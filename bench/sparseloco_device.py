"""A sparseloco miner's window on one device, stage by stage: the inner steps (tokens/s, MFU), the compression pass
(error feedback + top-k + 2-bit quantisation over every parameter) against the device's measured copy bandwidth, and
the file encoding on the CPU against the inner steps it would have to hide behind.

    compression  encode_delta over every parameter, as the miner runs it, twice side by side: torch ops, and the fused
                 Triton kernel (kernels.sparse_select, chosen on CUDA) with the quantisation on the kept values. It
                 reads Δ and e and writes e, 12 B per element at best, so its speed is reported as a share of the
                 copy bandwidth (the issue's target: ≥ 60 % on the 1b preset); the two must send the same selection
    inner        H AdamW steps of `--rows` sequences each as the miner runs them (bf16 autocast on CUDA, float32
                 weights, moments and Δ), `--compile`: after model.compile() as TEMPLAR_COMPILE=1 does; MFU from
                 6 · parameters · tokens per step against --peak-tflops (the issue's target: ≥ 45 %, H100-class)
    encoding     write_sparse_gradient of what the pass kept (Rice coding and safetensors on the CPU)

    python bench/sparseloco_device.py --device cuda --preset 1b --peak-tflops 989   # H100/H200 dense bf16 peak
    python bench/sparseloco_device.py --device cpu --preset small                   # the same stages on a CPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from compression import copy_bandwidth  # bench/compression.py (the script's folder is on sys.path)
from timing import timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workspace import machine  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.inner import InnerState, inner_steps  # noqa: E402
from templar_lib.model import build_model, parameter_count, parameters_of  # noqa: E402
from templar_lib.strategies import SparseLoCoStrategy  # noqa: E402
from templar_lib.training import miner_autocast  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--rows", type=int, default=4, help="sequences per inner step")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (H100 bf16: 989)")
    parser.add_argument("--skip-inner", action="store_true")
    parser.add_argument("--compile", action="store_true", help="model.compile() before the inner steps")
    args = parser.parse_args()
    hparams = HParams(strategy="sparseloco", warmup_steps=0, batch_size=args.rows)
    strategy = SparseLoCoStrategy(hparams)
    model = build_model(args.preset, device=args.device)
    parameters = parameters_of(model)
    count = parameter_count(model)
    print(f"{machine()}; device {args.device}; preset {args.preset} ({count:,} parameters), sparseloco top-"
          f"{hparams.sparse_topk} of ≤ {hparams.target_chunk}², {hparams.quantization_bins} bins", flush=True)

    generator = torch.Generator(device=args.device).manual_seed(0)
    deltas = {n: torch.randn(p.shape, device=args.device, generator=generator) * 1e-3 for n, p in parameters.items()}
    errors = {n: torch.randn(p.shape, device=args.device, generator=generator) * 1e-3 for n, p in parameters.items()}
    bandwidth = copy_bandwidth(args.device)
    paths = {"torch ops": False} | ({"fused kernel": None} if args.device.startswith("cuda") else {})
    for label, fused in paths.items():
        seconds = timed(lambda: strategy.encode(deltas, errors, fused=fused), args.device, 5)
        achieved = 12 * count / seconds
        print(f"compression pass, {label}: {seconds * 1e3:.1f} ms, {achieved / 1e9:.1f} GB/s at 12 B per element = "
              f"{100 * achieved / bandwidth:.1f} % of the measured copy bandwidth ({bandwidth / 1e9:.1f} GB/s)",
              flush=True)
    if len(paths) == 2:
        fused_sent, plain_sent = (strategy.encode(deltas, errors, fused=f)[0] for f in (None, False))
        differing = sum(int((fused_sent[n].idx != plain_sent[n].idx).any(dim=1).sum()) for n in plain_sent)
        print(f"fused against torch: {differing} of {sum(s.n_chunks for s in plain_sent.values()):,} chunks select "
              f"differently (expected 0: the kernel rounds β·e + Δ as torch does)", flush=True)

    sent, _ = strategy.encode(deltas, errors)
    started = time.perf_counter()
    data = strategy.write_gradient(1, 1, sent)
    encoding = time.perf_counter() - started
    print(f"file encoding (CPU): {encoding * 1e3:.1f} ms for {len(data):,} bytes", flush=True)
    del deltas, errors

    if args.skip_inner:
        return
    vocab = model.config.vocab_size
    tokens = torch.randint(0, vocab, (hparams.inner_steps * args.rows, hparams.sequence_length),
                           generator=torch.Generator().manual_seed(1)).to(args.device)
    state = InnerState.zeros_like(parameters)
    if args.compile:
        started = time.perf_counter()
        model.compile()  # in place, as a node with TEMPLAR_COMPILE=1 does (parameter names unchanged)
        inner_steps(model, state, tokens, step=0, hparams=hparams, autocast_dtype=miner_autocast(model))
        print(f"model.compile() and its first inner steps: {time.perf_counter() - started:.0f} s", flush=True)
    seconds = timed(lambda: inner_steps(model, state, tokens, step=0, hparams=hparams,
                                        autocast_dtype=miner_autocast(model)), args.device, 3)
    per_step = seconds / hparams.inner_steps
    flops = 6 * count * args.rows * hparams.sequence_length / per_step
    print(f"inner steps: {per_step * 1e3:.1f} ms per step of {args.rows} × {hparams.sequence_length} tokens, "
          f"{args.rows * hparams.sequence_length / per_step:,.0f} tokens/s, {flops / 1e12:.2f} TFLOP/s"
          + (f", MFU {100 * flops / (args.peak_tflops * 1e12):.1f} %" if args.peak_tflops else "")
          + (" (compiled)" if args.compile else ""), flush=True)
    print(f"file encoding against the window's inner steps: {100 * encoding / seconds:.0f} %", flush=True)


if __name__ == "__main__":
    main()
