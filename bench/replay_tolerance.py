"""What tolerance a spot check's replay needs (templar_lib/spot_check.py): one miner mines a few windows (its own file
as a one-peer outer step between them), then its last window is replayed from the same θ and state in fresh processes
that run other kernels: the same settings again, one thread, and the AVX2 kernels of this build (ATen, MKL and oneDNN
capped at AVX2: a validator on an older CPU than its miner). Each replay is compared with the miner's file the way a
check compares them: the file's bytes, its values as one vector (relative L2), each parameter's values, each tensor of
the state after, and (sparseloco) how far from a tie of the replay's top-k the positions the miner kept and the
replay did not, and those it dropped, are (sparseloco.selection_gaps: 1 − |a_j| / t_c and |a_i| / u_c − 1, t_c the
smallest |β·e + Δ| the replay kept in the chunk, u_c the largest it did not; a check refuses a file where either is
above the tolerance: sparseloco.off_selection).

    python bench/replay_tolerance.py                                   # tiny and small, both strategies, CPU
    python bench/replay_tolerance.py --presets 1b --device cuda --sequence-length 2048   (GPU: pending, no device lent)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.data import Dataset, build_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.model import build_model, load_parameters_  # noqa: E402
from templar_lib.sparseloco import selection_gaps  # noqa: E402
from templar_lib.spot_check import ZEROS, relative_difference, sent_values, values_difference  # noqa: E402
from templar_lib.strategies import strategy_of  # noqa: E402

# name -> (environment, threads, device): the kernels a validator's replay may run other than its miner's
CPU_VARIANTS = {
    "same": ({}, None, None),
    "1 thread": ({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}, 1, None),
    "AVX2 kernels": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2",
                      "ONEDNN_MAX_CPU_ISA": "AVX2"}, None, None),
}
DEVICE_VARIANTS = {"same": ({}, None, None), "on the CPU": ({}, None, "cpu")}  # a GPU miner's file, replayed


def hparams_of(args) -> HParams:
    return HParams(strategy=args.strategy, sequence_length=args.sequence_length, pages_per_window=args.pages,
                   batch_size=args.batch)


def setting(args) -> tuple[HParams, Dataset]:
    bucket = LocalBucket(Path(args.work) / "dataset")
    manifest = build_dataset(bucket, sequence_length=args.sequence_length, max_chars=300_000, held_out_pages=8)
    return hparams_of(args), Dataset(bucket, manifest)


def mine(args, start: dict[str, torch.Tensor], out: Path) -> None:
    """Mine window args.windows − 1 from `start` (θ and the state before) and write the file and the state after."""
    hparams, dataset = setting(args)
    model = build_model(args.preset, vocab_size=dataset.vocab_size, device=args.device)
    load_parameters_(model, {k[6:]: v.to(args.device) for k, v in start.items() if k.startswith("theta.")})
    before = {k[6:]: v.to(args.device) for k, v in start.items() if k.startswith("state.")} or None
    window = args.windows - 1
    tokens = dataset.tokens(dataset.miner_pages(window, 1, hparams.pages_per_window))
    strategy = strategy_of(hparams)
    mined = strategy.mine(model, before, tokens, step=window)
    out.joinpath("file").write_bytes(strategy.write_gradient(window, 1, mined.sent, state=(ZEROS, ZEROS)))
    save_file({k: v.detach().cpu().contiguous() for k, v in mined.state.items()}, out / "after.safetensors")


def start_of(args) -> dict[str, torch.Tensor]:
    """θ and the miner's state at the start of its last window: windows 0 … W − 2 mined, each followed by the outer
    step its own file makes alone."""
    hparams, dataset = setting(args)
    strategy = strategy_of(hparams)
    model = build_model(args.preset, vocab_size=dataset.vocab_size, device=args.device)
    parameters, state = dict(model.named_parameters()), None
    shapes = {name: tuple(p.shape) for name, p in parameters.items()}
    for window in range(args.windows - 1):
        mined = strategy.mine(model, state, dataset.tokens(dataset.miner_pages(window, 1, hparams.pages_per_window)),
                              step=window)
        gradient = strategy.read_gradient(strategy.write_gradient(window, 1, mined.sent, state=(ZEROS, ZEROS)),
                                          window=window, uid=1, shapes=shapes)
        strategy.apply_alone_(parameters, gradient, window=window, step=window)
        state = mined.state
    start = {f"theta.{k}": v.detach().cpu().contiguous() for k, v in parameters.items()}
    start.update({f"state.{k}": v.detach().cpu().contiguous() for k, v in (state or {}).items()})
    return start


def compare(args, miner: Path, replay: Path) -> str:
    strategy = strategy_of(hparams_of(args))
    shapes = {k[6:]: tuple(v.shape) for k, v in load_file(miner.parent / "start.safetensors").items()
              if k.startswith("theta.")}
    read = [strategy.read_gradient(p.joinpath("file").read_bytes(), window=args.windows - 1, uid=1, shapes=shapes)
            for p in (miner, replay)]
    if miner.joinpath("file").read_bytes() == replay.joinpath("file").read_bytes():
        return "bit for bit | 0 | 0 | 0 | 0 | 0 | 0 |"
    whole = values_difference(read[1].tensors, read[0].tensors)
    name, largest = max(((n, relative_difference(sent_values(read[1].tensors[n]), sent_values(read[0].tensors[n])))
                         for n in shapes), key=lambda x: x[1])
    states = [load_file(p / "after.safetensors") for p in (miner, replay)]
    key, state = max(((k, relative_difference(states[1][k], v)) for k, v in states[0].items()),
                     key=lambda x: x[1])
    tie_free = [strategy.tie_free_state(s, g.tensors) for s, g in zip(states, read)]  # what a check compares
    free_key, free = max(((k, relative_difference(tie_free[1][k], v)) for k, v in tie_free[0].items()),
                         key=lambda x: x[1])
    moved, gap = off_ties(tie_free[1], read[1].tensors, read[0].tensors)
    return (f"other bytes | {whole:.2g} | {largest:.2g} ({name[6:40]}) | {state:.2g} ({key[:40]}) | {free:.2g} "
            f"({free_key[:40]}) | {moved} | {gap:.2g} |")


def off_ties(replay_state, replay, sent) -> tuple[int | str, float]:
    """(how many positions `sent` keeps that `replay` does not, the largest selection gap of a position kept or
    dropped otherwise: sparseloco.selection_gaps against the replay's accumulation β·e + Δ). ("–", 0) for demo."""
    if not all(f"error.{name}" in replay_state for name in sent):
        return "–", 0.0
    moved, gap = 0, 0.0
    for name, delta in sent.items():
        added, dropped = selection_gaps(replay_state[f"error.{name}"], replay[name], delta)
        moved += added.numel()
        gap = max([gap, *(float(side.max()) for side in (added, dropped) if side.numel())])
    return moved, gap


def run_case(args, preset: str, strategy: str, windows: int) -> None:
    """One miner's last window mined in a fresh process, then replayed in one per variant; a table row per replay."""
    args.preset, args.strategy, args.windows = preset, strategy, windows
    case = Path(args.work) / f"{preset}-{strategy}-{windows}"
    case.mkdir()
    save_file(start_of(args), case / "start.safetensors")
    variants = CPU_VARIANTS if args.device == "cpu" else DEVICE_VARIANTS
    for n, (name, (environment, threads, device)) in enumerate({"miner": ({}, None, None), **variants}.items()):
        command = [sys.executable, __file__, "--replay", str(case / f"run{n}"), "--preset", preset, "--strategy",
                   strategy, "--work", args.work, "--device", device or args.device, "--sequence-length",
                   str(args.sequence_length), "--pages", str(args.pages), "--batch", str(args.batch), "--windows",
                   str(windows)]
        subprocess.run(command + (["--threads", str(threads)] if threads else []), check=True,
                       env={**os.environ, **environment})
        if n:
            row = compare(args, case / "run0", case / f"run{n}")
            print(f"| {preset} | {strategy} | {windows - 1} | {name} | {row}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--strategies", default="sparseloco,demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--pages", type=int, default=3, help="pages per window (2 sequences each)")
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--windows", default="1,6", help="windows mined per case, the last replayed (1: a fresh "
                        "start, where AdamW's sign-like first steps tie many values)")
    parser.add_argument("--replay", help=argparse.SUPPRESS)  # a child: mine from DIR/../start.safetensors into DIR
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.replay:
        if args.threads:
            torch.set_num_threads(args.threads)
        args.windows, out = int(args.windows), Path(args.replay)
        out.mkdir()
        mine(args, load_file(out.parent / "start.safetensors"), out)
        return
    args.work = tempfile.mkdtemp(prefix="bench-replay-")
    try:
        print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.device}, kernels "
              f"{torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}; {args.pages} pages × 2 × "
              f"{args.sequence_length} tokens a window")
        print("| preset | strategy | window replayed | replay | file | values, whole file (rel. L2) | largest "
              "parameter | largest state tensor | largest tie-free state tensor (what a check compares) | positions "
              "kept otherwise | their largest gap to a tie |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        cases = [(preset, strategy, int(windows)) for preset in args.presets.split(",")
                 for strategy in args.strategies.split(",") for windows in args.windows.split(",")]
        for case in cases:
            run_case(args, *case)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
