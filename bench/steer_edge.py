"""What steering a file within a spot check's tolerance gains in one window's score, measured paired: the steered
file and the honest one it came from, scored as the validator scores (each parameter at the scoring norm, the loss
before and after on the miner's own pages and on random pages), on the same θ and the same pages, window by window
along a network's run (docs/RELIABILITY.md, spot checks; bench/RESULTS.md "Replay tolerance"). A network run
compares weights, which page luck and θ's drift between runs blur; a paired score resolves a smaller edge.

    python bench/steer_edge.py [--windows 10] [--tolerances 0.001 0.02] [--seed 0]

One probing uid of five sends its honest file, so θ is an honest network's, and scores beside it what it could have
sent from its carried state (windows ≥ 1), each variant within both of a check's rooms at the network's tolerance
(the file's values within 0.9 of the tolerance as one vector, each parameter's within 0.9 of its state room,
tol · ‖β·e + Δ‖ of its error feedback, so that nothing is owed):
- `uniform`: kind `steer_carried` (simulate/adversaries.py): a uniform share of each parameter's room toward
  `gradient_sign`'s file;
- `by room`: the same budget spent on the parameters with the largest state room first, each moved toward
  `gradient_sign`'s file as far as its own room lets it, the rest sent honestly (the allocation a read-only review
  suggested: each parameter turned by up to its room instead of one share everywhere);
- `descent`: the same allocation toward sign(g) of its own pages' raw gradient on the positions its honest file
  keeps (a direction the encoder can express without moving a position, where a blend toward another top-k mostly
  re-encodes back to the honest positions).
Beside them, for scale, `gradient_sign`'s file whole (what no check lets pass: it is far outside both rooms).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workspace import machine, scratch_dataset  # noqa: E402
from templar_lib.data import random_pages  # noqa: E402
from templar_lib.roles.validator import evaluate_gradient  # noqa: E402
from templar_lib.scoring import score_losses  # noqa: E402
from templar_lib.simulate import run_network  # noqa: E402
from templar_lib.simulate.adversaries import KINDS, Adversary, Turn, _greedy_sent, _sign, _steer_carried  # noqa: E402
from templar_lib.sparseloco import decode_delta  # noqa: E402
from templar_lib.spot_check import values_difference  # noqa: E402
from templar_lib.training import evaluate_loss, loss_and_gradients  # noqa: E402
from tests.lib.test_network import STRATEGIES  # noqa: E402

PROBE = "steer_probe"
RANDOM_PAGES = 2  # as the suite's networks (random_page_count)


def norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


def by_room(turn: Turn, honest, target: dict[str, torch.Tensor]) -> dict:
    """`honest`'s values moved toward the dense `target`, parameter by parameter from the largest state room down,
    each as far as its room lets it (a share cut by 2^(1/4) until it re-encodes within), while the file stays within
    the values' room (turn.miner.own: the state after the honest work)."""
    tolerance = turn.hparams.spot_check_tolerance
    owed = turn.strategy.tie_free_state(turn.miner.own, honest.tensors)
    room = {name: 0.9 * tolerance * norm(owed["error." + name]) for name in honest.tensors}
    sent = dict(honest.tensors)
    for name in sorted(room, key=room.get, reverse=True):
        delta = honest.tensors[name]
        away = target[name] - decode_delta(delta)
        for share in (min(1.0, room[name] / max(norm(away), 1e-30)) * 2.0 ** (-n / 4) for n in range(32)):
            [steered] = turn.strategy.encode({name: decode_delta(delta) + share * away}, None)[0].values()
            if norm(decode_delta(steered) - decode_delta(delta)) <= room[name] and \
                    values_difference(honest.tensors, {**sent, name: steered}) <= 0.9 * tolerance:
                sent[name] = steered
                break
    return sent


def descent_on_its_positions(turn: Turn, honest) -> dict[str, torch.Tensor]:
    """sign(g) of the uid's own pages' raw gradient g on the positions its honest file keeps, each parameter at its
    honest values' norm: steepest descent (in the validator's per-parameter metric, roughly) that the encoder can
    express without moving a position."""
    _, gradients = loss_and_gradients(turn.model, turn.dataset.tokens(turn.own_pages()), turn.hparams.batch_size)
    turn.model.zero_grad(set_to_none=True)
    target = {}
    for name, delta in honest.tensors.items():
        dense = decode_delta(delta)
        direction = torch.where(dense != 0, torch.sign(gradients[name]), torch.zeros_like(dense))
        target[name] = direction * (norm(dense) / max(norm(direction), 1e-30))
    return target


def score(turn: Turn, gradient) -> float:
    """The validator's score of `gradient` alone on θ_w, the uid's own pages and this bench's random pages."""
    hparams, model = turn.hparams, turn.model
    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    random = turn.dataset.tokens(random_pages(turn.window, "steer-edge", RANDOM_PAGES,
                                              turn.dataset.manifest.train_pages))
    reference = turn.strategy.reference(model, random, step=turn.state.step)
    own = [turn.dataset.tokens([page]) for page in turn.own_pages()]
    losses = evaluate_gradient(copy.deepcopy(model), theta, gradient, window=turn.window, step=turn.state.step,
                               own=own, random=random, random_before=evaluate_loss(model, random, hparams.batch_size),
                               hparams=hparams, reference=reference)
    return score_losses(turn.miner.uid, losses).score


def probe(rows: list[dict]):
    def upload(turn: Turn) -> bytes:
        if turn.miner.own is None:  # a fresh start: nothing carried, nothing of this kind to steer
            return turn.write(turn.honest())
        before = {name: t.clone() for name, t in turn.miner.own.items()}  # mining updates a state in place
        shapes = {name: tuple(p.shape) for name, p in turn.model.named_parameters()}
        uniform = turn.strategy.read_gradient(_steer_carried(turn), window=turn.window, uid=turn.miner.uid,
                                              shapes=shapes).tensors
        turn.miner.own = before  # and again, honestly, from the same state: the file it sends
        honest = turn.honest()
        greedy = _greedy_sent(turn, _sign, honest)
        variants = {"honest": honest.tensors, "uniform": uniform,
                    "by room": by_room(turn, honest, {n: decode_delta(g) for n, g in greedy.items()}),
                    "descent": by_room(turn, honest, descent_on_its_positions(turn, honest)), "greedy": greedy}
        rows.append({"window": turn.window,
                     **{name: score(turn, honest.with_tensors(sent)) for name, sent in variants.items()},
                     **{f"moved {name}": values_difference(honest.tensors, sent) for name, sent in variants.items()},
                     **{f"parameters {name}": sum(not torch.equal(decode_delta(sent[n]), decode_delta(d))
                                                  for n, d in honest.tensors.items())
                        for name, sent in variants.items()}})
        return turn.write(honest)
    return upload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=10)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.001, 0.02])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# {machine()}; tiny preset, sparseloco (the suite's FAST settings), 5 miners, spot checks on every file, "
          f"{args.windows} windows, seed {args.seed}")
    with scratch_dataset("steer-edge-") as (work, dataset):
        for tolerance in args.tolerances:
            rows: list[dict] = []
            KINDS[PROBE] = Adversary(probe(rows), spot_checked=True, strategies=("sparseloco",))
            hparams = STRATEGIES["sparseloco"].replace(spot_check_probability=1.0, spot_check_tolerance=tolerance)
            report = run_network(dataset, work / f"tolerance-{tolerance}", miners=5, windows=args.windows,
                                 adversaries={PROBE: 1}, hparams=hparams, random_page_count=RANDOM_PAGES,
                                 seed=args.seed)
            reasons = {uid: why for window in report.windows for uid, why in window.reasons.items()}
            print(f"\ntolerance {tolerance:g}: zero scores in the run {reasons or 'none'}")
            print("window | honest | uniform (× honest) | by room (× honest) | descent (× honest) | greedy whole "
                  "(× honest) | moved: uniform, by room, descent, greedy | parameters moved: uniform, by room, descent")
            for row in rows:
                print(f"{row['window']} | {row['honest']:.5f} | "
                      + " | ".join(f"{row[name]:.5f} ({row[name] / row['honest']:.3f})"
                                   for name in ("uniform", "by room", "descent", "greedy"))
                      + f" | {row['moved uniform']:.5f}, {row['moved by room']:.5f}, {row['moved descent']:.5f}, "
                      f"{row['moved greedy']:.3f} | {row['parameters uniform']}, {row['parameters by room']}, "
                      f"{row['parameters descent']}")
            for name in ("uniform", "by room", "descent", "greedy"):
                ratios = [row[name] / row["honest"] for row in rows if row["honest"] > 0]
                print(f"{name}: score over honest, mean {statistics.mean(ratios):.4f}, min {min(ratios):.4f}, "
                      f"max {max(ratios):.4f} over {len(ratios)} windows")


if __name__ == "__main__":
    main()
