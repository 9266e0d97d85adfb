"""Spot checks: a validator replays a drawn miner's window from the state the miner committed to, and bans the uid
when the replay does not give its file (docs/RELIABILITY.md, "Spot checks").

A score measures a file's gain applied alone at a fixed size, and a greedier direction than the protocol's update
gains more there (the `gradient` kinds: ≈ 5–7× an honest miner's pay per unit of compute under sparseloco), as does
half the work on every page (`thin`: ≈ 1.4×). Only a replay pays exactly the protocol's update. With
p = spot_check_probability > 0:

    commit   every gradient file of window w carries (digest(S_{w−1}), digest(S_w)), the miner's state (its
             strategy's state_shapes: demo's momentum; sparseloco's inner AdamW moments, step and error feedback)
             before and after w; a fresh start (no state) commits ZEROS before
    link     the validator records the commitment of every file it saw in w (its own copy; sampled for scoring or
             not) whose θ it can name (θ_w or one up to sync_max_lag steps before) and whose state before is ZEROS
             or the state after of the uid's recorded file of w − 1 (`linked`); a file it scores that is not
             linked scores 0 (a state no seen file committed to); an unlinked file is not recorded, so the uid's
             next file must start fresh: a miner node reads the validators' reports before it mines and starts
             fresh where validators holding at least half of all validators' stake recorded that window's files
             but not its own (their watch missed it; roles/spot_checks.py Records), or it would score 0 there for
             good; a smaller share's miss those validators mend themselves, linking the next file to the record
             that validators holding half the stake agree on, in good standing (roles/spot_checks.py
             Records.mendable), unless the draw picked the last file; under that, the miner starts fresh on a
             schedule, within 2^⌈log₂(32 / s)⌉ windows for a share s
    draw     once w has closed, a recorded uid is checked iff  sha256(closing hash, w, uid) < p: the closing hash
             does not exist while files are uploaded, so no miner knows which windows are checked
    answer   a drawn miner puts S_{w−1} at miner_state_key(w, uid, "before") during w + 1 (and S_w, "after",
             where the check has a tolerance)
    check    after w + 1 closes the validator requires the state put to hash to the commitment, have the
             strategy's shapes and dtypes, be finite, and strategy.mine(θ, S_{w−1}, pages(w, uid), step) on the θ
             the file names to give the file: its values (as one vector) within the tolerance (relative L2;
             the strategy's FRESH_START_SLACK times it from no state), and S_w put, hashing to its commitment
             and within the tolerance of the replay's, tensor by tensor, in the strategy's tie_free_state form;
             and (sparseloco) both sides of every position the file keeps otherwise than the replay near-ties of
             the replay's top-k, within the tolerance of the chunk's k-th largest |β·e + Δ|
             (strategy.stray_positions, sparseloco.off_selection); bit for bit at tolerance 0
    failing  (one that does not hash, fit or replay, another file) bans the uid for spot_check_ban_windows, and
             its file of w + 1 scores 0. No state put (or a bucket that does not give it) leaves the check
             pending: its file of w + 1 scores 0 and the miner may put the state during w + 2, when the check is
             made again and no state is a failure (roles/spot_checks.py): a node down for a window loses that
             window's pay instead of 50, and a cheat gains nothing by waiting (the state must still hash to what
             its file committed to, and the waiting window is unpaid).

Why the chain of commitments: a state made up to fit a cheap file (an error feedback that turns an honest Δ into a
greedy file, moments large enough to swamp the gradients) must be the state after of a recorded file of w − 1, which
was committed before θ_w existed, and every recorded file is itself drawn with probability p, so a made-up state
after is caught there. A deviation that earns r times honest pay in a window stops paying when
p · spot_check_ban_windows ≥ r − 1.

Cost: a check moves the state before and after the window (24 bytes per parameter under sparseloco: 41 MB on the tiny
preset, ≈ 30 GB on 1b; half that bit for bit, where the state after is the replay's) and replays one miner's window
(H inner steps) on the validator (bench/spot_check.py).
Bit for bit holds only where the miner and the validator run the same kernels at the same thread count (one process:
the simulation). Otherwise rounding differs (bench/replay_tolerance.py, bench/RESULTS.md "Replay tolerance"): from a
carried state a replay on this CPU build's AVX2 kernels of an AVX-512 miner's window was within 4.8e-5 of every
state tensor and 2.9e-5 of the values; a fresh start breaks AdamW's near-ties (its first steps are sign-like) the
other way, on one thread as on AVX2: within 0.0062 of the values and 0.0061 of a state tensor on the small preset.
Hence the tolerance 1e-3, and 20 times it for the values of a sparseloco fresh start. The state after is compared in
a form the ties do not move (sparseloco's error feedback plus what was sent), so a file that sends more than its
replay must have kept that much less back for later windows: what a miner steers beyond the state's own room
(tol · ‖β·e + Δ‖ per tensor), it owes. Neither room sees a position moved (the state compared is the accumulation,
whichever positions were sent, and a few small values swapped are a small share of the file): giving up the kept
values least aligned with its own gradient for the positions it favours gained 1.2–2.0 % of a window's score at the
cap 0.02, ten times what steering values gained, until both sides of a position moved had to be near-ties of the
replay's top-k.
What the rooms leave a miner is measured in bench/RESULTS.md "Replay tolerance" (bench/steer_edge.py).
GPU kernels are not measured yet, and they will need more: a near-tie or a bin boundary crossed otherwise moves a
whole value, so relative noise of 1e-5 to 1e-4 in Δ already puts a file 0.006 to 0.02 from its replay as values
(bench/replay_noise.py); a comparison that allows near-ties without also bounding how many is not safe
(docs/RELIABILITY.md, "Spot checks").
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from templar_lib.buckets import Bucket
from templar_lib.compression import Sparse
from templar_lib.hparams import STATE_DIGEST_CHUNK, HParams
from templar_lib.model import load_parameters_
from templar_lib.sparseloco import SparseDelta, decode_delta
from templar_lib.strategies import strategy_of
from templar_lib.wire.container import (InvalidFile, check_sender, check_state, expect, is_int, parse_header,
                                        templar_header)
from templar_lib.wire.documents import Recorded
from templar_lib.wire.gradient import GRADIENT_HEADER_BYTES
from templar_lib.wire.keys import miner_state_key
from templar_lib.wire.miner_state import miner_state_limit, read_miner_state, write_miner_state

log = logging.getLogger(__name__)
ZEROS = "0" * 64  # what a file commits to before the window when the miner starts from no state


@dataclass(frozen=True)
class Commitment:
    """What one gradient file commits to: its miner's state before and after the window, and the θ it trained on."""

    before: str
    after: str
    model_hash: str
    probes: tuple[float, ...]


def state_digest(state: Mapping[str, torch.Tensor] | None) -> str:
    """The digest a gradient file commits to: sha256 over a state's tensors in name order, each as the compact JSON
    of [name, dtype, shape] followed by the sha256 of every STATE_DIGEST_CHUNK bytes of its data (on the CPU, in
    order; their number follows from the dtype and shape); ZEROS for None (no state). The chunks are hashed on a pool
    of threads (hashlib lets go of the GIL), so the same digest comes in a fraction of the time one stream takes on a
    node with many cores (bench/state_digest.py: a 1b state is ≈ 15 GB, two digests a window), whatever the threads."""
    if state is None:
        return ZEROS
    digest = hashlib.sha256()
    queued: deque[tuple[bytes, list[Future[bytes]], int]] = deque()  # tensors whose chunks are being hashed

    def fold(held_at_most: int | None = None) -> None:  # the oldest queued tensors into the digest (None: all)
        held = sum(size for _, _, size in queued)
        while queued and (held_at_most is None or held > held_at_most):
            header, chunks, size = queued.popleft()
            digest.update(header)
            for chunk in chunks:
                digest.update(chunk.result())
            held -= size

    with ThreadPoolExecutor(max_workers=_DIGEST_THREADS) as pool:
        for name in sorted(state):
            # a GPU state is copied as it goes: about _DIGEST_HELD_BYTES and one tensor held at once
            tensor = state[name].detach().to("cpu").contiguous()
            data = tensor.reshape(-1).view(torch.uint8).numpy()
            chunks = [pool.submit(_sha256, data[start:start + STATE_DIGEST_CHUNK])
                      for start in range(0, data.size, STATE_DIGEST_CHUNK)]
            header = json.dumps([name, str(tensor.dtype), list(tensor.shape)], separators=(",", ":"))
            queued.append((header.encode(), chunks, data.size))
            del tensor, data
            fold(_DIGEST_HELD_BYTES)
        fold()
    return digest.hexdigest()


_DIGEST_THREADS = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
_DIGEST_HELD_BYTES = 1 << 30


def _sha256(data) -> bytes:
    return hashlib.sha256(data).digest()


def commitment(before: Mapping[str, torch.Tensor] | None, after: Mapping[str, torch.Tensor]) -> tuple[str, str]:
    """What a gradient file commits to: the digests of the miner's state before and after its window."""
    return state_digest(before), state_digest(after)


def drawn(seed: str, window: int, uid: int, probability: float) -> bool:
    """Whether `uid`'s file of `window` is checked: sha256(seed, window, uid) as a number in [0, 1) below the
    probability; seed: the hash of the window's closing block (unknown while the files are uploaded)."""
    if probability <= 0:
        return False
    draw = hashlib.sha256(f"spot-check:{seed}:{window}:{uid}".encode()).digest()
    return int.from_bytes(draw[:8], "big") / 2 ** 64 < probability


def answer(window: int, uid: int, *, seed: str, before: Mapping[str, torch.Tensor] | None,
           after: Mapping[str, torch.Tensor] | None, bucket: Bucket, hparams: HParams) -> list[str]:
    """A miner's side: when its file of `window` is drawn, put its state before the window (unless it had none) in
    its bucket, and the state after it where the check has a tolerance (bit for bit, the replay's own state after
    is compared with the commitment); returns the keys put."""
    if not drawn(seed, window, uid, hparams.spot_check_probability):
        return []
    put, sides = [], (("before", before), ("after", after)) if hparams.spot_check_tolerance > 0 else (
        ("before", before),)
    for side, state in sides:
        if state is not None:
            key = miner_state_key(window, uid, side)
            bucket.put(key, write_miner_state(window, uid, side, state))
            put.append(key)
    log.info("uid %d: drawn for a spot check of window %d, put %s", uid, window, ", ".join(put) or "nothing")
    return put


def committed(data: bytes, *, window: int, uid: int, hparams: HParams) -> Commitment | None:
    """What a gradient file (the validator's copy) commits to, from its header alone; None when its header does not
    read as this network's file of `uid` for `window` committing to a state (it is scored as invalid, or not at all)."""
    try:
        _, metadata = parse_header(data, max_bytes=len(data), max_header=GRADIENT_HEADER_BYTES)
        header = templar_header(metadata)
        expect(is_int(header.get("window")) and header["window"] == window and header.get("kind") == "gradient",
               "not this window's gradient")
        model_hash, probes = check_sender(header, uid, hparams.protocol_hash())
        state = check_state(header)
    except InvalidFile:
        return None
    return None if state is None else Commitment(state[0], state[1], model_hash, probes)


def linked(commitment: Commitment, previous: Mapping[int, Recorded], uid: int, hotkey: str | None) -> bool:
    """Whether a file's state before continues what the validator recorded: a fresh start, or the state after of
    the uid's recorded file of the window before (`previous`, the report of that window's record) by the same
    hotkey (a uid registered anew starts fresh)."""
    if commitment.before == ZEROS:
        return True
    return uid in previous and previous[uid].after == commitment.before and previous[uid].hotkey == hotkey


def check(window: int, uid: int, *, hparams: HParams, model: torch.nn.Module, theta: Mapping[str, torch.Tensor],
          step: int, tokens: torch.Tensor, scored: bytes, fetch: Callable[[str, int], bytes]) -> str | None:
    """The validator's side: None if replaying `uid`'s window from its committed state gives the file, else why
    not. θ: `theta`, the one the file names (outer step `step`); tokens: the uid's pages of the window; scored: the
    file as the validator first saw it (its own copy); fetch(key, max_bytes): a file from the uid's bucket (raises
    what the bucket raises: the caller decides). The state's linkage is the caller's (`linked`). `model` is not
    changed."""
    strategy, shapes = strategy_of(hparams), {name: tuple(t.shape) for name, t in theta.items()}
    gradient = strategy.read_gradient(scored, window=window, uid=uid, shapes=shapes)
    if gradient.state is None:
        return "its file commits to no state"
    before_digest, after_digest = gradient.state
    expected = strategy.state_shapes(theta)

    def put_state(side: str, digest: str) -> dict[str, torch.Tensor]:
        wide = strategy.STATE_FLOAT64
        state = read_miner_state(fetch(miner_state_key(window, uid, side), miner_state_limit(expected, wide)),
                                 window=window, uid=uid, side=side, shapes=expected, float64=wide)
        if state_digest(state) != digest:
            raise InvalidFile(f"the state it put {side} the window does not hash to its commitment")
        return state

    before = None if before_digest == ZEROS else put_state("before", before_digest)
    scratch = copy.deepcopy(model)
    load_parameters_(scratch, theta)
    try:  # the state is the miner's: one that breaks the replay (a negative step count, moments) is its failure
        mined = strategy.mine(scratch, before, tokens, step=step)
    except (MemoryError, torch.OutOfMemoryError):  # the validator's own limits, not a verdict on the state
        raise
    except Exception as error:  # noqa: BLE001 - whatever a hostile state makes the training code raise
        return f"its state does not replay ({type(error).__name__}: {str(error)[:120]})"
    replayed = strategy.write_gradient(window, uid, mined.sent, model_hash=gradient.model_hash,
                                       probes=gradient.probes, state=(before_digest, state_digest(mined.state)))
    if replayed == scored:
        return None
    again = strategy.read_gradient(replayed, window=window, uid=uid, shapes=shapes)
    difference = values_difference(again.tensors, gradient.tensors)
    tolerance = allowed_difference(hparams, fresh=before is None)
    if tolerance <= 0:
        return (f"replaying its window from its committed state gives another file (values {difference:.3g} apart, "
                f"relative L2)")
    if not difference <= tolerance:  # NaN fails too
        return (f"replaying its window from its committed state gives other values (relative difference "
                f"{difference:.3g} > {tolerance:g})")
    # the state after, in a form a tie broken otherwise does not move: within the tolerance itself, at a fresh start
    # too; counts (the step) exactly
    replay_state = strategy.tie_free_state(mined.state, again.tensors)
    put = strategy.tie_free_state(put_state("after", after_digest), gradient.tensors)
    for name in sorted(replay_state):
        exact = name in strategy.STATE_FLOAT64
        difference = (0.0 if torch.equal(replay_state[name].cpu(), put[name].cpu()) else float("inf")) if exact \
            else relative_difference(replay_state[name], put[name])
        if not difference <= hparams.spot_check_tolerance:
            return (f"replaying its window from its committed state gives another state {name[:80]} (relative "
                    f"difference {difference:.3g} > {hparams.spot_check_tolerance:g})")
    # neither room sees a position moved (the values are one vector, the state the accumulation): only near-ties,
    # within the tolerance itself (a fresh start's too: its ties differ by rounding's scale, 5e-6 measured, and it
    # has near-ties aplenty to choose among within 20×)
    stray = strategy.stray_positions(replay_state, again.tensors, gradient.tensors,
                                     slack=hparams.spot_check_tolerance)
    return None if stray is None else f"replaying its window from its committed state: {stray}"


def relative_difference(replay: torch.Tensor, sent: torch.Tensor) -> float:
    """‖replay − sent‖₂ / max(‖replay‖₂, ‖sent‖₂) in float64: symmetric, so a tensor put as zeros is 1 from any
    replay but zeros (not ‖replay‖₂ alone, which a small honest tensor would keep under the tolerance); 0 when
    both are zero."""
    replay, sent = replay.detach().to("cpu", torch.float64), sent.detach().to("cpu", torch.float64)
    scale = max(float(torch.linalg.vector_norm(replay)), float(torch.linalg.vector_norm(sent)))
    return float(torch.linalg.vector_norm(replay - sent)) / scale if scale > 0 else 0.0


def allowed_difference(hparams: HParams, *, fresh: bool) -> float:
    """The relative difference a replay's values may have from its file's (as one vector): the tolerance, the
    strategy's FRESH_START_SLACK times it for a window mined from no state."""
    return hparams.spot_check_tolerance * (strategy_of(hparams).FRESH_START_SLACK if fresh else 1.0)


def values_difference(replay: Mapping[str, Sparse | SparseDelta], sent: Mapping[str, Sparse | SparseDelta]) -> float:
    """relative_difference of two files' values as one vector over every parameter `sent` has. As one vector because
    where kernels differ (another CPU's, a GPU's) a top-k tie broken the other way moves one value of a parameter: a
    large share of a small parameter, a small one of the file (bench/replay_tolerance.py). Summed parameter by
    parameter, never the whole model dense at once."""
    squared = [0.0, 0.0, 0.0]  # ‖replay − sent‖², ‖replay‖², ‖sent‖²
    for name, values in sent.items():
        a, b = (sent_values(x).detach().to("cpu", torch.float64) for x in (replay[name], values))
        for i, t in enumerate((a - b, a, b)):
            squared[i] += float(torch.linalg.vector_norm(t)) ** 2
    scale = max(squared[1], squared[2]) ** 0.5
    return squared[0] ** 0.5 / scale if scale > 0 else 0.0


def sent_values(sent: Sparse | SparseDelta) -> torch.Tensor:
    """What one parameter's entry of a file stands for, densely: a SparseDelta decoded; a Sparse's coefficients
    scattered into its chunks."""
    if isinstance(sent, SparseDelta):
        return decode_delta(sent)
    chunks = torch.zeros(sent.idx.shape[0], int(torch.tensor(sent.chunk).prod()), dtype=torch.float32)
    return chunks.scatter(1, sent.idx.long(), sent.vals.float())
