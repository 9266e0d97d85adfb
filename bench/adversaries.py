"""Every attack of the adversary suite, longer: one row per attack, in the production order (templar_lib.schedule).

    python bench/adversaries.py [--windows 5] [--only sign_flip,lazy] [--skip-fair] [--skip-mixed]
                                [--strategy demo|sparseloco] [--spot-checks P]

Per attack, at the fraction it is meant for (tests/lib/test_network.py's ATTACKS: 2 of 5 for the model attacks, 3
of 5 for majority_scale and majority_shrink, 1 of 5 for the rest), tiny preset, deploy/simulate-hparams.yaml:

    progress kept      held-out loss progress of the network against the all-honest network over the same windows
    attackers' weight  their total weight after the last window
    honest min/max     the lowest and highest honest weight after the last window
    reward per compute the attackers' and the honest miners' weight summed over windows, per miner-window of compute
                       an attacker of that kind really spends (adversaries.py)

then the fair-pay figure (8 honest miners, 20 windows, seed 5: mean weights over the last 10 windows), the mixed
case (10 miners, 40 % adversaries of new and old kinds, 10 windows) and the latency of the production order: per
window, the seconds the validator and the aggregator take after the close, before miners of the next window start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workspace import machine, scratch_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.simulate import parse_adversaries, run_network  # noqa: E402
from templar_lib.simulate.adversaries import KINDS, OPEN, SPOT_CHECKED  # noqa: E402
from tests.lib.test_network import ATTACKS, progress, weight_per_compute  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def row(kind: str, report, honest_progress: float) -> str:
    last = report.windows[-1]
    honest = [uid for uid, role in report.roles.items() if role == "honest"]
    cheats = [uid for uid, role in report.roles.items() if role != "honest"]
    weights = [last.weights.get(uid, 0.0) for uid in honest]
    reason = next((last.reasons[uid] for uid in cheats if uid in last.reasons), "")
    attackers = f"{ATTACKS.get(kind, len(cheats))}/{len(report.roles)}"
    return (f"| {kind} | {attackers} | {progress(report) / honest_progress:.1%} | "
            f"{sum(last.weights.get(uid, 0.0) for uid in cheats):.3f} | {min(weights):.3f} / {max(weights):.3f} | "
            f"{weight_per_compute(report, cheats):.3f} / {weight_per_compute(report, honest):.3f} | {reason[:60]} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--only", default="", help="comma-separated kinds (default: every kind)")
    parser.add_argument("--skip-fair", action="store_true")
    parser.add_argument("--skip-mixed", action="store_true")
    parser.add_argument("--strategy", default=None, help="demo | sparseloco (default: the file's)")
    parser.add_argument("--spot-checks", type=float, default=None,
                        help="spot_check_probability (default: the file's; templar_lib/spot_check.py)")
    args = parser.parse_args()
    hparams = HParams.load(ROOT / "deploy" / "simulate-hparams.yaml")
    hparams = hparams.replace(strategy=args.strategy) if args.strategy else hparams
    if args.spot_checks is not None:
        hparams = hparams.replace(spot_check_probability=args.spot_checks)
    with scratch_dataset("bench-adversaries-", sequence_length=hparams.sequence_length) as (work, dataset):
        print(f"{machine()}; {args.windows} windows, tiny preset, {hparams.strategy}, spot checks "
              f"{hparams.spot_check_probability:g}", flush=True)

        def network(name: str, **options):
            return run_network(dataset, work / name, hparams=hparams, random_page_count=2, **options)

        started = time.perf_counter()
        honest = network("honest", miners=5, windows=args.windows)
        seconds = (time.perf_counter() - started) / args.windows
        waited = sum(w.close_to_next_seconds for w in honest.windows) / len(honest.windows)
        print(f"all honest: held-out {honest.initial_held_out_loss:.3f} -> {honest.windows[-1].held_out_loss:.3f} "
              f"({seconds:.1f} s per window; from a window's close to the next window's mining: validator + "
              f"aggregator + replay {waited:.2f} s)")
        print("| attack | attackers | progress kept | attackers' weight | honest min / max weight | "
              "reward per compute, attackers / honest | last reason |")
        print("|---|---|---|---|---|---|---|")
        checked = dict.fromkeys(SPOT_CHECKED) if hparams.spot_check_probability > 0 else {}
        kinds = [kind for kind in {**ATTACKS, **OPEN, **checked} if not args.only or kind in args.only.split(",")]
        kinds = [kind for kind in kinds if hparams.strategy in OPEN.get(kind, KINDS[kind].strategies)]
        for kind in kinds:
            report = network(kind, miners=5, windows=args.windows, adversaries={kind: ATTACKS.get(kind, 1)})
            print(row(kind, report, progress(honest)), flush=True)
        if not args.skip_mixed:
            mixed = network("mixed", miners=10, windows=10, seed=1, adversaries=parse_adversaries(
                "sybil_mean:1,backdate_copy:1,lazy:1,sign_flip:1"))
            last = mixed.windows[-1]
            honest_final = min(last.final[u] for u, r in mixed.roles.items() if r == "honest")
            cheat_final = max(last.final.get(u, 0.0) for u, r in mixed.roles.items() if r != "honest")
            print(f"\nmixed 40 % (sybil_mean, backdate_copy, lazy, sign_flip of 10), 10 windows: lowest honest final "
                  f"{honest_final:.5f}, highest adversary final {cheat_final:.5f}")
        if not args.skip_fair:
            fair = network("fair", miners=8, windows=20, seed=5)
            mean = {uid: sum(w.weights.get(uid, 0.0) for w in fair.windows[-10:]) / 10 for uid in fair.roles}
            print(f"\nfair pay, 8 honest miners, 20 windows, seed 5: mean weight over the last 10 windows "
                  f"{' '.join(f'{uid}:{w:.3f}' for uid, w in sorted(mean.items()))}; lowest / highest "
                  f"{min(mean.values()) / max(mean.values()):.2f}")


if __name__ == "__main__":
    main()
