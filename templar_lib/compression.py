"""Chunked DCT-II + top-k compression (DESIGN §5); the miner's error feedback around it is templar_lib.error_feedback.

The DeMo-era Templar algorithm (tplr-ai/templar v0.2.x, after Peng et al., "DeMo: Decoupled Momentum
Optimization", 2024). Per parameter tensor with momentum m:

    chunks   a 2-D tensor (R, C) is cut into (r, c) blocks, r = largest divisor of R <= target_chunk, likewise c;
             a 1-D tensor (N,) into blocks of n = largest divisor of N <= target_chunk
    encode   X = D_r · B · D_cᵀ per block B (orthonormal DCT-II matrices D), flattened to r·c coefficients
    top-k    keep the k = min(topk, r·c) largest |X| per block: indices into the flattened block and values
    decode   B = D_rᵀ · X · D_c per block (the inverse, since D is orthonormal)

Aggregation: each peer's values are divided by their L2 norm over the whole parameter, all peers are scattered
into one coefficient tensor where a coefficient chosen by several peers takes the mean over the peers that chose
it, and the result is decoded.

All chunks of a parameter are transformed with one batched matmul over a (n_chunks, r, c) view; when combining
peers and decoding the result, parameters of the same layout (every layer's q_proj, say) go through one scatter
and one matmul together. The DCT bases are built once per (size, device, dtype). On CPU every operation is
deterministic; on CUDA, matmul reduction order may differ between cards by a few ulp (the aggregator's sign() is
then the only place this could matter).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from templar_lib.encodings import VALUE_ENCODINGS, torch_dtype

NORM_EPS = 1e-8  # vals / (||vals||_2 + NORM_EPS) in aggregate()


@dataclass(frozen=True)
class Sparse:
    """Top-k DCT-II coefficients of one parameter.

    idx:  (n_chunks, k) integer tensor, positions within the flattened chunk (row-major over (r, c)), each row
          without repeats. Chunks are ordered row-major over the grid of blocks (R/r, C/c).
    vals: (n_chunks, k) floating tensor, the coefficients at those positions.
    shape: the parameter's shape, e.g. (4096, 1024). chunk: (r, c) for 2-D, (n,) for 1-D.
    """

    idx: torch.Tensor
    vals: torch.Tensor
    shape: tuple[int, ...]
    chunk: tuple[int, ...]

    @property
    def n_chunks(self) -> int:
        return math.prod(self.shape) // math.prod(self.chunk)

    @property
    def chunk_size(self) -> int:
        return math.prod(self.chunk)


# ---------------------------------------------------------------------------------------------------- chunking
def chunk_side(n: int, target_chunk: int) -> int:
    """Largest divisor of n that is <= target_chunk (n itself when n <= target_chunk). 96 -> 48, 300 -> 60."""
    if n <= target_chunk:
        return n
    for side in range(target_chunk, 0, -1):
        if n % side == 0:
            return side
    return 1


def chunk_shape(shape: Sequence[int], target_chunk: int) -> tuple[int, ...]:
    """Chunk of a 1-D or 2-D parameter. Higher ranks are not part of the protocol (Templar raises for them)."""
    if len(shape) not in (1, 2) or any(int(n) <= 0 for n in shape):
        raise ValueError(f"compression handles non-empty 1-D and 2-D tensors, got shape {tuple(shape)}")
    return tuple(chunk_side(int(n), target_chunk) for n in shape)


@functools.lru_cache(maxsize=64)
def dct_matrix(n: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n, n): D[k, i] = s_k · cos(π (2i + 1) k / 2n), s_0 = √(1/n), s_k = √(2/n).

    X = D @ x is the DCT-II of x, and x = Dᵀ @ X its inverse. Built in float64, then cast: cached per
    (n, device, dtype) and never modified.
    """
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.to(device=device, dtype=dtype)


def _blocks(x: torch.Tensor, chunk: tuple[int, ...]) -> torch.Tensor:
    """View a parameter as its chunks: (R, C) -> (n_chunks, r, c); (N,) -> (n_chunks, 1, n)."""
    if x.dim() == 1:
        return x.reshape(-1, 1, chunk[0])
    rows, cols = x.shape
    r, c = chunk
    return x.reshape(rows // r, r, cols // c, c).transpose(1, 2).reshape(-1, r, c)  # (Y, r, X, c) -> (Y·X, r, c)


def dct_chunks(x: torch.Tensor, chunk: tuple[int, ...]) -> torch.Tensor:
    """Per-chunk 2-D DCT-II: x of the parameter's shape -> coefficients (n_chunks, chunk_size), float32."""
    blocks = _blocks(x.float(), chunk)  # (n_chunks, r, c); r = 1 for 1-D tensors
    _, r, c = blocks.shape
    device = str(x.device)
    coefficients = dct_matrix(r, device) @ blocks @ dct_matrix(c, device).T  # D_r · B · D_cᵀ
    return coefficients.reshape(blocks.shape[0], r * c)


def idct_chunks(coefficients: torch.Tensor, shape: tuple[int, ...], chunk: tuple[int, ...]) -> torch.Tensor:
    """Inverse of dct_chunks: (n_chunks, chunk_size) -> tensor of `shape`, float32."""
    return idct_many([coefficients], [shape], [chunk])[0]


def layout_groups(shapes: Sequence[tuple[int, ...]], chunks: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Positions of the parameters idct_many decodes together: one group per (shape, chunk), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for position, (shape, chunk) in enumerate(zip(shapes, chunks)):
        groups.setdefault((tuple(shape), tuple(chunk)), []).append(position)
    return list(groups.values())


def idct_many(coefficients: Sequence[torch.Tensor], shapes: Sequence[tuple[int, ...]],
              chunks: Sequence[tuple[int, ...]]) -> list[torch.Tensor]:
    """idct_chunks for many parameters: those of one (shape, chunk) go through one pair of batched matmuls.

    G tensors (n_chunks, r·c) of one layout are stacked into (G·n_chunks, r, c), decoded as D_rᵀ · X · D_c, and
    cut back into G tensors of the parameter's shape (views into one (G, R, C) result). The same math as one
    idct_chunks per tensor; a BLAS may sum a larger batch in another order (last-bit differences), so every node
    decodes an aggregation with this same grouping (layout_groups, in sign_directions), and replays agree bit for bit.
    """
    decoded: list[torch.Tensor | None] = [None] * len(coefficients)
    for positions in layout_groups(shapes, chunks):
        shape, chunk = tuple(shapes[positions[0]]), tuple(chunks[positions[0]])
        r, c = (1, chunk[0]) if len(chunk) == 1 else chunk
        group = [coefficients[position].float() for position in positions]
        stacked = group[0][None] if len(group) == 1 else torch.stack(group)  # (G, n_chunks, r·c); no copy of one
        device = str(stacked.device)
        values = dct_matrix(r, device).T @ stacked.reshape(-1, r, c) @ dct_matrix(c, device)  # D_rᵀ · X · D_c
        values = values.reshape(len(positions), -1, r, c)
        if len(shape) == 1:
            tensors = values.reshape(len(positions), *shape)
        else:
            rows, cols = shape
            tensors = (values.reshape(len(positions), rows // r, cols // c, r, c).transpose(2, 3)
                       .reshape(len(positions), rows, cols))
        for position, tensor in zip(positions, tensors.unbind(0)):
            decoded[position] = tensor
    return decoded


# ---------------------------------------------------------------------------------------------------- public API
def encode(tensor: torch.Tensor, topk: int = 32, target_chunk: int = 64) -> Sparse:
    """Steps 3–4 of DESIGN §5: chunked DCT-II, then the k = min(topk, chunk size) largest |coefficients| per chunk.

    tensor: (R, C) or (N,), any float dtype. Returns Sparse with idx int64 (n_chunks, k), vals float32 (n_chunks, k).
    """
    shape = tuple(tensor.shape)
    chunk = chunk_shape(shape, target_chunk)
    coefficients = dct_chunks(tensor, chunk)  # (n_chunks, chunk_size)
    k = min(topk, coefficients.shape[1])
    idx = coefficients.abs().topk(k, dim=1, sorted=False).indices  # (n_chunks, k)
    return Sparse(idx=idx, vals=coefficients.gather(1, idx), shape=shape, chunk=chunk)


def densify(sparse: Sparse) -> torch.Tensor:
    """Scatter idx/vals into zero coefficients: (n_chunks, chunk_size) float32."""
    dense = torch.zeros(sparse.n_chunks, sparse.chunk_size, device=sparse.vals.device, dtype=torch.float32)
    return dense.scatter_(1, sparse.idx.long(), sparse.vals.float())


def decode(sparse: Sparse) -> torch.Tensor:
    """Step 5's t = IDCT(scatter(idx, vals)): a float32 tensor of sparse.shape."""
    return idct_chunks(densify(sparse), sparse.shape, sparse.chunk)


def normalized_vals(sparse: Sparse) -> torch.Tensor:
    """vals / (‖vals‖₂ + 1e-8), the L2 norm taken over the whole parameter. (n_chunks, k) float32."""
    vals = sparse.vals.float()
    return vals / (torch.linalg.vector_norm(vals) + NORM_EPS)


def unit_norm(sparse: Sparse) -> Sparse:
    """The same coefficients scaled to unit L2 norm over the whole parameter, in their own dtype (an all-zero
    parameter stays zero): what a miner sends. The aggregation divides each peer by its norm and the outer step takes
    a sign, so the scale carries nothing, and a fixed one leaves no reference for a majority to move."""
    vals = sparse.vals.float()
    norm = torch.linalg.vector_norm(vals)
    if float(norm) == 0.0:
        return sparse
    return Sparse(sparse.idx, (vals / norm).to(sparse.vals.dtype), sparse.shape, sparse.chunk)


def combine(peers: Sequence[Sparse]) -> torch.Tensor:
    """Normalised peers scattered into one coefficient tensor (n_chunks, chunk_size), float32.

    A coefficient chosen by several peers takes the mean over the peers that chose it (not over all peers);
    coefficients nobody chose are 0. Peers are reduced in the order given (callers sort by uid).
    """
    return combine_many([peers])[0]


def combine_many(parameters: Sequence[Sequence[Sparse]]) -> list[torch.Tensor]:
    """combine() for many parameters at once: one list of peers per parameter -> one coefficient tensor each.

    Parameters with the same layout (shape, chunk, number of peers, k) are combined together: their peers'
    values stacked into (G, P, n_chunks, k), one norm per (parameter, peer), one scatter-mean into
    (G, n_chunks, chunk_size). The result for each parameter is a view into its group's tensor. Per coefficient
    the sum still runs over the peers in the order given, so grouping does not change a single bit.
    """
    for peers in parameters:
        if not peers:
            raise ValueError("combine() needs at least one peer")
        first = peers[0]
        for peer in peers[1:]:
            if peer.shape != first.shape or peer.chunk != first.chunk:
                raise ValueError(f"peers disagree on shape/chunk: {peer.shape}/{peer.chunk} vs "
                                 f"{first.shape}/{first.chunk}")
    groups: dict[tuple, list[int]] = {}
    for position, peers in enumerate(parameters):
        if all(peer.vals.shape == peers[0].vals.shape == peer.idx.shape for peer in peers):
            layout = (peers[0].shape, peers[0].chunk, len(peers), tuple(peers[0].vals.shape))
        else:  # a ragged parameter (not from a validated file) is combined on its own
            layout = ("ragged", position)
        groups.setdefault(layout, []).append(position)
    combined: list[torch.Tensor | None] = [None] * len(parameters)
    for layout, positions in groups.items():
        group = [parameters[position] for position in positions]
        tensors = _combine_ragged(group[0]) if layout[0] == "ragged" else _combine_group(group)
        for position, tensor in zip(positions, tensors.unbind(0)):
            combined[position] = tensor
    return combined


def _combine_group(group: Sequence[Sequence[Sparse]]) -> torch.Tensor:
    """G parameters of one layout, P peers each, (n_chunks, k) idx/vals -> (G, n_chunks, chunk_size)."""
    first = group[0][0]
    (n_chunks, k), parameters, peers = first.vals.shape, len(group), len(group[0])
    idx = torch.stack([peer.idx.long() for peers in group for peer in peers])  # (G·P, n_chunks, k)
    vals = torch.stack([peer.vals.float() for peers in group for peer in peers])
    norms = torch.linalg.vector_norm(vals.reshape(parameters * peers, -1), dim=1) + NORM_EPS  # (G·P,)
    vals = vals / norms[:, None, None]
    # (G, P, n_chunks, k) -> (G, n_chunks, P·k): every chunk's candidates, peer by peer
    idx = idx.reshape(parameters, peers, n_chunks, k).transpose(1, 2).reshape(parameters, n_chunks, peers * k)
    vals = vals.reshape(parameters, peers, n_chunks, k).transpose(1, 2).reshape(parameters, n_chunks, peers * k)
    shape = (parameters, n_chunks, first.chunk_size)
    total = torch.zeros(shape, device=vals.device).scatter_add_(2, idx, vals)
    ones = torch.ones(1, device=vals.device).expand_as(vals)  # a stride-0 view: no (G, n_chunks, P·k) buffer
    count = torch.zeros(shape, device=vals.device).scatter_add_(2, idx, ones)
    return total.div_(count.clamp_min_(1.0))


def _combine_ragged(peers: Sequence[Sparse]) -> torch.Tensor:
    """One parameter whose peers keep different numbers of values per chunk -> (1, n_chunks, chunk_size)."""
    first = peers[0]
    idx = torch.cat([peer.idx.long() for peer in peers], dim=1)  # (n_chunks, sum k)
    vals = torch.cat([normalized_vals(peer) for peer in peers], dim=1)
    shape = (first.n_chunks, first.chunk_size)
    total = torch.zeros(shape, device=vals.device).scatter_add_(1, idx, vals)
    count = torch.zeros(shape, device=vals.device).scatter_add_(1, idx, torch.ones_like(vals))
    return total.div_(count.clamp_min_(1.0))[None]


class CombinedCoefficients:
    """The combined coefficients of one parameter: dense (what the sign update decodes) and in compressed-row form
    (what an aggregation file carries). Either form is derived from the other on first use, then kept.

    dense:  (n_chunks, chunk_size) float32, zero where no peer chose a coefficient.
    counts: (n_chunks,) int64, nonzero coefficients per chunk; idx, vals: (nnz,) int64 / float32, chunk i's entries
            at [Σ counts[:i], Σ counts[:i+1]), positions increasing within a chunk.

    `CombinedCoefficients(idx, vals, counts, shape, chunk)` is the compressed-row form (a file read back);
    `CombinedCoefficients.of_dense(coefficients, shape, chunk)` the aggregator's (sparsify). The aggregator's sign
    update never needs the compressed rows, so the scan for nonzeros runs only when the file is written.
    """

    def __init__(self, idx: torch.Tensor, vals: torch.Tensor, counts: torch.Tensor, shape: Sequence[int],
                 chunk: Sequence[int]) -> None:
        self.shape, self.chunk = tuple(shape), tuple(chunk)
        self._rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = (idx, vals, counts)
        self._dense: torch.Tensor | None = None

    @classmethod
    def of_dense(cls, coefficients: torch.Tensor, shape: Sequence[int], chunk: Sequence[int]) -> CombinedCoefficients:
        combined = cls.__new__(cls)
        combined.shape, combined.chunk = tuple(shape), tuple(chunk)
        combined._rows, combined._dense = None, coefficients.float()
        return combined

    @property
    def dense(self) -> torch.Tensor:
        """The dense coefficients. Built from the compressed rows (a file read back) on every access and not kept:
        a replay densifies one layout group at a time (for 1b, 4.6 GB if every parameter's were kept)."""
        if self._dense is not None:
            return self._dense
        idx, vals, counts = self._rows
        rows = torch.repeat_interleave(torch.arange(counts.shape[0], device=idx.device), counts)
        dense = torch.zeros(counts.shape[0], math.prod(self.chunk), device=vals.device)
        dense[rows, idx] = vals.float()
        return dense

    def _compressed_rows(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._rows is None:
            dense = self._dense
            flat = (dense != 0).reshape(-1).nonzero().reshape(-1)  # row-major: increasing within each chunk
            chunk_size = dense.shape[1]
            counts = torch.bincount(flat // chunk_size, minlength=dense.shape[0])
            self._rows = (flat % chunk_size, dense.reshape(-1)[flat], counts)
        return self._rows

    @property
    def idx(self) -> torch.Tensor:
        return self._compressed_rows()[0]

    @property
    def vals(self) -> torch.Tensor:
        return self._compressed_rows()[1]

    @property
    def counts(self) -> torch.Tensor:
        return self._compressed_rows()[2]

    def __repr__(self) -> str:
        return f"CombinedCoefficients(shape={self.shape}, chunk={self.chunk})"


def sparsify(coefficients: torch.Tensor, shape: tuple[int, ...], chunk: tuple[int, ...]) -> CombinedCoefficients:
    """(n_chunks, chunk_size) coefficients -> CombinedCoefficients holding exactly their nonzeros (rows computed
    when read)."""
    return CombinedCoefficients.of_dense(coefficients, shape, chunk)


def aggregate(peers: Sequence[Sparse]) -> torch.Tensor:
    """The combined direction before sign: IDCT(combine(peers)), a float32 tensor of the parameter's shape."""
    return idct_chunks(combine(peers), peers[0].shape, peers[0].chunk)


# ---------------------------------------------------------------------------------------------------- wire values


def quantize_int8(vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-parameter absmax int8: q = round(vals / scale), scale = max|vals| / 127. Returns (q int8, scale (1,) f32)."""
    vals = vals.detach().float()
    scale = (vals.abs().max() / 127.0).clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
    return torch.round(vals / scale).clamp(-127, 127).to(torch.int8), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """q · scale as float32: what a receiver reconstructs (and so what the sender's error feedback subtracts)."""
    return q.float() * scale.float()


def round_values(vals: torch.Tensor, value_dtype: str) -> torch.Tensor:
    """Values as the wire will carry them (templar_lib.encodings' encodings): cast to the dtype, or int8-quantised and
    reconstructed."""
    if value_dtype not in VALUE_ENCODINGS:
        raise ValueError(f"value_dtype must be one of {sorted(VALUE_ENCODINGS)}, not {value_dtype!r}")
    if value_dtype == "int8":
        return dequantize_int8(*quantize_int8(vals))
    return vals.to(torch_dtype(value_dtype))
