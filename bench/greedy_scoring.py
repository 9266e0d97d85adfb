"""The greedy files of sparseloco (adversary kinds `gradient`, `gradient_sign`) under two ways of scoring, and what they
do to training when every miner sends them (docs/RELIABILITY.md, "Countermeasure tried for the greedy files").

    python bench/greedy_scoring.py [--windows 5] [--all-windows 20] [--seed 0]

1. One greedy miner of five, the suite's FAST settings under sparseloco, scored as the validator does (each file at
   SCORING_NORM · ‖Δ_ref‖₂ per parameter: `l2`) and as a variant defined here (`adam`): each file at the same share
   of ‖Δ_ref‖_D, D = √v̂ + mean(√v̂) per parameter, from the second moments v of the validator's own reference inner
   steps (its random pages). In the D metric the first-order best step is g / D, Adam's direction, not the raw
   gradient's. Prints the weight per uid, greedy over honest (compute is the same).
2. Networks where all five miners are honest, or all send one greedy kind: progress of the held-out loss.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workspace import machine, scratch_dataset  # noqa: E402
from templar_lib import strategies  # noqa: E402
from templar_lib.inner import InnerState, inner_steps  # noqa: E402
from templar_lib.model import parameters_of  # noqa: E402
from templar_lib.simulate import run_network  # noqa: E402
from tests.lib.test_network import STRATEGIES, progress  # noqa: E402

GREEDY = ("gradient", "gradient_sign")


@dataclass(frozen=True)
class MetricReference(strategies.NormReference):
    metric: dict[str, torch.Tensor] | None = None  # D per parameter
    metric_norms: dict[str, float] | None = None  # ‖Δ_ref‖_D


def metric_norm(metric: torch.Tensor, x: torch.Tensor) -> float:
    """‖x‖_D = √(Σ D·x²)."""
    return float((metric * x.square()).sum().sqrt())


class AdamMetricScoring(strategies.SparseLoCoStrategy):
    """sparseloco with files scored at a fixed ‖x‖_D instead of a fixed ‖x‖₂ (the norm rule is unchanged)."""

    def reference(self, model: torch.nn.Module, tokens: torch.Tensor, *, step: int) -> MetricReference:
        inner = InnerState.zeros_like(parameters_of(model))
        _, delta = inner_steps(model, inner, tokens, step=step, hparams=self.hparams)
        metric = {}
        for name, v in inner.v.items():
            root = (v / (1 - self.hparams.inner_beta2 ** inner.t)).sqrt()
            metric[name] = root + root.mean()  # floored: a coordinate the random pages never moved is not free
        return MetricReference({n: float(torch.linalg.vector_norm(d)) for n, d in delta.items()},
                               self.norm_bound(step), metric,
                               {n: metric_norm(metric[n], d) for n, d in delta.items()})

    def scoring_scale(self, name: str, update: torch.Tensor, reference: MetricReference) -> float:
        norm = metric_norm(reference.metric[name], update)
        return self.SCORING_NORM * reference.metric_norms[name] / norm if norm > 0 else 0.0


def weight_per_uid(report, roles: set[str]) -> float:
    uids = [uid for uid, role in report.roles.items() if role in roles]
    return sum(w.weights.get(uid, 0.0) for w in report.windows for uid in uids) / max(1, len(uids))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--all-windows", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    hparams = STRATEGIES["sparseloco"]
    with scratch_dataset("bench-greedy-", sequence_length=hparams.sequence_length) as (work, dataset):
        print(f"{machine()}; sparseloco, 5 miners, seed {args.seed}")
        for scoring, strategy in [("l2", strategies.SparseLoCoStrategy), ("adam", AdamMetricScoring)]:
            strategies.STRATEGIES["sparseloco"] = strategy
            try:
                for kind in GREEDY:
                    report = run_network(dataset, work / f"{scoring}-{kind}", miners=5, windows=args.windows,
                                         adversaries={kind: 1}, hparams=hparams, random_page_count=2, seed=args.seed)
                    greedy, honest = weight_per_uid(report, {kind}), weight_per_uid(report, {"honest"})
                    print(f"scoring {scoring:4}  1 {kind:13} of 5, {args.windows} windows: weight per uid greedy "
                          f"{greedy:.3f}, honest {honest:.3f}, ratio {greedy / honest:.2f}", flush=True)
            finally:
                strategies.STRATEGIES["sparseloco"] = strategies.SparseLoCoStrategy
        for kind in ("honest", *GREEDY):
            report = run_network(dataset, work / f"all-{kind}", miners=5, windows=args.all_windows,
                                 adversaries={} if kind == "honest" else {kind: 5}, hparams=hparams,
                                 random_page_count=2, seed=args.seed)
            print(f"all 5 {kind:13}, {args.all_windows} windows: held-out {report.initial_held_out_loss:.3f} -> "
                  f"{report.windows[-1].held_out_loss:.3f}, progress {progress(report):.3f}", flush=True)


if __name__ == "__main__":
    main()
