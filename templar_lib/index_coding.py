"""Lossless coding of top-k indices (wire format v2): Golomb–Rice codes of the gaps between sorted indices.

Each chunk keeps k distinct positions out of n = chunk size. Sorted, they are k gaps
g_0 = i_0, g_j = i_j − i_{j−1} − 1 (≥ 0), roughly geometric with mean ≈ n/k. A Rice code with parameter b writes
g as q = g >> b in unary (q ones and a zero) and r = g mod 2^b in b bits: about b + 2 bits per index instead of
the 12–16 of a fixed-width integer (n = 4096, k = 32: b = 6 or 7, ≈ 9 bits).

The unary parts and the remainders go to two separate bit streams, so decoding is vectorised: the zeros of the
unary stream mark where each q ends, and the remainders are fixed width. Encoding and decoding are exact inverses;
`decode_indices` validates the streams (lengths, counts, ranges) and raises ValueError on anything inconsistent.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def rice_parameter(chunk_size: int, k: int) -> int:
    """b ≈ log2(mean gap): near-optimal for geometric gaps of mean (n − k) / k."""
    mean_gap = max(1.0, (chunk_size - k) / max(1, k))
    return max(0, int(math.floor(math.log2(mean_gap))))


def encode_indices(idx: torch.Tensor, chunk_size: int) -> tuple[bytes, bytes, int]:
    """idx: (n_chunks, k) distinct positions per row. Returns (unary stream, remainder stream, b); order within a row
    is not kept: rows come back sorted (the coefficient values must be permuted the same way, see `sort_rows`)."""
    rows = np.sort(idx.to(torch.int64).numpy(), axis=1)
    n_chunks, k = rows.shape
    b = rice_parameter(chunk_size, k)
    gaps = np.diff(rows, axis=1, prepend=-1) - 1  # (n_chunks, k), ≥ 0
    gaps = gaps.reshape(-1)
    quotients = gaps >> b
    remainders = gaps & ((1 << b) - 1)
    # unary stream: q ones then a zero, per gap; the zero ends sit at cumulative positions
    ends = np.cumsum(quotients + 1) - 1
    unary = np.ones(int(ends[-1]) + 1 if gaps.size else 0, dtype=np.uint8)
    unary[ends] = 0
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        bits = ((remainders[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    else:
        bits = np.zeros(0, dtype=np.uint8)
    return np.packbits(unary).tobytes(), np.packbits(bits).tobytes(), b


def max_unary_bytes(n_chunks: int, k: int, chunk_size: int, b: int) -> int:
    """The longest unary stream of n_chunks rows of k sorted distinct positions in [0, chunk_size): a row's k gaps
    sum to at most chunk_size − k, so its quotients Σ ⌊g_j / 2^b⌋ ≤ ⌊(chunk_size − k) / 2^b⌋, plus one end bit per gap.
    Honest streams are about half of it (gaps average (chunk_size − k) / k, b ≈ log2 of that)."""
    return -(-n_chunks * (k + ((chunk_size - k) >> b)) // 8) if k else 0


def decode_indices(unary: bytes, remainders: bytes, b: int, n_chunks: int, k: int, chunk_size: int) -> torch.Tensor:
    """Inverse of encode_indices: (n_chunks, k) int64, each row strictly increasing within [0, chunk_size).
    Stream lengths are checked before anything is unpacked (a bit costs 1 to 8 bytes of work space): the largest
    stream this accepts is max_unary_bytes, never the file's size limit."""
    count = n_chunks * k
    if not 0 <= b <= 30:
        raise ValueError(f"rice parameter {b} out of range")
    if len(remainders) != (count * b + 7) // 8:
        raise ValueError("remainder stream has the wrong length")
    if len(unary) > max_unary_bytes(n_chunks, k, chunk_size, b):
        raise ValueError(f"unary stream of {len(unary)} bytes is longer than any of {n_chunks} × {k} positions")
    unary_bits = np.unpackbits(np.frombuffer(unary, dtype=np.uint8))
    ends = np.flatnonzero(unary_bits == 0)
    if ends.size < count:
        raise ValueError("unary stream ends early")
    ends = ends[:count]
    if (len(unary) * 8 - int(ends[-1]) - 1 if count else len(unary) * 8) >= 8:
        raise ValueError("unary stream has trailing bytes")
    quotients = np.diff(ends, prepend=-1) - 1
    values = np.zeros(count, dtype=np.int64)
    if b:  # b bits a value, most significant first: one column at a time (no int64 per bit)
        bits = np.unpackbits(np.frombuffer(remainders, dtype=np.uint8))[: count * b].reshape(count, b)
        for column in range(b):
            values <<= 1
            values |= bits[:, column]
    gaps = ((quotients.astype(np.int64) << b) + values).reshape(n_chunks, k)
    positions = np.cumsum(gaps + 1, axis=1) - 1
    if positions.size and int(positions[:, -1].max()) >= chunk_size:
        raise ValueError(f"index outside [0, {chunk_size})")
    return torch.from_numpy(positions)


def sort_rows(idx: torch.Tensor, vals: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row of idx ascending and permute vals the same way (the order v2 stores them in)."""
    order = idx.argsort(dim=1)
    return idx.gather(1, order), vals.gather(1, order)
