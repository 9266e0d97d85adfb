"""How much rounding a sparseloco spot check survives (templar_lib/spot_check.py), where no device is lent to
measure a GPU's: one miner mines a few windows, then its next window's pseudo-gradient Δ is perturbed by relative
noise ε (Δ · (1 + ε·N(0, 1)), a stand-in for other kernels' rounding; bf16's is 2⁻⁸ ≈ 4e-3) and encoded from the same
error feedback. Printed per ε: the file's values as one vector against the unperturbed file (what the values check
weighs), how many kept positions and codes moved, the largest tie-free state tensor's difference (what the state
check weighs), and what the rounding comparison (sparseloco.rounding_difference) says at three tolerances.

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
from templar_lib.spot_check import relative_difference, values_difference  # noqa: E402
from templar_lib.strategies import strategy_of  # noqa: E402

TOLERANCES = (1e-3, 4e-3, 2e-2)


def flat(sent) -> torch.Tensor:
    """A file's kept positions as one index over its chunks (chunk · chunk size + position within)."""
    return (torch.arange(sent.n_chunks).unsqueeze(1) * sent.chunk_size + sent.idx).reshape(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--windows", type=int, default=5, help="windows mined; the last one is perturbed")
    parser.add_argument("--noise", default="1e-6,1e-5,1e-4,1e-3,4e-3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        bucket = LocalBucket(Path(work))
        data = Dataset(bucket, build_dataset(bucket, sequence_length=128, max_chars=300_000, held_out_pages=8))
        hparams = HParams(strategy="sparseloco", pages_per_window=3, batch_size=6, warmup_steps=0)
        strategy = strategy_of(hparams)
        model = build_model(args.preset, seed=0, vocab_size=data.vocab_size)
        theta = {name: p.detach().clone() for name, p in parameters_of(model).items()}
        state = None
        for window in range(args.windows):
            before = None if state is None else {name: t.clone() for name, t in state.items()}
            mined = strategy.mine(model, state, data.tokens(data.miner_pages(window, 1, 3)), step=window)
            state = mined.state
            load_parameters_(model, theta)
    sent, errors = mined.sent, {name: before[f"error.{name}"] for name in mined.sent}
    accumulated = strategy.tie_free_state(mined.state, sent)
    delta = {name: accumulated[f"error.{name}"] - hparams.error_decay * errors[name] for name in sent}
    kept = sum(s.idx.numel() for s in sent.values())
    print(f"{platform.machine()}, torch {torch.__version__}; {args.preset}, window {args.windows - 1} (carried), "
          f"{kept} kept values")
    print("| ε | values, whole file | kept positions moved | codes moved (same positions) | largest tie-free state "
          "tensor | " + " | ".join(f"rounding at {t:g}" for t in TOLERANCES) + " |")
    print("|---" * (5 + len(TOLERANCES)) + "|")
    noise = torch.Generator().manual_seed(0)
    for eps in (float(e) for e in args.noise.split(",")):
        rounded, after = strategy.encode({name: d * (1 + eps * torch.randn(d.shape, generator=noise))
                                          for name, d in delta.items()}, errors)
        moved = sum(int((~torch.isin(flat(rounded[n]), flat(sent[n]))).sum()) for n in sent)
        codes = sum(int((rounded[n].codes != sent[n].codes).sum()) for n in sent if torch.equal(rounded[n].idx,
                                                                                                   sent[n].idx))
        free_state = strategy.tie_free_state({f"error.{n}": e for n, e in after.items()}, rounded)
        free = max(relative_difference(free_state[key], accumulated[key]) for key in free_state)
        verdicts = [strategy.rounding_difference(mined.state, sent, rounded, t) or "within" for t in TOLERANCES]
        print(f"| {eps:g} | {values_difference(rounded, sent):.3g} | {moved} | {codes} | {free:.3g} | "
              + " | ".join(v[:60] for v in verdicts) + " |", flush=True)


if __name__ == "__main__":
    main()
