"""What one fresh start costs a miner: the same network twice (the same seed, θ_0, pages and miners), the second time
one miner's state dropped before it mines `--at`, as a node's fresh start drops it (the simulation's own `continued`
rule, wrapped); its score and weight window by window in both runs, and what it lost summed from `--at` on, in
windows of a mean miner's score and weight. Sets the scale of `MINORITY_RESET_WINDOWS` (roles/spot_checks.py): how
long a miner may wait for a minority's miss to be mended against how often a minority may make it start fresh.

    python bench/fresh_start.py [--at 12] [--windows 26] [--strategy sparseloco] [--uid 2] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import templar_lib.simulate.network as network  # noqa: E402
from bench.workspace import machine, scratch_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def lost(base, reset, uid: int, field: str, at: int) -> list[tuple[int, float, float, float]]:
    """Per window from `at`: (window, the uid's figure in the base run, in the reset run, their difference in units
    of the mean miner's figure that window in the base run)."""
    rows = []
    for before, after in zip(base.windows, reset.windows):
        if before.window < at:
            continue
        values = getattr(before, field)
        mean = sum(values.get(u, 0.0) for u in base.roles) / len(base.roles)
        mine, theirs = values.get(uid, 0.0), getattr(after, field).get(uid, 0.0)
        rows.append((before.window, mine, theirs, (mine - theirs) / mean if mean else 0.0))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--at", type=int, default=12, help="the window the miner starts fresh in")
    parser.add_argument("--windows", type=int, default=26)
    parser.add_argument("--miners", type=int, default=5)
    parser.add_argument("--uid", type=int, default=2, help="the miner that starts fresh (1..miners)")
    parser.add_argument("--strategy", default="sparseloco")
    parser.add_argument("--seed", type=int, default=0, help="θ_0 and the roles' order")
    args = parser.parse_args()
    hparams = HParams.load(ROOT / "deploy" / "simulate-hparams.yaml").replace(strategy=args.strategy)
    kept = network.continued

    def dropped(before, uid, window, **options):
        if uid == args.uid and window == args.at:
            return None, "a fresh start (bench/fresh_start.py)"
        return kept(before, uid, window, **options)

    with scratch_dataset("bench-fresh-start-", sequence_length=hparams.sequence_length) as (work, dataset):
        print(f"{machine()}; tiny preset, {hparams.strategy}, {args.miners} miners, {args.windows} windows, seed "
              f"{args.seed}, uid {args.uid} fresh in window {args.at}", flush=True)
        started = time.perf_counter()
        runs = {}
        for name in ("base", "reset"):
            network.continued = dropped if name == "reset" else kept
            try:
                runs[name] = network.run_network(dataset, work / name, miners=args.miners, windows=args.windows,
                                                 hparams=hparams, random_page_count=2, seed=args.seed)
            finally:
                network.continued = kept
        print(f"{time.perf_counter() - started:.0f} s for both runs")
        print("| window | score base / fresh | lost, summed (mean scores) | weight base / fresh | lost, summed |")
        print("|---|---|---|---|---|")
        totals = [0.0, 0.0]
        for score, weight in zip(*(lost(runs["base"], runs["reset"], args.uid, f, args.at)
                                   for f in ("scores", "weights"))):
            totals = [totals[0] + score[3], totals[1] + weight[3]]
            print(f"| {score[0]} | {score[1]:.4f} / {score[2]:.4f} | {totals[0]:+.2f} | {weight[1]:.4f} / "
                  f"{weight[2]:.4f} | {totals[1]:+.2f} |")
        held = [runs[name].windows[-1].held_out_loss for name in ("base", "reset")]
        print(f"held-out loss after the last window: {held[0]:.4f} / {held[1]:.4f} ({held[1] / held[0] - 1:+.2%})")


if __name__ == "__main__":
    main()
