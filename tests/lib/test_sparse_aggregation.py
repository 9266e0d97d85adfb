"""The SparseLoCo aggregation file (aggregation format 3, templar_lib/wire/sparse.py): the accepted peers' own
SparseDeltas, from which every node replays combine_deltas and the outer step to the same bits. Byte-identical round
trips over odd shapes and 0–5 peers, the replayed update against combine_deltas of what was sent, validation,
fuzzing, and the size of a 20-peer file on the tiny preset against a dense update.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load

from templar_lib.model import build_model
from templar_lib.sparseloco import SparseDelta, combine_deltas, decode_delta, encode_delta, outer_step
from templar_lib.wire.container import InvalidFile, save_templar_file
from templar_lib.wire.sparse import (SparseAggregation, SparseGradient, max_sparse_aggregation_bytes,
                                     read_sparse_aggregation, sparse_update, write_sparse_aggregation,
                                     write_sparse_gradient)
from tests.lib.test_sparseloco import mutations

META = json.loads((Path(__file__).parents[1] / "data" / "sparseloco" / "vectors.json").read_text())
TOPK, TARGET_CHUNK = META["hparams"]["topk_compression"], META["hparams"]["target_chunk"]
SHAPES = {name: tuple(meta["shape"]) for name, meta in (META["params"] | META["unsupported"]).items()} | {
    "scalar": (), "one": (1,), "single.weight": (1, 1)}
UIDS = [2, 5, 7, 11, 40]


def peer_deltas(shapes: dict, peers: int, seed: int = 0, **settings) -> dict[str, list[SparseDelta]]:
    """Each peer's SparseDelta of random pseudo-gradients (zero.weight all zeros, as in the Templar vectors)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        deltas = [torch.randn(shape, generator=generator) * (p + 1) for p in range(peers)]  # norms differ: clipping
        if name == "zero.weight":
            deltas = [torch.zeros(shape) for _ in range(peers)]
        tensors[name] = [encode_delta(delta, None, topk=TOPK, target_chunk=TARGET_CHUNK, **settings)[0]
                         for delta in deltas]
    return tensors


def aggregation(peers: int = 3, seed: int = 0, shapes: dict = SHAPES, **settings) -> SparseAggregation:
    return SparseAggregation(window=12, step=9, lr=0.4, peers=UIDS[:peers], tensors=peer_deltas(shapes, peers, seed,
                                                                                                **settings),
                             hparams_hash="h", refused={3: "changed after it was scored", 100: "no file"})


def read(data: bytes, **options) -> SparseAggregation:
    arguments = dict(window=12, shapes=SHAPES, topk=TOPK, target_chunk=TARGET_CHUNK, max_peers=5, hparams_hash="h",
                     max_bytes=max_sparse_aggregation_bytes(SHAPES, topk=TOPK, target_chunk=TARGET_CHUNK, peers=5))
    return read_sparse_aggregation(data, **(arguments | options))


def header_of(data: bytes) -> dict:
    return json.loads(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]["templar"])


def rewritten(data: bytes, header_change=None, tensor_change=None) -> bytes:
    """A structurally valid file (safetensors, JSON header) with its templar header and/or tensors changed."""
    header, tensors = header_of(data), load(data)
    if header_change:
        header_change(header)
    if tensor_change:
        tensor_change(tensors)
    return save_templar_file(tensors, header)


# ---------------------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("peers", [1, 2, 3, 4, 5])
def test_round_trip_is_byte_identical_and_keeps_each_peer(peers):
    sent = aggregation(peers, seed=peers)
    data = write_sparse_aggregation(sent)
    assert write_sparse_aggregation(aggregation(peers, seed=peers)) == data  # deterministic
    assert len(data) <= max_sparse_aggregation_bytes(SHAPES, topk=TOPK, target_chunk=TARGET_CHUNK, peers=peers)
    back = read(data)
    assert write_sparse_aggregation(back) == data
    assert (back.window, back.step, back.lr, back.peers, back.hparams_hash) == (12, 9, 0.4, UIDS[:peers], "h")
    assert back.refused == {3: "changed after it was scored", 100: "no file"}
    assert set(back.tensors) == set(SHAPES)
    for name, deltas in sent.tensors.items():
        assert len(back.tensors[name]) == peers
        for original, decoded in zip(deltas, back.tensors[name], strict=True):  # peer p's own SparseDelta, in order
            assert (decoded.shape, decoded.chunk, decoded.k) == (original.shape, original.chunk, original.k)
            assert torch.equal(decode_delta(decoded), decode_delta(original))
            assert torch.equal(decoded.idx, original.idx.sort(dim=1).values)
            assert decoded.shift == original.shift and torch.equal(decoded.table, original.table)


@pytest.mark.parametrize("peers", [1, 2, 3, 5])
def test_replayed_update_equals_combine_deltas_of_what_was_sent(peers):
    sent = aggregation(peers, seed=10 + peers)
    update = sparse_update(read(write_sparse_aggregation(sent)))
    assert list(update) == sorted(SHAPES)
    generator = torch.Generator().manual_seed(99)
    for name, deltas in sent.tensors.items():
        expected = combine_deltas(deltas)
        assert update[name].dtype == torch.float32 and torch.equal(update[name], expected)
        theta = torch.randn(SHAPES[name], generator=generator)
        assert torch.equal(outer_step(theta, update[name], sent.lr), outer_step(theta, expected, 0.4))
    assert any(bool(update[name].ne(0).any()) for name in update)


def test_no_peer_is_an_empty_file_and_no_update():
    empty = SparseAggregation(window=12, step=9, lr=0.4, peers=[], tensors={}, hparams_hash="h",
                              refused={7: "no file"})
    data = write_sparse_aggregation(empty)
    back = read(data)
    assert back.peers == [] and back.tensors == {} and back.refused == {7: "no file"} and sparse_update(back) == {}
    assert write_sparse_aggregation(back) == data
    with pytest.raises(InvalidFile, match="no peer"):  # parameters in a file of no peer
        read(rewritten(write_sparse_aggregation(aggregation(1)), lambda header: header.update(peers=[])))


def test_other_bin_counts_round_trip_and_are_checked():
    data = write_sparse_aggregation(aggregation(2, bins=16))
    assert write_sparse_aggregation(read(data, bins=16)) == data
    with pytest.raises(InvalidFile, match="bins"):
        read(data)


def test_the_file_is_smaller_than_the_peers_gradient_files():
    sent = aggregation(5)
    gradients = sum(len(write_sparse_gradient(SparseGradient(12, uid, {n: d[p] for n, d in sent.tensors.items()})))
                    for p, uid in enumerate(sent.peers))
    assert len(write_sparse_aggregation(sent)) < gradients


# ---------------------------------------------------------------------------------------------------- writer
def test_writer_refuses_what_no_file_can_say():
    sent = aggregation(3)
    with pytest.raises(ValueError, match="ascending"):
        write_sparse_aggregation(SparseAggregation(12, 9, 0.4, [5, 2, 7], sent.tensors))
    with pytest.raises(ValueError, match="ascending"):
        write_sparse_aggregation(SparseAggregation(12, 9, 0.4, [2, 2, 7], sent.tensors))
    with pytest.raises(ValueError, match="for 2 peers"):
        write_sparse_aggregation(SparseAggregation(12, 9, 0.4, [2, 5], sent.tensors))
    mixed = dict(sent.tensors, **{"norm.weight": sent.tensors["norm.weight"][:2] + sent.tensors["bias96"][:1]})
    with pytest.raises(ValueError, match="disagree"):
        write_sparse_aggregation(SparseAggregation(12, 9, 0.4, [2, 5, 7], mixed))
    with pytest.raises(ValueError, match="no peer"):
        write_sparse_aggregation(SparseAggregation(12, 9, 0.4, [], sent.tensors))


# ---------------------------------------------------------------------------------------------------- validation
VALID = write_sparse_aggregation(aggregation(3))


@pytest.mark.parametrize("options, reason", [
    (dict(window=13), "window"), (dict(hparams_hash="other"), "hparams hash"), (dict(max_bytes=100), "exceeds"),
    (dict(max_peers=2), "3 peers, at most 2"), (dict(topk=32), "values per chunk"), (dict(target_chunk=32), "chunk"),
    (dict(shapes=SHAPES | {"rows96.weight": (64, 96)}), "shape"),
    (dict(shapes={n: s for n, s in SHAPES.items() if n != "scalar"}), "parameters differ"),
    (dict(shapes=SHAPES | {"extra.bias": (8,)}), "parameters differ"),
])
def test_refuses_a_file_for_another_window_model_or_network(options, reason):
    with pytest.raises(InvalidFile, match=reason):
        read(VALID, **options)


def test_refuses_a_gradient_file():
    gradient = write_sparse_gradient(SparseGradient(12, 2, {n: d[0] for n, d in aggregation(1).tensors.items()}))
    with pytest.raises(InvalidFile, match="kind"):
        read(gradient)


def set_refused(value):
    return lambda header: header.update(refused=value)


@pytest.mark.parametrize("change, reason", [
    (lambda h: h.update(kind="gradient"), "kind"), (lambda h: h.update(format=1), "format"),
    (lambda h: h.update(peers=[5, 2, 7]), "ascending"), (lambda h: h.update(peers=[2, 2, 7]), "ascending"),
    (lambda h: h.update(peers=[-1, 2, 7]), "ascending"), (lambda h: h.update(peers="2,5,7"), "ascending"),
    (lambda h: h.update(peers=[2, 5, True]), "ascending"),
    (lambda h: h.update(peers=[2, 5]), "tensor mismatch"),  # the tensors hold three peers
    (lambda h: h.update(peers=[2, 5, 7, 8]), "tensor mismatch"),
    (lambda h: h.update(lr=float("nan")), "lr"), (lambda h: h.update(lr=float("inf")), "lr"),
    (lambda h: h.update(lr=-0.4), "lr"), (lambda h: h.update(lr=1), "lr"), (lambda h: h.update(lr="0.4"), "lr"),
    (lambda h: h.update(step=-1), "step"), (lambda h: h.update(step=1.0), "step"), (lambda h: h.pop("step"), "step"),
    (lambda h: h.pop("hparams_hash"), "hparams_hash"), (lambda h: h.update(bins=2), "bins"),
    (set_refused({"5": "no file"}), "both combined and refused"), (set_refused({"x": "no file"}), "refused"),
    (set_refused({"3": 4}), "refused"), (set_refused({"3": "x" * 501}), "refused"), (set_refused([]), "refused"),
    (set_refused({"03": "no file"}), "canonical"), (lambda h: h.pop("refused"), "refused"),
    (lambda h: h.update(params=[]), "params"),
    (lambda h: h["params"]["bias96"].update(rice=h["params"]["bias96"]["rice"] + 1), "rice"),
    (lambda h: h["params"]["bias96"].update(k=40), "values per chunk"),
    (lambda h: h["params"]["bias96"].update(extra=1), "malformed"),
    (lambda h: h["params"]["odd70.bias"].update(chunk=[70]), "chunk"),
    (lambda h: h.update(window=True), "window"),
])
def test_refuses_a_bad_header_with_a_reason(change, reason):
    with pytest.raises(InvalidFile, match=reason):
        read(rewritten(VALID, change))


def set_tensor(name: str, change):
    def apply(tensors: dict) -> None:
        tensors[name] = change(tensors[name].clone())
    return apply


@pytest.mark.parametrize("change, reason", [
    (set_tensor("rows96.weight.quant", lambda q: q.index_put_((torch.tensor(1), torch.tensor(2)),
                                                              torch.tensor(float("nan")))), "peer 1.*non-finite"),
    (set_tensor("rows96.weight.quant", lambda q: q.index_put_((torch.tensor(2), torch.tensor(0)),
                                                              torch.tensor(float("inf")))), "peer 2.*non-finite"),
    (set_tensor("rows96.weight.quant", lambda q: q.fill_(3e38)), "non-finite"),  # table + shift overflows
    (set_tensor("rows96.weight.quant", lambda q: q[:2]), "quant tensor mismatch"),
    (set_tensor("rows96.weight.quant", lambda q: q.reshape(-1)), "quant tensor mismatch"),
    (set_tensor("rows96.weight.quant", lambda q: q.half()), "quant tensor mismatch"),
    (set_tensor("rows96.weight.bits", lambda b: torch.cat([b, torch.zeros(1, dtype=torch.uint8)])), "trailing"),
    (set_tensor("rows96.weight.bits", lambda b: b[:-1]), "ends early|wrong length|mismatch"),
    (set_tensor("rows96.weight.bits", lambda b: b[:40]), "bits tensor mismatch"),
    (set_tensor("rows96.weight.bits", lambda b: b.index_fill_(0, torch.tensor([b.numel() - 8]), 255)),
     "index|stream|trailing"),
    (set_tensor("rows96.weight.bits", lambda b: b.to(torch.int16)), "bits tensor mismatch"),
    (set_tensor("tiny_odd.weight.bits", lambda b: b.index_fill_(0, torch.tensor([46]), 255)),  # 186 codes: padding
     "padding"),
    (lambda tensors: tensors.pop("bias96.quant"), "tensors do not match"),
    (lambda tensors: tensors.update({"bias96.0.bits": tensors["bias96.bits"].clone()}), "tensors do not match"),
])
def test_refuses_bad_tensors_with_a_reason(change, reason):
    with pytest.raises(InvalidFile, match=reason):
        read(rewritten(VALID, tensor_change=change))


def test_swapping_two_peers_is_a_different_file_not_a_different_reading():
    """Peer order is uid order: the same deltas listed under other uids are another (valid) aggregation, and the
    update depends on which deltas, not on the uids."""
    sent = aggregation(2)
    swapped = SparseAggregation(12, 9, 0.4, [2, 5], {n: d[::-1] for n, d in sent.tensors.items()}, "h")
    assert write_sparse_aggregation(swapped) != write_sparse_aggregation(sent)
    back = read(write_sparse_aggregation(swapped))
    for name in SHAPES:
        assert torch.equal(decode_delta(back.tensors[name][0]), decode_delta(sent.tensors[name][1]))


FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_SHAPES = {"rows96.weight": (96, 64), "odd70.bias": (70,), "tiny_odd.weight": (7, 9), "scalar": ()}
FUZZ_VALID = write_sparse_aggregation(aggregation(3, shapes=FUZZ_SHAPES))


@FUZZ
@given(data=mutations(FUZZ_VALID))
def test_damaged_files_raise_invalid_file_and_nothing_else(data):
    try:
        back = read(data, shapes=FUZZ_SHAPES, max_bytes=1 << 20)
    except InvalidFile as error:
        assert str(error)
    else:  # a change that left the file valid (a digit of lr, a reason's letter) is still canonical
        assert write_sparse_aggregation(back) == data and set(back.tensors) == set(FUZZ_SHAPES)
        assert all(len(deltas) == len(back.peers) for deltas in back.tensors.values())
        sparse_update(back)  # and replays without error


# ---------------------------------------------------------------------------------------------------- size
def test_twenty_peers_on_the_tiny_preset_cost_a_fraction_of_a_dense_update(capsys):
    shapes = {name: tuple(p.shape) for name, p in build_model("tiny", device="meta").named_parameters()}
    peers = list(range(1, 41, 2))
    tensors = peer_deltas(shapes, len(peers), seed=3)
    sent = SparseAggregation(window=7, step=6, lr=0.4, peers=peers, tensors=tensors, hparams_hash="h" * 64)
    data = write_sparse_aggregation(sent)
    limit = max_sparse_aggregation_bytes(shapes, topk=TOPK, target_chunk=TARGET_CHUNK, peers=len(peers))
    back = read_sparse_aggregation(data, window=7, shapes=shapes, topk=TOPK, target_chunk=TARGET_CHUNK,
                                   max_peers=len(peers), max_bytes=limit, hparams_hash="h" * 64)
    update = sparse_update(back)
    assert all(torch.equal(update[name], combine_deltas(tensors[name])) for name in shapes)
    numel = sum(math.prod(shape) for shape in shapes.values())
    kept = len(peers) * sum(deltas[0].idx.numel() for deltas in tensors.values())
    gradients = sum(len(write_sparse_gradient(SparseGradient(7, uid, {n: d[p] for n, d in tensors.items()},
                                                             "h" * 64)))
                    for p, uid in enumerate(peers))
    dense_bf16 = 2 * numel
    with capsys.disabled():
        print(f"\n20 peers, tiny preset ({numel} parameters, {len(shapes)} tensors): aggregation {len(data)} bytes "
              f"= {len(data) / dense_bf16:.3f} of a dense bf16 update ({dense_bf16} bytes), "
              f"{len(data) / (4 * numel):.3f} of float32; {len(data) / kept:.3f} bytes per kept value; "
              f"the 20 gradient files {gradients} bytes; reader limit {limit}")
    assert len(data) <= limit
    assert len(data) < dense_bf16 / 4 and len(data) < gradients
    assert len(data) / kept <= 2.0
