"""SparseLoCo compression (DESIGN §5, issue 16): error feedback, chunked top-k without a transform, 2-bit quantised
values, and the aggregator's median-norm-clipped mean over the peers that chose each position.

Conformant to Templar's current gradient exchange (one-covenant/templar 142666f0, March 2026: src/tplr/compress.py
and neurons.py, the algorithm of the Covenant-72B run; after Sarfi et al., "SparseLoCo: Communication-Efficient
LLM Training", 2025); tests/data/sparseloco pins every step. The miner, per parameter tensor with pseudo-gradient
Δ = θ_start − θ_after of its inner steps and error e (zeros at first):

    1. feedback   e ← β·e + Δ                                   β = decay, 0.95
    2. chunks     e viewed as (n_chunks, c) rows: blocks of compression.chunk_shape, row-major within a block,
                  blocks row-major over the grid (no DCT: SparseLoCo selects in the parameter's own basis)
    3. top-k      per chunk the k largest |e|; k = topk clamped to [2, c] and made even (c = 35: k = 34).
                  Ties go to the lower position (a stable sort), so the same input gives the same selection anywhere
    4. quantise   over the N = n_chunks·k kept values v of the whole parameter:
                      μ = mean(v),  σ = ‖v − μ‖₂ / √(N − 1),  s = sigmas·σ / bins  (s = 1 if that is 0, inf or NaN)
                      code q = clamp(round((v − μ) / s + bins // 2), 0, bins − 1)            (round half to even)
                      table[b] = mean of (v − μ) over the values coded b (0 for an empty bin)
                  the receiver reads v̂ = table[q] + μ: each parameter ships μ (shift) and a bins-entry table
    5. residual   e ← e − decode(sent)        what was sent leaves the error, the rest carries to the next window

The aggregator, per parameter over P peers (in uid order) with dequantised values v̂_p:

    n_p = ‖v̂_p‖₂,  m = the lower median of n_1..n_P  (torch.median: for P = 2 the smaller norm)
    v̂_p ← v̂_p · min(1, m / (n_p + 1e-8))                     no peer outweighs the median peer
    update[i] = mean of v̂_p[i] over the peers that chose position i, 0 where none did     (dense, the param's shape)
    θ ← θ − lr·update                                           outer SGD, lr = 0.4

Shapes Templar's code cannot handle are chunked through a 1-D or 2-D view instead of raising: a 0-D tensor is
viewed as (1,), a tensor of rank ≥ 3 as (shape[0], rest flattened) (a conv kernel (4, 8, 16) as (4, 128)); a view
whose chunk would hold a single position (a prime length above target_chunk, (97,), or a (67, 71) matrix: the
original asks top-2 of one value and raises) is one chunk, the whole tensor, like a tensor smaller than one chunk
(k = 64 of its 97 or 4757 values). A single-value tensor keeps its one value (k = 1). Empty tensors are refused.

All functions are pure (no in-place change to their inputs) and deterministic on CPU. On CUDA the selection and
codes are the same; sums (mean, norms, the scatter-mean) may differ in the last float32 bit.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from templar_lib import kernels
from templar_lib.compression import chunk_shape

DECAY = 0.95  # β of the error feedback (Templar hparams momentum_decay)
TOPK = 64  # values kept per chunk (topk_compression)
TARGET_CHUNK = 64  # largest chunk side (target_chunk)
BINS = 4  # quantisation bins: 2-bit codes (quantization_bins)
SIGMAS = 6.0  # the bins span ±sigmas/2 standard deviations of the kept values (quantization_range)
OUTER_LR = 0.4  # outer SGD learning rate (outer_learning_rate)
CLIP_EPS = 1e-8  # min(1, m / (n_p + CLIP_EPS)) in the aggregator's clip
GAIN_WINDOWS = 400  # feedback_gain's horizon: its steady state for every β ≤ 0.995 (and β = 1 settles too)


# ---------------------------------------------------------------------------------------------------- chunking
def layout(shape: Sequence[int], target_chunk: int = TARGET_CHUNK) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(view, chunk) of a parameter: the 1-D or 2-D view it is chunked through, and the chunk within that view.

    Ranks 1 and 2 are their own view and take compression.chunk_shape's chunk (Templar's _get_smaller_split);
    see the module docstring for other ranks and for views whose chunk would hold one position.
    """
    view = view_of(shape)
    chunk = chunk_shape(view, target_chunk)
    if math.prod(chunk) == 1:  # no usable divisor (or a single value): the whole view is one chunk
        chunk = view
    return view, chunk


def view_of(shape: Sequence[int]) -> tuple[int, ...]:
    """The 1-D or 2-D view a parameter is chunked through: () -> (1,), rank ≥ 3 -> (shape[0], the rest flattened)."""
    shape = tuple(int(n) for n in shape)
    if math.prod(shape) == 0:
        raise ValueError(f"an empty tensor has nothing to send, shape {shape}")
    if len(shape) == 0:
        return (1,)
    if len(shape) <= 2:
        return shape
    return (shape[0], math.prod(shape[1:]))  # (out, in·kernel…): rows stay rows


def keep_count(chunk_size: int, topk: int = TOPK) -> int:
    """k of a chunk: min(topk, chunk_size) raised to 2 and made even (Templar's clamp), never above the chunk size
    (a one-value chunk keeps its one value). 64 → 64, 35 → 34, 63 → 62."""
    k = max(min(topk, chunk_size), 2)
    return min(k - k % 2, chunk_size)


def _to_rows(x: torch.Tensor, view: tuple[int, ...], chunk: tuple[int, ...]) -> torch.Tensor:
    """A parameter as its chunks: (*shape) -> (n_chunks, chunk_size), blocks row-major over the grid."""
    if len(view) == 1:
        return x.reshape(-1, chunk[0])
    (rows, cols), (r, c) = view, chunk
    return x.reshape(rows // r, r, cols // c, c).transpose(1, 2).reshape(-1, r * c)  # (Y, r, X, c) -> (Y·X, r·c)


def _from_rows(rows_: torch.Tensor, shape: tuple[int, ...], view: tuple[int, ...], chunk: tuple[int, ...]
               ) -> torch.Tensor:
    """Inverse of _to_rows: (n_chunks, chunk_size) -> a tensor of `shape`."""
    if len(view) == 1:
        return rows_.reshape(shape)
    (rows, cols), (r, c) = view, chunk
    return rows_.reshape(rows // r, cols // c, r, c).transpose(1, 2).reshape(shape)  # (Y, X, r, c) -> (Y, r, X, c)


# ---------------------------------------------------------------------------------------------------- what is sent
@dataclass(frozen=True, eq=False)
class SparseDelta:
    """What a miner sends for one parameter.

    shape: the parameter's shape. chunk: the chunk within layout(shape)'s view ((r, c) or (n,)).
    idx:   (n_chunks, k) int64, distinct positions within each flattened chunk (row-major over (r, c)); increasing
           per row as encode_delta and the wire reader give them, though nothing here depends on the order.
    codes: (n_chunks, k) uint8 in [0, bins), the quantisation code of the value at idx.
    shift: μ, the mean of the kept values (a float32 number). table: (bins,) float32; the value is table[code] + shift.
    """

    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    idx: torch.Tensor
    codes: torch.Tensor
    shift: float
    table: torch.Tensor

    def __post_init__(self) -> None:
        if self.idx.dim() != 2 or self.idx.shape != self.codes.shape or self.idx.shape[0] != self.n_chunks:
            raise ValueError(f"idx {tuple(self.idx.shape)} / codes {tuple(self.codes.shape)} do not fit "
                             f"{self.n_chunks} chunks of {self.shape}")
        if self.table.dim() != 1:
            raise ValueError("table must be 1-D")

    @property
    def view(self) -> tuple[int, ...]:
        return view_of(self.shape)

    @property
    def chunk_size(self) -> int:
        return math.prod(self.chunk)

    @property
    def n_chunks(self) -> int:
        return math.prod(self.shape) // self.chunk_size

    @property
    def k(self) -> int:
        return int(self.idx.shape[1])

    @property
    def bins(self) -> int:
        return int(self.table.shape[0])

    @property
    def vals(self) -> torch.Tensor:
        """values(), under the name compression.Sparse gives its values (screening compares either)."""
        return self.values()

    def values(self) -> torch.Tensor:
        """Dequantised values v̂ = table[code] + shift: (n_chunks, k) float32, in idx's order."""
        shift = torch.tensor(self.shift, dtype=torch.float32, device=self.table.device)
        return self.table.float()[self.codes.long()] + shift


def flat_positions(sent: SparseDelta) -> torch.Tensor:
    """Where each kept value sits in the flattened parameter: (n_chunks, k) int64, in idx's order. For the 2-D view
    (rows, cols) in chunks (r, c), chunk b = (y, x) on the grid of cols / c blocks a row, position p = (i, j) within:
    (y·r + i)·cols + x·c + j; for the 1-D view b·n + p. Touches only the kept positions."""
    chunks = torch.arange(sent.n_chunks, device=sent.idx.device)[:, None]
    if len(sent.view) == 1:
        return chunks * sent.chunk[0] + sent.idx
    (_, cols), (r, c) = sent.view, sent.chunk
    per_row = cols // c
    return (chunks // per_row * r + sent.idx // c) * cols + chunks % per_row * c + sent.idx % c


# ---------------------------------------------------------------------------------------------------- miner
def encode_delta(delta: torch.Tensor, error: torch.Tensor | None, decay: float = DECAY, topk: int = TOPK,
                 target_chunk: int = TARGET_CHUNK, bins: int = BINS, sigmas: float = SIGMAS, *,
                 fused: bool | None = None) -> tuple[SparseDelta, torch.Tensor]:
    """Steps 1–5: (what to send, the error after sending it).

    delta: the pseudo-gradient, any shape and float dtype. error: float32 of delta's shape, or None for zeros.
    Returns (SparseDelta, error_after float32 of delta's shape). Raises ValueError for a non-finite error.
    fused: steps 1–3 as one Triton kernel (templar_lib.kernels.sparse_select: one read of Δ and e, one write of e)
    and step 5 on the kept positions only. None (the default) = on CUDA when triton is installed and the view's
    chunk fits one program (sides ≤ 64); True forces it (an error where it cannot run; on a CPU only under
    TRITON_INTERPRET=1). The same e, selection and codes (the kernel rounds β·e + Δ twice, as torch does).
    """
    if not 2 <= bins <= 256:
        raise ValueError(f"bins must be in [2, 256], not {bins}")
    shape = tuple(delta.shape)
    view, chunk = layout(shape, target_chunk)
    if kernels.chosen(fused, delta.device, max(chunk) <= kernels.MAX_CHUNK_SIDE,
                      f"fused sparseloco compression needs CUDA and triton and chunks of at most "
                      f"{kernels.MAX_CHUNK_SIDE} a side (delta {shape} on {delta.device}, chunk {chunk})"):
        return _encode_fused(delta, error, decay, topk, view, chunk, bins, sigmas)
    e = delta.float() if error is None else error.float() * decay + delta.float()  # 1. e ← β·e + Δ
    if not bool(torch.isfinite(e).all()):
        raise ValueError("the error feedback is not finite: nothing sensible to send")
    rows = _to_rows(e, view, chunk)  # 2. (n_chunks, chunk_size)
    idx = _top_positions(rows, keep_count(rows.shape[1], topk))  # 3. (n_chunks, k), increasing
    codes, shift, table = _quantise(rows.gather(1, idx), bins, sigmas)  # 4.
    sent = SparseDelta(shape=shape, chunk=chunk, idx=idx, codes=codes, shift=shift, table=table)
    return sent, e - decode_delta(sent)  # 5. e ← e − decode(sent)


def _encode_fused(delta: torch.Tensor, error: torch.Tensor | None, decay: float, topk: int, view: tuple[int, ...],
                  chunk: tuple[int, ...], bins: int, sigmas: float) -> tuple[SparseDelta, torch.Tensor]:
    """encode_delta with steps 1–3 in one kernel and step 5 on the kept positions: e − decode(sent) is e − 0 = e
    everywhere else, so only e[kept] − v̂ is computed (the same float32 subtraction as the torch path)."""
    shape = tuple(delta.shape)
    e, idx, vals = kernels.sparse_select(None if error is None else error.float().reshape(view).contiguous(),
                                         delta.reshape(view).contiguous(), decay=decay,
                                         k=keep_count(math.prod(chunk), topk), chunk=chunk)  # 1–3
    if not bool(torch.isfinite(vals).all()):  # a non-finite e anywhere is among the kept values
        raise ValueError("the error feedback is not finite: nothing sensible to send")
    codes, shift, table = _quantise(vals, bins, sigmas)  # 4.
    sent = SparseDelta(shape=shape, chunk=chunk, idx=idx, codes=codes, shift=shift, table=table)
    flat, at = e.view(-1), flat_positions(sent).view(-1)
    flat[at] = flat[at] - sent.values().view(-1)  # 5.
    return sent, e.reshape(shape)


def _top_positions(rows: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest |rows| per row, ties to the lower position: (n_chunks, k) int64, increasing per row. rows finite.

    With t the k-th largest |x| of a row: every |x| > t (at most k − 1 of them), then the |x| = t in position order
    until there are k: a stable descending sort's first k, found with topk's selection instead of a full sort of
    every chunk (bench/RESULTS.md, "SparseLoCo on a device": the CPU's compression pass)."""
    magnitude = rows.abs()
    kth = magnitude.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)
    above, tied = magnitude > kth, magnitude == kth
    keep = above | (tied & (tied.cumsum(dim=1) <= k - above.sum(dim=1, keepdim=True)))
    return keep.nonzero()[:, 1].view(rows.shape[0], k)


def _quantise(vals: torch.Tensor, bins: int, sigmas: float) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Step 4 over all kept values of a parameter, vals (n_chunks, k) float32 -> (codes uint8 (n_chunks, k), shift,
    table (bins,) float32). The same float32 operations as Templar's _quantize_values."""
    shift = vals.mean()
    centred = vals - shift
    std = centred.norm() / math.sqrt(centred.numel() - 1)  # NaN for a single value (0 / 0): then s = 1
    scale = sigmas * std / bins
    if not bool(torch.isfinite(scale)) or float(scale) == 0.0:
        scale = torch.ones((), dtype=torch.float32, device=vals.device)
    codes = (centred / scale + bins // 2).round().clamp(0, bins - 1).to(torch.uint8)
    flat_codes, flat_centred = codes.reshape(-1).long(), centred.reshape(-1)
    sums = torch.zeros(bins, dtype=torch.float32, device=vals.device).scatter_add_(0, flat_codes, flat_centred)
    counts = torch.zeros(bins, dtype=torch.float32, device=vals.device).scatter_add_(
        0, flat_codes, torch.ones_like(flat_centred))
    table = torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))  # empty bin: 0
    return codes, float(shift), table


def with_values(sent: SparseDelta, values: torch.Tensor, sigmas: float = SIGMAS) -> SparseDelta:
    """The same positions carrying other values (n_chunks, k), quantised as step 4 does (what a miner who sends
    something else than its error's top-k would upload)."""
    codes, shift, table = _quantise(values.float(), sent.bins, sigmas)
    return SparseDelta(shape=sent.shape, chunk=sent.chunk, idx=sent.idx, codes=codes, shift=shift, table=table)


def decode_delta(sent: SparseDelta) -> torch.Tensor:
    """The tensor `sent` stands for: v̂ at the kept positions, 0 elsewhere. float32 of sent.shape."""
    rows = torch.zeros(sent.n_chunks, sent.chunk_size, dtype=torch.float32, device=sent.idx.device)
    rows.scatter_(1, sent.idx, sent.values())  # (n_chunks, chunk_size)
    return _from_rows(rows, sent.shape, sent.view, sent.chunk)


def _selection(accumulation: torch.Tensor, replay: SparseDelta, sent: SparseDelta):
    """(|a| in chunks, the replay's kept mask, sent's kept mask, t_c, u_c): t_c the smallest |a| the replay keeps in
    chunk c, u_c the largest it does not (−inf where it keeps every position). (n_chunks, chunk_size) and
    (n_chunks, 1)."""
    rows = _to_rows(accumulation.float().to(replay.idx.device), replay.view, replay.chunk).abs()
    kept = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, replay.idx, True)
    chosen = torch.zeros_like(rows, dtype=torch.bool).scatter_(1, sent.idx, True)
    t = torch.where(kept, rows, torch.full_like(rows, torch.inf)).amin(dim=1, keepdim=True)
    u = torch.where(kept, torch.full_like(rows, -torch.inf), rows).amax(dim=1, keepdim=True)
    return rows, kept, chosen, t, u


def selection_gaps(accumulation: torch.Tensor, replay: SparseDelta, sent: SparseDelta
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """How far from a tie of the top-k of `accumulation` (β·e + Δ, the parameter's shape) that `replay` is, the
    positions `sent` chose otherwise are: (1 − |a_j| / t_c for each position sent keeps and the replay does not,
    |a_i| / u_c − 1 for each the replay keeps and sent does not), 1-D float32 each, ≥ 0; t_c is the smallest |a|
    the replay keeps in chunk c, u_c the largest it does not. For benches: the check is off_selection."""
    rows, kept, chosen, t, u = _selection(accumulation, replay, sent)
    added, dropped = chosen & ~kept, kept & ~chosen
    return (1.0 - rows / t)[added], (rows / u - 1.0)[dropped]


def off_selection(accumulation: torch.Tensor, replay: SparseDelta, sent: SparseDelta, slack: float) -> int:
    """How many positions `sent` keeps or drops that no rounding of the top-k of `accumulation` would: a position
    sent keeps and the replay does not needs |a_j| ≥ (1 − slack)·t_c, one the replay keeps and sent drops
    |a_i| ≤ (1 + slack)·u_c (selection_gaps' t_c, u_c), so both sides of a position moved are near-ties of the
    chunk's k-th largest. Other kernels' rounding moves a_j, t_c and u_c by about its own scale, so an honest file
    passes at a slack above it. accumulation's kept entries are a rebuilt sum (e − v̂) + v̂ in float32 (the tie-free
    state): each side allows 2⁻²² of the chunk's largest |v̂| for it. Compared by products, never divided, so a chunk
    where everything is 0 (t_c = u_c = 0) passes whatever ties it breaks."""
    rows, kept, chosen, t, u = _selection(accumulation, replay, sent)
    slop = 2.0 ** -22 * replay.values().abs().amax(dim=1, keepdim=True).to(rows.device)  # (n_chunks, 1)
    added = chosen & ~kept & (rows < (1.0 - slack) * t - slop)
    dropped = kept & ~chosen & (rows > (1.0 + slack) * u + slop)
    return int(added.sum()) + int(dropped.sum())


def feedback_gain(decay: float, windows: int, topk: int = TOPK, chunk_size: int = TARGET_CHUNK ** 2) -> float:
    """How much an error feedback of decay β amplifies what it sends: ‖top-k(e_t)‖ / ‖Δ_t‖ in the t-th window
    (t = windows ≥ 1, capped at GAIN_WINDOWS) when every window adds an independent Δ_t ~ N(0, 1) per value and
    steps 1–3, 5 run on it (32 chunks of chunk_size, k = keep_count(chunk_size, topk)). Window 1 sends the top-k of
    Δ_1 alone (0.264 at top-32 of 4096, any β); it grows with t towards a steady state that grows with β
    (0.61 at β 0.95, 0.85 at 0.99). Deterministic (a seeded generator, CPU), simulated once per process and setting,
    only as far as the windows asked for.
    Real pseudo-gradients are correlated across windows, so they grow somewhat more (bench/RESULTS.md)."""
    if windows < 1:
        raise ValueError(f"windows must be >= 1, not {windows}")
    return _gain_curve(float(decay), keep_count(chunk_size, topk), chunk_size).at(min(windows, GAIN_WINDOWS))


class _GainCurve:
    """feedback_gain's simulation for one (β, k, chunk size), run only as far as a caller has asked: a validator in a
    young network pays for its t windows (≈ 1.4 ms each on a CPU), not for all GAIN_WINDOWS. The same generator and
    the same steps in the same order whenever they run, so the value of window t does not depend on who asked first."""

    def __init__(self, decay: float, k: int, chunk_size: int):
        self.decay, self.k = decay, k
        self.generator = torch.Generator().manual_seed(0)
        self.error = torch.zeros(32, chunk_size)
        self.gains: list[float] = []
        self.lock = threading.Lock()

    def at(self, windows: int) -> float:
        with self.lock:
            while len(self.gains) < windows:
                delta = torch.randn(self.error.shape, generator=self.generator)
                self.error.mul_(self.decay).add_(delta)
                idx = self.error.abs().topk(self.k, dim=1).indices  # not _top_positions: no ties here, 19× faster
                sent = self.error.gather(1, idx)
                self.gains.append(float(torch.linalg.vector_norm(sent) / torch.linalg.vector_norm(delta)))
                self.error.scatter_(1, idx, 0.0)  # what was sent leaves the error (exactly, without quantisation)
            return self.gains[windows - 1]


@functools.lru_cache(maxsize=8)
def _gain_curve(decay: float, k: int, chunk_size: int) -> _GainCurve:
    return _GainCurve(decay, k, chunk_size)


# ---------------------------------------------------------------------------------------------------- aggregator
@dataclass(frozen=True, eq=False)
class Clipping:
    """The aggregator's per-peer clip of one parameter. norms, factors: (P,) float32; median: () float32."""

    norms: torch.Tensor  # ‖v̂_p‖₂ over all of peer p's values
    median: torch.Tensor  # the lower median of norms
    factors: torch.Tensor  # min(1, median / (norm + 1e-8)), what each peer's values are multiplied by


def clip_factors(peers: Sequence[SparseDelta]) -> Clipping:
    """Median-norm clip of P peers of one parameter (P ≥ 1, in uid order). A peer whose norm overflows float32
    (finite values near 3e38, only ever hostile) gets factor 0 rather than a NaN from inf / inf."""
    norms = torch.stack([torch.linalg.vector_norm(peer.values()) for peer in peers])  # (P,)
    median = norms.median()  # lower middle value for an even P
    factors = (median / (norms + CLIP_EPS)).clamp(max=1.0)
    return Clipping(norms=norms, median=median, factors=torch.where(torch.isfinite(norms), factors, 0.0))


def combine_deltas(peers: Sequence[SparseDelta]) -> torch.Tensor:
    """The aggregator's update for one parameter: each peer clipped to the median norm, then per position the mean
    over the peers that chose it (0 where none did). peers: P ≥ 1, same shape and chunk, in uid order.
    Returns a dense float32 tensor of the parameter's shape."""
    first = _check_peers(peers)
    factors = clip_factors(peers).factors
    idx = torch.cat([peer.idx for peer in peers], dim=1)  # (n_chunks, Σ k_p): each chunk's candidates, peer by peer
    vals = torch.cat([peer.values() * factors[p] for p, peer in enumerate(peers)], dim=1)
    shape = (first.n_chunks, first.chunk_size)
    total = torch.zeros(shape, dtype=torch.float32, device=vals.device).scatter_add_(1, idx, vals)
    count = torch.zeros(shape, dtype=torch.float32, device=vals.device).scatter_add_(1, idx, torch.ones_like(vals))
    return _from_rows(total / count.clamp_min(1.0), first.shape, first.view, first.chunk)


def _check_peers(peers: Sequence[SparseDelta]) -> SparseDelta:
    if not peers:
        raise ValueError("combine_deltas needs at least one peer")
    first = peers[0]
    for peer in peers[1:]:
        if peer.shape != first.shape or peer.chunk != first.chunk:
            raise ValueError(f"peers disagree on shape/chunk: {peer.shape}/{peer.chunk} vs {first.shape}/{first.chunk}")
    return first


def outer_step(theta: torch.Tensor, update: torch.Tensor, lr: float = OUTER_LR) -> torch.Tensor:
    """Outer SGD: θ − lr·update, float32 of θ's shape (a new tensor)."""
    return theta.float() - lr * update.float()
