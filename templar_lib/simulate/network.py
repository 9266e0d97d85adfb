"""A whole network in-process: a validator (uid 0), N miners and an aggregator running the real role functions over
local buckets and a LocalChain with a manual clock, with cheating miners of the kinds in adversaries.py. The
aggregator node advances θ by replaying the aggregation it published (roles.aggregator.advance_window), as every node
does, so the miners and the validator of the next window train and score on the network's θ.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from templar_lib.buckets import Bucket, LocalBucket
from templar_lib.chain import LocalChain
from templar_lib.checkpoints import ModelState
from templar_lib.commitments import peer_buckets, register_local_network
from templar_lib.data import Dataset
from templar_lib.hparams import HParams
from templar_lib.model import build_model, parameters_of
from templar_lib.ratings import Ratings
from templar_lib.roles import EvaluationOptions, advance_window, aggregator_step, miner_step, validator_step
from templar_lib.simulate.adversaries import KINDS, Miner, Turn
from templar_lib.state import StateStore
from templar_lib.wire import gradient_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkWindow:
    window: int
    miner_loss: float  # mean loss of honest miners on their own pages, θ_w
    random_loss: float  # validator's random pages, θ_w
    held_out_loss: float  # θ_{w+1} on the held-out pages
    scores: dict[int, float]
    reasons: dict[int, str]
    ordinals: dict[int, float]
    binary_ma: dict[int, float]
    final: dict[int, float]
    weights: dict[int, float]
    peers: list[int]
    seconds: float


@dataclass(frozen=True)
class NetworkReport:
    roles: dict[int, str]  # uid -> "honest" | adversary kind (the validator is not listed)
    windows: list[NetworkWindow]

    @property
    def final_weights(self) -> dict[int, float]:
        return self.windows[-1].weights if self.windows else {}

    def to_json(self) -> str:
        return json.dumps({"roles": self.roles, "windows": [asdict(w) for w in self.windows]}, indent=1)


def run_network(dataset: Bucket, home, *, miners: int, windows: int, adversaries: dict[str, int] | None = None,
                hparams: HParams, seed: int = 0, preset: str = "tiny", random_page_count: int | None = None,
                on_window: Callable[[NetworkWindow], None] | None = None) -> NetworkReport:
    """A whole network in-process: one validator (uid 0), `miners` miners (uids 1..N, some adversarial) and an
    aggregator, on a LocalChain with a manual clock and local buckets under `home`."""
    home = Path(home)
    adversaries = dict(adversaries or {})
    if sum(adversaries.values()) > miners:
        raise ValueError("more adversaries than miners")
    data = Dataset.open(dataset)
    gradients, aggregator = LocalBucket(home / "gradients"), LocalBucket(home / "aggregator")
    store = StateStore(home / "state", keep_windows=2)
    chain = LocalChain(home / "chain.sqlite", clock="manual", blocks_per_window=hparams.blocks_per_window)
    validator_uid, uids = register_local_network(chain, miners, gradients.url)
    kinds = ["honest"] * (miners - sum(adversaries.values()))
    for kind, count in sorted(adversaries.items()):
        kinds += [kind] * count
    order = torch.randperm(miners, generator=torch.Generator().manual_seed(seed)).tolist()
    roles = {uids[position]: kinds[index] for index, position in enumerate(order)}

    model = build_model(preset, seed=seed, vocab_size=data.vocab_size)
    state = ModelState(0, 0, {n: p.detach().clone() for n, p in model.named_parameters()})
    nodes = {uid: Miner.start(uid, kind, parameters_of(model), hparams) for uid, kind in roles.items()}
    peers = peer_buckets(chain.commitments(), allow_local=True)
    options = EvaluationOptions(random_page_count=random_page_count)
    ratings, report = Ratings(), []
    for window in range(windows):
        started = time.perf_counter()
        chain.advance_to_block(window * hparams.blocks_per_window)
        honest_losses, honest_sent = [], {}
        for uid in sorted(nodes):
            node, behaviour = nodes[uid], KINDS[nodes[uid].kind]
            if behaviour.mines:
                result = miner_step(window, uid, model=model, step=state.step, feedback=node.feedback,
                                    dataset=data, gradients=gradients, hparams=hparams)
                if node.kind == "honest":
                    honest_losses.append(result.loss)
                    honest_sent[uid] = gradients.get(gradient_key(window, uid))
            if behaviour.remembers:  # keep the last four θ
                node.history = node.history[-3:] + [{n: p.detach().clone() for n, p in model.named_parameters()}]
        for uid in sorted(nodes):
            upload = KINDS[nodes[uid].kind].upload
            turn = Turn(window, nodes[uid], model, state, data, hparams, honest_sent)
            data_bytes = upload(turn) if upload is not None else None
            if data_bytes is not None:
                gradients.put(gradient_key(window, uid), data_bytes)
        chain.advance(hparams.blocks_per_window)  # window w closes: uploads are final
        validation = validator_step(window, chain=chain.as_uid(validator_uid), model=model, state=state,
                                    dataset=data, peers=peers, own_bucket=gradients, ratings=ratings,
                                    hparams=hparams, options=options)
        ratings = validation.ratings
        aggregator_step(window, state=state, uids=uids, peers=peers, aggregator=aggregator, hparams=hparams,
                        peers_list=gradients)
        advance = advance_window(window, state=state, aggregator=aggregator, store=store, model=model, dataset=data,
                                 hparams=hparams)
        state = advance.state
        evaluation = validation.evaluation
        entry = NetworkWindow(
            window=window, miner_loss=sum(honest_losses) / max(1, len(honest_losses)),
            random_loss=evaluation.random_loss, held_out_loss=advance.held_out_loss,
            scores={u: s.score for u, s in evaluation.scores.items()},
            reasons={u: s.reason for u, s in evaluation.scores.items() if s.reason},
            ordinals={u: r.ordinal for u, r in ratings.by_uid.items()},
            binary_ma={u: r.binary_ma for u, r in ratings.by_uid.items()},
            final=ratings.final_scores(), weights=dict(validation.weights or {}), peers=evaluation.peers,
            seconds=time.perf_counter() - started)
        report.append(entry)
        log.info("network window %d: miner loss %.4f, peers %s, %.1fs", window, entry.miner_loss, entry.peers,
                 entry.seconds)
        if on_window is not None:
            on_window(entry)
    return NetworkReport(roles=dict(sorted(roles.items())), windows=report)
