"""The `templar` console script.

    templar init  [--home DIR] [--miners N]        tokenizer + dataset pages from the bundled corpus, a LocalChain
                                                   with a validator and N miners, θ_0, the Dagster instance
    templar local-network --miners N --windows W   run windows of the local network through Dagster (the same
                                                   runs `dagster dev` shows, on the instance under --home)
    templar node [--jobs miner_job,…] [--until-window W]
                                                   a resident node: follow the chain and run this node's role jobs
                                                   in this process (no process start-up per window; GPU nodes)
    templar audit [--window W]                     audit the newest (or given) published checkpoint: every check
                                                   with its verdict and reason; exit 0 only when all passed
    templar backfill --windows 3-5[,8] [--jobs local_network_job]
                                                   re-run past windows in order on the node's instance (θ and pruned
                                                   momentum rebuilt); stops at the first failed window
    templar chain status                           the local chain: block, window, clock mode, registered uids
    templar chain advance --blocks N | --windows N move the local chain's manual clock (the sensor follows it)
    templar train [--home DIR] --miners N --windows W [--strategy sparseloco|demo|dense-adamw|...] [--json FILE]
                                                   the training core in-process (honest miners, no chain)
    templar simulate --miners N --windows W [--adversaries KIND:COUNT,...] [--seed S] [--json FILE]
                                                   a whole network in-process: validator, aggregator, LocalChain,
                                                   honest and cheating miners; prints weights per uid

Everything lands under --home (default: $TEMPLAR_HOME or ./.templar): `dataset/` is the local dataset bucket.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from templar_lib.buckets import LocalBucket
from templar_lib.data import build_dataset, read_manifest
from templar_lib.hparams import FILE_ENV, HOME_FILE, TRAINING_STRATEGIES, HParams, hparams_file
from templar_lib.wire.keys import MANIFEST as MANIFEST_KEY

log = logging.getLogger("templar")


def default_home() -> Path:
    return Path(os.environ.get("TEMPLAR_HOME", ".templar")).resolve()


def dataset_bucket(home: Path) -> LocalBucket:
    return LocalBucket(home / "dataset")


def init(home: Path, *, hparams: HParams, max_chars: int | None, miners: int = 4, preset: str = "tiny",
         seed: int = 0, force: bool = False, clock: str = "manual", seconds_per_block: float = 12.0) -> HParams:
    """Everything a local network needs under `home`; idempotent (existing pieces are kept unless --force). Returns
    the network's hyper-parameters as recorded in its home (this run's unless the home already held others).
    clock: the LocalChain's block clock, "manual" (moved by `templar local-network`) or "wall" (blocks follow real
    time at seconds_per_block, for `templar node`)."""
    from templar_lib.chain import LocalChain
    from templar_lib.checkpoints import ModelState
    from templar_lib.commitments import register_local_network
    from templar_lib.model import build_model
    from templar_lib.state import StateStore

    bucket = dataset_bucket(home)
    if bucket.exists(MANIFEST_KEY) and not force:
        manifest = read_manifest(bucket)
        print(f"dataset: {manifest.total_pages} pages already in {bucket.root} (use --force to rebuild)")
    else:
        started = time.perf_counter()
        manifest = build_dataset(bucket, sequence_length=hparams.sequence_length, max_chars=max_chars)
        print(f"dataset: built {manifest.total_pages} pages ({manifest.train_pages} for training) of "
              f"{manifest.rows_per_page}×{manifest.sequence_length} tokens, vocab {manifest.vocab_size}, "
              f"in {time.perf_counter() - started:.1f}s -> {bucket.root}")
    # a local network's chain secret (its block hashes, so the validators' random pages) follows the seed, so a local
    # network is reproducible; on a real chain nobody knows a block's hash before it is made
    chain = LocalChain(home / "chain.sqlite", clock=clock, seconds_per_block=seconds_per_block,
                       blocks_per_window=hparams.blocks_per_window, secret=f"local-network-{seed}")
    validator, uids = register_local_network(chain, miners, (home / "gradients").as_uri())
    print(f"chain: {chain.path} at block {chain.block()}, validator uid {validator}, miner uids {uids}")
    store = StateStore(home / "state")
    if not store.model_windows():
        model = build_model(preset, seed=seed, vocab_size=manifest.vocab_size)
        store.save_model(ModelState(0, 0, {n: p.detach().clone() for n, p in model.named_parameters()}))
        print(f"state: θ_0 of the {preset} preset (seed {seed}) -> {store.root}")
    settings = LocalBucket(home)
    if force or not settings.exists(HOME_FILE):  # the network's settings, read by every later command on this home
        settings.put(HOME_FILE, (json.dumps(hparams.to_dict(), indent=1, sort_keys=True) + "\n").encode())
        print(f"hparams: strategy {hparams.strategy}, protocol {hparams.protocol_hash()} -> {home / HOME_FILE}")
        recorded = hparams
    elif (recorded := HParams.load(home / HOME_FILE)).protocol_hash() != hparams.protocol_hash():
        print(f"hparams: this run's (protocol {hparams.protocol_hash()}, strategy {hparams.strategy}) differ from the "
              f"network's in {home / HOME_FILE} (protocol {recorded.protocol_hash()}, strategy {recorded.strategy})")
    from templar_pipelines.instance import prepare_dagster_home

    print(f"dagster: instance in {prepare_dagster_home(home / 'dagster', os.environ)}")
    return recorded


def train(home: Path, *, hparams: HParams, miners: int, windows: int, strategy: str | None,
          json_path: Path | None) -> None:
    from templar_lib.simulate import train as run  # torch/transformers import only for commands that train

    bucket = dataset_bucket(home)
    if not bucket.exists(MANIFEST_KEY):
        sys.exit(f"no dataset in {bucket.root}: run `templar init` first")
    strategy = strategy or hparams.strategy
    print(f"{strategy} training: {miners} miners, {windows} windows, tiny preset, CPU")
    print(f"{'window':>6} {'lr':>9} {'train loss':>10} {'held-out':>9} {'bytes/miner':>9} {'seconds':>7}")

    def show(entry) -> None:
        print(f"{entry.window:>6} {entry.lr:>9.2e} {entry.train_loss:>10.4f} {entry.held_out_loss:>9.4f} "
              f"{entry.bytes_per_miner:>9.0f} {entry.seconds:>7.2f}", flush=True)

    report = run(bucket, miners=miners, windows=windows, hparams=hparams, strategy=strategy, on_window=show)
    print(f"held-out loss {report.initial_held_out_loss:.4f} -> {report.final_held_out_loss:.4f}")
    if json_path is not None:
        json_path.write_text(json.dumps(dataclasses.asdict(report), indent=1))


def simulate(home: Path, *, hparams: HParams, miners: int, windows: int, adversaries: str, seed: int,
             json_path: Path | None) -> None:
    import shutil
    import tempfile

    from templar_lib.simulate import parse_adversaries, run_network

    bucket = dataset_bucket(home)
    if not bucket.exists(MANIFEST_KEY):
        sys.exit(f"no dataset in {bucket.root}: run `templar init` first")
    counts = parse_adversaries(adversaries)
    print(f"network: 1 validator, 1 aggregator, {miners} miners"
          + (f" ({', '.join(f'{k}×{n}' for k, n in counts.items())})" if counts else "") + f", {windows} windows")
    print(f"{'window':>6} {'miner loss':>10} {'random-page loss':>16} {'held-out':>9} {'peers':<24} {'seconds':>7}")

    def show(entry) -> None:
        print(f"{entry.window:>6} {entry.miner_loss:>10.4f} {entry.random_loss:>16.4f} {entry.held_out_loss:>9.4f} "
              f"{','.join(map(str, entry.peers)):<24} {entry.seconds:>7.2f}", flush=True)

    run_home = Path(tempfile.mkdtemp(prefix="network-", dir=home))
    try:
        report = run_network(bucket, run_home, miners=miners, windows=windows, adversaries=counts, hparams=hparams,
                             seed=seed, on_window=show)
    finally:
        shutil.rmtree(run_home, ignore_errors=True)
    last = report.windows[-1]
    ranked = sorted(report.roles, key=lambda uid: (-last.final.get(uid, 0.0), uid))
    print(f"\n{'rank':>4} {'uid':>4} {'role':<11} {'final score':>11} {'weight':>7}  last reason")
    for rank, uid in enumerate(ranked, 1):
        print(f"{rank:>4} {uid:>4} {report.roles[uid]:<11} {last.final.get(uid, 0.0):>11.3f} "
              f"{last.weights.get(uid, 0.0):>7.3f}  {last.reasons.get(uid, '')[:60]}")
    if json_path is not None:
        json_path.write_text(report.to_json())
        print(f"report written to {json_path}")


def local_network(home: Path, *, windows: int, adversaries: str, json_path: Path | None) -> None:
    """Run `windows` more windows of the local network through Dagster, the roles in the production order."""
    from templar_lib.simulate import parse_adversaries
    from templar_pipelines.local_network import run_local_network

    reports = run_local_network(home, windows=windows, adversaries=parse_adversaries(adversaries), on_window=print)
    if json_path is not None:
        json_path.write_text(json.dumps(reports, indent=1))
    print(f"\nthe runs are in the Dagster instance under {home / 'dagster'}; to browse them: make ui, or\n"
          f"  DAGSTER_HOME={home / 'dagster'} TEMPLAR_HOME={home} .venv/bin/dagster dev -m templar_pipelines")


def parse_windows(text: str) -> list[int]:
    """"3-5,8" -> [3, 4, 5, 8] (ascending, distinct); ValueError for anything else."""
    windows: set[int] = set()
    for part in filter(None, (part.strip() for part in text.split(","))):
        first, dash, last = part.partition("-")
        if not first.isdecimal() or (dash and not last.isdecimal()) or (dash and int(last) < int(first)):
            raise ValueError(f"windows: {part!r} is not W or W-V with V ≥ W")
        windows.update(range(int(first), int(last if dash else first) + 1))
    if not windows:
        raise ValueError("windows: none given")
    return sorted(windows)


def backfill(home: Path, *, windows: list[int], jobs: list[str]) -> None:
    """Re-run past windows through Dagster on the node's instance (templar_pipelines.node.run_backfill); exit 1 when
    it stops or is refused, with the reason."""
    from templar_pipelines.node import BackfillStopped, run_backfill

    def show(run) -> None:
        print(f"{run.job} window {run.window}: {'done' if run.success else 'FAILED'} (run {run.run_id[:8]}, "
              f"{run.seconds:.1f} s)", flush=True)

    try:
        run_backfill(home, windows, jobs=jobs, on_run=show)
    except BackfillStopped as error:
        print(error)
        raise SystemExit(1) from None


def node(home: Path, *, jobs: list[str], until_window: int | None, poll_seconds: float) -> None:
    """Follow the chain and run this node's role jobs in this process (a resident node: see templar_pipelines.node)."""
    from templar_pipelines.node import run_node

    def show(run) -> None:
        print(f"{run.job} window {run.window}: {'ok' if run.success else 'FAILED'} in {run.seconds:.1f} s "
              f"(run {run.run_id})", flush=True)

    try:
        run_node(home, jobs=jobs, until_window=until_window, poll_seconds=poll_seconds, on_run=show)
    except KeyboardInterrupt:
        print("stopped; the next start goes on from state/node-cursor.json")


def audit(home: Path, *, window: int | None) -> None:
    """The same audit as the checkpoint_audit checks (checks.run_audit), of the deployment the environment configures:
    every check with its verdict and reason; exit 0 only when all of them passed."""
    from templar_pipelines.checks import run_audit
    from templar_pipelines.resources import resources_from_env

    resources = resources_from_env({**os.environ, "TEMPLAR_HOME": str(home)})
    result = run_audit(resources["buckets"], resources["hparams"], resources["training"], window=window)
    audited = f"checkpoint-{result.window}" if result.window is not None else "no checkpoint"
    print(f"audit of {audited} in {resources['buckets'].aggregator_url}"
          + (f" against checkpoint-{result.previous_window}" if result.previous_window is not None else "")
          + (f" (θ sha256 {result.sha256})" if result.sha256 else ""))
    for verdict in result.verdicts:
        print(f"  {verdict.status.upper():<7} {verdict.name:<33} {verdict.reason}")
    failing = [verdict for verdict in result.verdicts if not verdict.passed]
    print(f"{len(result.verdicts) - len(failing)} of {len(result.verdicts)} checks passed"
          + (f"; not passed: {', '.join(v.name for v in failing)}" if failing else ""))
    sys.exit(1 if failing else 0)


def open_local_chain(home: Path):
    """The deployment's chain if it is the embedded LocalChain with a file already there; exits with the reason
    otherwise (a real chain's clock is nobody's to move, and opening a missing file would create an empty chain)."""
    from urllib.parse import unquote, urlparse

    from templar_pipelines.resources import resources_from_env

    resource = resources_from_env({**os.environ, "TEMPLAR_HOME": str(home)})["chain"]
    if not resource.is_local:
        sys.exit(f"templar chain: {resource.url} is not a local chain: only the embedded LocalChain (local://…) has "
                 f"a clock to read and move here")
    path = Path(unquote(urlparse(resource.url).path))
    if not path.exists():
        sys.exit(f"templar chain: no local chain at {path}: run `templar init` first")
    return resource.open()


def chain_status(home: Path) -> None:
    """Block, window, blocks per window, clock mode and registered uids of the local chain."""
    chain = open_local_chain(home)
    neurons = chain.metagraph().neurons
    uids = ", ".join(f"{n.uid} (validator)" if n.validator_permit else str(n.uid) for n in neurons) or "none"
    clock = "manual (moves on `templar chain advance` or `templar local-network`)" if chain.manual else \
        "wall (follows real time)"
    print(f"chain: {chain.path}\nblock: {chain.block()}\nwindow: {chain.window()}\n"
          f"blocks per window: {chain.blocks_per_window}\nclock: {clock}\nuids: {uids}")


def chain_advance(home: Path, *, blocks: int | None, windows: int | None) -> None:
    """Move the local chain's manual clock forward `blocks` blocks, or to the first block `windows` windows on."""
    chain = open_local_chain(home)
    if not chain.manual:
        sys.exit(f"templar chain advance: {chain.path} has a wall clock (blocks follow real time): nothing to move")
    if (blocks if blocks is not None else windows) < 1:
        sys.exit("templar chain advance: the clock only moves forward (give a count of at least 1)")
    before, window = chain.block(), chain.window()
    after = chain.advance(blocks) if blocks is not None else \
        chain.advance_to_block((window + windows) * chain.blocks_per_window)
    now = chain.window()
    print(f"block {before} -> {after}, window {window} -> {now}")
    if now > window:  # what the (started) sensor makes of it: `make ui` -> Automation -> new_block_sensor
        print(f"new_block_sensor (when started) opens window {now}'s partition and requests the runs now due on "
              f"its next tick: window {now - 1}'s validator and aggregator, window {now}'s watch and miners")
    else:
        print(f"window {now} stays open until block {(now + 1) * chain.blocks_per_window}")


def add_chain_parser(commands) -> None:
    """`templar chain status | advance --blocks N | --windows N`: the embedded LocalChain's manual clock."""
    chain_parser = commands.add_parser("chain", help="the local chain: its block and uids, and its manual clock")
    chain_commands = chain_parser.add_subparsers(dest="chain_command", required=True)
    chain_commands.add_parser("status", help="block, window, blocks per window, clock mode, registered uids")
    advance_parser = chain_commands.add_parser("advance", help="move the manual clock forward (the sensor then "
                                                               "opens the new windows)")
    step = advance_parser.add_mutually_exclusive_group(required=True)
    step.add_argument("--blocks", type=int, help="blocks to move forward")
    step.add_argument("--windows", type=int, help="windows to move forward (to the first block of the window)")


def main(argv: list[str] | None = None) -> None:
    from templar_lib.simulate.adversaries import ADVERSARIES

    parser = argparse.ArgumentParser(prog="templar", description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, default=None, help="state directory (default $TEMPLAR_HOME or .templar)")
    parser.add_argument("--hparams", type=Path, default=None, help="JSON/YAML hyper-parameter file")
    commands = parser.add_subparsers(dest="command", required=True)
    init_parser = commands.add_parser("init", help="build tokenizer and dataset pages from the bundled corpus")
    init_parser.add_argument("--max-chars", type=int, default=None, help="corpus size limit (default: all)")
    init_parser.add_argument("--force", action="store_true", help="rebuild even if a dataset exists")
    init_parser.add_argument("--miners", type=int, default=4, help="miners to register on the local chain")
    init_parser.add_argument("--clock", choices=("manual", "wall"), default="manual",
                             help="local chain block clock: manual (local-network) or wall (templar node)")
    init_parser.add_argument("--seconds-per-block", type=float, default=12.0)
    network_parser = commands.add_parser("local-network", help="run windows of the local network through Dagster")
    network_parser.add_argument("--miners", type=int, default=4)
    network_parser.add_argument("--windows", type=int, default=5)
    network_parser.add_argument("--adversaries", default="", help=f"KIND:COUNT,... cheating miners among the last "
                                                                  f"uids, of the kinds: {', '.join(ADVERSARIES)}")
    network_parser.add_argument("--json", type=Path, default=None, help="write per-window results here")
    node_parser = commands.add_parser("node", help="a resident node: follow the chain, run role jobs in-process")
    node_parser.add_argument("--jobs", default="aggregator_job,miner_job,validator_job",
                             help="comma-separated role jobs this node runs")
    node_parser.add_argument("--until-window", type=int, default=None, help="stop after this window (default: never)")
    node_parser.add_argument("--poll", type=float, default=2.0, help="seconds between chain polls when idle, and "
                             "between the watch's looks while a run lasts")
    audit_parser = commands.add_parser("audit", help="audit the newest published checkpoint (exit 1 unless every "
                                                     "check passed)")
    audit_parser.add_argument("--window", type=int, default=None, help="audit this checkpoint (default: the newest)")
    backfill_parser = commands.add_parser("backfill", help="re-run past windows in order on the node's instance")
    backfill_parser.add_argument("--windows", type=parse_windows, required=True, help="e.g. 3-5 or 1,4-6")
    backfill_parser.add_argument("--jobs", default="local_network_job",
                                 help="comma-separated jobs per window (default: every role in one run)")
    add_chain_parser(commands)
    train_parser = commands.add_parser("train", help="run the training core in-process (honest miners, no chain)")
    train_parser.add_argument("--miners", type=int, default=4)
    train_parser.add_argument("--windows", type=int, default=10)
    train_parser.add_argument("--strategy", choices=TRAINING_STRATEGIES, default=None,
                              help="the network's (HParams.strategy) by default; dense-adamw, local-sgd and dense-sign "
                                   "are uncompressed baselines (templar_lib/simulate/core.py)")
    train_parser.add_argument("--json", type=Path, default=None, help="write the per-window report here")
    simulate_parser = commands.add_parser("simulate", help="a whole network in-process, with cheating miners")
    simulate_parser.add_argument("--miners", type=int, default=5)
    simulate_parser.add_argument("--windows", type=int, default=10)
    simulate_parser.add_argument("--adversaries", default="", help=f"KIND:COUNT,... e.g. sign_flip:1,copy:1; kinds: "
                                                                   f"{', '.join(ADVERSARIES)}")
    simulate_parser.add_argument("--seed", type=int, default=0)
    simulate_parser.add_argument("--json", type=Path, default=None, help="write the per-window report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    home = (args.home or default_home()).resolve()
    if args.hparams is not None:  # the Dagster resources (local-network, node) and audit read it from the environment
        os.environ[FILE_ENV] = str(args.hparams.resolve())
    hparams = HParams.load(hparams_file(home, os.environ), os.environ)
    if args.command == "init":
        init(home, hparams=hparams, max_chars=args.max_chars, miners=args.miners, force=args.force,
             clock=args.clock, seconds_per_block=args.seconds_per_block)
    elif args.command == "local-network":
        if (recorded := init(home, hparams=hparams, max_chars=None, miners=args.miners)).protocol_hash() \
                != hparams.protocol_hash():
            # its θ, miner states and files belong to the recorded network: running this one on them cannot fit
            parser.exit(2, f"local-network: {home} holds a network of another protocol ({recorded.protocol_hash()}, "
                           f"strategy {recorded.strategy}); use another --home, or remove this one to start over\n")
        local_network(home, windows=args.windows, adversaries=args.adversaries, json_path=args.json)
    elif args.command == "node":
        node(home, jobs=[job for job in args.jobs.split(",") if job], until_window=args.until_window,
             poll_seconds=args.poll)
    elif args.command == "audit":
        audit(home, window=args.window)
    elif args.command == "backfill":
        backfill(home, windows=args.windows, jobs=[job for job in args.jobs.split(",") if job])
    elif args.command == "chain" and args.chain_command == "status":
        chain_status(home)
    elif args.command == "chain":
        chain_advance(home, blocks=args.blocks, windows=args.windows)
    elif args.command == "train":
        train(home, hparams=hparams, miners=args.miners, windows=args.windows, strategy=args.strategy,
              json_path=args.json)
    elif args.command == "simulate":
        simulate(home, hparams=hparams, miners=args.miners, windows=args.windows, adversaries=args.adversaries,
                 seed=args.seed, json_path=args.json)


if __name__ == "__main__":
    main()
