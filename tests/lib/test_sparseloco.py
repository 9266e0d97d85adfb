"""SparseLoCo against Templar's own outputs (tests/data/sparseloco, one-covenant/templar 142666f0): chunk sides, one
parameter's round trip, three peers over two rounds with error feedback carried, the median-norm-clipped combine and
the outer SGD step; then the shapes Templar cannot handle, and the wire format (byte-identical round trip, validation,
fuzzing, bytes per kept value on the tiny preset).

Selections are compared as sets of flat positions (top-k order is implementation-defined), dense results with
torch.testing.assert_close at float32 tolerance.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load, load_file

from templar_lib import kernels
from templar_lib.compression import chunk_side
from templar_lib.model import build_model
from templar_lib.sparseloco import (GAIN_WINDOWS, SparseDelta, _gain_curve, clip_factors, combine_deltas,
                                    decode_delta, encode_delta, feedback_gain, flat_positions, keep_count, layout,
                                    outer_step)
from templar_lib.wire.container import InvalidFile, save_templar_file
from templar_lib.wire.sparse import (HEADER_BYTES, SparseGradient, max_sparse_gradient_bytes, pack_codes,
                                     read_sparse_gradient, unpack_codes, write_sparse_gradient)

DATA = Path(__file__).parents[1] / "data" / "sparseloco"
META = json.loads((DATA / "vectors.json").read_text())
HP = META["hparams"]
PARAMS = META["params"]
RT_NAMES = [name for name in PARAMS if name not in META["no_rt"]]
ROUNDS = range(META["n_rounds"])
PEERS = range(META["n_peers"])
SETTINGS = dict(decay=HP["momentum_decay"], topk=HP["topk_compression"], target_chunk=HP["target_chunk"],
                bins=HP["quantization_bins"], sigmas=float(HP["quantization_range"]))


@pytest.fixture(scope="module")
def vectors() -> dict[str, torch.Tensor]:
    return load_file(DATA / "vectors.safetensors")


# encode_delta's two paths: torch ops, and the fused Triton kernel (kernels.sparse_select) that a GPU runs, here under
# Triton's interpreter (tests/conftest.py chooses it before triton is imported)
PATHS = [pytest.param(False, id="torch"),
         pytest.param(True, id="fused", marks=pytest.mark.skipif(not kernels.available("cpu", interpreter=True),
                                                                 reason="triton's interpreter is not available"))]


def encode(delta: torch.Tensor, error: torch.Tensor | None = None, fused: bool = False
           ) -> tuple[SparseDelta, torch.Tensor]:
    return encode_delta(delta, error, **SETTINGS, fused=fused)


def check_record(vectors: dict, prefix: str, name: str, sent: SparseDelta, error_after: torch.Tensor) -> None:
    """One ef_compress record of Templar's against ours: selection, codes, shift, table, transmitted, e_after."""
    positions = flat_positions(sent).reshape(-1)
    order = positions.argsort()
    sel = vectors[f"{prefix}/sel"].long()
    dense = decode_delta(sent).reshape(-1)
    assert (sent.chunk, sent.k) == (tuple(PARAMS[name]["chunk"]), PARAMS[name]["k"])
    if PARAMS[name]["zero"]:  # every |value| ties: any k positions per chunk, all sent as exactly 0
        assert torch.equal(dense, torch.zeros_like(dense)) and torch.equal(error_after, torch.zeros_like(error_after))
        assert sorted(sent.codes.reshape(-1).tolist()) == sorted(vectors[f"{prefix}/q_sel"].tolist())
    else:
        assert torch.equal(positions[order], sel)
        assert torch.equal(sent.codes.reshape(-1)[order], vectors[f"{prefix}/q_sel"])
        torch.testing.assert_close(dense[sel], vectors[f"{prefix}/transmit_sel"])
        unchosen = torch.ones_like(dense, dtype=torch.bool).index_fill_(0, sel, False)
        assert torch.equal(dense[unchosen], torch.zeros_like(dense[unchosen]))
    torch.testing.assert_close(sent.shift, float(vectors[f"{prefix}/shift"]), atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(sent.table, vectors[f"{prefix}/lookup"])
    torch.testing.assert_close(error_after, vectors[f"{prefix}/e_after"])


def record_delta(vectors: dict, prefix: str, name: str) -> SparseDelta:
    """Templar's own compressed record as a SparseDelta (its selection and codes, in its order)."""
    meta = PARAMS[name]
    n_chunks, k = meta["n_chunks"], meta["k"]
    return SparseDelta(shape=tuple(meta["shape"]), chunk=tuple(meta["chunk"]),
                       idx=vectors[f"{prefix}/idx"].long().reshape(n_chunks, k),
                       codes=vectors[f"{prefix}/vals_q"].reshape(n_chunks, k),
                       shift=float(vectors[f"{prefix}/shift"]), table=vectors[f"{prefix}/lookup"])


def dense_of(vectors: dict, prefix: str, shape: list[int]) -> torch.Tensor:
    dense = torch.zeros(math.prod(shape))
    dense[vectors[f"{prefix}/sel"].long()] = vectors[f"{prefix}/vals"]
    return dense.reshape(shape)


# ---------------------------------------------------------------------------------------------------- conformance
def test_chunk_side_matches_templar_split_for_every_size(vectors):
    sizes = vectors["split/n"].tolist()
    assert [chunk_side(n, HP["target_chunk"]) for n in sizes] == vectors["split/chunk"].tolist()


@pytest.mark.parametrize("name", PARAMS)
def test_layout_and_k_match_templar(name):
    _, chunk = layout(PARAMS[name]["shape"], HP["target_chunk"])
    assert chunk == tuple(PARAMS[name]["chunk"])
    assert keep_count(math.prod(chunk), HP["topk_compression"]) == PARAMS[name]["k"]


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("name", RT_NAMES)
def test_round_trip_matches_templar(vectors, name, fused):
    sent, error_after = encode(vectors[f"rt/{name}/delta"], vectors[f"rt/{name}/e_before"], fused)
    check_record(vectors, f"rt/{name}", name, sent, error_after)


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("name", PARAMS)
def test_three_peers_over_two_rounds_match_templar(vectors, name, fused):
    errors = [None] * len(PEERS)  # error feedback starts at zero and is carried from round to round
    for t in ROUNDS:
        for k in PEERS:
            prefix = f"r{t}/peer{k}/{name}"
            sent, errors[k] = encode(vectors[f"{prefix}/delta"], errors[k], fused)
            check_record(vectors, prefix, name, sent, errors[k])


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("group, peers", [("combine", list(PEERS)), ("combine_pair02", META["pair"])])
def test_combine_matches_templar(vectors, name, group, peers):
    for t in ROUNDS:
        sent = [record_delta(vectors, f"r{t}/peer{k}/{name}", name) for k in peers]
        prefix = f"r{t}/{group}/{name}"
        clipping = clip_factors(sent)
        torch.testing.assert_close(clipping.norms, vectors[f"{prefix}/norms"])
        torch.testing.assert_close(clipping.median.reshape(1), vectors[f"{prefix}/median"])
        torch.testing.assert_close(clipping.factors, vectors[f"{prefix}/clip"])
        torch.testing.assert_close(combine_deltas(sent), dense_of(vectors, prefix, PARAMS[name]["shape"]))


@pytest.mark.parametrize("name", PARAMS)
def test_outer_step_from_our_own_peers_matches_templar(vectors, name):
    """End to end: our encodings of the peers' deltas, combined, then θ ← θ − 0.4·update, round after round."""
    errors = [None] * len(PEERS)
    theta = vectors[f"r0/theta/{name}"]
    for t in ROUNDS:
        sent = []
        for k in PEERS:
            delta, errors[k] = encode(vectors[f"r{t}/peer{k}/{name}/delta"], errors[k])
            sent.append(delta)
        theta = outer_step(theta, combine_deltas(sent), lr=HP["outer_learning_rate"])
        torch.testing.assert_close(theta, vectors[f"r{t}/p_next/{name}"])


@pytest.mark.parametrize("name", META["pg_params"])
def test_pseudo_gradient_is_start_minus_after(vectors, name):
    prefix = f"pg/{name}"
    assert torch.equal(vectors[f"{prefix}/theta_start"] - vectors[f"{prefix}/theta_after"], vectors[f"{prefix}/delta"])


# ---------------------------------------------------------------------------------------------------- beyond Templar
UNSUPPORTED_CHUNKS = {"prime.bias": (97,), "prime2d.weight": (67, 71), "conv.weight": (4, 64)}


@pytest.mark.parametrize("name", META["unsupported"])
def test_shapes_templar_cannot_chunk_are_sent_sensibly(name):
    shape = tuple(META["unsupported"][name]["shape"])
    generator = torch.Generator().manual_seed(1)
    deltas = [torch.randn(shape, generator=generator) for _ in range(3)]
    sent = [encode(delta) for delta in deltas]
    first, error_after = sent[0]
    assert first.chunk == UNSUPPORTED_CHUNKS[name] and first.k == 64
    assert decode_delta(first).shape == shape and error_after.shape == shape
    torch.testing.assert_close(error_after + decode_delta(first), deltas[0])  # e_after = e − transmitted
    kept = flat_positions(first).reshape(-1)
    assert kept.unique().numel() == first.n_chunks * 64
    if first.n_chunks == 1:  # one chunk, the whole tensor: its 64 largest |values|
        assert deltas[0].reshape(-1).abs()[kept].min() >= deltas[0].reshape(-1).abs().sort().values[-64]
    assert combine_deltas([s for s, _ in sent]).shape == shape


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_a_single_value_is_sent_exactly(shape, fused):
    delta = torch.full(shape, -0.25)
    sent, error_after = encode(delta, fused=fused)
    assert sent.k == 1
    assert torch.equal(decode_delta(sent), delta) and torch.equal(error_after, torch.zeros(shape))


@pytest.mark.parametrize("fused", PATHS)
def test_empty_and_non_finite_tensors_are_refused(fused):
    with pytest.raises(ValueError, match="empty"):
        encode(torch.zeros(0, 4), fused=fused)
    with pytest.raises(ValueError, match="finite"):
        encode(torch.tensor([1.0, float("nan"), 2.0]), fused=fused)
    for bad in (float("inf"), float("nan")):  # in the error feedback, away from Δ's largest values
        error = torch.zeros(96, 64).index_fill_(0, torch.tensor([50]), bad)
        with pytest.raises(ValueError, match="finite"):
            encode(torch.randn(96, 64), error, fused=fused)


@pytest.mark.parametrize("fused", PATHS)
def test_all_zero_tensor_and_its_combine_are_zero_without_nan(fused):
    sent, error_after = encode(torch.zeros(32, 64), torch.zeros(32, 64), fused)
    assert torch.isfinite(sent.table).all() and math.isfinite(sent.shift)
    assert torch.equal(decode_delta(sent), torch.zeros(32, 64)) and torch.equal(error_after, torch.zeros(32, 64))
    assert torch.equal(combine_deltas([sent, sent]), torch.zeros(32, 64))


@pytest.mark.parametrize("fused", PATHS)
def test_ties_go_to_the_lower_positions_and_no_error_means_zeros(fused):
    sent, _ = encode(torch.ones(8, 128), fused=fused)  # chunk (8, 64): each chunk keeps its first 64 positions
    assert torch.equal(sent.idx, torch.arange(64).expand(2, 64))
    delta = torch.randn(96, 64, generator=torch.Generator().manual_seed(2))
    plain, with_zeros = encode(delta, fused=fused), encode(delta, torch.zeros(96, 64), fused)
    assert torch.equal(plain[0].idx, with_zeros[0].idx) and torch.equal(plain[1], with_zeros[1])


def test_a_peer_whose_norm_overflows_is_dropped_not_nan():
    honest, _ = encode(torch.randn(96, 64, generator=torch.Generator().manual_seed(3)))
    huge = SparseDelta(honest.shape, honest.chunk, honest.idx, honest.codes, 0.0, torch.full((4,), 3e38))
    for peers in ([honest, huge], [huge, huge, honest]):  # the median is finite, then inf
        update = combine_deltas(peers)
        assert torch.isfinite(update).all()
        assert clip_factors(peers).factors.tolist()[peers.index(huge)] == 0.0


@pytest.mark.parametrize("decay", [0.95, 0.99])
def test_feedback_gain_is_what_encode_delta_sends_of_independent_deltas(decay):
    """feedback_gain models the encoder: 40 windows of Gaussian Δ through encode_delta (256 bins: nearly exact
    values; 32 chunks of 64 × 64) send ‖values‖ / ‖Δ‖ within a few percent of the model's, window by window."""
    generator, error = torch.Generator().manual_seed(11), None
    for window in range(1, 41):
        delta = torch.randn(256, 512, generator=generator)
        sent, error = encode_delta(delta, error, decay=decay, topk=32, bins=256)
        measured = float(torch.linalg.vector_norm(sent.values()) / torch.linalg.vector_norm(delta))
        assert measured == pytest.approx(feedback_gain(decay, window, topk=32), rel=0.04), window


def test_feedback_gain_grows_with_memory_and_age_and_settles():
    first = feedback_gain(0.95, 1, topk=32)
    assert first == feedback_gain(0.5, 1, topk=32) == feedback_gain(1.0, 1, topk=32)  # e_1 = Δ_1 for every β
    assert feedback_gain(0.9, 200) < feedback_gain(0.95, 200) < feedback_gain(0.99, 200) < feedback_gain(1.0, 200)
    curve = [feedback_gain(0.99, t, topk=32) for t in (1, 10, 40, 100)]
    assert curve == sorted(curve) and curve[-1] > 3 * first
    assert feedback_gain(0.99, GAIN_WINDOWS) == feedback_gain(0.99, 10 * GAIN_WINDOWS)  # settled: capped
    with pytest.raises(ValueError, match="windows"):
        feedback_gain(0.99, 0)


def test_feedback_gain_is_simulated_only_as_far_as_asked_and_the_same_in_any_order():
    """A validator in the network's 7th window runs 7 windows of the simulation, not GAIN_WINDOWS; asking for a later
    window first or last gives the same bits (one generator, one order of steps)."""
    _gain_curve.cache_clear()
    early = feedback_gain(0.97, 7, topk=32)
    assert len(_gain_curve(0.97, 32, 4096).gains) == 7
    later = feedback_gain(0.97, 30, topk=32)
    _gain_curve.cache_clear()
    assert (feedback_gain(0.97, 30, topk=32), feedback_gain(0.97, 7, topk=32)) == (later, early)


def test_peers_of_different_shapes_are_refused():
    a, _ = encode(torch.ones(96, 64))
    b, _ = encode(torch.ones(64, 96))
    with pytest.raises(ValueError, match="disagree"):
        combine_deltas([a, b])
    with pytest.raises(ValueError, match="at least one"):
        combine_deltas([])


@pytest.mark.parametrize("bins", [2, 3, 4, 16, 256])
def test_codes_pack_and_unpack(bins):
    codes = torch.randint(0, bins, (7, 9), generator=torch.Generator().manual_seed(bins), dtype=torch.int64)
    packed = pack_codes(codes.to(torch.uint8), bins)
    assert packed.numel() == math.ceil(63 * {2: 1, 3: 2, 4: 2, 16: 4, 256: 8}[bins] / 8)
    assert torch.equal(unpack_codes(packed, 63, bins).long(), codes.reshape(-1))


# ---------------------------------------------------------------------------------------------------- wire format
WIRE_SHAPES = {"rows96.weight": (96, 64), "odd70.bias": (70,), "tiny_odd.weight": (7, 9), "prime.bias": (97,),
               "conv.weight": (4, 8, 16), "zero.weight": (32, 64), "scalar": ()}


def wire_gradient(seed: int = 0, **settings) -> SparseGradient:
    generator = torch.Generator().manual_seed(seed)
    deltas = {name: torch.randn(shape, generator=generator) for name, shape in WIRE_SHAPES.items()}
    deltas["zero.weight"].zero_()
    tensors = {name: encode_delta(delta, None, **(SETTINGS | settings))[0] for name, delta in deltas.items()}
    return SparseGradient(window=12, uid=3, tensors=tensors, hparams_hash="h", model_hash="m" * 32, probes=(0.5, -1.0))


def read_wire(data: bytes, **options) -> SparseGradient:
    arguments = dict(window=12, uid=3, shapes=WIRE_SHAPES, topk=HP["topk_compression"],
                     target_chunk=HP["target_chunk"], hparams_hash="h",
                     max_bytes=max_sparse_gradient_bytes(WIRE_SHAPES, topk=64, target_chunk=64))
    return read_sparse_gradient(data, **(arguments | options))


def test_wire_round_trip_is_byte_identical_and_decodes_to_what_was_sent():
    sent = wire_gradient()
    data = write_sparse_gradient(sent)
    back = read_wire(data)
    assert write_sparse_gradient(back) == data and write_sparse_gradient(wire_gradient()) == data
    assert (back.model_hash, back.probes) == ("m" * 32, (0.5, -1.0))
    for name, delta in sent.tensors.items():
        assert torch.equal(decode_delta(back.tensors[name]), decode_delta(delta))
        assert back.tensors[name].shift == delta.shift


def test_wire_carries_other_bin_counts():
    data = write_sparse_gradient(wire_gradient(bins=16))
    assert write_sparse_gradient(read_wire(data, bins=16)) == data
    with pytest.raises(InvalidFile, match="bins"):
        read_wire(data)


@pytest.mark.parametrize("options, reason", [
    (dict(window=13), "window"), (dict(uid=4), "uid"), (dict(hparams_hash="other"), "hparams hash"),
    (dict(topk=32), "values per chunk"), (dict(target_chunk=32), "chunk"), (dict(max_bytes=100), "exceeds"),
    (dict(shapes=WIRE_SHAPES | {"rows96.weight": (64, 96)}), "shape"),
    (dict(shapes={n: s for n, s in WIRE_SHAPES.items() if n != "scalar"}), "parameters differ"),
])
def test_wire_refuses_a_file_for_another_model_window_or_peer(options, reason):
    with pytest.raises(InvalidFile, match=reason):
        read_wire(write_sparse_gradient(wire_gradient()), **options)


def tampered(part: str, change) -> bytes:
    """A structurally valid file (safetensors, header) with one tensor of rows96.weight replaced by change(tensor)."""
    data = write_sparse_gradient(wire_gradient())
    tensors = load(data)
    tensors[f"rows96.weight.{part}"] = change(tensors[f"rows96.weight.{part}"].clone())
    header = json.loads(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]["templar"])
    return save_templar_file(tensors, header)


@pytest.mark.parametrize("part, change, reason", [
    ("quant", lambda q: q.index_fill_(0, torch.tensor([2]), float("nan")), "non-finite"),
    ("quant", lambda q: q.index_fill_(0, torch.tensor([0]), float("inf")), "non-finite"),
    ("quant", lambda q: q.fill_(3e38), "non-finite"),  # each finite, table + shift overflows
    ("bits", lambda b: torch.cat([b, torch.zeros(1, dtype=torch.uint8)]), "trailing"),
    ("bits", lambda b: torch.cat([b, torch.zeros(4096, dtype=torch.uint8)]), "bits tensor mismatch"),  # before load
    ("bits", lambda b: b[:-1], "ends early|wrong length|mismatch"),
    ("bits", lambda b: b.index_fill_(0, torch.tensor([b.numel() - 8]), 255), "index|stream|trailing"),
])
def test_wire_refuses_bad_content_with_a_reason(part, change, reason):
    with pytest.raises(InvalidFile, match=reason):
        read_wire(tampered(part, change))


def test_wire_refuses_a_header_longer_than_a_gradient_needs():
    header = b"[" + b" " * HEADER_BYTES + b"]"  # under the file's size limit, over the header's
    with pytest.raises(InvalidFile, match="header limit"):
        read_wire(len(header).to_bytes(8, "little") + header)


def test_wire_refuses_nonzero_code_padding():
    generator = torch.Generator().manual_seed(0)
    sent, _ = encode(torch.randn(7, 9, generator=generator))  # 62 codes: 2 unused bit pairs in the last byte
    shapes = {"w": (7, 9)}
    data = write_sparse_gradient(SparseGradient(1, 2, {"w": sent}))
    tensors = load(data)
    tensors["w.bits"][15] |= 0b11000000
    header = json.loads(json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]["templar"])
    with pytest.raises(InvalidFile, match="padding"):
        read_sparse_gradient(save_templar_file(tensors, header), window=1, uid=2, shapes=shapes, topk=64,
                             target_chunk=64, max_bytes=1 << 20)


FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
VALID = write_sparse_gradient(wire_gradient())


def mutations(valid: bytes):
    """Byte-level damage to a valid file: flips, truncations, splices, insertions, noise."""
    positions = st.integers(0, len(valid) - 1)
    return st.one_of(
        st.tuples(positions, st.integers(0, 255)).map(lambda p: valid[:p[0]] + bytes([p[1]]) + valid[p[0] + 1:]),
        st.tuples(positions, st.integers(0, 7)).map(
            lambda p: valid[:p[0]] + bytes([valid[p[0]] ^ (1 << p[1])]) + valid[p[0] + 1:]),
        positions.map(lambda p: valid[:p]),
        st.tuples(positions, st.binary(min_size=1, max_size=64)).map(lambda p: valid[:p[0]] + p[1] + valid[p[0]:]),
        st.tuples(positions, positions).map(lambda p: valid[:min(p)] + valid[max(p):]),
        st.binary(max_size=2048),
    )


@FUZZ
@given(data=mutations(VALID))
def test_damaged_files_raise_invalid_file_and_nothing_else(data):
    try:
        gradient = read_wire(data)
    except InvalidFile as error:
        assert str(error)
    else:  # a change that left the file valid (a hash's character, a probe's digit) is still canonical
        assert write_sparse_gradient(gradient) == data and set(gradient.tensors) == set(WIRE_SHAPES)


# ---------------------------------------------------------------------------------------------------- size
def test_tiny_preset_costs_at_most_two_bytes_per_kept_value():
    shapes = {name: tuple(p.shape) for name, p in build_model("tiny", device="meta").named_parameters()}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: encode(torch.randn(shape, generator=generator))[0] for name, shape in shapes.items()}
    data = write_sparse_gradient(SparseGradient(7, 1, tensors, "h" * 64, "m" * 64, tuple(float(i) for i in range(8))))
    kept = sum(sent.idx.numel() for sent in tensors.values())
    assert len(data) / kept <= 2.0, f"{len(data) / kept:.3f} bytes per kept value"
    limit = max_sparse_gradient_bytes(shapes, topk=64, target_chunk=64)
    # a reader's limit: what an honest file can be and little more (beyond the fixed allowance for the header)
    assert len(data) <= limit <= HEADER_BYTES + 1.25 * len(data)
