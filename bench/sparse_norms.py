"""How close honest sparseloco files come to the validator's norm bound, round after round.

    python bench/sparse_norms.py [--rounds 200] [--preset tiny|small] [--every 10] [--set sparseloco:field=value ...]

The validator refuses a file whose values in any parameter are above bound_t × its reference ‖Δ_ref‖ (H inner
AdamW steps from fresh moments on its random pages; templar_lib/strategies.py, SparseLoCoStrategy). Honest miners
send the top-k of an error feedback that accumulates over windows, so their norm grows with β until the top-k
sending balances it, and bound_t follows that growth. This runs bench/convergence.py's setting (4 honest miners ×
6 × 128 tokens per round, its tuned sparseloco settings plus `--set`; the tiny preset unless `--preset`), computes
the validator's reference on θ_w each round exactly as the validator does, and prints every `--every` rounds each
miner's largest ratio ‖values‖ / ‖Δ_ref‖ over parameters and bound_t, then the largest ratio of the run and the
smallest margin bound_t / ratio (above 1: no honest file refused); and the other side, each miner's smallest ratio
over parameters against the lower bound (SparseLoCoStrategy.NORM_FLOOR: a file below it in any parameter is
refused), with the parameter that came lowest.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.convergence import hparams_for  # noqa: E402
from bench.workspace import machine, scratch_dataset  # noqa: E402
from templar_lib.data import Dataset  # noqa: E402
from templar_lib.data.pages import random_pages  # noqa: E402
from templar_lib.model import CPU_PRESETS, build_model  # noqa: E402
from templar_lib.strategies import SparseLoCoStrategy  # noqa: E402
from templar_lib.wire.sparse import SparseAggregation  # noqa: E402

MINERS = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--preset", default="tiny", choices=CPU_PRESETS)
    parser.add_argument("--every", type=int, default=10, help="print every this many rounds")
    parser.add_argument("--set", action="append", default=[], help="sparseloco:field=value")
    args = parser.parse_args()
    if args.every < 1:
        parser.error("--every must be at least 1")
    hparams = hparams_for("sparseloco", args.set)
    strategy = SparseLoCoStrategy(hparams)
    print(f"{machine()}; {args.preset} preset, {MINERS} miners, β {hparams.error_decay}, outer lr "
          f"{hparams.outer_learning_rate}, top-{hparams.sparse_topk}, H {hparams.inner_steps}", flush=True)
    with scratch_dataset("bench-sparse-norms-") as (_, bucket):
        data = Dataset.open(bucket)
        model = build_model(args.preset, seed=0, vocab_size=data.vocab_size)
        parameters = dict(model.named_parameters())
        states: dict[int, dict[str, torch.Tensor]] = {}
        largest, margin, smallest, lowest = 0.0, float("inf"), float("inf"), ""
        floor = strategy.NORM_FLOOR
        for window in range(args.rounds):
            random = data.tokens(random_pages(window, 7, hparams.pages_per_window, data.manifest.train_pages))
            reference = strategy.reference(model, random, step=window)  # on θ_w, before anything moves it
            sent, ratios, lows = {}, [], []
            for uid in range(MINERS):
                mined = strategy.mine(model, states.get(uid), data.tokens(
                    data.miner_pages(window, uid, hparams.pages_per_window)), step=window)
                states[uid], sent[uid] = mined.state, mined.sent
                ratio = {name: float(torch.linalg.vector_norm(values.values())) / reference.norms[name]
                         for name, values in mined.sent.items()}
                ratios.append(max(ratio.values()))
                lows.append(min(ratio.values()))
                if lows[-1] < smallest:
                    smallest, lowest = lows[-1], f"{min(ratio, key=ratio.get)} (round {window + 1}, uid {uid})"
            largest, margin = max(largest, *ratios), min(margin, reference.bound / max(ratios))
            if window % args.every == args.every - 1:
                print(f"round {window + 1}: largest ‖values‖ / ‖Δ_ref‖ per miner "
                      f"{' '.join(f'{r:.2f}' for r in ratios)}; bound {reference.bound:.2f}; smallest "
                      f"{' '.join(f'{r:.2f}' for r in lows)}", flush=True)
            peers = sorted(sent)
            strategy.replay_(parameters, SparseAggregation(window, window, hparams.outer_learning_rate, peers,
                                                           {n: [sent[uid][n] for uid in peers] for n in parameters}))
        print(f"largest honest ratio over {args.rounds} rounds: {largest:.2f}; smallest margin bound_t / ratio: "
              f"{margin:.2f}×")
        print(f"smallest honest ratio: {smallest:.3f}, {lowest}; margin ratio / floor: "
              f"{smallest / floor if floor else float('inf'):.2f}×")


if __name__ == "__main__":
    main()
