"""How much rounding a sparseloco spot check's values survive (templar_lib/spot_check.py), where no device is lent to
measure a GPU's: one miner mines a few windows, then its last window's pseudo-gradient Δ is perturbed by relative
noise ε (Δ · (1 + ε·N(0, 1)), a stand-in for other kernels' rounding; bf16's unit is 2⁻⁸ ≈ 4e-3; real kernels'
differences pass through the inner steps and are correlated, which this does not model) and encoded from the same
error feedback. Printed per ε (0: the control, Δ as rebuilt from the state, which carries float32 rounding): the
file's values as one vector against the unperturbed file (what a check weighs against its tolerance), how many kept
positions moved and the largest selection gap of a position kept or dropped otherwise (sparseloco.selection_gaps:
how far below the unperturbed top-k's smallest |β·e + Δ| in its chunk, or above the largest it did not keep,
relative; a check refuses a position moved beyond its tolerance), how many
codes moved at the positions both keep, and the largest tie-free state tensor's difference (what the state check
weighs).

    python bench/replay_noise.py                  # tiny, CPU
    python bench/replay_noise.py --preset small
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.data import Dataset, build_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.model import build_model, load_parameters_, parameters_of  # noqa: E402
from templar_lib.sparseloco import flat_positions, selection_gaps  # noqa: E402
from templar_lib.spot_check import relative_difference, values_difference  # noqa: E402
from templar_lib.strategies import strategy_of  # noqa: E402


def kept(sent) -> dict[int, int]:
    """A parameter's kept positions (in the flattened parameter) -> their codes."""
    return dict(zip(flat_positions(sent).reshape(-1).tolist(), sent.codes.reshape(-1).tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--windows", type=int, default=5, help="windows mined (at least 2); the last one is perturbed")
    parser.add_argument("--noise", default="0,1e-6,1e-5,1e-4,1e-3,4e-3")
    args = parser.parse_args()
    if args.windows < 2:
        parser.error("--windows must be at least 2: the perturbed window is a carried one")
    with tempfile.TemporaryDirectory() as work:
        bucket = LocalBucket(Path(work))
        data = Dataset(bucket, build_dataset(bucket, sequence_length=128, max_chars=300_000, held_out_pages=8))
        hparams = HParams(strategy="sparseloco", pages_per_window=3, batch_size=6, warmup_steps=0)
        strategy = strategy_of(hparams)
        model = build_model(args.preset, seed=0, vocab_size=data.vocab_size)
        theta = {name: p.detach().clone() for name, p in parameters_of(model).items()}
        state = before = None
        for window in range(args.windows):
            before = None if state is None else {name: t.clone() for name, t in state.items()}
            mined = strategy.mine(model, state, data.tokens(data.miner_pages(window, 1, 3)), step=window)
            state = mined.state
            load_parameters_(model, theta)
    sent, errors = mined.sent, {name: before[f"error.{name}"] for name in mined.sent}
    accumulated = strategy.tie_free_state(mined.state, sent)
    delta = {name: accumulated[f"error.{name}"] - hparams.error_decay * errors[name] for name in sent}
    print(f"{platform.machine()}, torch {torch.__version__}; {args.preset}, window {args.windows - 1} (carried), "
          f"{sum(s.idx.numel() for s in sent.values())} kept values")
    print("| ε | values, whole file | kept positions moved | their largest selection gap | codes moved (positions "
          "both keep) | largest tie-free state tensor |")
    print("|---|---|---|---|---|---|")
    noise = torch.Generator().manual_seed(0)
    for eps in (float(e) for e in args.noise.split(",")):
        rounded, after = strategy.encode({name: d * (1 + eps * torch.randn(d.shape, generator=noise))
                                          for name, d in delta.items()}, errors)
        moved = codes = 0
        gap = 0.0
        for name in sent:
            ours, theirs = kept(sent[name]), kept(rounded[name])
            moved += len(theirs.keys() - ours.keys())
            sides = selection_gaps(accumulated[f"error.{name}"], sent[name], rounded[name])
            gap = max([gap, *(float(side.max()) for side in sides if side.numel())])
            codes += sum(ours[p] != theirs[p] for p in ours.keys() & theirs.keys())
        free_state = strategy.tie_free_state({f"error.{n}": e for n, e in after.items()}, rounded)
        free = max(relative_difference(free_state[key], accumulated[key]) for key in free_state)
        print(f"| {eps:g} | {values_difference(rounded, sent):.3g} | {moved} | {gap:.2g} | {codes} | {free:.3g} |",
              flush=True)


if __name__ == "__main__":
    main()
