"""Training strategies (HParams.strategy): what a miner computes and sends for a window, how a validator applies one
miner's file alone, how the aggregator combines the accepted files and how every node replays the result.

    demo        one accumulated gradient of θ_w on the miner's pages, folded into error-feedback momentum, DCT +
                top-k, unit-norm values (gradient formats 1, 2); the aggregation is the scatter-mean of the peers'
                normalised coefficients, the outer step θ ← θ·(1 − lr·wd) − lr·sign(IDCT(·))   (Templar, March 2025)
    sparseloco  H inner AdamW steps from θ_w (inner.py), the pseudo-gradient Δ = θ_w − θ_H with error feedback,
                top-k per chunk and 2-bit values (sparseloco.py; gradient format 3); the aggregation carries the
                accepted peers' files (aggregation format 3), the outer step θ ← θ − outer_lr·combine_deltas(·)
                                                                                                 (Templar, July 2025)

Every node of a network runs the same strategy: its fields are in HParams.protocol_hash, which every gradient file
carries, so a file of another strategy (or other settings) is refused by the reader with a reason. A miner's state
(the "momentum" of the node's state store: flat float32 tensors) is the error-feedback momentum for demo, the error
and the inner AdamW moments for sparseloco; both are saved and recomputed the same way (roles/miner.py).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from templar_lib.aggregation import aggregate_window, apply_aggregation_, learning_rate_at
from templar_lib.compression import Sparse, unit_norm
from templar_lib.error_feedback import ErrorFeedback
from templar_lib.hparams import MAX_INNER_BETA1, MAX_INNER_BETA2, MIN_INNER_BETA1, HParams
from templar_lib.inner import InnerState, inner_steps
from templar_lib.model import parameters_of
from templar_lib.screening import norm_reason
from templar_lib.sparseloco import (SparseDelta, combine_deltas, decode_delta, encode_delta, feedback_gain,
                                    off_selection)
from templar_lib.training import loss_and_gradients, miner_autocast
from templar_lib.wire import (Aggregation, Gradient, gradient_byte_limit, max_aggregation_bytes, read_aggregation,
                              read_gradient, write_aggregation, write_gradient)
from templar_lib.wire.container import expect
from templar_lib.wire.sparse import (SparseAggregation, SparseGradient, max_sparse_aggregation_bytes,
                                     max_sparse_gradient_bytes, read_sparse_aggregation, read_sparse_gradient,
                                     sparse_update, write_sparse_aggregation, write_sparse_gradient)


@dataclass(frozen=True)
class Mined:
    """What a miner computed for one window."""

    loss: float  # θ_w's mean loss on the pages (sparseloco: the first inner step's, which is on θ_w)
    inner_losses: list[float]  # the loss of every inner step (demo: the one gradient's)
    sent: dict  # name -> what is sent for that parameter (compression.Sparse or sparseloco.SparseDelta)
    state: dict[str, torch.Tensor]  # the miner's state after the window, for the state store


def committed(gradient, hparams: HParams):
    """The gradient, if it commits to its miner's state where the network spot-checks miners (spot_check.py): a file
    that commits to none could not be checked. Raises InvalidFile."""
    expect(gradient.state is not None or hparams.spot_check_probability <= 0,
           "commits to no miner state, and this network spot-checks miners")
    return gradient


# ---------------------------------------------------------------------------------------------------- demo
def new_feedback(parameters, hparams: HParams, momentum: dict[str, torch.Tensor] | None = None) -> ErrorFeedback:
    """A demo miner's error feedback under these hyper-parameters: from `momentum` (moved to the parameters' device:
    a state file loads on the CPU), or zeros shaped like `parameters`."""
    settings = dict(topk=hparams.topk_compression, target_chunk=hparams.target_chunk,
                    momentum_decay=hparams.momentum_decay, value_dtype=hparams.gradient_value_dtype)
    if momentum is None:
        return ErrorFeedback.zeros_like(parameters, **settings)
    return ErrorFeedback({name: m.to(parameters[name].device) if name in parameters else m
                          for name, m in momentum.items()}, **settings)


def fold_gradient(model: torch.nn.Module, feedback: ErrorFeedback, tokens: torch.Tensor, *, step: int,
                  hparams: HParams) -> tuple[float, dict[str, Sparse]]:
    """Loss of the model's θ on `tokens`, and its gradient folded into `feedback` at outer step `step`'s learning
    rate (in place); returns what to transmit: each parameter's kept coefficients at unit norm (the momentum keeps
    what was actually taken out of it)."""
    loss, gradients = loss_and_gradients(model, tokens, hparams.batch_size, autocast_dtype=miner_autocast(model))
    sent = feedback.step(gradients, lr=learning_rate_at(step, hparams))
    return loss, {name: unit_norm(sparse) for name, sparse in sent.items()}


class DemoStrategy:
    name = "demo"
    STATE_FLOAT64: frozenset[str] = frozenset()  # the state's tensors not in float32 (spot_check.py reads them)
    # a spot check's allowance for the values of a window mined from no state, in multiples of its tolerance (the
    # sparseloco strategy's says why); demo's first gradients tie nothing (bench/RESULTS.md "Replay tolerance")
    FRESH_START_SLACK = 1.0

    def __init__(self, hparams: HParams) -> None:
        self.hparams = hparams

    def tie_free_state(self, state: Mapping[str, torch.Tensor], sent: Mapping[str, Sparse]) -> dict[str, torch.Tensor]:
        """The state after a window in the form spot_check.py compares, tensor by tensor: demo's momentum as it is.
        Not tie-free: a DCT coefficient chosen otherwise would move between the momentum and the file (m ← m −
        decode(sent), before the file's values are normalised, so their sum cannot be formed from the file), but none
        was seen on CPU (bench/RESULTS.md "Replay tolerance"); weighed as one vector instead, a small parameter's
        momentum could be made up within the whole's tolerance, and demo's file gives every parameter unit norm."""
        return dict(state)

    def stray_positions(self, replay_state: Mapping[str, torch.Tensor], replay: Mapping[str, Sparse],
                        sent: Mapping[str, Sparse], slack: float) -> str | None:
        """Nothing: demo's file is checked by its values and its momentum only (a DCT coefficient kept in place of
        the replay's moves the momentum at both, within a large tensor's tolerance; not measured)."""
        return None

    def state_shapes(self, parameters: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """What a miner's state holds: the error feedback's momentum, one tensor per parameter."""
        return {name: tuple(p.shape) for name, p in parameters.items()}

    def mine(self, model: torch.nn.Module, state: dict[str, torch.Tensor] | None, tokens: torch.Tensor, *,
             step: int) -> Mined:
        feedback = new_feedback(parameters_of(model), self.hparams, momentum=state)
        loss, sent = fold_gradient(model, feedback, tokens, step=step, hparams=self.hparams)
        return Mined(loss, [loss], sent, feedback.momentum)

    def write_gradient(self, window: int, uid: int, sent: dict, *, model_hash: str = "",
                       probes: tuple[float, ...] = (), state: tuple[str, str] | None = None) -> bytes:
        return write_gradient(Gradient.of(window, uid, sent, self.hparams, model_hash, probes=probes, state=state))

    def gradient_limit(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        return gradient_byte_limit(shapes, self.hparams)

    def read_gradient(self, data: bytes, *, window: int, uid: int, shapes: Mapping[str, tuple[int, ...]]) -> Gradient:
        hparams = self.hparams
        return committed(read_gradient(data, window=window, uid=uid, shapes=shapes, topk=hparams.topk_compression,
                                       target_chunk=hparams.target_chunk, hparams_hash=hparams.protocol_hash(),
                                       max_bytes=self.gradient_limit(shapes)), hparams)

    def reference(self, model: torch.nn.Module, tokens: torch.Tensor, *, step: int) -> None:
        """Nothing: the demo strategy's norm rule is a constant (unit norms)."""
        return None

    def norm_reason(self, gradient: Gradient, reference: None = None) -> str | None:
        """Miners send each parameter's values at unit norm (screening.norm_reason); all zero is empty."""
        return norm_reason(gradient)

    def apply_alone_(self, parameters: Mapping[str, torch.Tensor], gradient: Gradient, *, window: int,
                     step: int, reference: None = None) -> None:
        """θ_w + this file's update alone, in place: the outer step an aggregation of this one peer would make (its
        values are unit norm per parameter, so their size carries nothing)."""
        single = aggregate_window(window, step, learning_rate_at(step, self.hparams), {gradient.uid: gradient.tensors},
                                  list(parameters))
        apply_aggregation_(parameters, single, weight_decay=self.hparams.weight_decay)

    def aggregate(self, window: int, step: int, accepted: Mapping[int, Gradient], names: list[str],
                  refused: Mapping[int, str]) -> tuple[list[int], float, bytes]:
        """(the peers combined, ascending; the step's learning rate; the aggregation file)."""
        hparams, lr = self.hparams, learning_rate_at(step, self.hparams)
        aggregation = aggregate_window(window, step, lr, {uid: g.tensors for uid, g in accepted.items()}, names,
                                       hparams.protocol_hash(), format=hparams.aggregation_format)
        aggregation = dataclasses.replace(aggregation, refused=dict(sorted(refused.items())))
        return aggregation.peers, lr, write_aggregation(aggregation)

    def aggregation_limit(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        hparams = self.hparams
        # an aggregator without a peers list combines every gradient it accepts: up to max_peers, not topk_peers
        return max_aggregation_bytes(shapes, target_chunk=hparams.target_chunk, topk=hparams.topk_compression,
                                     peers=max(hparams.max_peers, hparams.topk_peers))

    def read_aggregation(self, data: bytes, *, window: int, shapes: Mapping[str, tuple[int, ...]]) -> Aggregation:
        """The file, validated: this network's hyper-parameters (hash) and the rate their schedule gives the file's
        step. Every node replays it, so neither is the file's to declare (a rate of 1e38 or 0 would move or freeze θ
        on every node at once)."""
        hparams = self.hparams
        aggregation = read_aggregation(data, window=window, shapes=shapes, target_chunk=hparams.target_chunk,
                                       max_bytes=self.aggregation_limit(shapes), hparams_hash=hparams.protocol_hash())
        expected = learning_rate_at(aggregation.step, hparams)
        expect(aggregation.lr == expected, f"lr {aggregation.lr!r} is not the {expected!r} this network's schedule "
                                           f"gives step {aggregation.step}")
        return aggregation

    def replay_(self, parameters: Mapping[str, torch.Tensor], aggregation: Aggregation) -> None:
        apply_aggregation_(parameters, aggregation, weight_decay=self.hparams.weight_decay)


# ---------------------------------------------------------------------------------------------------- sparseloco
@dataclass(frozen=True)
class NormReference:
    """A validator's measure of an honest file's size for one window: ‖Δ_ref‖₂ per parameter, and the multiple of
    it above which a file's values break the norm rule."""

    norms: dict[str, float]
    bound: float


class SparseLoCoStrategy:
    """The values' size is the step, and a miner sets it: a file scaled ×10 moves θ further and, applied alone, would
    score higher for the same work (measured: bench/RESULTS.md, adversaries under sparseloco). So the validator
    measures its own reference per parameter each window, ‖Δ_ref‖₂ of H inner AdamW steps from fresh moments on its
    random pages, and

        rejects a file with any parameter's values above bound_t · ‖Δ_ref‖   (a constant rule: no majority moves it)
        rejects a file with any parameter's values below NORM_FLOOR · ‖Δ_ref‖                       (the same, below)
        scores every file at SCORING_NORM · ‖Δ_ref‖ per parameter           (direction only: scaling earns nothing)
          magnified at most MAX_MAGNIFICATION times                          (below ¼ of ‖Δ_ref‖, less is paid less)

    while the aggregator clips each peer to the median norm of the peers (Templar's rule; minorities are bounded by
    it, majorities by the validator's two bounds: a majority ×3 would own the median and the step, a majority ×0.01
    would clip every peer to its own size and freeze training, and was paid in full while scoring ignored size: see
    bench/majority_shrink.py). An honest file is the top-k of an error feedback that builds up over windows, the
    more so the longer its memory β: at β 0.95 honest files measured 0.7–1.34 of ‖Δ_ref‖ over 200 windows, at β 0.99
    up to 1.88 (bench/sparse_norms.py). So the bound, NORM_BOUND at β 0.95, follows the error
    feedback's gain in the network's t-th window (sparseloco.feedback_gain, t = outer step + 1: no honest miner's
    error is older):  bound_t = NORM_BOUND · gain(β, t) / gain(0.95, t)  (2.0 at t = 1 for any β; 2.78 from
    t ≈ 100 at β 0.99), which keeps the honest margin of β 0.95 and refuses ×3 in every window; and it follows the
    inner AdamW's β₂ and β₁ (beta2_lag: 1 at 0.95, up to 1.36 at 0.99 as the miners' moments build up; beta1_lag:
    1 at 0.9, up to 1.1 at 0.8). The gain is the model's at top-32 of 64 × 64, where the bound was measured, for a
    network that keeps more: real pseudo-gradients are heavy-tailed, and honest files at top-64 reached the same
    share of the reference as at top-32 (2.53 against 2.55 over 200 rounds), where the Gaussian model predicts
    1.2–1.3× more and its β ratio at top-64 (1.26 against 1.39) would have cut the honest margin to 1.21×; a sparser
    network (not measured) keeps the model's ratio at its own k, which is larger (top-8: 1.60). The floor is a
    constant: the smallest honest share of any parameter was 0.13 of ‖Δ_ref‖ in a network's first window (no error
    fed back yet) and ≥ 0.25 after it, at β 0.99 and 0.95 alike (bench/sparse_norms.py), so 0.05 leaves 2.6× (the
    small preset: 0.12, and 0.115 at inner β₂ 0.99: 2.3×; 0.105 at β₁ 0.8: 2.1×). A
    majority that shrinks to just above it still slows the step, and the cap makes that cost it most of its pay
    (docs/RELIABILITY.md); honest files are mostly above ¼ after the first window (tiny: ≥ 0.20 of the reference; small
    down to 0.12 in rounds 60–90), so the cap leaves most honest scores alone and magnifies the rest less."""

    name = "sparseloco"
    STATE_FLOAT64 = frozenset({"adam_t"})  # InnerState's step count
    # AdamW's first steps are sign-like (m̂/√v̂ = ±1 at step 1), so from no state many values of Δ nearly tie and
    # other kernels, even another thread count, break the top-k's ties otherwise: 0.0062 of a file's values on the
    # small preset, ≤ 2.9e-5 from a carried state (bench/RESULTS.md "Replay tolerance")
    FRESH_START_SLACK = 20.0
    NORM_BOUND = 2.0  # at β = NORM_BOUND_DECAY, where it was measured (top-NORM_BOUND_TOPK of 64 × 64)
    NORM_BOUND_DECAY = 0.95
    NORM_BOUND_TOPK, NORM_BOUND_CHUNK = 32, 64
    # how much further honest files reach at the inner AdamW's β₂ 0.99 than at 0.95 (both settled): 2.55 / 1.88 on
    # the tiny preset and 2.45 / 1.80 on small (bench/RESULTS.md, "Inner AdamW β₂"); inner_beta2 is capped there
    BETA2_LAG = 1.36
    BETA2_LAG_AT = (0.95, MAX_INNER_BETA2)
    # and at its β₁ 0.8 than at Templar's 0.9 (at β₂ 0.99): 2.67 / 2.55 at their largest over 200 rounds, 1.05–1.18
    # round by round, on the tiny preset (bench/RESULTS.md, "Inner AdamW β₁"); inner_beta1 is kept within the two
    BETA1_LAG = 1.1
    BETA1_LAG_AT = (MAX_INNER_BETA1, MIN_INNER_BETA1)
    SCORING_NORM = 0.5  # about an honest file's median share of the reference
    NORM_FLOOR = 0.05  # the smallest honest share measured, 0.13 in window 1, over 2.6
    MAX_MAGNIFICATION = 2.0  # a parameter sent below SCORING_NORM / 2 of the reference is scored at 2× its size

    def __init__(self, hparams: HParams) -> None:
        self.hparams = hparams

    def state_shapes(self, parameters: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        """What a miner's state holds: the inner AdamW's moments and step count (InnerState.tensors' names, from
        meta tensors: nothing is allocated), and the error feedback."""
        meta = {name: p.detach().to("meta") for name, p in parameters.items()}
        return {key: tuple(t.shape) for key, t in InnerState.zeros_like(meta).tensors.items()} | {
            f"error.{name}": tuple(p.shape) for name, p in parameters.items()}

    def mine(self, model: torch.nn.Module, state: dict[str, torch.Tensor] | None, tokens: torch.Tensor, *,
             step: int) -> Mined:
        parameters = parameters_of(model)
        inner = InnerState.zeros_like(parameters) if state is None else InnerState.from_tensors(state, parameters)
        errors = None if state is None else {name: state[f"error.{name}"].to(p.device)
                                             for name, p in parameters.items()}
        losses, delta = inner_steps(model, inner, tokens, step=step, hparams=self.hparams,
                                    autocast_dtype=miner_autocast(model))  # bf16 on a GPU, as demo's miner
        sent, after = self.encode(delta, errors)
        return Mined(losses[0], losses, sent, inner.tensors | {f"error.{name}": e for name, e in after.items()})

    def encode(self, deltas: Mapping[str, torch.Tensor], errors: Mapping[str, torch.Tensor] | None, *,
               fused: bool | None = None) -> tuple[dict[str, SparseDelta], dict[str, torch.Tensor]]:
        """Each parameter's pseudo-gradient through error feedback, top-k and 2-bit values: (what to send, the error
        after sending it). errors: None for zeros (a miner's first window). fused: sparseloco.encode_delta's (None:
        the Triton kernel on CUDA for every parameter it fits, torch ops elsewhere)."""
        hparams, sent, after = self.hparams, {}, {}
        for name, delta in deltas.items():
            sent[name], after[name] = encode_delta(delta, None if errors is None else errors[name],
                                                   decay=hparams.error_decay, topk=hparams.sparse_topk,
                                                   target_chunk=hparams.target_chunk, bins=hparams.quantization_bins,
                                                   sigmas=hparams.quantization_range, fused=fused)
        return sent, after

    def write_gradient(self, window: int, uid: int, sent: dict, *, model_hash: str = "",
                       probes: tuple[float, ...] = (), state: tuple[str, str] | None = None) -> bytes:
        return write_sparse_gradient(SparseGradient(window, uid, sent, self.hparams.protocol_hash(), model_hash,
                                                    tuple(probes), state))

    def gradient_limit(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        hparams = self.hparams
        return min(hparams.max_gradient_bytes, max_sparse_gradient_bytes(
            shapes, topk=hparams.sparse_topk, target_chunk=hparams.target_chunk, bins=hparams.quantization_bins))

    def read_gradient(self, data: bytes, *, window: int, uid: int, shapes: Mapping[str, tuple[int, ...]]
                      ) -> SparseGradient:
        hparams = self.hparams
        return committed(read_sparse_gradient(data, window=window, uid=uid, shapes=shapes, topk=hparams.sparse_topk,
                                              target_chunk=hparams.target_chunk, hparams_hash=hparams.protocol_hash(),
                                              max_bytes=self.gradient_limit(shapes), bins=hparams.quantization_bins),
                         hparams)

    def norm_bound(self, step: int) -> float:
        """bound_t of outer step `step` (t = step + 1 windows of error feedback at most), times beta2_lag(step) and
        beta1_lag(step). The gain's β ratio is the larger of the model's at the network's k and chunk and at the
        measured setting: a denser network is held to the measured one (its honest files reach no further), a
        sparser one, not measured, keeps the model's larger allowance."""
        hparams, windows = self.hparams, step + 1

        def growth(topk: int, chunk_size: int) -> float:
            gain = functools.partial(feedback_gain, windows=windows, topk=topk, chunk_size=chunk_size)
            return gain(hparams.error_decay) / gain(self.NORM_BOUND_DECAY)
        measured = growth(self.NORM_BOUND_TOPK, self.NORM_BOUND_CHUNK ** 2)
        return self.NORM_BOUND * max(measured, growth(hparams.sparse_topk, hparams.target_chunk ** 2)) \
            * self.beta2_lag(step) * self.beta1_lag(step)

    def beta2_lag(self, step: int) -> float:
        """κ_t, the allowance for the inner AdamW's β₂: a longer memory of g² lags the gradients as they grow, so a
        miner's m̂/√v̂ outgrows the fresh moments of the validator's reference (bench/RESULTS.md, "Inner AdamW β₂").

            κ_t = 1 + (BETA2_LAG − 1) · s · (1 − β₂^(H·(t − 1)))      s = (1/(1 − β₂) − 20) / (100 − 20) in [0, 1]

        s places β₂'s memory between 0.95's (20 steps, where NORM_BOUND was measured: κ = 1) and 0.99's (100 steps,
        where honest files reach BETA2_LAG times as far), and the last factor is how much history a miner's
        moments can have in window t (none in the first: κ_1 = 1, so the first windows' bound is unchanged)."""
        low, high = (1.0 / (1.0 - beta2) for beta2 in self.BETA2_LAG_AT)
        beta2 = self.hparams.inner_beta2
        share = min(1.0, max(0.0, (1.0 / (1.0 - beta2) - low) / (high - low)))
        return 1.0 + (self.BETA2_LAG - 1.0) * share * self.moments_history(step)

    def beta1_lag(self, step: int) -> float:
        """κ¹_t, the allowance for the inner AdamW's β₁: a shorter memory of g averages less of its noise away, so a
        miner's m̂/√v̂ (against v̂'s long memory) reaches further past the reference's steps from fresh moments.

            κ¹_t = 1 + (BETA1_LAG − 1) · (0.9 − β₁) / (0.9 − 0.8) · (1 − β₂^(H·(t − 1)))

        1 at Templar's β₁ 0.9, BETA1_LAG at 0.8 once the moments have a history (none in the first window: κ¹_1 = 1,
        as for beta2_lag)."""
        high, low = self.BETA1_LAG_AT
        share = min(1.0, max(0.0, (high - self.hparams.inner_beta1) / (high - low)))  # measured between the two
        return 1.0 + (self.BETA1_LAG - 1.0) * share * self.moments_history(step)

    def moments_history(self, step: int) -> float:
        """1 − β₂^(H·(t − 1)): how much history an honest miner's AdamW moments can have in window t (0 in the
        first), the share of their lag the β allowances grant."""
        return 1.0 - self.hparams.inner_beta2 ** (self.hparams.inner_steps * step)

    def reference(self, model: torch.nn.Module, tokens: torch.Tensor, *, step: int) -> NormReference:
        """‖Δ_ref‖₂ per parameter: H inner AdamW steps from fresh moments on `tokens` (the model keeps θ_w), and
        the window's bound."""
        _, delta = inner_steps(model, InnerState.zeros_like(parameters_of(model)), tokens, step=step,
                               hparams=self.hparams)
        return NormReference({name: float(torch.linalg.vector_norm(d)) for name, d in delta.items()},
                             self.norm_bound(step))

    def norm_reason(self, gradient: SparseGradient, reference: NormReference | None = None) -> str | None:
        """All zero is empty; a parameter's values above the bound or below the floor times the validator's
        reference break the rule."""
        if (reason := norm_reason(gradient, unit_norm=False)) is not None or reference is None:
            return reason
        for name, sent in sorted(gradient.tensors.items()):
            norm, limit = float(torch.linalg.vector_norm(sent.values())), reference.norms[name]
            for outside, side, factor in ((norm > reference.bound * limit, "above", reference.bound),
                                          (norm < self.NORM_FLOOR * limit, "below", self.NORM_FLOOR)):
                if outside:
                    return (f"norm: {name[:60]} has ‖values‖ {norm:.3g}, {side} {factor:.3g}× the validator's "
                            f"reference {limit:.3g}")
        return None

    def tie_free_state(self, state: Mapping[str, torch.Tensor], sent: Mapping[str, SparseDelta]
                       ) -> dict[str, torch.Tensor]:
        """The state after a window in a form that does not depend on how the top-k broke its ties (spot_check.py
        compares it per tensor): each error feedback plus what was sent, e_after + decode(sent) = β·e + Δ, the
        accumulation the top-k chose from. A tie broken otherwise moves a value between the two terms, not their
        sum; and a file that sends more than its replay must have kept that much less back."""
        return {name: t + decode_delta(sent[name[6:]]).to(t.device, t.dtype) if name.startswith("error.") else t
                for name, t in state.items()}

    def stray_positions(self, replay_state: Mapping[str, torch.Tensor], replay: Mapping[str, SparseDelta],
                        sent: Mapping[str, SparseDelta], slack: float) -> str | None:
        """Why `sent` keeps or drops a position its replay's top-k could not have, or None: per parameter,
        sparseloco.off_selection against the replay's accumulation (replay_state: tie_free_state of the replay).
        Neither room of a check sees a position moved: the values' room is of the file as one vector, and the state
        it compares is the accumulation, the same whichever positions were sent. Unchecked, a miner could give up its
        least useful kept values for the positions its own gradient favours (bench/steer_edge.py, `swap`); here both
        sides of a position moved must be near-ties, within `slack` of the chunk's k-th largest |β·e + Δ|."""
        for name in sorted(sent):
            strays = off_selection(replay_state["error." + name], replay[name], sent[name], slack)
            if strays:
                return (f"{name[:80]} keeps or drops {strays} position(s) no tie of its replay's top-k would "
                        f"(beyond {slack:g} of the chunk's k-th largest accumulated value)")
        return None

    def apply_alone_(self, parameters: Mapping[str, torch.Tensor], gradient: SparseGradient, *, window: int,
                     step: int, reference: NormReference | None = None) -> None:
        """θ_w − outer_lr·combine_deltas([Δ]), in place: the outer step an aggregation of this one peer makes (the
        median of one norm is its own, so only the clip's ε touches it); with a reference, each parameter's update
        at SCORING_NORM · reference instead (what the validator scores)."""
        with torch.no_grad():
            for name, p in parameters.items():
                if name in gradient.tensors:
                    update = combine_deltas([gradient.tensors[name]])
                    if reference is not None:
                        update = update * self.scoring_scale(name, update, reference)
                    p.sub_(update.to(p.device, p.dtype), alpha=self.hparams.outer_learning_rate)

    def scoring_scale(self, name: str, update: torch.Tensor, reference: NormReference) -> float:
        """The factor that brings parameter `name`'s update to the size it is scored at: SCORING_NORM · ‖Δ_ref‖₂,
        magnified at most MAX_MAGNIFICATION times (0 for an empty update)."""
        norm = float(torch.linalg.vector_norm(update))
        return min(self.SCORING_NORM * reference.norms[name] / norm, self.MAX_MAGNIFICATION) if norm > 0 else 0.0

    def aggregate(self, window: int, step: int, accepted: Mapping[int, SparseGradient], names: list[str],
                  refused: Mapping[int, str]) -> tuple[list[int], float, bytes]:
        peers, lr = sorted(accepted), self.hparams.outer_learning_rate
        tensors = {name: [accepted[uid].tensors[name] for uid in peers] for name in names} if peers else {}
        aggregation = SparseAggregation(window, step, lr, peers, tensors, self.hparams.protocol_hash(),
                                        dict(sorted(refused.items())))
        return peers, lr, write_sparse_aggregation(aggregation)

    def aggregation_limit(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        hparams = self.hparams
        return max_sparse_aggregation_bytes(shapes, topk=hparams.sparse_topk, target_chunk=hparams.target_chunk,
                                            peers=max(hparams.max_peers, hparams.topk_peers),
                                            bins=hparams.quantization_bins)

    def read_aggregation(self, data: bytes, *, window: int, shapes: Mapping[str, tuple[int, ...]]
                         ) -> SparseAggregation:
        """The file, validated; its outer rate must be this network's (a constant of the hyper-parameters the file's
        hash names): every node replays it, so a rate the file alone declares would move θ everywhere at once."""
        hparams = self.hparams
        aggregation = read_sparse_aggregation(data, window=window, shapes=shapes, topk=hparams.sparse_topk,
                                              target_chunk=hparams.target_chunk,
                                              max_peers=max(hparams.max_peers, hparams.topk_peers),
                                              max_bytes=self.aggregation_limit(shapes),
                                              hparams_hash=hparams.protocol_hash(), bins=hparams.quantization_bins)
        expect(aggregation.lr == hparams.outer_learning_rate,
               f"outer lr {aggregation.lr!r} is not this network's {hparams.outer_learning_rate!r}")
        return aggregation

    def replay_(self, parameters: Mapping[str, torch.Tensor], aggregation: SparseAggregation) -> None:
        """θ ← θ − lr·combine_deltas(peers) per parameter, in place (a parameter no peer sent is unchanged)."""
        with torch.no_grad():
            for name, update in sparse_update(aggregation).items():
                p = parameters[name]
                p.sub_(update.to(p.device, p.dtype), alpha=aggregation.lr)


Strategy = DemoStrategy | SparseLoCoStrategy
STRATEGIES = {"demo": DemoStrategy, "sparseloco": SparseLoCoStrategy}


def strategy_of(hparams: HParams) -> Strategy:
    """The strategy these hyper-parameters run."""
    return STRATEGIES[hparams.strategy](hparams)
