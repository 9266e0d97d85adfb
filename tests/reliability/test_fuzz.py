"""Every reader of untrusted data, fed generated input (Hypothesis, ≥ 1000 cases each, derandomized for CI).

The property is the same everywhere: the reader returns a valid object or raises its own validation error
(InvalidFile / InvalidPage) with a reason. Any other exception would escape a run; that is the failure looked for.
"""

import io
import json

import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from templar_lib.checkpoints import parse_manifest
from templar_lib.compression import encode
from templar_lib.data import InvalidPage, Manifest
from templar_lib.data.pages import parse_page
from templar_lib.commitments import parse_commitment
from templar_lib.wire.miner_state import read_miner_state, write_miner_state
from templar_lib.wire import (Aggregation, Gradient, InvalidFile, Peers, read_aggregation, read_evaluation,
                              read_gradient, read_peers, write_aggregation, write_gradient, write_peers)

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SHAPES = {"w": (64, 96), "b": (60,)}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20)


def mutations(valid: bytes):
    """Byte-level damage to a valid file: flips, truncations, splices, insertions."""
    positions = st.integers(0, len(valid) - 1)
    return st.one_of(
        st.tuples(positions, st.integers(0, 255)).map(lambda p: valid[:p[0]] + bytes([p[1]]) + valid[p[0] + 1:]),
        positions.map(lambda p: valid[:p]),
        st.tuples(positions, st.binary(min_size=1, max_size=64)).map(lambda p: valid[:p[0]] + p[1] + valid[p[0]:]),
        st.tuples(positions, positions).map(lambda p: valid[:min(p)] + valid[max(p):]),
        st.binary(max_size=2048),
    )


GRADIENT_ENCODINGS = [(1, "float32"), (2, "int8"), (2, "bfloat16")]  # (format, values): every wire format


def valid_gradient(format: int, values: str, state: tuple[str, str] | None = None) -> bytes:
    generator = torch.Generator().manual_seed(0)
    tensors = {n: encode(torch.randn(s, generator=generator), 8, 64) for n, s in SHAPES.items()}
    return write_gradient(Gradient(3, 1, tensors, "hash", format=format, values=values, state=state))


COMMITTED = valid_gradient(2, "int8", ("0" * 64, "ab" * 32))  # a file that commits to its miner's state


def with_templar_header(valid: bytes, text: str) -> bytes:
    """A valid safetensors file whose templar metadata is replaced by `text` (the tensors stay where they were)."""
    length = int.from_bytes(valid[:8], "little")
    header = json.loads(valid[8:8 + length]) | {"__metadata__": {"templar": text}}
    encoded = json.dumps(header).encode()
    return len(encoded).to_bytes(8, "little") + encoded + valid[8 + length:]


def header_variants(valid: bytes):
    """Valid safetensors container, hostile JSON header: the templar metadata replaced by generated JSON."""
    length = int.from_bytes(valid[:8], "little")
    templar = json.loads(json.loads(valid[8:8 + length])["__metadata__"]["templar"])
    field_changes = st.tuples(st.sampled_from(sorted(templar)), json_values).map(
        lambda change: with_templar_header(valid, json.dumps(templar | {change[0]: change[1]})))
    return st.one_of(json_values.map(lambda value: with_templar_header(valid, json.dumps(value))), field_changes)


@FUZZ
@given(data=st.one_of(*(mutations(valid_gradient(*encoding)) for encoding in GRADIENT_ENCODINGS),
                      *(header_variants(valid_gradient(*encoding)) for encoding in GRADIENT_ENCODINGS),
                      header_variants(COMMITTED)))
def test_read_gradient_never_raises_anything_but_invalid_file(data):
    try:
        gradient = read_gradient(data, window=3, uid=1, shapes=SHAPES, topk=8, max_bytes=1 << 20)
    except InvalidFile as error:
        assert str(error)
    else:
        assert set(gradient.tensors) == set(SHAPES)
        for sparse in gradient.tensors.values():
            assert torch.isfinite(sparse.vals.float()).all() and int(sparse.idx.max()) < sparse.chunk_size
        assert gradient.state is None or all(len(digest) == 64 for digest in gradient.state)


STATE_SHAPES = {"adam_m.w": (64, 96), "adam_t": (1,), "error.b": (60,)}


def valid_miner_state() -> bytes:
    generator = torch.Generator().manual_seed(2)
    state = {name: torch.randn(shape, generator=generator) for name, shape in STATE_SHAPES.items()}
    return write_miner_state(3, 1, "before", state | {"adam_t": torch.tensor([7.0], dtype=torch.float64)})


@FUZZ
@given(data=st.one_of(mutations(valid_miner_state()), header_variants(valid_miner_state())))
def test_read_miner_state_never_raises_anything_but_invalid_file(data):
    try:
        state = read_miner_state(data, window=3, uid=1, side="before", shapes=STATE_SHAPES,
                                 float64=frozenset({"adam_t"}))
    except InvalidFile as error:
        assert str(error)
    else:
        assert {name: tuple(t.shape) for name, t in state.items()} == STATE_SHAPES
        assert all(torch.isfinite(t).all() for t in state.values())


def valid_aggregation() -> bytes:
    from templar_lib.compression import combine, sparsify

    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in SHAPES.items():
        sparse = encode(torch.randn(shape, generator=generator), 8, 64)
        tensors[name] = sparsify(combine([sparse]), sparse.shape, sparse.chunk)
    return write_aggregation(Aggregation(3, 3, 1e-3, [1], tensors, "hash"))


@FUZZ
@given(data=st.one_of(mutations(valid_aggregation()), header_variants(valid_aggregation())))
def test_read_aggregation_never_raises_anything_but_invalid_file(data):
    try:
        read_aggregation(data, window=3, shapes=SHAPES, max_bytes=1 << 20)
    except InvalidFile as error:
        assert str(error)


@FUZZ
@given(data=st.one_of(mutations(write_peers(Peers(4, 0, [1, 2, 3]))),
                      json_values.map(lambda v: json.dumps(v).encode()),
                      st.dictionaries(st.sampled_from(["format", "window", "validator", "uids"]), json_values)
                      .map(lambda v: json.dumps(v).encode())))
def test_read_peers_never_raises_anything_but_invalid_file(data):
    try:
        peers = read_peers(data, window=4)
    except InvalidFile as error:
        assert str(error)
    else:
        assert peers.uids == sorted(set(peers.uids))


EVALUATION = json.dumps({"format": 1, "window": 4, "validator": 0, "step": 4, "random_loss": 7.5, "peers": [1],
                         "uids": {"1": {"score": 0.01, "indicator": 1, "improvement_own": 0.02,
                                        "improvement_random": 0.01, "reason": "",
                                        "losses": {"own_before": 8.0, "own_after": 7.8, "random_before": 7.5,
                                                   "random_after": 7.4}}}}).encode()


@FUZZ
@given(data=st.one_of(mutations(EVALUATION), json_values.map(lambda v: json.dumps(v).encode()),
                      st.tuples(st.sampled_from(["format", "window", "validator", "step", "random_loss", "peers",
                                                 "uids", "watched"]), json_values)
                      .map(lambda c: json.dumps(json.loads(EVALUATION) | {c[0]: c[1]}).encode())))
def test_read_evaluation_never_raises_anything_but_invalid_file(data):
    try:
        read_evaluation(data, window=4, validator=0)
    except InvalidFile as error:
        assert str(error)


CHECKPOINT_MANIFEST = json.dumps({"format": 1, "window": 5, "step": 5, "sha256": "a" * 64, "bytes": 100,
                                  "tensors": {"w": {"shape": [2, 3], "dtype": "float32"}}, "hparams": {}}).encode()


@FUZZ
@given(data=st.one_of(mutations(CHECKPOINT_MANIFEST), json_values.map(lambda v: json.dumps(v).encode()),
                      st.tuples(st.sampled_from(["format", "window", "step", "sha256", "bytes", "tensors", "hparams"]),
                                json_values)
                      .map(lambda c: json.dumps(json.loads(CHECKPOINT_MANIFEST) | {c[0]: c[1]}).encode())))
def test_checkpoint_manifest_never_raises_anything_but_invalid_file(data):
    try:
        parse_manifest(data, 5)
    except InvalidFile as error:
        assert str(error)


MANIFEST = Manifest(total_pages=4, train_pages=3, sequence_length=8, rows_per_page=2, vocab_size=100,
                    tokenizer_sha256="0" * 64, page_sha256=["0" * 64] * 4)


def valid_page() -> bytes:
    sink = io.BytesIO()
    pd.DataFrame({"tokens": [list(range(8)), list(range(10, 18))], "text": ["a", "b"]}).to_parquet(sink)
    return sink.getvalue()


@FUZZ
@given(data=mutations(valid_page()))
def test_dataset_page_parser_never_raises_anything_but_invalid_page(data):
    try:
        tokens = parse_page(data, MANIFEST)
    except InvalidPage as error:
        assert str(error)
    else:
        assert tokens.shape == (2, 8)


@FUZZ
@given(data=st.one_of(mutations(MANIFEST.to_json()), json_values.map(lambda v: json.dumps(v).encode())))
def test_dataset_manifest_never_raises_anything_but_invalid_page(data):
    try:
        Manifest.from_json(data)
    except InvalidPage as error:
        assert str(error)


COMMITMENT = '{"v":1,"gradients":"s3://bucket?endpoint_url=https://a.r2.cloudflarestorage.com"}'


@FUZZ
@given(text=st.one_of(st.text(max_size=300), json_values.map(json.dumps), json_values,
                      mutations(COMMITMENT.encode()).map(lambda b: b.decode("utf-8", "replace")),
                      st.tuples(st.sampled_from(["v", "gradients", "access_key_id", "secret_access_key"]), json_values)
                      .map(lambda c: json.dumps(json.loads(COMMITMENT) | {c[0]: c[1]}))))
def test_chain_commitments_never_raise_anything_but_invalid_file(text):
    try:
        commitment = parse_commitment(text, allow_local=False)
    except InvalidFile as error:
        assert str(error)
    else:
        assert commitment.url.startswith("s3://")


def test_page_decompression_bomb_is_refused_before_decoding():
    sink = io.BytesIO()
    bomb = pd.DataFrame({"tokens": [[0] * 5_000_000, [0] * 5_000_000], "text": ["", ""]})
    bomb.to_parquet(sink, compression="zstd")
    assert len(sink.getvalue()) < 200_000  # small on the wire, 40 MB of int64 once decoded
    with pytest.raises(InvalidPage, match="token values declared"):
        parse_page(sink.getvalue(), MANIFEST)


# ---------------------------------------------------------------------------------------------------- deep nesting
def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def _deep_cases():
    """(reader, its own error, untrusted bytes or text whose JSON nests past the parser's recursion limit). Generated
    JSON above never nests more than a few levels; "[[[[...]]]]" makes json raise RecursionError, which is not a
    ValueError: an `except ValueError` reader lets it out."""
    from tests.lib.test_sparseloco import VALID as SPARSE_VALID
    from tests.lib.test_sparseloco import read_wire

    deep = _nested(20_000)  # 40 kB, under every file limit
    outer = (len(deep).to_bytes(8, "little") + deep.encode(),)
    gradient = lambda data: read_gradient(data, window=3, uid=1, shapes=SHAPES, topk=8, max_bytes=1 << 20)
    aggregation = lambda data: read_aggregation(data, window=3, shapes=SHAPES, max_bytes=1 << 20)
    return [
        ("gradient, safetensors header", gradient, InvalidFile, *outer),
        ("gradient, templar header", gradient, InvalidFile, with_templar_header(valid_gradient(2, "int8"), deep)),
        ("aggregation, templar header", aggregation, InvalidFile, with_templar_header(valid_aggregation(), deep)),
        ("sparse gradient, templar header", read_wire, InvalidFile, with_templar_header(SPARSE_VALID, deep)),
        ("peers list", lambda data: read_peers(data, window=4), InvalidFile, deep.encode()),
        ("evaluation", lambda data: read_evaluation(data, window=4, validator=0), InvalidFile, deep.encode()),
        ("checkpoint manifest", lambda data: parse_manifest(data, 5), InvalidFile, deep.encode()),
        ("dataset manifest", Manifest.from_json, InvalidPage, deep.encode()),
        # any miner writes one on the chain: 1024 "[" (unbalanced: the parser runs out of stack before the end)
        ("chain commitment", parse_commitment, InvalidFile, "[" * 1024),
    ]


@pytest.mark.parametrize("label, reader, error, data", _deep_cases(), ids=[case[0] for case in _deep_cases()])
def test_deeply_nested_json_is_refused_with_the_readers_own_error(label, reader, error, data):
    with pytest.raises(error, match="not valid JSON|not JSON"):
        reader(data)


def test_the_nesting_above_is_past_the_json_parsers_limit():
    for text in (_nested(20_000), "[" * 1024):
        with pytest.raises(RecursionError):
            json.loads(text)
