"""Compression and outer step against Templar's own reference vectors (tests/data/vectors.*, see its README)."""

import pytest
import torch

from templar_lib.aggregation import learning_rate_at, outer_step_, update_norm
from templar_lib.compression import (CombinedCoefficients, Sparse, aggregate, chunk_shape, chunk_side, combine,
                                     combine_many, dct_matrix, decode, encode, idct_chunks, idct_many)
from templar_lib.error_feedback import ErrorFeedback
from templar_lib.hparams import HParams

ATOL, RTOL = 1e-6, 1e-5  # fp32: the reference differs from us in summation order only
PEERS = range(3)


def params(meta):
    return list(meta["params"])


def test_chunk_split_matches_reference_for_every_size(vectors):
    sizes, chunks = vectors["split/n"].tolist(), vectors["split/chunk"].tolist()
    assert [chunk_side(n, 64) for n in sizes] == chunks
    assert (chunk_side(96, 64), chunk_side(300, 64), chunk_side(4096, 64)) == (48, 60, 64)


def test_dct_bases_match_reference(vectors):
    sizes = sorted(int(key.split("_")[1]) for key in vectors if key.startswith("basis/dct_"))
    assert sizes
    for n in sizes:
        # reference stores f = DCT applied to rows of I (x @ f), i.e. Dᵀ, and b = IDCT of rows of I, i.e. D
        torch.testing.assert_close(dct_matrix(n).T, vectors[f"basis/dct_{n}"], atol=1e-7, rtol=0)
        torch.testing.assert_close(dct_matrix(n), vectors[f"basis/idct_{n}"], atol=1e-7, rtol=0)


def test_encode_decode_matches_reference(vectors, vectors_meta):
    for name in params(vectors_meta):
        expected = vectors_meta["params"][name]
        sparse = encode(vectors[f"rt/{name}/x"], topk=32, target_chunk=64)
        assert list(sparse.chunk) == expected["chunk"]
        assert sparse.idx.shape[1] == expected["topk_effective"]
        torch.testing.assert_close(decode(sparse), vectors[f"rt/{name}/decoded"], atol=ATOL, rtol=RTOL)
        if not expected["zero_grad"]:  # all-zero input: any index set is a valid top-k
            reference = vectors[f"rt/{name}/idx_canon"].reshape(sparse.idx.shape[0], -1)
            assert torch.equal(sparse.idx.sort(dim=1).values, reference), name


def test_error_feedback_and_aggregation_match_reference_windows(vectors, vectors_meta):
    for window in (0, 1):
        lr = float(vectors[f"w{window}/lr"])
        for name in params(vectors_meta):
            sent = []
            for peer in PEERS:
                prefix = f"w{window}/peer{peer}/{name}"
                feedback = ErrorFeedback({name: vectors[f"{prefix}/m_before"].clone()}, topk=32, target_chunk=64,
                                         momentum_decay=0.999)
                sparse = feedback.step({name: vectors[f"{prefix}/grad"]}, lr=lr)[name]
                torch.testing.assert_close(decode(sparse), vectors[f"{prefix}/transmit"], atol=1e-9, rtol=1e-5)
                torch.testing.assert_close(feedback.momentum[name], vectors[f"{prefix}/m_after"], atol=1e-9, rtol=1e-5)
                sent.append(sparse)
            direction = aggregate(sent)
            torch.testing.assert_close(direction, vectors[f"w{window}/agg/{name}/decoded"], atol=ATOL, rtol=RTOL)
            sign = torch.sign(direction)
            assert torch.equal(sign, vectors[f"w{window}/agg/{name}/sign"])
            parameters = {name: vectors[f"w{window}/shared/{name}/p_before"].clone()}
            outer_step_(parameters, {name: sign}, lr=lr, weight_decay=0.1)
            assert torch.equal(parameters[name], vectors[f"w{window}/agg/{name}/p_next"])  # bit-exact


def test_learning_rate_schedule_matches_torch_reference(vectors):
    hparams = HParams()
    for step, value in zip(vectors["lr/steps"].tolist(), vectors["lr/values"].tolist()):
        assert learning_rate_at(step, hparams) == pytest.approx(value, rel=1e-12), step
    assert learning_rate_at(int(vectors["w0/global_step"]), hparams) == pytest.approx(float(vectors["w0/lr"]))


@pytest.mark.parametrize("shape", [(128, 256), (96, 64), (300,), (97, 64), (37, 48), (5,), (64, 1)])
def test_full_k_reconstructs_input(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    chunk = chunk_shape(shape, 64)
    sparse = encode(x, topk=chunk[0] * (chunk[1] if len(chunk) == 2 else 1), target_chunk=64)
    torch.testing.assert_close(decode(sparse), x, atol=1e-5, rtol=0)


def test_error_feedback_conserves_what_it_does_not_send():
    generator = torch.Generator().manual_seed(1)
    gradients = {"w": torch.randn(96, 128, generator=generator), "b": torch.randn(300, generator=generator)}
    momentum = {"w": torch.randn(96, 128, generator=generator), "b": torch.randn(300, generator=generator)}
    feedback = ErrorFeedback({n: m.clone() for n, m in momentum.items()}, topk=32, target_chunk=64,
                             momentum_decay=0.999)
    lr = 3e-4
    sent = feedback.step(gradients, lr=lr)
    for name in gradients:
        before = 0.999 * momentum[name] + lr * gradients[name]  # m_before·decay + lr·g == transmitted + m_after
        torch.testing.assert_close(decode(sent[name]) + feedback.momentum[name], before, atol=1e-6, rtol=0)
        assert decode(sent[name]).abs().sum() > 0


def test_bf16_values_leave_exactly_the_rounding_in_the_momentum():
    g = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(2))}
    feedback = ErrorFeedback.zeros_like(g, topk=8, target_chunk=64, momentum_decay=0.9, value_dtype="bfloat16")
    sparse = feedback.step(g, lr=1.0)["w"]
    assert sparse.vals.dtype == torch.bfloat16
    torch.testing.assert_close(decode(sparse) + feedback.momentum["w"], g["w"], atol=1e-6, rtol=0)


def test_aggregate_takes_the_mean_over_peers_that_chose_a_coefficient():
    # two peers, one 1-D chunk of 4; both normalised vals have norm 1
    a = Sparse(idx=torch.tensor([[0, 1]]), vals=torch.tensor([[3.0, 4.0]]), shape=(4,), chunk=(4,))
    b = Sparse(idx=torch.tensor([[1, 2]]), vals=torch.tensor([[0.0, 2.0]]), shape=(4,), chunk=(4,))
    coefficients = torch.tensor([0.6, (0.8 + 0.0) / 2, 1.0, 0.0])  # idx 1 chosen by both: mean over the two
    expected = dct_matrix(4).T @ coefficients
    torch.testing.assert_close(aggregate([a, b]), expected, atol=1e-6, rtol=0)


def test_combined_rows_and_dense_form_are_the_same_coefficients():
    generator = torch.Generator().manual_seed(3)
    peers = [encode(torch.randn(96, 128, generator=generator), 8, 64) for _ in range(3)]
    coefficients = combine(peers)  # (4 chunks, 48·64)
    coefficients[1, coefficients[1].nonzero()[0]] = 0.0  # an exact zero is not a stored coefficient
    combined = CombinedCoefficients.of_dense(coefficients, (96, 128), (48, 64))
    assert combined.dense is coefficients  # the aggregator decodes its own tensor: no scan, same bits
    nonzero = coefficients.nonzero()
    assert combined.counts.tolist() == torch.bincount(nonzero[:, 0], minlength=4).tolist()
    assert torch.equal(combined.idx, nonzero[:, 1]) and torch.equal(combined.vals, coefficients[coefficients != 0])
    # as a file reader builds it
    back = CombinedCoefficients(combined.idx, combined.vals, combined.counts, (96, 128), (48, 64))
    assert torch.equal(back.dense, coefficients)


def test_combining_parameters_together_is_the_same_math():
    generator = torch.Generator().manual_seed(4)
    shapes = [(128, 64), (128, 64), (64,), (96, 128), (128, 64), (64,)]  # two layouts repeat, as across layers
    parameters = []
    for shape in shapes:
        peers = [encode(torch.randn(shape, generator=generator), 8, 32) for _ in range(5)]
        peers[1] = Sparse(peers[1].idx.int(), peers[1].vals.bfloat16(), peers[1].shape, peers[1].chunk)  # as read
        parameters.append(peers)
    parameters[4] = parameters[4][:3]  # a parameter some peers did not send is grouped apart
    ragged = parameters[3][0]
    parameters[3][0] = Sparse(ragged.idx[:, :4], ragged.vals[:, :4], ragged.shape, ragged.chunk)  # fewer values
    together = combine_many(parameters)
    for peers, coefficients in zip(parameters, together):
        assert torch.equal(coefficients, combine(peers))
    chunks = [peers[0].chunk for peers in parameters]
    for coefficients, shape, chunk, decoded in zip(together, shapes, chunks, idct_many(together, shapes, chunks)):
        # a larger batched matmul may sum in another order (BLAS picks kernels by size): equal to rounding; every
        # node decodes with the same grouping, so they still agree with each other
        assert decoded.shape == shape
        torch.testing.assert_close(decoded, idct_chunks(coefficients, shape, chunk), atol=1e-6, rtol=1e-5)


def test_three_dimensional_tensors_are_not_part_of_the_protocol():
    with pytest.raises(ValueError, match="1-D and 2-D"):
        encode(torch.zeros(4, 8, 16))


def test_update_norm_is_the_norm_of_the_whole_difference():
    generator = torch.Generator().manual_seed(0)
    before = {"w": torch.randn(8, 4, generator=generator), "b": torch.randn(4, generator=generator)}
    after = {"w": before["w"] + 0.5, "b": before["b"].to(torch.bfloat16)}
    whole = torch.cat([(after[n].float() - before[n]).reshape(-1) for n in before]).double().norm()
    assert update_norm(before, after) == pytest.approx(float(whole), rel=1e-6)
    assert update_norm(before, before) == 0.0
