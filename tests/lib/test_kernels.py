"""The fused compression kernels (templar_lib.kernels) against the torch path, run by Triton's interpreter on the
CPU: the same kernel source a GPU compiles. The interpreter must be chosen before triton is first imported (triton
decorates its own library functions then; transformers imports triton), so tests/conftest.py sets TRITON_INTERPRET=1
for the session; the fused path is still only chosen automatically on CUDA, so no other test runs it."""

from __future__ import annotations

import os
import sys

import pytest

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("triton was imported before its interpreter could be chosen", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch  # noqa: E402

from templar_lib import kernels  # noqa: E402
from templar_lib.compression import dct_chunks, encode  # noqa: E402
from templar_lib.error_feedback import ErrorFeedback  # noqa: E402
from templar_lib.sparseloco import encode_delta  # noqa: E402


@pytest.fixture
def interpreted():
    return kernels


def torch_step(m, g, *, value_dtype, decay=0.9, lr=0.1, topk=32):
    feedback = ErrorFeedback({"p": m.clone()}, topk=topk, target_chunk=64, momentum_decay=decay,
                             value_dtype=value_dtype, fused=False)
    return feedback.step({"p": g}, lr=lr)["p"], feedback.momentum["p"]


@pytest.mark.parametrize("shape,value_dtype", [
    ((128, 192), "float32"),   # 64 × 64 chunks
    ((96, 352), "bfloat16"),   # 48 × 44 chunks: padded tiles
    ((256,), "int8"),          # a 1-D parameter: chunks of 64 as (1, 64)
    ((128, 128), "int8"),
    ((64, 40), "float16"),     # one chunk of 64 × 40
])
def test_fused_round_trip_matches_the_torch_path(interpreted, shape, value_dtype):
    generator = torch.Generator().manual_seed(sum(shape))
    m0, g = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    expected, expected_momentum = torch_step(m0, g, value_dtype=value_dtype)
    m = m0.clone()
    sent = interpreted.round_trip(m, g, decay=0.9, lr=0.1, topk=32, target_chunk=64, value_dtype=value_dtype)
    positions, order = expected.idx.sort(dim=1)
    assert sent.idx.dtype == torch.int64 and sent.vals.dtype == expected.vals.dtype  # what the wire writes
    assert torch.equal(sent.idx, positions)  # the same kept coefficients, listed in increasing position
    assert torch.allclose(sent.vals.float(), expected.vals.float().gather(1, order), rtol=0, atol=1e-5)
    assert torch.allclose(m, expected_momentum, rtol=0, atol=1e-5)
    assert (sent.shape, sent.chunk) == (expected.shape, expected.chunk)


def test_error_feedback_fused_over_several_steps(interpreted):
    generator = torch.Generator().manual_seed(3)
    shapes = {"w": (128, 128), "b": (128,)}
    fused, plain = (ErrorFeedback({n: torch.zeros(s) for n, s in shapes.items()}, topk=16, target_chunk=64,
                                  momentum_decay=0.95, value_dtype="int8", fused=choice) for choice in (True, False))
    for _ in range(3):
        gradients = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
        sent, expected = fused.step(gradients, lr=0.01), plain.step(gradients, lr=0.01)
        for name in shapes:
            assert torch.equal(sent[name].idx, expected[name].idx.sort(dim=1).values)
    for name in shapes:
        assert torch.allclose(fused.momentum[name], plain.momentum[name], rtol=0, atol=1e-6)


def test_ties_keep_exactly_k_positions_first_in_row_major_order(interpreted):
    zeros = torch.zeros(64, 128)  # every |X| ties at 0: the first k positions of each chunk
    sent = interpreted.fold_encode(zeros.clone(), zeros, decay=0.9, lr=0.1, topk=32, target_chunk=64)
    assert torch.equal(sent.idx, torch.arange(32).expand(2, 32))
    levels = torch.randint(-2, 3, (64, 64), generator=torch.Generator().manual_seed(0)).float()  # many equal |X|
    m = torch.zeros(64, 64)
    sent = interpreted.fold_encode(m, levels, decay=0.9, lr=1.0, topk=32, target_chunk=64)
    magnitudes = dct_chunks(levels, (64, 64)).abs()[0]
    kept = torch.zeros(4096, dtype=torch.bool)
    kept[sent.idx[0]] = True
    assert kept.sum() == 32 and len(set(sent.idx[0].tolist())) == 32
    assert magnitudes[kept].min() >= magnitudes[~kept].max() - 1e-6  # a valid top-32 whatever the ties


@pytest.mark.parametrize("topk", [1, 100, 4096, 5000])  # 100 > 64 rows: the search starts from 0, not the rows
def test_any_k_selects_the_same_positions_as_torch_topk(interpreted, topk):
    m = torch.randn(64, 128, generator=torch.Generator().manual_seed(topk))
    sent = interpreted.fold_encode(m.clone(), torch.zeros_like(m), decay=1.0, lr=0.0, topk=topk, target_chunk=64)
    assert torch.equal(sent.idx, encode(m, topk, 64).idx.sort(dim=1).values)


def test_fewer_programs_than_chunks_loop_over_all_of_them(interpreted, monkeypatch):
    monkeypatch.setattr(interpreted, "_programs", lambda n_chunks, device: max(1, n_chunks // 3))
    generator = torch.Generator().manual_seed(5)
    m0, g = torch.randn(256, 320, generator=generator), torch.randn(256, 320, generator=generator)
    expected, expected_momentum = torch_step(m0, g, value_dtype="int8")
    m = m0.clone()
    sent = interpreted.round_trip(m, g, decay=0.9, lr=0.1, topk=32, target_chunk=64, value_dtype="int8")
    assert torch.equal(sent.idx, expected.idx.sort(dim=1).values)
    assert torch.allclose(m, expected_momentum, rtol=0, atol=1e-5)


def test_fused_is_chosen_automatically_only_on_cuda():
    assert not kernels.available("cpu")
    assert kernels.supports((128, 64), 64) and not kernels.supports((4, 4, 4), 64) and not kernels.supports((8,), 128)
    auto = ErrorFeedback({"p": torch.zeros(64, 64)}, topk=4, target_chunk=64, momentum_decay=0.9)
    assert not auto._fuses(auto.momentum["p"])  # the torch path on a CPU, interpreter or not
    assert auto.step({"p": torch.randn(64, 64)}, lr=0.1)["p"].idx.shape == (1, 4)


def test_forcing_the_fused_path_where_it_cannot_run_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    forced = ErrorFeedback({"p": torch.zeros(64, 64)}, topk=4, target_chunk=64, momentum_decay=0.9, fused=True)
    with pytest.raises(RuntimeError, match="fused compression needs CUDA and triton"):
        forced.step({"p": torch.randn(64, 64)}, lr=0.1)


# ---------------------------------------------------------------------------------------------------- sparseloco
def sparse_windows(shape, fused, windows=3, decay=0.99):
    """encode_delta window after window on the same Δs, the error carried: what was sent and the errors."""
    generator, error, out = torch.Generator().manual_seed(len(shape) + sum(shape)), None, []
    for _ in range(windows):
        sent, error = encode_delta(torch.randn(shape, generator=generator), error, decay=decay, topk=32, fused=fused)
        out.append((sent, error))
    return out


@pytest.mark.parametrize("shape", [(96, 352), (4, 8, 16), (300, 16), (256,), (7, 9)])
def test_sparseloco_fused_pass_is_the_torch_pass(interpreted, shape):
    """Padded tiles (48 × 44), a rank-3 view (4, 128), 60 × 16 chunks, 1-D chunks, one small chunk: the same
    selection, codes, shift and table, and the same error after, bit for bit, over three windows."""
    for (fused, error_f), (plain, error_p) in zip(sparse_windows(shape, True), sparse_windows(shape, False)):
        assert torch.equal(fused.idx, plain.idx) and torch.equal(fused.codes, plain.codes)
        assert fused.shift == plain.shift and torch.equal(fused.table, plain.table)
        assert (fused.shape, fused.chunk) == (plain.shape, plain.chunk)
        assert torch.equal(error_f, error_p)


def test_sparseloco_fused_loops_when_programs_are_fewer_than_chunks(interpreted, monkeypatch):
    monkeypatch.setattr(interpreted, "_programs", lambda n_chunks, device: max(1, n_chunks // 3))
    (fused, error_f), = sparse_windows((256, 320), True, windows=1)
    (plain, error_p), = sparse_windows((256, 320), False, windows=1)
    assert torch.equal(fused.idx, plain.idx) and torch.equal(error_f, error_p)


def test_sparseloco_fused_is_only_chosen_on_cuda_and_refused_where_it_cannot_run(monkeypatch):
    def no_kernel(*args, **kwargs):
        raise AssertionError("the fused kernel ran on a CPU without being asked to")

    monkeypatch.setattr(kernels, "sparse_select", no_kernel)
    sent, _ = encode_delta(torch.randn(64, 64), None)  # the default on a CPU, interpreter or not: torch
    assert sent.idx.shape == (1, 64)
    with pytest.raises(RuntimeError, match="chunks of at most 64"):
        encode_delta(torch.randn(97), None, fused=True)  # a prime length is one chunk of 97: too wide for a program
