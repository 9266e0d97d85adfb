"""Load: a simulated network of many miners on the tiny preset, reporting time per window and peak memory.

    python bench/load.py [--miners 64] [--windows 5]

Peak RSS comes from getrusage (the whole process, model copies and every gradient of a window included).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.data import build_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.simulate import run_network  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--miners", type=int, default=64)
    parser.add_argument("--windows", type=int, default=5)
    args = parser.parse_args()
    hparams = HParams.load(ROOT / "deploy" / "simulate-hparams.yaml").replace(topk_peers=args.miners)
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    try:
        dataset = LocalBucket(work / "dataset")
        build_dataset(dataset, sequence_length=hparams.sequence_length, max_chars=600_000, held_out_pages=8)
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        seconds = []
        report = run_network(dataset, work / "network", miners=args.miners, windows=args.windows, hparams=hparams,
                             on_window=lambda entry: seconds.append(entry.seconds))
        total = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; tiny preset, "
          f"{args.miners} miners + validator + aggregator, {args.windows} windows")
    print(f"  time per window: mean {sum(seconds) / len(seconds):.1f} s, max {max(seconds):.1f} s "
          f"(total {total:.0f} s)")
    print(f"  peak RSS: {peak / 1024:.0f} MiB (before the network: {baseline / 1024:.0f} MiB)")
    print(f"  peers in the last window: {len(report.windows[-1].peers)}, loss "
          f"{report.windows[0].miner_loss:.3f} -> {report.windows[-1].miner_loss:.3f}")


if __name__ == "__main__":
    main()
