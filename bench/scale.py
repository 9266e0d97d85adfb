"""A validator and an aggregator among 16, 64 and 256 uids: per-window cost, memory, and how soon everyone is scored.

    python bench/scale.py [--uids 16,64,256] [--windows 10] [--scored 32]

Per network size, a simulated network (templar_lib.simulate.run_network: honest miners, the production order, tiny
preset, deploy/simulate-hparams.yaml with one page per miner and `--scored` uids scored per window) prints

    validator s/window   evaluate + rate + weights after the close (median over the windows)
    aggregator s/window  gather of the listed peers (+ reserves) + combine + replay (median)
    watch s/window       every poll of the open window's buckets (linear in uids: one small read per uid)
    scored/window        uids the validator scored (at most --scored; sampled beyond that)
    all scored by        the first window by which every uid had been scored at least once
    peak RSS             of this process after the size's run (ru_maxrss: a high-water mark, so it only grows)

and the ratio the issue asks for: the validator's time per window at the largest size over the next smaller one.
Miners' training is the bulk of the wall time here (every simulated miner trains); it is not what is measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workspace import machine, scratch_dataset  # noqa: E402
from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.simulate import run_network  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def measure(dataset: LocalBucket, home: Path, uids: int, windows: int, hparams: HParams) -> dict:
    started = time.perf_counter()
    report = run_network(dataset, home, miners=uids, windows=windows, hparams=hparams, random_page_count=1)
    first: dict[int, int] = {}
    for entry in report.windows:
        for uid in entry.scored:
            first.setdefault(uid, entry.window)
    everyone = max(first.values()) if len(first) == uids else None
    return {"uids": uids, "wall": time.perf_counter() - started,
            "validator": statistics.median(w.role_seconds["validator"] for w in report.windows),
            "aggregator": statistics.median(w.role_seconds["aggregator"] for w in report.windows),
            "watch": statistics.median(w.role_seconds["watch"] for w in report.windows),
            "scored": statistics.median(len(w.scored) for w in report.windows),
            "everyone": everyone, "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "held_out": report.windows[-1].held_out_loss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uids", default="16,64,256")
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--scored", type=int, default=32, help="scored_per_window")
    args = parser.parse_args()
    hparams = dataclasses.replace(HParams.load(ROOT / "deploy" / "simulate-hparams.yaml"), pages_per_window=1,
                                  scored_per_window=args.scored)
    with scratch_dataset("bench-scale-", sequence_length=hparams.sequence_length,
                         held_out_pages=4) as (work, dataset):
        print(f"{machine()}; "
              f"tiny preset, {args.windows} windows, {args.scored} scored per window", flush=True)
        print("| uids | validator s/window | aggregator s/window | watch s/window | scored/window | all scored by "
              "| peak RSS | wall |")
        print("|---|---|---|---|---|---|---|---|")
        rows = []
        for uids in (int(n) for n in args.uids.split(",")):
            row = measure(dataset, work / f"n{uids}", uids, args.windows, hparams)
            rows.append(row)
            everyone = f"window {row['everyone']}" if row["everyone"] is not None else f"not in {args.windows}"
            print(f"| {uids} | {row['validator']:.2f} | {row['aggregator']:.2f} | {row['watch']:.2f} | "
                  f"{row['scored']:.0f} | {everyone} | {row['rss_mib']:.0f} MiB | {row['wall']:.0f} s |", flush=True)
            shutil.rmtree(work / f"n{uids}", ignore_errors=True)
        if len(rows) >= 2:
            print(f"validator time per window, {rows[-1]['uids']} uids / {rows[-2]['uids']} uids: "
                  f"{rows[-1]['validator'] / rows[-2]['validator']:.2f}x (target ≤ 1.5x)")


if __name__ == "__main__":
    main()
