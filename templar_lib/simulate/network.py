"""A whole network in-process: a validator (uid 0), N miners and an aggregator running the real role functions over
local buckets and a LocalChain whose clock moves block by block, with cheating miners of the kinds in adversaries.py.

The roles run when templar_lib.schedule says, as the sensor and the resident node run them: each window the watch
and the miners start, the validator's watch looks at every bucket at every block, cheats act when a real one would
(with the honest miners, once their uploads are public, after the close, after the scoring), and once the window
closes the validator scores it, the aggregator combines what was scored and every node replays the result
(roles.aggregator.advance_window), so the next window trains and scores on the network's θ.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from templar_lib import schedule, spot_check
from templar_lib.buckets import Bucket, LocalBucket
from templar_lib.chain import LocalChain
from templar_lib.checkpoints import ModelState
from templar_lib.commitments import BucketCommitment, PeerBuckets, peer_buckets, register_local_network
from templar_lib.data import Dataset
from templar_lib.hparams import HParams
from templar_lib.model import build_model
from templar_lib.ratings import Ratings
from templar_lib.roles import (EvaluationOptions, ValidatorResult, advance_window, aggregator_step, miner_step,
                               validator_step)
from templar_lib.roles.miner import continued
from templar_lib.roles.spot_checks import Records, kept_windows, validator_records
from templar_lib.simulate.adversaries import KINDS, Miner, Turn, backdate
from templar_lib.simulate.endpoints import HostileServer
from templar_lib.state import StateStore
from templar_lib.training import held_out_loss
from templar_lib.transport import Limits
from templar_lib.watch import Watch
from templar_lib.strategies import strategy_of
from templar_lib.wire import gradient_key
from templar_lib.wire.aggregation import CHANGED_AFTER_SCORING

log = logging.getLogger(__name__)
PUBLIC_OFFSET = 2  # the block of a window at which the honest uploads are public (after the watch saw them)
# a simulated window lasts seconds, not 84 s: production's limits scaled down, loopback allowed (a local network)
SIMULATED_LIMITS = Limits(connect_timeout=1.0, read_timeout=1.0, grace=0.5, allow_private=True)
SIMULATED_POLL_SECONDS = 1.0


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
    compute: dict[int, float]  # honest miner-windows each uid spent
    refused: dict[int, str]  # listed uids the aggregator left out
    seconds: float
    close_to_next_seconds: float  # after the close: validator + aggregator + replay, what miners of w + 1 wait for
    role_seconds: dict[str, float]  # watch (every poll of the window), validator, aggregator (with the replay)
    scored: list[int]  # the uids the validator scored (sampled, when more were seen than it scores)


@dataclass(frozen=True)
class NetworkReport:
    roles: dict[int, str]  # uid -> "honest" | adversary kind (the validator is not listed)
    initial_held_out_loss: float
    windows: list[NetworkWindow]

    @property
    def final_weights(self) -> dict[int, float]:
        return self.windows[-1].weights if self.windows else {}

    def to_json(self) -> str:
        return json.dumps({"roles": self.roles, "initial_held_out_loss": self.initial_held_out_loss,
                           "windows": [asdict(w) for w in self.windows]}, indent=1)


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
    store = StateStore(home / "state", keep_windows=kept_windows(hparams.sync_max_lag + 2, hparams))
    seen = LocalBucket(home / "validator")
    bpw = hparams.blocks_per_window
    chain = LocalChain(home / "chain.sqlite", clock="manual", blocks_per_window=bpw, secret=f"simulation-{seed}")
    validator_uid, uids = register_local_network(chain, miners, gradients.url)
    kinds = ["honest"] * (miners - sum(adversaries.values()))
    for kind, count in sorted(adversaries.items()):
        kinds += [kind] * count
    order = torch.randperm(miners, generator=torch.Generator().manual_seed(seed)).tolist()
    roles = {uids[position]: kinds[index] for index, position in enumerate(order)}

    with contextlib.ExitStack() as stack:
        for server in _hostile_endpoints(chain, roles):
            stack.callback(server.close)
        model = build_model(preset, seed=seed, vocab_size=data.vocab_size)
        state = ModelState(0, 0, {n: p.detach().clone() for n, p in model.named_parameters()})
        store.save_model(state, background=False)  # θ_0, which a spot check of window 0 replays on
        initial_loss = held_out_loss(model, data, batch_size=hparams.batch_size)
        nodes = {uid: Miner(uid, kind) for uid, kind in roles.items()}
        peers = peer_buckets(chain.commitments(), allow_local=True, limits=SIMULATED_LIMITS)
        options = EvaluationOptions(random_page_count=random_page_count)
        validator_chain = chain.as_uid(validator_uid)
        ratings, report, banned = Ratings(), [], {}
        watches: dict[int, Watch] = {}
        honest: dict[int, tuple[list[float], dict[int, bytes]]] = {}  # window -> (honest losses, honest files)
        validated: dict[int, ValidatorResult] = {}
        started: dict[int, float] = {}
        cursor = schedule.initial_cursor(0)

        def reports(window: int) -> Records:  # the validators' reports of a window, as a node reads them
            return validator_records(window, metagraph=chain.metagraph(), peers=peers, shared=gradients)

        def turn(window: int, uid: int) -> Turn:
            return Turn(window, nodes[uid], model, state, data, hparams, chain, gradients, honest[window][1],
                        validator_uid)

        def act(window: int, when: str) -> None:
            """Every cheat whose moment this is uploads what it uploads."""
            for uid in sorted(nodes):
                behaviour = KINDS[nodes[uid].kind]
                if behaviour.when != when or behaviour.upload is None:
                    continue
                upload = behaviour.upload(turn(window, uid))
                if upload is not None:
                    gradients.put(gradient_key(window, uid), upload)
                    if behaviour.backdates:
                        backdate(turn(window, uid), 30.0)

        def answer(window: int) -> None:
            """Every miner drawn for a spot check of `window` puts the states around the work it committed to (a
            cheat its real ones: the replay of its honest work is then not its file); one that answers late puts
            those of window − 1 instead (a window late: its node was down), one that never answers nothing."""
            for uid, node in sorted(nodes.items()):
                asked = window - {"in time": 0, "late": 1, "never": window + 1}[KINDS[node.kind].answers]
                seed = chain.block_hash((asked + 1) * bpw) if asked >= 0 else None
                if seed is not None and asked in node.transitions:
                    before, after = node.transitions[asked]
                    spot_check.answer(asked, uid, seed=seed, before=before, after=after, bucket=gradients,
                                      hparams=hparams)

        def mine(window: int) -> None:
            started[window] = time.perf_counter()
            losses, files = [], {}
            honest[window] = (losses, files)
            answer(window - 1)  # as a miner node does, before the next window's work updates its state
            # as a node does, where checks are on: a state the validator did not record is not carried on
            records = reports(window - 1) if hparams.spot_check_probability > 0 and window > 0 else None
            expected = strategy_of(hparams).state_shapes(dict(model.named_parameters()))
            for uid in sorted(nodes):
                node, behaviour = nodes[uid], KINDS[nodes[uid].kind]
                if behaviour.remembers:  # keep the last four θ
                    node.history = node.history[-3:] + [{n: p.detach().clone() for n, p in model.named_parameters()}]
                if behaviour.mines:
                    node.state, zeroed = continued(node.state, uid, window, store=store, gradients=gradients,
                                                   hparams=hparams, expected=expected, records=records)
                    if zeroed is not None:
                        log.info("uid %d, window %d: %s: starting from zeros", uid, window, zeroed)
                    before = {n: t.clone() for n, t in node.state.items()} if node.state is not None else None
                    result = miner_step(window, uid, model=model, step=state.step, state=node.state, dataset=data,
                                        gradients=gradients, hparams=hparams)
                    node.state = result.state
                    node.record(window, before, result.state)
                    if node.kind == "honest":
                        losses.append(result.loss)
                        files[uid] = gradients.get(gradient_key(window, uid))
            act(window, "mine")

        closed: dict[int, float] = {}
        timings: dict[int, dict[str, float]] = {}

        @contextlib.contextmanager
        def timed(role: str, window: int):
            began = time.perf_counter()
            yield
            spent = timings.setdefault(window, {"watch": 0.0, "validator": 0.0, "aggregator": 0.0})
            spent[role] += time.perf_counter() - began

        def validate(window: int) -> None:
            nonlocal ratings
            closed[window] = time.perf_counter()
            with timed("validator", window):
                result = validator_step(window, chain=validator_chain, model=model, state=state, dataset=data,
                                        watch=watches.pop(window), own_bucket=gradients, ratings=ratings,
                                        hparams=hparams, banned=banned, history=store.parameters_at, options=options,
                                        others=reports)
            ratings, validated[window] = result.ratings, result
            act(window, "scored")

        def aggregate(window: int) -> None:
            nonlocal state, banned
            with timed("aggregator", window):
                result = aggregator_step(window, state=state, chain=chain, peers=peers, aggregator=aggregator,
                                         hparams=hparams, peers_list=gradients)
                advance = advance_window(window, state=state, aggregator=aggregator, store=store, model=model,
                                         dataset=data, hparams=hparams)
            banned = {uid: why for uid, why in result.skipped.items() if why.startswith(CHANGED_AFTER_SCORING)}
            state = advance.state
            validation = validated.pop(window)
            evaluation = validation.evaluation
            losses, _ = honest.pop(window)
            entry = NetworkWindow(
                window=window, miner_loss=sum(losses) / max(1, len(losses)), random_loss=evaluation.random_loss,
                held_out_loss=advance.held_out_loss, scores={u: s.score for u, s in evaluation.scores.items()},
                reasons={u: s.reason for u, s in evaluation.scores.items() if s.reason},
                ordinals={u: r.ordinal for u, r in ratings.by_uid.items()},
                binary_ma={u: r.binary_ma for u, r in ratings.by_uid.items()}, final=ratings.final_scores(),
                weights=dict(validation.weights or {}), peers=evaluation.peers,
                compute={uid: KINDS[node.kind].compute_in(window) for uid, node in nodes.items()},
                refused=result.skipped,
                seconds=time.perf_counter() - started.pop(window),
                close_to_next_seconds=time.perf_counter() - closed.pop(window), role_seconds=timings.pop(window),
                scored=sorted(u for u, s in evaluation.scores.items() if s.losses is not None))
            report.append(entry)
            log.info("network window %d: miner loss %.4f, held-out %.4f, peers %s, %.1fs", window, entry.miner_loss,
                     entry.held_out_loss, entry.peers, entry.seconds)
            if on_window is not None:
                on_window(entry)

        def watch(window: int) -> None:
            unseen = {uid for uid, node in nodes.items() if window in KINDS[node.kind].unseen}
            seeing = PeerBuckets({uid: b for uid, b in peers.buckets.items() if uid not in unseen}, peers.skipped | {
                uid: "its bucket failed every read this window (simulated)" for uid in unseen})
            watches[window] = Watch(window, blocks_per_window=bpw, state=seen, peers=seeing, uids=uids,
                                    max_bytes=limit, poll_timeout=SIMULATED_POLL_SECONDS)

        limit = strategy_of(hparams).gradient_limit({n: tuple(p.shape) for n, p in model.named_parameters()})
        runs = {"watch": watch, "miner": mine, "validator": validate, "aggregator": aggregate}
        for block in range(windows * bpw + 1):
            chain.advance_to_block(block)
            window, offset = divmod(block, bpw)
            if offset == 0 and window >= 1:
                if window - 1 in watches:
                    watches[window - 1].saw_close(block)
                act(window - 1, "close")  # too late: the watch of window − 1 stopped looking at its closing block
            if offset == PUBLIC_OFFSET and window in honest:
                act(window, "public")
            for role, planned in schedule.due_runs(window, cursor):
                if planned < windows:
                    runs[role](planned)
                cursor = schedule.advanced(cursor, [(role, planned)])
            if window in watches and offset in (0, PUBLIC_OFFSET, bpw - 1):  # after each kind of upload
                with timed("watch", window):
                    watches[window].poll(block)
        return NetworkReport(roles=dict(sorted(roles.items())), initial_held_out_loss=initial_loss, windows=report)


def _hostile_endpoints(chain: LocalChain, roles: dict[int, str]) -> list[HostileServer]:
    """A loopback endpoint for every miner of a kind that commits one, half of them trickling, half silent."""
    servers = []
    for index, uid in enumerate(uid for uid, kind in sorted(roles.items()) if KINDS[kind].endpoint):
        servers.append(HostileServer("silent" if index % 2 else KINDS[roles[uid]].endpoint))
        chain.as_uid(uid).commit(BucketCommitment(f"s3://grads?endpoint_url={servers[-1].url}").encode())
    return servers
