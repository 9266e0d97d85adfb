"""What a spot check costs (templar_lib/spot_check.py), measured side by side with the miner's window it replays:
one sparseloco miner node mines two windows through the library's path (roles.miner.mine_window, a write-behind
state store, files committing to its state), answers a draw of the second (its states put), and a validator
checks it; then the same check against a file of half the work (which must fail); then a network of 5 honest
miners at spot_check_probability 0, 0.5 and 1, side by side: what the checks add after each close.

    python bench/spot_check.py                      # tiny and small presets, CPU
    python bench/spot_check.py --presets 1b --device cuda --sequence-length 2048   (GPU: pending, no device lent)
"""

from __future__ import annotations

import argparse
import copy
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.data import Dataset, build_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.model import build_model  # noqa: E402
from templar_lib.roles.miner import answer_spot_checks, mine_window  # noqa: E402
from templar_lib.simulate import run_network  # noqa: E402
from templar_lib.spot_check import check, commitment, state_digest  # noqa: E402
from templar_lib.state import StateStore, WriteBehind  # noqa: E402
from templar_lib.strategies import strategy_of  # noqa: E402
from templar_lib.wire import gradient_key  # noqa: E402


def measure(preset: str, args, dataset: Dataset, work: Path) -> None:
    hparams = HParams(strategy="sparseloco", spot_check_probability=1.0, sequence_length=args.sequence_length,
                      pages_per_window=args.pages, batch_size=args.batch)
    model = build_model(preset, vocab_size=dataset.vocab_size, device=args.device)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    store, gradients = StateStore(work / preset / "state", writer=WriteBehind()), LocalBucket(work / preset / "miner")
    seconds = {}
    for window in (0, 1):
        started = time.perf_counter()
        mine_window(window, [1], model=model, step=window, store=store, dataset=dataset,
                               gradients=gradients, hparams=hparams)
        seconds[window] = time.perf_counter() - started
    started = time.perf_counter()
    answered = answer_spot_checks(1, [1], seed="bench", store=store, gradients=gradients, hparams=hparams)
    answering = time.perf_counter() - started
    state_bytes = sum(len(gradients.get(key)) for key in answered[1])
    after = store.load_momentum(1, 1)
    started = time.perf_counter()
    state_digest(after)
    digest = time.perf_counter() - started
    tokens = dataset.tokens(dataset.miner_pages(1, 1, hparams.pages_per_window))

    def run(scored: bytes) -> tuple[str | None, float]:
        began = time.perf_counter()
        reason = check(1, 1, hparams=hparams, model=model, theta=theta, step=1, tokens=tokens, scored=scored,
                       fetch=lambda key, limit: gradients.get(key))
        return reason, time.perf_counter() - began

    reason, checking = run(gradients.get(gradient_key(1, 1)))
    strategy, before = strategy_of(hparams), store.load_momentum(1, 0)
    thin = strategy.mine(copy.deepcopy(model), {k: v.clone() for k, v in before.items()},
                         tokens[: len(tokens) // 2], step=1)
    cheat, _ = run(strategy.write_gradient(1, 1, thin.sent, model_hash="",
                                           state=commitment(before, thin.state)))
    parameters = sum(p.numel() for p in theta.values())
    print(f"| {preset} | {parameters / 1e6:.2f} M | {seconds[1]:.2f} s | {checking:.2f} s | "
          f"**{checking / seconds[1]:.2f}×** | {answering:.2f} s | {state_bytes / 2**20:.1f} MiB "
          f"({state_bytes / parameters:.1f} B/param) | {digest:.3f} s | {'passed' if reason is None else reason} | "
          f"{cheat or 'passed (!)'} |", flush=True)
    store.writer.flush()


def latency(bucket: LocalBucket, work: Path, windows: int) -> None:
    """What the checks add to the production order, side by side: 5 honest miners, sparseloco at the suite's
    settings, the seconds from a window's close to the next window's mining (validator + aggregator + replay)."""
    base = HParams.load(Path(__file__).resolve().parents[1] / "deploy" / "simulate-hparams.yaml").replace(
        strategy="sparseloco")
    print(f"\n| spot_check_probability | close → next window's mining (mean of {windows} windows) | validator |")
    print("|---|---|---|")
    for probability in (0.0, 0.5, 1.0):
        report = run_network(bucket, work / f"latency-{probability}", miners=5, windows=windows,
                             hparams=base.replace(spot_check_probability=probability), random_page_count=2)
        wait = sum(w.close_to_next_seconds for w in report.windows) / windows
        validator = sum(w.role_seconds["validator"] for w in report.windows) / windows
        print(f"| {probability:g} | {wait:.2f} s | {validator:.2f} s |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--pages", type=int, default=3, help="pages per window (2 sequences each)")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--latency-windows", type=int, default=5, help="0: skip the network side by side")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-spot-check-"))
    try:
        bucket = LocalBucket(work / "dataset")
        manifest = build_dataset(bucket, sequence_length=args.sequence_length, max_chars=300_000, held_out_pages=8)
        dataset = Dataset(bucket, manifest)
        print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {args.device}; "
              f"{args.pages} pages × 2 × {args.sequence_length} tokens per window, H = {HParams().inner_steps}")
        print("| preset | parameters | miner's window (mine_window) | check (replay) | check / window | answer "
              "(put states) | states put | one state digest | honest file | half the work |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for preset in args.presets.split(","):
            measure(preset, args, dataset, work)
        if args.latency_windows:
            latency(bucket, work, args.latency_windows)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
