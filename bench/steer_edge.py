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
  `gradient_sign`'s file as far as its own room lets it, the rest sent honestly;
- `descent`: the same allocation toward sign(g) of its own pages' raw gradient on the positions its honest file
  keeps (a direction the encoder can express without moving a position, where a blend toward another top-k mostly
  re-encodes back to the honest positions);
- `descent, turn`: the same, the parameters ranked by their room over their sent norm (the largest turn of a
  direction first: the validator scales each parameter to a fixed norm, so a turn is what it sees);
- `aimed, turn`: that ranking toward sign(g_worst − g_generic) on its kept positions, a first-order direction aimed
  at the score itself (the worst own page's improvement minus the random pages');
- `swap`: positions moved instead of values: in a chunk, the kept value least aligned with g is given up for the
  position outside the file with the largest |g|, at the quantisation level that gains most per unit of the values'
  room, the chunks whose swap gains most (weighted by the scale the validator scores each parameter at, estimated
  on the miner's own random draw) first. A check's state room does not see a swap: the state it compares, error
  feedback plus what was sent, is the accumulation either way; only the values' room bounds it, and since
  2026-12-08 the check's rule on positions (sparseloco.off_selection: both sides of a position moved must be
  near-ties of the replay's top-k);
- `swap, near-ties`: the same among the positions that rule lets pass.
Beside them, for scale, `gradient_sign`'s file whole (what no check lets pass: it is far outside both rooms). A
variant the norm rule would refuse scores 0, as the validator scores it.
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
from templar_lib.scoring import Losses, score_losses  # noqa: E402
from templar_lib.simulate import run_network  # noqa: E402
from templar_lib.simulate.adversaries import KINDS, Adversary, Turn, _greedy_sent, _sign, _steer_carried  # noqa: E402
from templar_lib.sparseloco import SparseDelta, _selection, _to_rows, decode_delta, off_selection  # noqa: E402
from templar_lib.spot_check import values_difference  # noqa: E402
from templar_lib.training import evaluate_loss, loss_and_gradients  # noqa: E402
from tests.lib.test_network import STRATEGIES  # noqa: E402

PROBE = "steer_probe"
RANDOM_PAGES = 2  # as the suite's networks (random_page_count)


def norm(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x))


def steered(turn: Turn, honest, target: dict[str, torch.Tensor], *, relative: bool = False) -> dict:
    """`honest`'s values moved toward the dense `target`, parameter by parameter from the largest state room down
    (`relative`: the largest room over the parameter's sent norm, the largest turn of its direction, which is what
    the validator's per-parameter scale sees), each as far as its room lets it (a share cut by 2^(1/4) until it
    re-encodes within), while the file stays within the values' room (turn.miner.own: the state after the honest
    work)."""
    tolerance = turn.hparams.spot_check_tolerance
    owed = turn.strategy.tie_free_state(turn.miner.own, honest.tensors)
    room = {name: 0.9 * tolerance * norm(owed["error." + name]) for name in honest.tensors}
    rank = {name: room[name] / max(norm(decode_delta(honest.tensors[name])), 1e-30) if relative else room[name]
            for name in room}
    sent = dict(honest.tensors)
    for name in sorted(rank, key=rank.get, reverse=True):
        delta = honest.tensors[name]
        away = target[name] - decode_delta(delta)
        for share in (min(1.0, room[name] / max(norm(away), 1e-30)) * 2.0 ** (-n / 4) for n in range(32)):
            [moved] = turn.strategy.encode({name: decode_delta(delta) + share * away}, None)[0].values()
            if norm(decode_delta(moved) - decode_delta(delta)) <= room[name] and \
                    values_difference(honest.tensors, {**sent, name: moved}) <= 0.9 * tolerance:
                sent[name] = moved
                break
    return sent


def on_its_positions(honest, direction: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sign(direction) on the positions `honest` keeps, each parameter at its honest values' norm: a target the
    encoder can express without moving a position."""
    target = {}
    for name, delta in honest.tensors.items():
        dense = decode_delta(delta)
        signs = torch.where(dense != 0, torch.sign(direction[name]), torch.zeros_like(dense))
        target[name] = signs * (norm(dense) / max(norm(signs), 1e-30))
    return target


def gradients_on(turn: Turn, pages: list[int]) -> dict[str, torch.Tensor]:
    _, gradients = loss_and_gradients(turn.model, turn.dataset.tokens(pages), turn.hparams.batch_size)
    turn.model.zero_grad(set_to_none=True)
    return gradients


class Scorer:
    """The validator's scoring of one file alone on θ_w, set up once a window (θ, the random pages, the norm rule's
    reference from its inner steps, the losses before) and shared by every file scored there: the uid's own pages,
    and 2 random pages drawn with `seed` (this bench's draw standing in for the validator's, which the miner cannot
    know)."""

    def __init__(self, turn: Turn, seed: str) -> None:
        self.turn, model, hparams = turn, turn.model, turn.hparams
        self.theta = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.random_ids = random_pages(turn.window, seed, RANDOM_PAGES, turn.dataset.manifest.train_pages)
        self.random = turn.dataset.tokens(self.random_ids)
        self.reference = turn.strategy.reference(model, self.random, step=turn.state.step)
        self.random_before = evaluate_loss(model, self.random, hparams.batch_size)
        self.own = [turn.dataset.tokens([page]) for page in turn.own_pages()]
        self.scratch = copy.deepcopy(model)

    def losses(self, gradient) -> Losses | None:
        """None where the norm rule refuses `gradient`."""
        turn = self.turn
        if turn.strategy.norm_reason(gradient, self.reference) is not None:
            return None
        return evaluate_gradient(self.scratch, self.theta, gradient, window=turn.window, step=turn.state.step,
                                 own=self.own, random=self.random, random_before=self.random_before,
                                 hparams=turn.hparams, reference=self.reference)

    def score(self, gradient) -> float:
        """The validator's score of `gradient` alone (0 where the norm rule refuses it)."""
        losses = self.losses(gradient)
        return 0.0 if losses is None else score_losses(self.turn.miner.uid, losses).score


def swapped(honest, direction: dict[str, torch.Tensor], weights: dict[str, float], tolerance: float,
            accumulation: dict[str, torch.Tensor] | None = None) -> dict[str, SparseDelta]:
    """`honest` with at most one position a chunk swapped, within 0.9 of the values' room (module docstring, `swap`).
    A swap in a chunk gives up its kept value v_i least aligned with g (the smallest v_i·g_i) for the position j
    outside the file with the largest |g_j| at level c of the parameter's 4: to first order the file's step gains
    w·(c·g_j − v_i·g_i) (w the parameter's scoring scale) for c² + v_i² of the values' squared room. With
    `accumulation` (β·e + Δ per parameter), i and j only among the near-ties a check lets pass on either side
    (sparseloco.off_selection at the tolerance: |a_i| ≤ (1 + tol)·u_c, |a_j| ≥ (1 − tol)·t_c)."""
    sent = {name: decode_delta(delta) for name, delta in honest.tensors.items()}
    budget = (0.9 * tolerance) ** 2 * sum(norm(dense) ** 2 for dense in sent.values())
    candidates = []  # (gain per room, room, name, chunk, slot given up, position taken, code)
    for name, delta in honest.tensors.items():
        g = _to_rows(direction[name].float(), delta.view, delta.chunk)  # (n_chunks, chunk_size)
        values = delta.values()  # (n_chunks, k)
        aligned = values * g.gather(1, delta.idx)
        candidates_g = g.abs().scatter(1, delta.idx, -1.0)  # -1: kept positions out of the running
        if accumulation is not None:  # and positions the check would refuse, on either side
            a, _, _, t, u = _selection(accumulation[name], delta, delta)  # the check's t_c and u_c
            candidates_g = torch.where(a >= (1.0 - tolerance) * t, candidates_g, torch.full_like(candidates_g, -1.0))
            aligned = torch.where(a.gather(1, delta.idx) <= (1.0 + tolerance) * u, aligned,
                                  torch.full_like(aligned, torch.inf))
        slot = aligned.argmin(1, keepdim=True)  # (n_chunks, 1)
        outside, taken = candidates_g.max(1, keepdim=True)  # the largest |g| outside the file
        levels = (delta.table.float() + delta.shift)[None, :]  # (1, bins)
        gain = levels * g.gather(1, taken) - aligned.gather(1, slot)  # (n_chunks, bins)
        room = levels ** 2 + values.gather(1, slot) ** 2
        possible = (outside >= 0) & torch.isfinite(aligned.gather(1, slot))  # a position to take and one to give up
        ratio = torch.where((gain > 0) & possible, weights[name] * gain / room, torch.zeros_like(gain))
        best, code = ratio.max(1)
        for chunk in torch.nonzero(best > 0).flatten().tolist():
            c = int(code[chunk])
            candidates.append((float(best[chunk]), float(room[chunk, c]), name, chunk, int(slot[chunk]),
                               int(taken[chunk]), c))
    swaps: dict[str, list[tuple[int, int, int, int]]] = {}
    for _, cost, name, *swap in sorted(candidates, reverse=True):
        if cost <= budget:
            budget -= cost
            swaps.setdefault(name, []).append(tuple(swap))
    moved = dict(honest.tensors)
    for name, chosen in swaps.items():
        delta = honest.tensors[name]
        idx, codes = delta.idx.clone(), delta.codes.clone()
        for chunk, slot, taken, code in chosen:
            idx[chunk, slot], codes[chunk, slot] = taken, code
        order = idx.argsort(1)  # positions increasing within a chunk, as the wire writes them
        moved[name] = SparseDelta(delta.shape, delta.chunk, idx.gather(1, order), codes.gather(1, order),
                                  delta.shift, delta.table)
    return moved


def aimed(turn: Turn, honest, own: Scorer) -> dict[str, torch.Tensor]:
    """A first-order direction aimed at the score itself (the worst own page's improvement minus the random pages'):
    sign(g_worst − g_generic) on its kept positions, where g_worst is the gradient on the own page its honest file
    improves least and g_generic the gradient on 2 pages of `own`'s random draw (the miner's stand-in for the
    validator's, which are unknown to it)."""
    improvements = [before - after for before, after in own.losses(honest).own_pages]
    worst = gradients_on(turn, [turn.own_pages()[improvements.index(min(improvements))]])
    generic = gradients_on(turn, own.random_ids)
    return on_its_positions(honest, {name: worst[name] - generic[name] for name in worst})


VARIANTS = ("uniform", "by room", "descent", "descent, turn", "aimed, turn", "swap", "swap, near-ties")


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
        gradient = gradients_on(turn, turn.own_pages())
        owed = turn.strategy.tie_free_state(turn.miner.own, honest.tensors)  # β·e + Δ: what the top-k chose from
        descent = on_its_positions(honest, gradient)
        miners_view = Scorer(turn, seed=f"steer-edge-miner:{turn.miner.uid}")  # the miner's own random draw
        weights = {name: turn.strategy.scoring_scale(name, decode_delta(delta), miners_view.reference)
                   for name, delta in honest.tensors.items()}
        variants = {"honest": honest.tensors, "uniform": uniform,
                    "by room": steered(turn, honest, {n: decode_delta(g) for n, g in greedy.items()}),
                    "descent": steered(turn, honest, descent),
                    "descent, turn": steered(turn, honest, descent, relative=True),
                    "aimed, turn": steered(turn, honest, aimed(turn, honest, miners_view), relative=True),
                    "swap": swapped(honest, gradient, weights, turn.hparams.spot_check_tolerance),
                    "swap, near-ties": swapped(honest, gradient, weights, turn.hparams.spot_check_tolerance,
                                               {name: owed["error." + name] for name in honest.tensors}),
                    "greedy": greedy}
        validator = Scorer(turn, seed="steer-edge")
        rows.append({"window": turn.window,
                     **{name: validator.score(honest.with_tensors(sent)) for name, sent in variants.items()},
                     **{f"moved {name}": values_difference(honest.tensors, sent) for name, sent in variants.items()},
                     **{f"parameters {name}": sum(not torch.equal(decode_delta(sent[n]), decode_delta(d))
                                                  for n, d in honest.tensors.items())
                        for name, sent in variants.items()},
                     **{f"strays {name}": sum(off_selection(owed["error." + n], d, sent[n],
                                                            turn.hparams.spot_check_tolerance)
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
            print("window | honest | " + " | ".join(f"{name} (× honest)" for name in VARIANTS + ("greedy",))
                  + " | moved: " + ", ".join(VARIANTS) + " | parameters moved: " + ", ".join(VARIANTS))
            for row in rows:
                ratio = {name: row[name] / row["honest"] if row["honest"] > 0 else float("nan")
                         for name in VARIANTS + ("greedy",)}
                print(f"{row['window']} | {row['honest']:.5f} | "
                      + " | ".join(f"{row[name]:.5f} ({ratio[name]:.3f})" for name in VARIANTS + ("greedy",))
                      + " | " + ", ".join(f"{row['moved ' + name]:.4f}" for name in VARIANTS)
                      + " | " + ", ".join(str(row["parameters " + name]) for name in VARIANTS))
            for name in VARIANTS + ("greedy",):
                ratios = [row[name] / row["honest"] for row in rows if row["honest"] > 0]
                gained = statistics.mean(row[name] - row["honest"] for row in rows)
                strays = statistics.mean(row["strays " + name] for row in rows)
                print(f"{name}: score over honest, mean {statistics.mean(ratios):.4f}, min {min(ratios):.4f}, "
                      f"max {max(ratios):.4f} over {len(ratios)} windows; score gained, mean {gained:+.2e} "
                      f"(honest mean {statistics.mean(row['honest'] for row in rows):.2e}); positions a check "
                      f"refuses (sparseloco.off_selection), mean {strays:.1f} a window")

if __name__ == "__main__":
    main()
