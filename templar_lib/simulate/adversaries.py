"""The cheating miners of a simulated network: a table from kind to behaviour.

Each kind says whether the miner first runs the honest miner step (its error feedback then advances as an honest
miner's, and its honest file is uploaded), whether it keeps θ of past windows, and what file it then uploads over it
(or nothing):

    honest      the honest file only
    sign_flip   the honest gradient negated               scale       ×10
    noise       Gaussian noise of the honest norm          copy        another uid's file, relabelled (+1e-4)
    replay      its first gradient, sent every window      free_rider  zeros
    wrong_data  trained on pages that are not its own      lagging     trained on θ three windows old
    missing     nothing                                    malformed   half a file and garbage
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from templar_lib.checkpoints import ModelState, model_fingerprint
from templar_lib.compression import Sparse
from templar_lib.data import Dataset
from templar_lib.error_feedback import ErrorFeedback
from templar_lib.hparams import HParams
from templar_lib.model import load_parameters_, parameters_of
from templar_lib.roles.miner import compute_gradient, new_feedback
from templar_lib.wire import Gradient, read_gradient, write_gradient


@dataclass
class Miner:
    """One simulated miner's own state."""

    uid: int
    kind: str
    feedback: ErrorFeedback
    kept: Gradient | None = None  # replay: the one gradient it keeps re-sending
    history: list[dict[str, torch.Tensor]] = field(default_factory=list)  # lagging: θ of past windows

    @classmethod
    def start(cls, uid: int, kind: str, parameters, hparams: HParams) -> Miner:
        return cls(uid, kind, new_feedback(parameters, hparams))


@dataclass(frozen=True)
class Turn:
    """What a miner sees when it uploads for a window: θ_w (in `model`), the pages and what honest miners sent."""

    window: int
    miner: Miner
    model: torch.nn.Module
    state: ModelState
    dataset: Dataset
    hparams: HParams
    honest_sent: dict[int, bytes]  # uid -> the file an honest miner uploaded this window

    def honest(self, pages_uid: int | None = None, on_model: torch.nn.Module | None = None,
               step: int | None = None) -> Gradient:
        """The gradient an honest miner would send (on other pages, another θ or step when given); folds into this
        miner's error feedback like an honest one."""
        pages = self.dataset.miner_pages(self.window, self.miner.uid if pages_uid is None else pages_uid,
                                         self.hparams.pages_per_window)
        return compute_gradient(self.window, self.miner.uid, model=on_model or self.model,
                                step=self.state.step if step is None else step, feedback=self.miner.feedback,
                                tokens=self.dataset.tokens(pages), hparams=self.hparams)[1]

    @property
    def generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.window * 1000 + self.miner.uid)


def _values(gradient: Gradient, function: Callable[[torch.Tensor], torch.Tensor]) -> Gradient:
    return gradient.with_tensors({n: Sparse(s.idx, function(s.vals), s.shape, s.chunk)
                                  for n, s in gradient.tensors.items()})


def _noise(turn: Turn) -> bytes:
    gradient = turn.honest()
    norm = float(torch.sqrt(sum(s.vals.pow(2).sum() for s in gradient.tensors.values())))
    noise = {n: torch.randn(s.vals.shape, generator=turn.generator) for n, s in gradient.tensors.items()}
    scale = norm / float(torch.sqrt(sum(v.pow(2).sum() for v in noise.values())))
    return write_gradient(gradient.with_tensors({n: Sparse(s.idx, noise[n] * scale, s.shape, s.chunk)
                                                 for n, s in gradient.tensors.items()}))


def _copy(turn: Turn) -> bytes | None:
    if not turn.honest_sent:
        return None
    victim = min(turn.honest_sent)  # the first honest miner's file, re-labelled as its own, with a whisper of noise
    shapes = {n: tuple(p.shape) for n, p in turn.model.named_parameters()}
    source = read_gradient(turn.honest_sent[victim], window=turn.window, uid=victim, shapes=shapes)
    return write_gradient(_values(source.with_tensors(source.tensors, uid=turn.miner.uid), lambda v: v * (1 + 1e-4)))


def _replay(turn: Turn) -> bytes:
    if turn.miner.kept is None:
        turn.miner.kept = turn.honest()
    # a careful replayer even claims the current θ
    return write_gradient(turn.miner.kept.with_tensors(turn.miner.kept.tensors, window=turn.window,
                                                       model_hash=model_fingerprint(parameters_of(turn.model))))


def _lagging(turn: Turn) -> bytes:
    stale = copy.deepcopy(turn.model)
    lag = min(3, len(turn.miner.history) - 1)
    load_parameters_(stale, turn.miner.history[-1 - lag])
    return write_gradient(turn.honest(on_model=stale, step=max(0, turn.state.step - lag)))


def _malformed(turn: Turn) -> bytes:
    data = write_gradient(turn.honest())
    return data[: len(data) // 2] + bytes(range(256))


@dataclass(frozen=True)
class Adversary:
    upload: Callable[[Turn], bytes | None] | None = None  # the file it puts after the honest step (None: nothing)
    mines: bool = False  # runs the honest miner step first
    remembers: bool = False  # keeps θ of the last four windows


KINDS: dict[str, Adversary] = {
    "honest": Adversary(mines=True),
    "sign_flip": Adversary(lambda turn: write_gradient(_values(turn.honest(), lambda v: -v))),
    "scale": Adversary(lambda turn: write_gradient(_values(turn.honest(), lambda v: v * 10))),
    "noise": Adversary(_noise),
    "copy": Adversary(_copy, mines=True),
    "replay": Adversary(_replay),
    "free_rider": Adversary(lambda turn: write_gradient(_values(turn.honest(), torch.zeros_like))),
    "wrong_data": Adversary(lambda turn: write_gradient(turn.honest(pages_uid=turn.miner.uid + 10_000))),
    "lagging": Adversary(_lagging, remembers=True),
    "missing": Adversary(),
    "malformed": Adversary(_malformed),
}
ADVERSARIES = tuple(kind for kind in KINDS if kind != "honest")


def parse_adversaries(text: str) -> dict[str, int]:
    """"sign_flip:1,copy:2" -> {"sign_flip": 1, "copy": 2}; unknown kinds are refused."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, count = part.partition(":")
        if kind not in ADVERSARIES:
            raise ValueError(f"unknown adversary {kind!r}; choose from {', '.join(ADVERSARIES)}")
        counts[kind] = counts.get(kind, 0) + int(count or 1)
    return counts
