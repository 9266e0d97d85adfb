"""Dagster overhead per window: the same local network windows run (a) by the library alone (`run_network`, state
kept in memory), (b) through Dagster (`local_network_job` in-process on a SQLite instance, θ and momentum
loaded from and saved to the node's state store every window) and (c) by a resident `templar node` (the sensor's
three role runs per window, each a Dagster run in the node's process), side by side in one run; plus the process
start-up of `dagster job execute` (what a node pays per run when each run is a fresh process: three per window).

    python bench/window.py [--miners 4] [--windows 4]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.chain import LocalChain  # noqa: E402
from templar_lib.data import build_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.simulate import run_network  # noqa: E402
from templar_pipelines.cli import init  # noqa: E402
from templar_pipelines.local_network import run_local_network  # noqa: E402
from templar_pipelines.node import run_node  # noqa: E402

HPARAMS_FILE = ROOT / "deploy" / "simulate-hparams.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--miners", type=int, default=4)
    parser.add_argument("--windows", type=int, default=4)
    args = parser.parse_args()
    hparams = HParams.load(HPARAMS_FILE)
    work = Path(tempfile.mkdtemp(prefix="bench-window-"))
    try:
        dataset = LocalBucket(work / "dataset")
        build_dataset(dataset, sequence_length=hparams.sequence_length, max_chars=300_000, held_out_pages=8)

        started = time.perf_counter()
        report = run_network(dataset, work / "library", miners=args.miners, windows=args.windows, hparams=hparams)
        library = (time.perf_counter() - started) / args.windows

        home = work / "dagster-node"
        shutil.copytree(work / "dataset", home / "dataset")
        init(home, hparams=hparams, max_chars=None, miners=args.miners)
        env = {"TEMPLAR_HPARAMS_FILE": str(HPARAMS_FILE), "TEMPLAR_WANDB_MODE": "disabled"}
        run_local_network(home, windows=1, environ=env)  # warm-up: imports, instance tables
        started = time.perf_counter()
        run_local_network(home, windows=args.windows, environ=env)
        dagster = (time.perf_counter() - started) / args.windows

        resident_home = work / "resident-node"
        shutil.copytree(work / "dataset", resident_home / "dataset")
        init(resident_home, hparams=hparams, max_chars=None, miners=args.miners)
        chain = LocalChain(resident_home / "chain.sqlite")

        def next_window(_seconds):  # instead of waiting for the chain: move its manual clock one window on
            chain.advance(hparams.blocks_per_window)

        run_node(resident_home, until_window=0, environ=env, wait=next_window)  # warm-up, as for (b)
        started = time.perf_counter()
        runs = run_node(resident_home, until_window=args.windows, environ=env, wait=next_window)
        resident = (time.perf_counter() - started) / args.windows
        assert all(run.success for run in runs), [run for run in runs if not run.success]

        dagster_bin = ROOT / ".venv" / "bin" / "dagster"
        started = time.perf_counter()
        subprocess.run([str(dagster_bin), "definitions", "validate", "-m", "templar_pipelines"], cwd=ROOT,
                       env={**os.environ, **env, "TEMPLAR_HOME": str(home), "DAGSTER_HOME": str(home / "dagster")},
                       check=True, capture_output=True)
        startup = time.perf_counter() - started
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; tiny preset, "
          f"{args.miners} miners + validator + aggregator, {args.windows} windows")
    print(f"  library only (state in memory):          {library:6.2f} s/window   (last loss "
          f"{report.windows[-1].miner_loss:.3f})")
    print(f"  Dagster local_network_job (state store): {dagster:6.2f} s/window")
    print(f"  overhead ratio dagster/library:           {dagster / library:6.2f}x  "
          f"(+{dagster - library:.2f} s/window)")
    print(f"  resident templar node (3 runs/window):   {resident:6.2f} s/window   ratio to library "
          f"{resident / library:.2f}x (+{resident - library:.2f} s/window, {100 * (resident - library) / 84:.1f} % of "
          f"an 84 s window)")
    print(f"  Python + Dagster process start-up (code location load): {startup:.2f} s per run; a fresh process per "
          f"role run pays {3 * startup:.1f} s/window ({100 * 3 * startup / 84:.1f} % of an 84 s window), a resident "
          f"node once")


if __name__ == "__main__":
    main()
