"""What hashing a miner's state costs (templar_lib/spot_check.py state_digest), side by side: one sha256 stream over
the whole state (the digest's definition until 2026-12-07) against the chunked digest (every STATE_DIGEST_CHUNK
bytes of a tensor hashed apart, on a pool of threads), on one thread and on the pool. A miner that spot checks
hashes its state twice a window (before and after it), a validator twice per check; the state is a sparseloco
miner's (AdamW moments, step count and error feedback: 12 bytes per parameter), random values, built on `--device`
from the preset's shapes.

    python bench/state_digest.py                                   # tiny and small presets, CPU
    python bench/state_digest.py --presets 1b --device cuda        # ≈ 15 GB (GPU node: pending, no device lent)
"""

from __future__ import annotations

import argparse
import hashlib
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import templar_lib.spot_check as spot_check  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.model import PRESETS, build_model  # noqa: E402
from templar_lib.strategies import strategy_of  # noqa: E402


def one_stream(state: dict[str, torch.Tensor]) -> str:
    """The former definition (its framing aside): the names, dtypes, shapes and bytes of every tensor through one
    sha256."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def seconds(function, state, repeats: int) -> float:
    function(state)  # warm: the pool's threads, the pages of the state
    started = time.perf_counter()
    for _ in range(repeats):
        function(state)
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    threads = spot_check._DIGEST_THREADS
    print(f"{platform.processor() or platform.machine()}, {threads} digest threads, state on {args.device}; "
          f"STATE_DIGEST_CHUNK {spot_check.STATE_DIGEST_CHUNK >> 20} MiB")
    print("| preset | state | one stream | chunked, 1 thread | chunked, pool | pool vs one stream |")
    print("|---|---|---|---|---|---|")
    strategy = strategy_of(HParams(strategy="sparseloco"))
    for preset in args.presets.split(","):
        model = build_model(preset, device="meta", vocab_size=PRESETS[preset]["vocab_size"])
        shapes = strategy.state_shapes(dict(model.named_parameters()))
        generator = torch.Generator(device=args.device).manual_seed(0)
        state = {name: torch.randn(shape, generator=generator, device=args.device,
                                   dtype=torch.float64 if name in strategy.STATE_FLOAT64 else torch.float32)
                 for name, shape in shapes.items()}
        size = sum(t.numel() * t.element_size() for t in state.values())
        stream = seconds(one_stream, state, args.repeats)
        pooled = seconds(spot_check.state_digest, state, args.repeats)
        spot_check._DIGEST_THREADS = 1
        single = seconds(spot_check.state_digest, state, args.repeats)
        spot_check._DIGEST_THREADS = threads
        rate = lambda s: f"{s:.3f} s ({size / s / 1e9:.2f} GB/s)"  # noqa: E731
        print(f"| {preset} | {size / 2**20:.0f} MiB | {rate(stream)} | {rate(single)} | {rate(pooled)} | "
              f"**{stream / pooled:.2f}×** |", flush=True)
        del state


if __name__ == "__main__":
    main()
