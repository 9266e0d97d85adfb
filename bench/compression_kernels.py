"""The fused compression kernels (templar_lib.kernels) one by one on one large parameter: launch settings side by
side, what each stage costs, and the fraction of device memory bandwidth reached; then the whole-model round trip
of bench/compression.py with the fastest settings.

    encode   fold + DCT + k-th largest search + compaction: reads g and m, writes m (12 B per element)
    decode   round + rank-k inverse DCT + subtract: reads and writes m (8 B per element)
    stages   encode with the search replaced by "the first k positions" (SKIP=1), or without the DCT (SKIP=2):
             the differences say what the search and the transform cost (the results are wrong: timing only)

    python bench/compression_kernels.py --device cuda [--rows 8192 --cols 8192] [--preset 1b]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import torch
from compression import copy_bandwidth, run  # bench/compression.py (the script's folder is on sys.path)
from timing import timed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from templar_lib import kernels  # noqa: E402


def median_ms(function, device: str, repeats: int = 20) -> float:
    """Median milliseconds of `function` over `repeats` calls after 3 warm-ups (CUDA events on a GPU: a kernel of
    about a millisecond is timed without the host's synchronisation in it)."""
    if not device.startswith("cuda"):
        return timed(function, device, repeats) * 1e3
    for _ in range(3):
        function()
    samples = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--topk", type=int, default=32)
    parser.add_argument("--preset", help="then run bench/compression.py's round trip on this preset")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = args.device
    generator = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(args.rows, args.cols, generator=generator, device=device)
    m = torch.randn(args.rows, args.cols, generator=generator, device=device)
    elements = m.numel()
    bandwidth = None
    if device.startswith("cuda"):
        bandwidth = copy_bandwidth(device)
        print(f"{torch.cuda.get_device_name()}: device copy {bandwidth / 1e9:.0f} GB/s (read + write); "
              f"{args.rows} × {args.cols} float32, top-{args.topk} of 64 × 64 chunks", flush=True)

    def report(label: str, ms: float, bytes_per_element: int) -> None:
        rate = elements * bytes_per_element / (ms / 1e3)
        share = f" = {100 * rate / bandwidth:3.0f} % of the copy bandwidth" if bandwidth else ""
        print(f"  {label:<44} {ms:8.3f} ms   {rate / 1e9:7.1f} GB/s{share}", flush=True)

    def encode(precision="tf32x3", skip=0):  # the fused path's default precision
        return kernels._fold_encode(m, g, decay=0.999, lr=1e-3, topk=args.topk, target_chunk=64,
                                    precision=precision, stage_skip=skip)

    baseline = dataclasses.replace(kernels.SETTINGS)
    timings = {}
    for thresholds in (1, 2, 4):
        for warps in (4, 8):
            kernels.SETTINGS = dataclasses.replace(baseline, thresholds=thresholds, encode_warps=warps)
            try:
                timings[(thresholds, warps)] = ms = median_ms(encode, device, args.repeats)
                report(f"encode: {thresholds} threshold(s) per round, {warps} warps", ms, 12)
            except Exception as error:  # a setting that does not compile here: say so, try the others
                print(f"  encode: {thresholds} threshold(s), {warps} warps: failed: {str(error)[:300]}", flush=True)
    best = min(timings, key=timings.get)
    for programs in (2, 4, 8):  # a persistent grid: SMs × programs, each looping over chunks
        kernels.SETTINGS = dataclasses.replace(baseline, thresholds=best[0], encode_warps=best[1],
                                               programs_per_sm=programs)
        try:
            timings[best[:2] + (programs,)] = ms = median_ms(encode, device, args.repeats)
            report(f"encode: as above, {programs} program(s) per SM, looping", ms, 12)
        except Exception as error:
            print(f"  encode, {programs} programs per SM: failed: {str(error)[:300]}", flush=True)
    best = min(timings, key=timings.get)
    kernels.SETTINGS = dataclasses.replace(baseline, thresholds=best[0], encode_warps=best[1],
                                           programs_per_sm=best[2] if len(best) > 2 else None)
    print(f"  fastest encode: {kernels.SETTINGS}", flush=True)
    for label, stage in (("encode, ieee (FMA) products", lambda: encode("ieee")),
                       ("encode, tf32 products", lambda: encode("tf32")),
                       ("encode without the search (stage cost)", lambda: encode(skip=1)),
                       ("encode without the DCT (stage cost)", lambda: encode(skip=2))):
        try:
            report(label, median_ms(stage, device, args.repeats), 12)
        except Exception as error:
            print(f"  {label}: failed: {str(error)[:300]}", flush=True)
    sparse = encode()
    decode_timings = {}
    for warps in (4, 8):
        kernels.SETTINGS = dataclasses.replace(kernels.SETTINGS, decode_warps=warps)
        for value_dtype in ("float32", "int8"):
            try:
                ms = median_ms(lambda: kernels.round_subtract(m, sparse, value_dtype=value_dtype), device,
                               args.repeats)
                decode_timings[warps] = max(decode_timings.get(warps, 0.0), ms)
                report(f"decode ({value_dtype} values): {warps} warps", ms, 8)
            except Exception as error:
                print(f"  decode, {warps} warps: failed: {str(error)[:300]}", flush=True)
    decode_warps = min(decode_timings, key=decode_timings.get)
    kernels.SETTINGS = dataclasses.replace(kernels.SETTINGS, decode_warps=decode_warps)
    round_trip = median_ms(lambda: kernels.round_trip(m, g, decay=0.999, lr=1e-3, topk=args.topk, target_chunk=64,
                                                      value_dtype="int8"), device, args.repeats)
    report("round trip (int8 values), fastest settings", round_trip, 20)
    print(f"  settings used below: {kernels.SETTINGS}", flush=True)
    if args.preset:
        del g, m, sparse
        run(args.preset, device, args.repeats, args.topk, 64)


if __name__ == "__main__":
    main()
