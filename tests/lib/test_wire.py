"""Gradient files: exact round trip, and every kind of hostile file rejected with a reason."""

import dataclasses
import json
import pickle
import struct

import pytest
import torch
from safetensors.torch import save

from templar_lib.compression import encode
from templar_lib.wire import Gradient, InvalidFile, index_dtype, read_gradient, write_gradient

SHAPES = {"layer.weight": (96, 128), "layer.bias": (300,), "tiny.weight": (8, 4)}
WINDOW, UID, HASH = 12, 3, "0123456789abcdef"


def make_gradient(value_dtype=torch.float32) -> Gradient:
    """A format-1 gradient with values of `value_dtype`."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in SHAPES.items():
        sparse = encode(torch.randn(shape, generator=generator), topk=32, target_chunk=64)
        tensors[name] = type(sparse)(sparse.idx, sparse.vals.to(value_dtype), sparse.shape, sparse.chunk)
    return Gradient(WINDOW, UID, tensors, HASH, format=1, values=str(value_dtype).removeprefix("torch."))


def read(data: bytes, **overrides):
    arguments = dict(window=WINDOW, uid=UID, shapes=SHAPES, topk=32, target_chunk=64, hparams_hash=HASH)
    return read_gradient(data, **(arguments | overrides))


def raw_file(header: dict, body: bytes = b"") -> bytes:
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


ENTRY = '{"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'


def raw_header_text(text: str, body: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode() + body


def tensors_and_header(gradient: Gradient):
    """The tensors and templar header write_gradient would produce, for building variants."""
    data = write_gradient(gradient)
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    from safetensors.torch import load
    return load(data), json.loads(header["__metadata__"]["templar"])


def rebuild(tensors: dict, header: dict) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()}, metadata={"templar": json.dumps(header)})


@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact_and_deterministic(value_dtype):
    gradient = make_gradient(value_dtype)
    data = write_gradient(gradient)
    assert data == write_gradient(make_gradient(value_dtype))
    assert data[8:].startswith(b"{")  # a standard safetensors header follows the 8-byte length
    back = read(data)
    assert (back.window, back.uid, back.hparams_hash) == (WINDOW, UID, HASH)
    for name, sparse in gradient.tensors.items():
        assert torch.equal(back.tensors[name].idx, sparse.idx)
        assert torch.equal(back.tensors[name].vals, sparse.vals) and back.tensors[name].vals.dtype == value_dtype
        assert (back.tensors[name].shape, back.tensors[name].chunk) == (sparse.shape, sparse.chunk)


def test_indices_use_the_smallest_dtype_for_the_chunk():
    assert index_dtype(32) == torch.uint8 and index_dtype(256) == torch.uint8
    assert index_dtype(4096) == torch.int16 and index_dtype(40000) == torch.int32
    tensors, _ = tensors_and_header(make_gradient())
    assert tensors["layer.weight.idx"].dtype == torch.int16  # 48 × 64 chunk
    assert tensors["layer.bias.idx"].dtype == torch.uint8  # 60-element chunk


def _mutations():
    """(label, function of (tensors, header) -> bytes, expected reason fragment)."""
    def change_header(**fields):
        return lambda t, h: rebuild(t, h | fields)

    def change_tensor(key, function):
        return lambda t, h: rebuild(t | {key: function(t[key])}, h)

    def change_param(name, **fields):
        return lambda t, h: rebuild(t, h | {"params": h["params"] | {name: h["params"][name] | fields}})

    return [
        ("wrong window", change_header(window=WINDOW + 1), "window"),
        ("wrong uid", change_header(uid=UID + 1), "uid"),
        ("uid as string", change_header(uid=str(UID)), "uid"),
        ("wrong hparams hash", change_header(hparams_hash="ffff"), "hparams hash"),
        ("future format", change_header(format=99), "format"),
        ("wrong kind", change_header(kind="aggregation"), "kind"),
        ("shape differs from model", change_param("layer.weight", shape=[128, 96]), "shape"),
        ("chunk not the protocol's", change_param("layer.weight", chunk=[96, 64]), "chunk"),
        ("missing parameter", lambda t, h: rebuild({k: v for k, v in t.items() if not k.startswith("tiny")},
                                                    h | {"params": {k: v for k, v in h["params"].items()
                                                                    if k != "tiny.weight"}}), "missing"),
        ("extra tensor", lambda t, h: rebuild(t | {"evil": torch.zeros(1)}, h), "tensors do not match"),
        ("index out of range", change_tensor("layer.weight.idx", lambda x: x.clone().fill_(4000)), "index outside"),
        ("negative index", change_tensor("layer.bias.idx", lambda x: x.to(torch.int16) * 0 - 1), "index dtype"),
        ("repeated index", change_tensor("layer.weight.idx", lambda x: torch.cat([x[:, :1], x[:, :31]], 1)),
         "repeated index"),
        ("NaN value", change_tensor("layer.weight.vals", lambda x: x.clone().index_fill_(1, torch.tensor([0]),
                                                                                         float("nan"))), "non-finite"),
        ("Inf value", change_tensor("layer.bias.vals", lambda x: x.clone().fill_(float("inf"))), "non-finite"),
        ("integer values", change_tensor("layer.bias.vals", lambda x: x.to(torch.int32)), "not allowed"),
        ("float64 values", change_tensor("layer.bias.vals", lambda x: x.double()), "not allowed"),
        ("int64 indices", change_tensor("layer.bias.idx", lambda x: x.long()), "not allowed"),
        ("too few coefficients", lambda t, h: rebuild(t | {"layer.weight.idx": t["layer.weight.idx"][:, :8],
                                                           "layer.weight.vals": t["layer.weight.vals"][:, :8]}, h),
         "coefficients per chunk"),
        ("idx/vals shapes differ", change_tensor("layer.weight.vals", lambda x: x[:, :16].contiguous()),
         "shapes differ"),
        ("no templar header", lambda t, h: save(t), "no templar header"),
        ("templar header not JSON", lambda t, h: save(t, metadata={"templar": "{nope"}), "not valid JSON"),
    ]


@pytest.mark.parametrize("label, mutate, reason", _mutations(), ids=[m[0] for m in _mutations()])
def test_structurally_bad_files_are_rejected_with_a_reason(label, mutate, reason):
    tensors, header = tensors_and_header(make_gradient())
    with pytest.raises(InvalidFile, match=reason):
        read(mutate(tensors, header))


@pytest.mark.parametrize("label, data, reason", [
    ("empty", b"", "shorter than"),
    ("pickle payload", pickle.dumps({"layer.weight": [1, 2, 3]}), "header length"),
    ("torch.save zip", b"PK\x03\x04" + b"\x00" * 100, "header length"),
    ("huge declared header", struct.pack("<Q", 2**60) + b"{}", "header length"),
    ("header not JSON", struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
    # within the 16 MiB any safetensors header may have, past what a gradient's can need: refused unparsed (wide
    # JSON costs ≈ 25× its bytes to parse, and a validator reads its sampled gradients one after another)
    ("header past a gradient's", struct.pack("<Q", (1 << 20) + 2) + b"[" + b" " * (1 << 20) + b"]", "header limit"),
    ("header is a list", raw_file([]), "not a JSON object"),  # type: ignore[arg-type]
    ("duplicate tensor keys", raw_header_text('{"a": %s, "a": %s}' % (ENTRY, ENTRY), b"\0" * 4), "duplicate"),
    ("size lies about shape", raw_file({"a": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4]}}, b"\0" * 4),
     "does not match its shape"),
    ("offsets beyond the file", raw_file({"a": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, b"\0" * 4),
     "outside the file"),
    ("overlapping tensors", raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                                      "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "overlaps"),
    ("trailing garbage", raw_file({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 40),
     "trailing"),
    ("object dtype", raw_file({"a": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "not allowed"),
])
def test_hostile_bytes_are_rejected_with_a_reason(label, data, reason):
    with pytest.raises(InvalidFile, match=reason):
        read(data)


def test_an_exception_the_checks_missed_is_still_an_invalid_file_and_logged(monkeypatch, caplog):
    """A reader's contract holds even where its own checks fall short (here: safetensors' loader failing in a way
    nobody foresaw): InvalidFile, so the caller's per-peer reason and zero score follow, and the traceback is in the
    log as the reader's bug. Running out of memory is the node's fault, not the file's: it is not turned into a
    verdict on the peer."""
    import templar_lib.wire.gradient as gradient_module

    data = write_gradient(make_gradient())
    monkeypatch.setattr(gradient_module, "load_tensors", lambda data: {}["missing"])
    with pytest.raises(InvalidFile, match=r"unreadable \(KeyError\)"):
        read(data)
    assert "read_gradient let KeyError through" in caplog.text and "Traceback" in caplog.text

    def out_of_memory(data):
        raise MemoryError

    monkeypatch.setattr(gradient_module, "load_tensors", out_of_memory)
    with pytest.raises(MemoryError):
        read(data)


def test_size_limit_is_checked_before_parsing():
    data = write_gradient(make_gradient())
    with pytest.raises(InvalidFile, match="exceeds the limit"):
        read(data, max_bytes=len(data) - 1)
    assert read(data, max_bytes=len(data)).uid == UID


def test_wrong_model_shapes_are_rejected():
    with pytest.raises(InvalidFile, match="parameters differ"):
        read(write_gradient(make_gradient()), shapes=SHAPES | {"new.weight": (4, 4)})


# ---------------------------------------------------------------------------------------------------- format 2
@pytest.mark.parametrize("values, dtype", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_compact_format_round_trip_is_exact_up_to_row_order(values, dtype):
    gradient = make_gradient(dtype)
    back = read(write_gradient(dataclasses.replace(gradient, format=2, values=values)))
    assert back.format == 2
    for name, sparse in gradient.tensors.items():
        order = sparse.idx.argsort(dim=1)
        assert torch.equal(back.tensors[name].idx, sparse.idx.gather(1, order))
        assert torch.equal(back.tensors[name].vals, sparse.vals.gather(1, order))
        # the decoded tensor does not depend on the order coefficients are listed in
        from templar_lib.compression import decode
        assert torch.equal(decode(back.tensors[name]), decode(sparse))


def test_compact_format_is_smaller_and_int8_matches_error_feedback():
    from templar_lib.compression import decode
    from templar_lib.error_feedback import ErrorFeedback

    generator = torch.Generator().manual_seed(3)
    gradients = {"w": torch.randn(1024, 2048, generator=generator), "b": torch.randn(3000, generator=generator)}
    shapes = {n: tuple(g.shape) for n, g in gradients.items()}
    sizes = {}
    for values in ("bfloat16", "int8"):
        feedback = ErrorFeedback.zeros_like(gradients, topk=32, target_chunk=64, momentum_decay=0.9,
                                            value_dtype=values)
        sent = feedback.step(gradients, lr=1.0)
        data = write_gradient(Gradient(1, 2, sent, "h", format=2, values=values))
        back = read_gradient(data, window=1, uid=2, shapes=shapes, topk=32)
        for name in gradients:  # what the receiver decodes is exactly what the sender took out of its momentum
            assert torch.equal(decode(back.tensors[name]), decode(sent[name]))
            torch.testing.assert_close(decode(sent[name]) + feedback.momentum[name], gradients[name], atol=1e-5,
                                       rtol=0)
        sizes[values] = len(data)
    baseline = sum(s.idx.numel() for s in sent.values()) * 4  # int16 index + bf16 value per kept coefficient
    assert sizes["bfloat16"] <= 0.8 * baseline and sizes["int8"] <= 0.55 * baseline


@pytest.mark.parametrize("damage, reason", [
    (lambda t, h: t | {"w.unary": t["w.unary"][:-3]}, "index streams invalid"),
    (lambda t, h: t | {"w.rem": t["w.rem"][:-1]}, "index streams invalid"),
    (lambda t, h: t | {"w.unary": torch.zeros_like(t["w.unary"])}, "index streams invalid"),
    (lambda t, h: t | {"w.scale": torch.tensor([float("nan")])}, "bad scale"),
    (lambda t, h: t | {"w.scale": torch.tensor([-1.0])}, "bad scale"),
    (lambda t, h: {k: v for k, v in t.items() if k != "w.scale"}, "scale mismatch"),
    # any b codes the same positions; a larger one only inflates the remainders a reader expands
    (lambda t, h: h["params"]["w"].update(rice=30) or t, "rice parameter, expected 6"),
])
def test_compact_format_hostile_streams_are_rejected(damage, reason):
    generator = torch.Generator().manual_seed(4)
    sent = {"w": encode(torch.randn(64, 128, generator=generator), 32, 64)}
    data = write_gradient(Gradient(1, 2, sent, "h", format=2, values="int8"))
    tensors, header = tensors_and_header_raw(data)
    with pytest.raises(InvalidFile, match=reason):
        read_gradient(rebuild(damage(tensors, header), header), window=1, uid=2, shapes={"w": (64, 128)}, topk=32)


def tensors_and_header_raw(data: bytes):
    from safetensors.torch import load
    (length,) = struct.unpack("<Q", data[:8])
    return load(data), json.loads(json.loads(data[8:8 + length])["__metadata__"]["templar"])
