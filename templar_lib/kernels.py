"""Fused Triton kernels for the miner's compression round trip on CUDA (DESIGN §5, the same math as
error_feedback.ErrorFeedback.step, in two passes over the momentum instead of about twenty torch operations).

Per chunk B of a parameter (the chunk held in one program's registers, padded to powers of two ≥ 16):

    encode   (one read of g and m, one write of m)
             m ← decay · m + lr · g
             X = D_r · m_B · D_cᵀ                                      (two tl.dot, fp32 in, fp32 accumulate)
             t = the k-th largest |X| of the chunk, searched over the bit patterns of |X| (for floats ≥ 0 the
                 int32 order is the float order) from [min of the row maxima, max]; kept = |X| ≥ t, and where
                 several |X| equal t, the first ones in row-major order
             idx, vals ← positions (row-major within the (r, c) chunk, increasing) and values of the kept X
    round    vals as the wire carries them (float32, bfloat16, float16, or int8 with one scale per parameter,
             scale = max|vals| / 127, which needs every chunk's vals first: one torch reduction in between)
    decode   (one read and one write of m)
             m_B ← m_B − Σₛ vals_s · D_r[row_s, :]ᵀ ⊗ D_c[col_s, :]   (= D_rᵀ · scatter(vals) · D_c, as a rank-k
                                                                       tl.dot of (r, k) by (k, c))

A 1-D parameter (N,) with chunk (n,) is the 2-D case (N/n, n) with chunk (1, n) (D_1 = [1]).

The sparseloco strategy's pass (templar_lib.sparseloco steps 1–3, no DCT) is one kernel over the parameter's view:

    select   (one read of e and Δ, one write of e': 12 B per element, the copy bandwidth's own ratio)
             e' ← β · e + Δ                                     (to a new tensor: the caller's e is left as it was)
             idx, vals ← the k largest |e'| of the chunk, the same search and tie rule as encode
    the rest runs on the kept values only (under 1 % of the elements): the 2-bit quantisation's per-parameter
    statistics in torch, then e'[kept] ← e'[kept] − v̂ (sparseloco.encode_delta).

Numerics against the torch path: the products run as "tf32x3" by default (three TF32 tensor-core products, about
float32 accuracy: the same kept positions as the torch path but for near-ties of |X|); "ieee" (FMA) is slower and
"tf32" (one TF32 product) faster but changes selections, so neither is the default (bench/RESULTS.md has the counts
and timings). Deterministic: no atomics, a fixed order of sums. Triton is imported when a kernel is
first needed (never on CPU-only installs); `TRITON_INTERPRET=1` runs the same kernels on CPU tensors
(tests/lib/test_kernels.py).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

from templar_lib.compression import Sparse, chunk_shape, dct_matrix
from templar_lib.encodings import FLOAT_ENCODINGS, VALUE_ENCODINGS, torch_dtype

_VALUE_CODES = {encoding: code for code, encoding in enumerate(VALUE_ENCODINGS)}  # the kernels' VALUES constexpr
MAX_CHUNK_SIDE = 64  # chunks are at most 64 × 64 (target_chunk ≤ 64): one chunk fits one program's registers


@dataclass
class LaunchSettings:
    """How the kernels are launched (not what they compute): the fastest of bench/compression_kernels.py's sweep
    (bench/RESULTS.md says on which GPU). thresholds: split points per round of the k-th largest search (1, 2
    or 4); warps per program; programs_per_sm: a grid of multiprocessors × this, each program looping over chunks
    (None: one program per chunk)."""

    thresholds: int = 2
    encode_warps: int = 4
    decode_warps: int = 4
    programs_per_sm: int | None = 2


SETTINGS = LaunchSettings()


def available(device: torch.device | str, *, interpreter: bool = False) -> bool:
    """True when the fused kernels can run on tensors of `device`: CUDA with triton installed; with
    interpreter=True also a CPU under TRITON_INTERPRET=1 (Triton's interpreter: for tests, never chosen by default)."""
    device = torch.device(device)
    if device.type != "cuda" and not (interpreter and os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return False
    return _triton_installed()


@functools.cache
def _triton_installed() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def chosen(fused: bool | None, device: torch.device | str, fits: bool, refusal: str) -> bool:
    """Whether a caller runs its fused kernel: never for fused False; for None (the default) where it can run on
    CUDA and the tensor `fits` it; for True wherever it can run (a CPU too under TRITON_INTERPRET=1), else a
    RuntimeError saying `refusal`."""
    if fused is False:
        return False
    usable = available(device, interpreter=bool(fused)) and fits
    if fused and not usable:
        raise RuntimeError(refusal)
    return usable


def supports(shape: tuple[int, ...], target_chunk: int) -> bool:
    """Whether a parameter's layout fits the kernels (1-D or 2-D, chunk sides ≤ 64)."""
    return len(shape) in (1, 2) and target_chunk <= MAX_CHUNK_SIDE and all(n > 0 for n in shape)


def fold_encode(m: torch.Tensor, g: torch.Tensor, *, decay: float, lr: float, topk: int, target_chunk: int,
                precision: str = "tf32x3") -> Sparse:
    """m ← decay·m + lr·g in place, then top-k of its chunked DCT-II: Sparse with idx int64 / vals float32
    (n_chunks, k), positions increasing within each chunk. m: contiguous float32 (R, C) or (N,); g: same shape."""
    return _fold_encode(m, g, decay=decay, lr=lr, topk=topk, target_chunk=target_chunk, precision=precision)


def _fold_encode(m: torch.Tensor, g: torch.Tensor, *, decay: float, lr: float, topk: int, target_chunk: int,
                 precision: str, stage_skip: int = 0) -> Sparse:
    """fold_encode; stage_skip leaves a stage out to time the others (bench/compression_kernels.py only: the result
    is then wrong): 1 keeps the first k positions instead of selecting, 2 skips the DCT."""
    shape = tuple(m.shape)
    chunk = chunk_shape(shape, target_chunk)
    rows, cols, r, c = _grid(shape, chunk)
    n_chunks = (rows // r) * (cols // c)
    k = min(topk, r * c)
    idx = torch.empty(n_chunks, k, dtype=torch.int64, device=m.device)
    vals = torch.empty(n_chunks, k, dtype=torch.float32, device=m.device)
    block_r, block_c = _block(r), _block(c)
    _kernels().encode[(_programs(n_chunks, m.device),)](
        m, g.contiguous(), _padded_dct(r, block_r, m.device), _padded_dct(c, block_c, m.device), idx, vals,
        cols, cols // c, n_chunks, float(decay), float(lr),
        R=r, C=c, K=k, BLOCK_R=block_r, BLOCK_C=block_c, PRECISION=precision, THRESHOLDS=SETTINGS.thresholds,
        SKIP=stage_skip, num_warps=SETTINGS.encode_warps)
    return Sparse(idx=idx, vals=vals, shape=shape, chunk=chunk)


def round_subtract(m: torch.Tensor, sparse: Sparse, *, value_dtype: str, precision: str = "tf32x3") -> Sparse:
    """Round sparse.vals as the wire carries them (in place), then m ← m − IDCT(scatter(vals)) in place.

    Returns the Sparse that was transmitted, its values as compression.round_values gives them: float32 for float32
    and int8 (the reconstructed q · scale), bfloat16 or float16 tensors for those."""
    if value_dtype not in _VALUE_CODES:
        raise ValueError(f"value_dtype must be one of {sorted(_VALUE_CODES)}")
    rows, cols, r, c = _grid(sparse.shape, sparse.chunk)
    n_chunks, k = sparse.vals.shape
    if value_dtype == "int8":  # scale = max|vals| / 127 over the whole parameter, computed in the kernel
        largest = torch.linalg.vector_norm(sparse.vals, ord=math.inf).reshape(1)
    else:
        largest = sparse.vals  # not read
    block_r, block_c = _block(r), _block(c)
    _kernels().decode[(_programs(n_chunks, m.device),)](
        m, sparse.idx, sparse.vals, largest, _padded_dct(r, block_r, m.device), _padded_dct(c, block_c, m.device),
        cols, cols // c, n_chunks,
        R=r, C=c, K=k, BLOCK_K=max(16, _next_power_of_2(k)), BLOCK_R=block_r, BLOCK_C=block_c,
        VALUES=_VALUE_CODES[value_dtype], PRECISION=precision,
        num_warps=SETTINGS.decode_warps)
    if value_dtype not in FLOAT_ENCODINGS:  # int8: the reconstructed q · scale, float32 as round_values gives it
        return sparse
    # bf16/fp16: the same tensor round_values gives (exact: the kernel already rounded the values)
    return Sparse(sparse.idx, sparse.vals.to(torch_dtype(value_dtype)), sparse.shape, sparse.chunk)


def round_trip(m: torch.Tensor, g: torch.Tensor, *, decay: float, lr: float, topk: int, target_chunk: int,
               value_dtype: str = "float32", precision: str = "tf32x3") -> Sparse:
    """ErrorFeedback's per-parameter step, fused: fold, encode, top-k, round, decode, subtract."""
    sparse = fold_encode(m, g, decay=decay, lr=lr, topk=topk, target_chunk=target_chunk, precision=precision)
    return round_subtract(m, sparse, value_dtype=value_dtype, precision=precision)


def sparse_select(error: torch.Tensor | None, delta: torch.Tensor, *, decay: float, k: int,
                  chunk: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """e' = decay · error + delta (delta alone for error None) into a new float32 tensor, and the k largest |e'| of
    each chunk: (e', idx (n_chunks, k) int64 increasing within each chunk, vals (n_chunks, k) float32 = e'[idx]).
    error, delta: contiguous, the parameter's 1-D or 2-D view, chunk ≤ MAX_CHUNK_SIDE per side; 1 ≤ k ≤ chunk size.
    A non-finite e' is among the kept values wherever it occurs (its bits without the sign are above every finite
    value's)."""
    shape = tuple(delta.shape)
    rows, cols, r, c = _grid(shape, chunk)
    n_chunks = (rows // r) * (cols // c)
    out = torch.empty(shape, dtype=torch.float32, device=delta.device)
    idx = torch.empty(n_chunks, k, dtype=torch.int64, device=delta.device)
    vals = torch.empty(n_chunks, k, dtype=torch.float32, device=delta.device)
    _kernels().sparse_select[(_programs(n_chunks, delta.device),)](
        delta if error is None else error, delta, out, idx, vals, cols, cols // c, n_chunks, float(decay),
        R=r, C=c, K=k, BLOCK_R=_block(r), BLOCK_C=_block(c), THRESHOLDS=SETTINGS.thresholds,
        HAS_ERROR=error is not None, num_warps=SETTINGS.encode_warps,
        enable_fp_fusion=False)  # β·e + Δ rounded twice, as torch does: the same e', selection and codes on a GPU
    return out, idx, vals


# ---------------------------------------------------------------------------------------------------- helpers
def _grid(shape: tuple[int, ...], chunk: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(rows, cols, r, c) of the 2-D view the kernels walk: a 1-D (N,) with chunk (n,) is (N/n, n) with (1, n)."""
    if len(shape) == 1:
        return shape[0] // chunk[0], chunk[0], 1, chunk[0]
    return shape[0], shape[1], chunk[0], chunk[1]


def _programs(n_chunks: int, device: torch.device) -> int:
    if SETTINGS.programs_per_sm is None or device.type != "cuda":
        return n_chunks
    return min(n_chunks, _multiprocessors(device) * SETTINGS.programs_per_sm)


@functools.lru_cache(maxsize=8)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _block(side: int) -> int:
    return max(16, _next_power_of_2(side))  # tl.dot needs every side ≥ 16


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=32)
def _padded_dct(n: int, block: int, device: torch.device) -> torch.Tensor:
    """D_n (n, n) zero-padded to (block, block), contiguous float32 on device."""
    padded = torch.zeros(block, block, dtype=torch.float32)
    padded[:n, :n] = dct_matrix(n)
    return padded.to(device)


def _kernels():
    """The jit-compiled kernels (templar_lib/kernels_triton.py imports triton; only imported when first needed)."""
    from templar_lib import kernels_triton

    return kernels_triton
