"""Golomb–Rice coding of sorted positions (templar_lib/index_coding.py): exact round trip, and the bound on the unary
stream every reader checks before it unpacks a single bit."""

import numpy as np
import pytest
import torch

from templar_lib.index_coding import decode_indices, encode_indices, max_unary_bytes, rice_parameter

SIZES = [(4096, 32), (4096, 64), (3072, 64), (64, 34), (70, 34), (9, 2), (63, 62), (1, 1)]


def random_rows(n_chunks: int, k: int, chunk_size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(chunk_size, generator=generator)[:k] for _ in range(n_chunks)])


@pytest.mark.parametrize("chunk_size, k", SIZES)
def test_round_trip_is_exact_and_within_the_bound(chunk_size, k):
    idx = random_rows(5, k, chunk_size, seed=chunk_size + k)
    unary, remainders, b = encode_indices(idx, chunk_size)
    assert b == rice_parameter(chunk_size, k)
    assert len(unary) <= max_unary_bytes(5, k, chunk_size, b)
    assert torch.equal(decode_indices(unary, remainders, b, 5, k, chunk_size), idx.sort(dim=1).values)


@pytest.mark.parametrize("chunk_size, k", SIZES)
def test_the_bound_is_reached_by_the_longest_stream_and_nothing_longer_is_unpacked(chunk_size, k, monkeypatch):
    """The longest stream: every row's positions at the chunk's end (one gap of c − k, the rest 0). One byte more
    is refused on its length alone: np.unpackbits is never called."""
    last = torch.arange(chunk_size - k, chunk_size).expand(3, k)
    unary, remainders, b = encode_indices(last, chunk_size)
    assert len(unary) == max_unary_bytes(3, k, chunk_size, b)
    assert torch.equal(decode_indices(unary, remainders, b, 3, k, chunk_size), last)
    monkeypatch.setattr(np, "unpackbits", lambda *a, **kw: pytest.fail("unpacked a stream longer than the bound"))
    with pytest.raises(ValueError, match="longer than any"):
        decode_indices(unary + b"\0", remainders, b, 3, k, chunk_size)


def test_a_stream_padded_to_the_files_size_limit_is_refused_before_it_costs_memory(monkeypatch):
    """The attack the bound stops: zero bytes (a position ending at every bit) up to what the file limit used to
    allow, (c + k) / 8 bytes a chunk, about 40 times an honest stream of 4096 × top-32."""
    idx = random_rows(64, 32, 4096, seed=1)
    unary, remainders, b = encode_indices(idx, 4096)
    padded = unary + bytes(64 * (4096 + 32) // 8 - len(unary))
    assert len(padded) > 30 * len(unary)
    monkeypatch.setattr(np, "unpackbits", lambda *a, **kw: pytest.fail("unpacked a padded stream"))
    with pytest.raises(ValueError, match="longer than any"):
        decode_indices(padded, remainders, b, 64, 32, 4096)
