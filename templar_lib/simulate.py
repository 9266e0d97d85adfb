"""In-process networks, without Dagster: the bare training core (`train`) and a whole network with cheating
miners on a LocalChain (`run_network`, used by `templar simulate` and the adversary suite).

`train`, the training core:

Each window w, with lr = learning_rate_at(w):
    every miner u:  X_u = pages_for(w, u)  ->  (loss, g_u) on θ_w
    compressed:     s_u = ErrorFeedback_u.step(g_u, lr), sent through the wire format (write + validated read)
                    θ_{w+1} = outer_step(θ_w, sign(aggregate(s_1..s_N)))
    dense:          θ_{w+1} = outer_step(θ_w, sign(mean_u g_u))         (baseline: no compression, same optimiser)
and the held-out loss of θ_{w+1} is measured on the dataset's held-out pages.

Used by the convergence smoke test and `templar train` (`--mode dense` is the uncompressed baseline).

`run_network`: a validator (uid 0), N miners and an aggregator running the real role functions over local buckets
and a LocalChain with a manual clock, with adversaries of the kinds in ADVERSARIES; every honest node replays the
published aggregation and the replay is checked against the aggregator's θ every window.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from templar_lib.aggregation import apply_aggregation_, combine_peers, learning_rate_at, outer_step_
from templar_lib.buckets import Bucket
from templar_lib.data import load_pages, pages_for, read_manifest
from templar_lib.hparams import HParams
from templar_lib.model import build_model
from templar_lib.roles.miner import new_feedback
from templar_lib.training import evaluate_loss, loss_and_gradients
from templar_lib.wire import Gradient, read_gradient, write_gradient

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowReport:
    window: int
    lr: float
    train_loss: float  # mean over miners, on θ_w and each miner's own pages
    held_out_loss: float  # θ_{w+1} on the held-out pages
    gradient_bytes: int  # total wire bytes of this window's gradients (0 when dense)
    seconds: float


@dataclass(frozen=True)
class TrainingReport:
    mode: str
    initial_held_out_loss: float
    windows: list[WindowReport] = field(default_factory=list)

    @property
    def final_held_out_loss(self) -> float:
        return self.windows[-1].held_out_loss if self.windows else self.initial_held_out_loss


def train(dataset: Bucket, *, miners: int, windows: int, hparams: HParams, mode: str = "compressed",
          preset: str = "tiny", seed: int = 0, held_out_pages: int = 8,
          on_window: Callable[[WindowReport], None] | None = None) -> TrainingReport:
    """Run `windows` outer steps of `miners` honest miners from a fresh model. mode: "compressed" | "dense"."""
    if mode not in ("compressed", "dense"):
        raise ValueError(f"mode must be 'compressed' or 'dense', not {mode!r}")
    manifest = read_manifest(dataset)
    model = build_model(preset, seed=seed, vocab_size=manifest.vocab_size)
    parameters = dict(model.named_parameters())
    shapes = {name: tuple(p.shape) for name, p in parameters.items()}
    held_out = load_pages(dataset, manifest, manifest.held_out[:held_out_pages])
    feedback = {uid: new_feedback(parameters, hparams) for uid in range(miners)}
    report = TrainingReport(mode, evaluate_loss(model, held_out, hparams.batch_size))
    for window in range(windows):
        started = time.perf_counter()
        lr = learning_rate_at(window, hparams)
        losses, sent, dense_sum, wire_bytes = [], {}, None, 0
        for uid in range(miners):
            tokens = load_pages(dataset, manifest, pages_for(window, uid, hparams.pages_per_window,
                                                             manifest.train_pages))
            loss, gradients = loss_and_gradients(model, tokens, hparams.batch_size)
            losses.append(loss)
            if mode == "dense":
                dense_sum = {n: g.clone() for n, g in gradients.items()} if dense_sum is None else \
                    {n: dense_sum[n].add_(g) for n, g in gradients.items()}
                continue
            data = write_gradient(Gradient(window, uid, feedback[uid].step(gradients, lr=lr),
                                           hparams.protocol_hash()), version=hparams.gradient_format,
                                  values=hparams.gradient_value_dtype)
            wire_bytes += len(data)
            sent[uid] = read_gradient(data, window=window, uid=uid, shapes=shapes, topk=hparams.topk_compression,
                                      target_chunk=hparams.target_chunk,
                                      hparams_hash=hparams.protocol_hash()).tensors
        if mode == "compressed":
            aggregation = combine_peers(window, window, lr, sent, list(shapes), hparams.protocol_hash())
            apply_aggregation_(parameters, aggregation, weight_decay=hparams.weight_decay)
        else:
            signs = {n: torch.sign(g) for n, g in dense_sum.items()}  # sign(mean) == sign(sum)
            outer_step_(parameters, signs, lr=lr, weight_decay=hparams.weight_decay)
        entry = WindowReport(window, lr, sum(losses) / len(losses), evaluate_loss(model, held_out, hparams.batch_size),
                             wire_bytes, time.perf_counter() - started)
        report.windows.append(entry)
        log.info("%s window %d: lr %.2e train %.4f held-out %.4f (%.1fs)", mode, window, lr, entry.train_loss,
                 entry.held_out_loss, entry.seconds)
        if on_window is not None:
            on_window(entry)
    return report


# ==================================================================================================== network
ADVERSARIES = ("sign_flip", "scale", "noise", "copy", "replay", "free_rider", "wrong_data", "lagging", "missing",
               "malformed")


@dataclass(frozen=True)
class NetworkWindow:
    window: int
    miner_loss: float  # mean loss of honest miners on their own pages, θ_w
    random_loss: float  # validator's random pages, θ_w
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
        import json

        return json.dumps({"roles": self.roles, "windows": [_window_json(w) for w in self.windows]}, indent=1)


def _window_json(entry: NetworkWindow) -> dict:
    from dataclasses import asdict

    return asdict(entry)


def parse_adversaries(text: str) -> dict[str, int]:
    """"sign_flip:1,copy:2" -> {"sign_flip": 1, "copy": 2}; unknown kinds are refused."""
    counts: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, count = part.partition(":")
        if kind not in ADVERSARIES:
            raise ValueError(f"unknown adversary {kind!r}; choose from {', '.join(ADVERSARIES)}")
        counts[kind] = counts.get(kind, 0) + int(count or 1)
    return counts


class _Miner:
    """One simulated miner: honest, or cheating in the way its `kind` names."""

    def __init__(self, uid: int, kind: str, parameters, hparams: HParams) -> None:
        self.uid, self.kind = uid, kind
        self.feedback = new_feedback(parameters, hparams)
        self.kept: Gradient | None = None  # replay: the one gradient it keeps re-sending
        self.history: list[dict] = []  # lagging: θ of past windows


def register_local_network(chain, miners: int, gradients_url: str) -> tuple[int, list[int]]:
    """Register a validator (with permit) and `miners` miners on a LocalChain, each miner committing the local
    gradients bucket; idempotent (hotkeys are fixed names). Returns (validator uid, miner uids)."""
    from templar_lib.gather import BucketCommitment

    validator_uid = chain.register(hotkey="validator", stake=1000.0, validator_permit=True)
    uids = [chain.register(hotkey=f"miner-{index}") for index in range(miners)]
    for uid in uids:
        chain.as_uid(uid).commit(BucketCommitment(gradients_url).encode())
    return validator_uid, uids


def run_network(dataset: Bucket, home, *, miners: int, windows: int, adversaries: dict[str, int] | None = None,
                hparams: HParams, seed: int = 0, preset: str = "tiny", random_page_count: int | None = None,
                on_window: Callable[[NetworkWindow], None] | None = None) -> NetworkReport:
    """A whole network in-process: one validator (uid 0), `miners` miners (uids 1..N, some adversarial) and an
    aggregator, on a LocalChain with a manual clock and local buckets under `home`."""
    from pathlib import Path

    from templar_lib.buckets import LocalBucket
    from templar_lib.chain import LocalChain
    from templar_lib.checkpoints import ModelState, catch_up
    from templar_lib.gather import peer_buckets
    from templar_lib.model import load_parameters_, parameters_of
    from templar_lib.ratings import Ratings
    from templar_lib.roles import aggregator_step, miner_step, validator_step
    from templar_lib.roles.miner import compute_gradient
    from templar_lib.wire import gradient_key

    home = Path(home)
    adversaries = dict(adversaries or {})
    if sum(adversaries.values()) > miners:
        raise ValueError("more adversaries than miners")
    manifest = read_manifest(dataset)
    gradients, aggregator = LocalBucket(home / "gradients"), LocalBucket(home / "aggregator")
    chain = LocalChain(home / "chain.sqlite", clock="manual", blocks_per_window=hparams.blocks_per_window)
    validator_uid, uids = register_local_network(chain, miners, gradients.url)
    kinds = ["honest"] * (miners - sum(adversaries.values()))
    for kind, count in sorted(adversaries.items()):
        kinds += [kind] * count
    order = torch.randperm(miners, generator=torch.Generator().manual_seed(seed)).tolist()
    roles = {uids[position]: kinds[index] for index, position in enumerate(order)}

    model = build_model(preset, seed=seed, vocab_size=manifest.vocab_size)
    state = ModelState(0, 0, {n: p.detach().clone() for n, p in model.named_parameters()})
    nodes = {uid: _Miner(uid, kind, parameters_of(model), hparams) for uid, kind in roles.items()}
    buckets, bad_commitments = peer_buckets(chain.commitments(), allow_local=True)
    ratings, report = Ratings(), []
    for window in range(windows):
        started = time.perf_counter()
        chain.advance_to_block(window * hparams.blocks_per_window)
        honest_losses, honest_sent = [], {}
        for uid in sorted(nodes):
            node = nodes[uid]
            if node.kind in ("honest", "copy"):
                result = miner_step(window, uid, model=model, step=state.step, feedback=node.feedback,
                                    dataset=dataset, manifest=manifest, gradients=gradients, hparams=hparams)
                if node.kind == "honest":
                    honest_losses.append(result.loss)
                    honest_sent[uid] = gradients.get(gradient_key(window, uid))
            if node.kind == "lagging":  # it trains on θ three windows old: keep the last four
                node.history = node.history[-3:] + [{n: p.detach().clone() for n, p in model.named_parameters()}]
        for uid in sorted(nodes):
            _misbehave(nodes[uid], window, model=model, state=state, dataset=dataset, manifest=manifest,
                       gradients=gradients, hparams=hparams, honest_sent=honest_sent, compute=compute_gradient)
        chain.advance(hparams.blocks_per_window)  # window w closes: uploads are final
        validation = validator_step(window, validator_uid=validator_uid, chain=chain.as_uid(validator_uid),
                                    model=model, step=state.step, dataset=dataset, manifest=manifest,
                                    peer_buckets=buckets, own_bucket=gradients, ratings=ratings, hparams=hparams,
                                    random_page_count=random_page_count, skipped_commitments=bad_commitments)
        ratings = validation.ratings
        _, following = aggregator_step(window, state=state, uids=uids, peer_buckets=buckets, aggregator=aggregator,
                                       hparams=hparams, peers_bucket=gradients,
                                       time_range=None, skipped_commitments=bad_commitments)
        # every honest node replays the published aggregation: the same bits as the aggregator's θ_{w+1}
        state = catch_up(state, aggregator, window + 1, hparams=hparams)
        if not all(torch.equal(state.parameters[n], following.parameters[n]) for n in state.parameters):
            raise RuntimeError(f"window {window}: replayed θ differs from the aggregator's")
        load_parameters_(model, state.parameters)
        evaluation = validation.evaluation
        entry = NetworkWindow(
            window=window, miner_loss=sum(honest_losses) / max(1, len(honest_losses)),
            random_loss=evaluation.random_loss,
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


def _misbehave(node: _Miner, window: int, *, model, state, dataset: Bucket, manifest, gradients: Bucket,
               hparams: HParams, honest_sent: dict[int, bytes], compute) -> None:
    """Upload what an adversary of `node.kind` uploads for `window` (honest miners and `missing` do nothing here)."""
    import copy as copy_module

    from templar_lib.compression import Sparse
    from templar_lib.wire import gradient_key

    kind, uid = node.kind, node.uid
    key = gradient_key(window, uid)
    generator = torch.Generator().manual_seed(window * 1000 + uid)

    def honest(pages_uid: int = uid, on_model=model, step: int = state.step) -> Gradient:
        tokens = load_pages(dataset, manifest, pages_for(window, pages_uid, hparams.pages_per_window,
                                                         manifest.train_pages))
        return compute(window, uid, model=on_model, step=step, feedback=node.feedback, tokens=tokens,
                       hparams=hparams)[1]

    def with_values(gradient: Gradient, function) -> Gradient:
        tensors = {n: Sparse(s.idx, function(s.vals), s.shape, s.chunk) for n, s in gradient.tensors.items()}
        return Gradient(gradient.window, gradient.uid, tensors, gradient.hparams_hash, gradient.model_hash)

    if kind in ("honest", "missing"):
        return
    if kind == "sign_flip":
        gradients.put(key, write_gradient(with_values(honest(), lambda v: -v)))
    elif kind == "scale":
        gradients.put(key, write_gradient(with_values(honest(), lambda v: v * 10)))
    elif kind == "noise":
        gradient = honest()
        norm = float(torch.sqrt(sum(s.vals.pow(2).sum() for s in gradient.tensors.values())))
        noise = {n: torch.randn(s.vals.shape, generator=generator) for n, s in gradient.tensors.items()}
        scale = norm / float(torch.sqrt(sum(v.pow(2).sum() for v in noise.values())))
        tensors = {n: Sparse(s.idx, noise[n] * scale, s.shape, s.chunk) for n, s in gradient.tensors.items()}
        gradients.put(key, write_gradient(Gradient(window, uid, tensors, gradient.hparams_hash, gradient.model_hash)))
    elif kind == "copy":
        if honest_sent:  # re-label the first honest miner's file as its own, with a whisper of noise
            victim = min(honest_sent)
            source = read_gradient(honest_sent[victim], window=window, uid=victim,
                                   shapes={n: tuple(p.shape) for n, p in model.named_parameters()})
            relabelled = Gradient(window, uid, source.tensors, source.hparams_hash, source.model_hash)
            gradients.put(key, write_gradient(with_values(relabelled, lambda v: v * (1 + 1e-4))))
    elif kind == "replay":
        if node.kept is None:
            node.kept = honest()
        replayed = Gradient(window, uid, node.kept.tensors, node.kept.hparams_hash,
                            honest_model_hash(model))  # a careful replayer even claims the current θ
        gradients.put(key, write_gradient(replayed))
    elif kind == "free_rider":
        gradients.put(key, write_gradient(with_values(honest(), lambda v: torch.zeros_like(v))))
    elif kind == "wrong_data":
        gradients.put(key, write_gradient(honest(pages_uid=uid + 10_000)))
    elif kind == "lagging":
        stale = copy_module.deepcopy(model)
        lag = min(3, len(node.history) - 1)
        from templar_lib.model import load_parameters_

        load_parameters_(stale, node.history[-1 - lag])
        gradients.put(key, write_gradient(honest(on_model=stale, step=max(0, state.step - lag))))
    elif kind == "malformed":
        data = write_gradient(honest())
        gradients.put(key, data[: len(data) // 2] + bytes(range(256)))


def honest_model_hash(model) -> str:
    from templar_lib.checkpoints import model_fingerprint
    from templar_lib.model import parameters_of

    return model_fingerprint(parameters_of(model))
