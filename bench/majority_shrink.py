"""A majority of miners that shrink their honest sparseloco files, with and without the validator's two small-file
rules (docs/RELIABILITY.md, "A majority that shrinks its files").

    python bench/majority_shrink.py [--windows 10] [--factors 0.01,0.3]

The aggregator clips every peer to the median of the peers' norms (Templar's rule), so a majority that sends its
honest files ×f makes everyone's step ×f. The validator has two rules against it (templar_lib/strategies.py,
SparseLoCoStrategy): a floor (a file below NORM_FLOOR of its reference in any parameter is refused) and a cap on how
much a small file is magnified before it is scored (MAX_MAGNIFICATION: below a quarter of the reference a file is
scored at twice its size, so sending less costs score). Each factor runs 3 of 5 miners ×f in the production order,
the suite's settings under sparseloco, under the rules as shipped, without the cap, and without both; printed side
by side: progress of the held-out loss kept against the 2 honest miners alone, and the weight per unit of compute of
the shrinkers and of the honest miners (their compute is honest: only the values are scaled).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workspace import machine, scratch_dataset  # noqa: E402
from templar_lib.simulate import adversaries  # noqa: E402
from templar_lib.simulate import run_network  # noqa: E402
from templar_lib.strategies import SparseLoCoStrategy  # noqa: E402
from tests.lib.test_network import STRATEGIES, progress, weight_per_compute  # noqa: E402

# "as shipped" patches a constant to its own value: mock.patch.multiple needs one
RULES = {"as shipped": {"NORM_FLOOR": SparseLoCoStrategy.NORM_FLOOR}, "no cap": {"MAX_MAGNIFICATION": float("inf")},
         "no cap, no floor": {"MAX_MAGNIFICATION": float("inf"), "NORM_FLOOR": 0.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--factors", default="0.01,0.3")
    args = parser.parse_args()
    hparams = STRATEGIES["sparseloco"]
    with scratch_dataset("bench-shrink-", sequence_length=hparams.sequence_length) as (work, dataset):
        print(f"{machine()}; sparseloco, 3 of 5 miners shrink, {args.windows} windows", flush=True)
        honest = run_network(dataset, work / "honest", miners=2, windows=args.windows, hparams=hparams,
                             random_page_count=2)
        print("| ×f | rules | progress kept | weight per compute, shrinkers / honest | shrinkers refused (windows) |")
        print("|---|---|---|---|---|")
        for factor in (float(f) for f in args.factors.split(",")):
            kind = f"shrink_{factor:g}"
            adversaries.KINDS[kind] = adversaries.Adversary(adversaries.scaled(factor))
            for index, (name, overrides) in enumerate(RULES.items()):
                with mock.patch.multiple(SparseLoCoStrategy, **overrides):  # the class constants, for this run
                    report = run_network(dataset, work / f"{kind}-{index}", miners=5, windows=args.windows,
                                         hparams=hparams, adversaries={kind: 3}, random_page_count=2)
                cheats = [uid for uid, role in report.roles.items() if role == kind]
                honest_uids = [uid for uid, role in report.roles.items() if role == "honest"]
                refused = sum(any(w.reasons.get(uid, "").startswith("norm:") for uid in cheats)
                              for w in report.windows)
                print(f"| ×{factor:g} | {name} | {progress(report) / progress(honest):.0%} | "
                      f"{weight_per_compute(report, cheats):.3f} / {weight_per_compute(report, honest_uids):.3f} | "
                      f"{refused} of {args.windows} |", flush=True)


if __name__ == "__main__":
    main()
