"""The cheating miners of a simulated network: a table from kind to behaviour, each acting when in the window a real
one would (`when`), and what it costs (`compute`, in honest miner-windows: what an attacker would really spend).

    when    mine     with the honest miners, at the window's start
            public   after the honest uploads of the window are public (their files can be copied)
            close    after the window closed (too late to be seen, whatever time its bucket claims)
            scored   after the validator scored the window, before the aggregator combines it

    honest          the honest file
    sign_flip       the honest gradient negated                      scale           ×10 values
    noise           unit-norm noise on the honest positions          copy            another uid's file, relabelled
    replay          its first gradient, sent every window            free_rider      zeros
    wrong_data      trained on pages that are not its own            lagging         trained on θ three windows old
    missing         nothing                                          malformed       half a file and garbage
    swap_after_score  honest, then sign-flipped once the validator scored it
    backdate_copy   another uid's public file as its own, the file's time set before the victim's
    late_combine    after the close: the mean of the public uploads plus a little of its own work, backdated
    sybil_mean      inside the window: the mean of the public uploads plus a little of its own work
    teach_random    trains on its pages and on the validator's random pages as far as it can predict them
    lazy            trains on one page of its share
    thin            trains on the first half of each page's rows (half the compute; every page touched) (open)
    majority_scale  honest ×3 values (meant for a majority: against a median it would move the reference)
    majority_shrink honest ×0.01 values (meant for a majority: the aggregator's median clip would freeze training)
    slow_endpoint   commits an endpoint on loopback that trickles its bodies or never answers (endpoints.py)
    gradient        sparseloco: the top-k of its raw gradient at its honest file's size (open: OPEN says where)
    gradient_sign   sparseloco: ±1 on the top-k of its raw gradient's |values|, at its honest file's size (open)
    unlinked        honest work from a state its last file did not commit to (a cheat where spot checks are on)
    answers_late    honest work, answering each spot check a window late (its node down when asked)
    never_answers   honest work, never answering a spot check
    unseen_once     honest work, its bucket failing the validator's every read in window 1 (its file lands; its node
                    does not know the validator missed it)
    steer           sparseloco, spot checks on: its honest file moved toward gradient_sign's within the tolerance
                    (steer_unpaid: keeping back no less; steer_carried: the same from a carried state, each
                    parameter within the state check's room; steer_fresh: from no state every window)
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from templar_lib.buckets import Bucket
from templar_lib.chain import Chain
from templar_lib.checkpoints import ModelState, model_fingerprint, probe_values
from templar_lib.compression import Sparse, densify, unit_norm
from templar_lib.data import Dataset, random_pages
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_, parameters_of
from templar_lib.roles.miner import compute_gradient
from templar_lib.sparseloco import decode_delta, encode_delta, with_values
from templar_lib.spot_check import allowed_difference, commitment, values_difference
from templar_lib.strategies import Strategy, new_feedback, strategy_of
from templar_lib.training import loss_and_gradients
from templar_lib.wire import Gradient, gradient_key, write_gradient
from templar_lib.wire.sparse import SparseGradient, write_sparse_gradient


@dataclass
class Miner:
    """One simulated miner's own state."""

    uid: int
    kind: str
    state: dict[str, torch.Tensor] | None = None  # its honest mining state (roles.miner.miner_step), when it mines
    own: dict[str, torch.Tensor] | None = None  # the state its own computations (Turn.honest) carry (None: zeros)
    kept: Gradient | SparseGradient | None = None  # replay: the one gradient it keeps re-sending
    history: list[dict[str, torch.Tensor]] = field(default_factory=list)  # lagging: θ of past windows
    # window -> its state before and after the work it committed to (spot_check.py), the last two windows
    transitions: dict[int, tuple[dict[str, torch.Tensor] | None, dict[str, torch.Tensor]]] = field(
        default_factory=dict)

    def record(self, window: int, before: dict[str, torch.Tensor] | None, after: dict[str, torch.Tensor]) -> None:
        """Keep the states around a window's work (copies: mining updates a state in place), to answer a spot
        check of it."""
        kept = {w: t for w, t in self.transitions.items() if w >= window - 1}
        self.transitions = kept | {window: (_copied(before), _copied(after))}


@dataclass(frozen=True)
class Turn:
    """What a miner sees when it acts for a window: θ_w (in `model`), the pages, the chain, and what honest miners
    uploaded."""

    window: int
    miner: Miner
    model: torch.nn.Module
    state: ModelState
    dataset: Dataset
    hparams: HParams
    chain: Chain
    gradients: Bucket  # where every miner of the simulated network uploads
    honest_sent: dict[int, bytes]  # uid -> the file an honest miner uploaded this window
    validator_uid: int

    @property
    def strategy(self) -> Strategy:
        return strategy_of(self.hparams)

    def honest(self, pages: list[int] | None = None, on_model: torch.nn.Module | None = None,
               step: int | None = None, rows: int | None = None, page_rows: int | None = None
               ) -> Gradient | SparseGradient:
        """The file an honest miner would send (on other pages, another θ or step, only the first `rows`
        sequences, or the first `page_rows` of each page, when given), under the network's strategy; carries this
        miner's own state like an honest one."""
        pages = pages if pages is not None else self.own_pages()
        before = _copied(self.miner.own)
        gradient = self._honest(pages, on_model, step, rows, page_rows)
        self.miner.record(self.window, before, self.miner.own)
        if self.hparams.spot_check_probability <= 0:
            return gradient
        return dataclasses.replace(gradient, state=commitment(before, self.miner.own))

    def _honest(self, pages: list[int], on_model: torch.nn.Module | None, step: int | None, rows: int | None,
                page_rows: int | None) -> Gradient | SparseGradient:
        tokens = self.dataset.tokens(pages)
        if page_rows is not None:
            tokens = tokens.reshape(len(pages), -1, tokens.shape[-1])[:, :page_rows].reshape(-1, tokens.shape[-1])
        tokens = tokens[:rows]
        step = self.state.step if step is None else step
        model = on_model or self.model
        if self.hparams.strategy == "demo":
            feedback = new_feedback(parameters_of(model), self.hparams, momentum=self.miner.own)
            self.miner.own = feedback.momentum  # allocated on first use: an honest simulated miner never needs it
            return compute_gradient(self.window, self.miner.uid, model=model, step=step, feedback=feedback,
                                    tokens=tokens, hparams=self.hparams)[1]
        mined = self.strategy.mine(model, self.miner.own, tokens, step=step)
        self.miner.own = mined.state
        parameters = parameters_of(model)
        return SparseGradient(self.window, self.miner.uid, mined.sent, self.hparams.protocol_hash(),
                              model_fingerprint(parameters), tuple(probe_values(parameters, self.window)))

    def write(self, gradient: Gradient | SparseGradient) -> bytes:
        """The file's bytes in its own format."""
        return write_gradient(gradient) if isinstance(gradient, Gradient) else write_sparse_gradient(gradient)

    def own_pages(self) -> list[int]:
        return self.dataset.miner_pages(self.window, self.miner.uid, self.hparams.pages_per_window)

    def public(self) -> dict[int, Gradient | SparseGradient]:
        shapes = {n: tuple(p.shape) for n, p in self.model.named_parameters()}
        return {uid: self.strategy.read_gradient(data, window=self.window, uid=uid, shapes=shapes)
                for uid, data in sorted(self.honest_sent.items())}

    @property
    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.window * 1000 + self.miner.uid)


def _copied(state: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor] | None:
    return None if state is None else {name: t.detach().clone() for name, t in state.items()}


def _values(gradient, function: Callable[[torch.Tensor], torch.Tensor]):
    """The same positions with function(values) (a sparseloco file re-quantises them)."""
    return gradient.with_tensors({n: Sparse(s.idx, function(s.vals), s.shape, s.chunk) if isinstance(s, Sparse)
                                  else with_values(s, function(s.vals)) for n, s in gradient.tensors.items()})


def scaled(factor: float) -> Callable[[Turn], bytes]:
    """The upload of a miner that sends its honest file with every value × factor."""
    return lambda turn: turn.write(_values(turn.honest(), lambda v: v * factor))


def _noise(turn: Turn) -> bytes:
    """Noise of the honest file's norm on its positions (demo: unit norm, as the protocol sends)."""
    def noise(values: torch.Tensor) -> torch.Tensor:
        random = torch.randn(values.shape, generator=turn.generator)
        return random * (values.norm() / random.norm().clamp_min(1e-12))
    return turn.write(_values(turn.honest(), noise))


def _relabelled(turn: Turn) -> Gradient | None:
    """The first honest miner's public file, relabelled as this miner's, with a whisper of noise."""
    public = turn.public()
    if not public:
        return None
    source = public[min(public)]
    return _values(source.with_tensors(source.tensors, uid=turn.miner.uid), lambda v: v * (1 + 1e-4))


def _copy(turn: Turn) -> bytes | None:
    copied = _relabelled(turn)
    return turn.write(copied) if copied is not None else None


def backdate(turn: Turn, seconds: float) -> None:
    """Make the miner's file report a time `seconds` before the window opened (what any miner's own endpoint can
    claim)."""
    opened = turn.chain.block_time(turn.window * turn.hparams.blocks_per_window)
    stamp = (opened.timestamp() if opened is not None else time.time()) - seconds
    os.utime(turn.gradients.local_path(gradient_key(turn.window, turn.miner.uid)), (stamp, stamp))


def _combined(turn: Turn) -> Gradient | SparseGradient | None:
    """The mean of the window's public uploads plus a quarter of its own work (one of its four sequences), the top-k
    of each chunk kept, at unit norm: what a miner that spends a quarter of the compute can make of others' work."""
    public = turn.public()
    if not public:
        return None
    own = turn.honest(rows=max(1, turn.dataset.manifest.rows_per_page * turn.hparams.pages_per_window // 4))
    if isinstance(own, SparseGradient):  # decoded, mixed, and sent again through error-free compression
        hparams = turn.hparams
        return own.with_tensors({name: encode_delta(
            decode_delta(sent) * 0.25 + sum(decode_delta(g.tensors[name]) for g in public.values()) / len(public),
            None, topk=hparams.sparse_topk, target_chunk=hparams.target_chunk, bins=hparams.quantization_bins,
            sigmas=hparams.quantization_range)[0] for name, sent in own.tensors.items()})
    tensors = {}
    for name, sparse in own.tensors.items():
        total = densify(unit_norm(sparse)) * 0.25
        for gradient in public.values():
            total += densify(unit_norm(gradient.tensors[name])) / len(public)
        k = sparse.idx.shape[1]
        idx = total.abs().topk(k, dim=1, sorted=False).indices
        tensors[name] = unit_norm(Sparse(idx, total.gather(1, idx), sparse.shape, sparse.chunk))
    return own.with_tensors(tensors)


def _combine(turn: Turn) -> bytes | None:
    combined = _combined(turn)
    return turn.write(combined) if combined is not None else None


def _teach_random(turn: Turn) -> bytes:
    """Its own pages and one page of what it predicts the validator's random pages are: the hash of the block it can
    see now stands in for the closing block's, which nobody knows yet."""
    guess = turn.chain.block_hash(turn.chain.block())
    predicted = random_pages(turn.window, f"{guess}:{turn.validator_uid}", turn.hparams.pages_per_window,
                             turn.dataset.manifest.train_pages)
    return turn.write(turn.honest(pages=turn.own_pages() + predicted[:1]))


def _swap(turn: Turn) -> bytes:
    """Its honest file, read back from the bucket and sign-flipped."""
    shapes = {n: tuple(p.shape) for n, p in turn.model.named_parameters()}
    mine = turn.strategy.read_gradient(turn.gradients.get(gradient_key(turn.window, turn.miner.uid)),
                                       window=turn.window, uid=turn.miner.uid, shapes=shapes)
    return turn.write(_values(mine, lambda v: -v))


def _replay(turn: Turn) -> bytes:
    if turn.miner.kept is None:
        turn.miner.kept = turn.honest()
    # a careful replayer even claims the current θ
    return turn.write(turn.miner.kept.with_tensors(turn.miner.kept.tensors, window=turn.window,
                                                   model_hash=model_fingerprint(parameters_of(turn.model))))


def _lagging(turn: Turn) -> bytes:
    stale = copy.deepcopy(turn.model)
    lag = min(3, len(turn.miner.history) - 1)
    load_parameters_(stale, turn.miner.history[-1 - lag])
    return turn.write(turn.honest(on_model=stale, step=max(0, turn.state.step - lag)))


def _greedy(turn: Turn, direction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bytes:
    """sparseloco: instead of its AdamW pseudo-gradient, direction(g, chosen) of its own pages' raw gradient g, where
    `chosen` marks the top-k of |g| (the positions a top-k of g sends), each parameter's values scaled to the norm of
    its honest file's (an honest size, well inside the validator's bound). Found by a red-team pass, 2026-12-06
    (docs/RELIABILITY.md): scoring applies a file alone at a fixed size, and a steepest-descent direction improves the
    loss there more per unit of norm than the protocol's update. Its compute is honest (the raw gradients come with
    the inner steps' own backward passes; this simulation spends one more pass to get them, which a real attacker
    need not)."""
    if turn.hparams.strategy != "sparseloco":
        raise ValueError("the greedy adversaries are sparseloco ones: demo's honest file already is the top-k of its "
                         "gradients' momentum")
    honest = turn.honest()
    return turn.write(honest.with_tensors(_greedy_sent(turn, direction, honest)))


def _greedy_sent(turn: Turn, direction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 honest: SparseGradient) -> dict:
    """What _greedy sends in place of `honest`'s values."""
    _, gradients = loss_and_gradients(turn.model, turn.dataset.tokens(turn.own_pages()), turn.hparams.batch_size)
    turn.model.zero_grad(set_to_none=True)
    sent, _ = turn.strategy.encode(gradients, None)
    greedy = {name: direction(g, decode_delta(sent[name]) != 0) for name, g in gradients.items()}
    sent, _ = turn.strategy.encode(greedy, None)
    scale = {}
    for name, delta in honest.tensors.items():
        size = float(torch.linalg.vector_norm(decode_delta(sent[name])))
        scale[name] = float(torch.linalg.vector_norm(decode_delta(delta))) / size if size > 0 else 0.0
    return turn.strategy.encode({n: g * scale[n] for n, g in greedy.items()}, None)[0]


def _gradient(turn: Turn) -> bytes:
    """The top-k of the raw gradient itself."""
    return _greedy(turn, lambda g, chosen: g)


def _sign(g: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    return torch.where(chosen, torch.sign(g), torch.zeros_like(g))


def _gradient_sign(turn: Turn) -> bytes:
    """±1 on the top-k of |g|: the best reply found to a validator scoring in AdamW's own metric (RELIABILITY)."""
    return _greedy(turn, _sign)


def _steer(turn: Turn, *, pays: bool = True, fresh_every_window: bool = False) -> bytes:
    """sparseloco, where spot checks are on: its honest file moved toward gradient_sign's as far as a check's
    tolerance lets the values pass (0.9 of it, measured as the check measures it), its error feedback keeping back
    what it sent beyond its honest file (as the check's tie-free state requires: `pays`; without, it keeps back
    nothing and the state check alone stands in its way), from no state every window where `fresh_every_window`
    (the values' room at a fresh start, and nothing owed carried on). What it earns over honest work is what the
    tolerance leaves a miner (spot_check.py). At a fresh start (its first window) the blend re-encodes some
    positions away from the top-k's near-ties, which a check's rule on positions refuses: it is banned at its first
    check (since 2026-12-08; before, it passed every check and earned no more than honest work)."""
    if fresh_every_window:
        turn.miner.own = None
    fresh = turn.miner.own is None
    honest = turn.honest()
    room = 0.9 * allowed_difference(turn.hparams, fresh=fresh)
    if room <= 0:
        return turn.write(honest)
    greedy = _greedy_sent(turn, _sign, honest)
    for mix in (min(1.0, room * 2.0 ** -n) for n in range(-3, 6)):  # the farthest that re-encodes within it
        sent = turn.strategy.encode({name: (1 - mix) * decode_delta(delta) + mix * decode_delta(greedy[name])
                                     for name, delta in honest.tensors.items()}, None)[0]
        if values_difference(honest.tensors, sent) > room:
            continue
        if not pays:
            return turn.write(honest.with_tensors(sent))
        before, _ = turn.miner.transitions[turn.window]
        turn.miner.own = kept_back(turn.miner.own, sent, honest.tensors)
        turn.miner.record(turn.window, before, turn.miner.own)
        return turn.write(dataclasses.replace(honest.with_tensors(sent), state=commitment(before, turn.miner.own)))
    return turn.write(honest)


def _steer_carried(turn: Turn) -> bytes:
    """sparseloco, where spot checks are on: from a carried state, its honest file moved toward gradient_sign's
    without keeping back what it sent beyond (its state stays its honest work's), each parameter only as far as the
    state check's room (tol · ‖β·e + Δ‖ of its error feedback, 0.9 of it) and the whole file as far as the values'
    (0.9 of the tolerance); honest work at a fresh start (nothing carried: the state check would catch the values'
    20× room there, `steer_unpaid`). A uniform share of each parameter's room toward one greedy file; other
    allocations and directions the encoder expresses gained ≤ 0.4 % of a window's score on average at the cap
    (scored paired: bench/steer_edge.py, bench/RESULTS.md "Replay tolerance")."""
    fresh = turn.miner.own is None
    honest = turn.honest()
    tolerance = turn.hparams.spot_check_tolerance
    if fresh or tolerance <= 0:
        return turn.write(honest)
    greedy = _greedy_sent(turn, _sign, honest)
    owed = turn.strategy.tie_free_state(turn.miner.own, honest.tensors)  # what a replay's state after holds
    away = {name: decode_delta(greedy[name]) - decode_delta(delta) for name, delta in honest.tensors.items()}
    room = {name: 0.9 * tolerance * float(torch.linalg.vector_norm(owed["error." + name]))
            for name in honest.tensors}
    for mix in (min(1.0, tolerance * 2.0 ** (-n / 4)) for n in range(-24, 32)):  # the farthest passing both
        sent = dict(honest.tensors)
        for name, delta in honest.tensors.items():  # a parameter whose re-encoding leaves its room stays honest
            share = min(mix, room[name] / max(float(torch.linalg.vector_norm(away[name])), 1e-30))
            [steered] = turn.strategy.encode({name: decode_delta(delta) + share * away[name]}, None)[0].values()
            if float(torch.linalg.vector_norm(decode_delta(steered) - decode_delta(delta))) <= room[name]:
                sent[name] = steered
        if values_difference(honest.tensors, sent) <= 0.9 * tolerance:
            return turn.write(honest.with_tensors(sent))
    return turn.write(honest)


def kept_back(state: dict[str, torch.Tensor], sent: dict, instead: dict) -> dict[str, torch.Tensor]:
    """The state after of a sparseloco miner whose file sent `sent` where its work gave `instead`: its error feedback
    keeps back what the file sent beyond (e − (decode(sent) − decode(instead))), so its tie-free state
    (strategies.SparseLoCoStrategy.tie_free_state) is its work's; other entries (and demo's momentum) as they are."""
    return {name: t - (decode_delta(sent[name[6:]]) - decode_delta(instead[name[6:]])).to(t)
            if name.startswith("error.") else t for name, t in state.items()}


def _thin(turn: Turn) -> bytes:
    """Honest work on the first half of each own page's rows: every page it was given moves, for half the compute."""
    return turn.write(turn.honest(page_rows=max(1, turn.dataset.manifest.rows_per_page // 2)))


def _unlinked(turn: Turn) -> bytes:
    """Honest work from a state its last file did not commit to (its own, nudged), which it puts when drawn: a
    made-up state that replays to its file, what a greedy file built on a crafted error feedback would need."""
    if turn.miner.own is not None:
        turn.miner.own = {name: t + 1e-3 if t.dtype == torch.float32 else t for name, t in turn.miner.own.items()}
    return turn.write(turn.honest())


def _malformed(turn: Turn) -> bytes:
    data = turn.write(turn.honest())
    return data[: len(data) // 2] + bytes(range(256))


@dataclass(frozen=True)
class Adversary:
    upload: Callable[[Turn], bytes | None] | None = None  # the file it puts (None: nothing)
    when: str = "mine"  # mine | public | close | scored
    mines: bool = False  # runs the honest miner step first, at the window's start
    remembers: bool = False  # keeps θ of the last four windows
    compute: float = 1.0  # honest miner-windows of compute a real attacker spends
    backdates: bool = False  # claims a time before the window opened for its file
    endpoint: str | None = None  # commits a hostile endpoint of this mode instead of its bucket (endpoints.py)
    honest_first: bool = False  # its first window is honest work (compute 1)
    open_under: tuple[str, ...] = ()  # strategies under which it still earns more than honest work: not yet countered
    spot_checked: bool = False  # a cheat only where the network spot-checks miners (without, it is honest work)
    strategies: tuple[str, ...] = ("demo", "sparseloco")  # the strategies it is defined under
    answers: str = "in time"  # a spot check's request for its state: "in time" (the window after), "late", "never"
    unseen: tuple[int, ...] = ()  # windows in which its bucket fails the validator's every read

    def compute_in(self, window: int) -> float:
        return 1.0 if self.honest_first and window == 0 else self.compute


KINDS: dict[str, Adversary] = {
    "honest": Adversary(mines=True),
    "sign_flip": Adversary(lambda turn: turn.write(_values(turn.honest(), lambda v: -v))),
    "scale": Adversary(scaled(10)),
    "noise": Adversary(_noise, compute=0.0),
    "copy": Adversary(_copy, when="public", compute=0.0),
    "replay": Adversary(_replay, compute=0.0, honest_first=True),
    "free_rider": Adversary(lambda turn: turn.write(_values(turn.honest(), torch.zeros_like)), compute=0.0),
    "wrong_data": Adversary(lambda turn: turn.write(turn.honest(pages=turn.dataset.miner_pages(
        turn.window, turn.miner.uid + 10_000, turn.hparams.pages_per_window)))),
    "lagging": Adversary(_lagging, remembers=True),
    "missing": Adversary(compute=0.0),
    "malformed": Adversary(_malformed, compute=0.0),
    "swap_after_score": Adversary(_swap, when="scored", mines=True),
    "backdate_copy": Adversary(_copy, when="public", compute=0.0, backdates=True),
    "late_combine": Adversary(_combine, when="close", compute=0.25, backdates=True),
    "sybil_mean": Adversary(_combine, when="public", compute=0.25),
    "teach_random": Adversary(_teach_random, compute=1.5),
    "lazy": Adversary(lambda turn: turn.write(turn.honest(pages=turn.own_pages()[:1])), compute=0.5),
    "thin": Adversary(_thin, compute=0.5, open_under=("demo", "sparseloco")),
    "majority_scale": Adversary(scaled(3)),
    "majority_shrink": Adversary(scaled(0.01)),
    "slow_endpoint": Adversary(compute=0.0, endpoint="trickle"),
    "unlinked": Adversary(_unlinked, spot_checked=True),
    "answers_late": Adversary(mines=True, spot_checked=True, answers="late"),
    "never_answers": Adversary(mines=True, spot_checked=True, answers="never"),
    "unseen_once": Adversary(mines=True, spot_checked=True, unseen=(1,)),
    "steer": Adversary(_steer, spot_checked=True, strategies=("sparseloco",)),
    "steer_unpaid": Adversary(functools.partial(_steer, pays=False), spot_checked=True, strategies=("sparseloco",)),
    "steer_carried": Adversary(_steer_carried, spot_checked=True, strategies=("sparseloco",)),
    "steer_fresh": Adversary(functools.partial(_steer, fresh_every_window=True), spot_checked=True,
                             strategies=("sparseloco",)),
    "gradient": Adversary(_gradient, open_under=("sparseloco",)),
    "gradient_sign": Adversary(_gradient_sign, open_under=("sparseloco",)),
}
ADVERSARIES = tuple(kind for kind in KINDS if kind != "honest")
OPEN = {kind: adversary.open_under for kind, adversary in KINDS.items() if adversary.open_under}
SPOT_CHECKED = tuple(kind for kind, adversary in KINDS.items() if adversary.spot_checked)


def parse_adversaries(text: str) -> dict[str, int]:
    """"sign_flip:1,copy:2" -> {"sign_flip": 1, "copy": 2}; unknown kinds are refused."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, count = part.partition(":")
        if kind not in ADVERSARIES:
            raise ValueError(f"unknown adversary {kind!r}; choose from {', '.join(ADVERSARIES)}")
        counts[kind] = counts.get(kind, 0) + int(count or 1)
    return counts
