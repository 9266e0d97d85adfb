"""Checkpoints: integrity, atomicity under SIGKILL, and bit-identical catch-up from published aggregations."""

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from templar_lib.aggregation import aggregate_window, apply_aggregation_, learning_rate_at, sign_directions
from templar_lib.buckets import LocalBucket
from templar_lib.checkpoints import (CatchUpError, ModelState, catch_up, latest_checkpoint, load_checkpoint,
                                     model_fingerprint, save_checkpoint, state_bytes, state_sha256)
from templar_lib.wire.keys import CHECKPOINT, CHECKPOINT_MANIFEST
from templar_lib.compression import Sparse, chunk_shape
from templar_lib.error_feedback import ErrorFeedback
from templar_lib.hparams import HParams
from templar_lib.model import build_model
from templar_lib.state import StateStore
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from templar_lib.wire import (MAX_HEADER_BYTES, AggregationFormat, Aggregation, InvalidFile, aggregation_key,
                              max_aggregation_bytes, parse_header, read_aggregation, write_aggregation)

HPARAMS = HParams()


def tiny_state(window=0, step=0) -> ModelState:
    model = build_model("tiny", seed=0)
    return ModelState(window, step, {n: p.detach().clone() for n, p in model.named_parameters()})


def test_save_load_round_trip_is_exact(tmp_path):
    bucket = LocalBucket(tmp_path)
    state = tiny_state(window=5, step=5)
    info = save_checkpoint(bucket, state, HPARAMS)
    loaded = load_checkpoint(bucket, 5, shapes={n: tuple(p.shape) for n, p in state.parameters.items()})
    assert (loaded.window, loaded.step) == (5, 5) and info.sha256 == state_sha256(state)
    assert all(torch.equal(loaded.parameters[n], p) for n, p in state.parameters.items())


def test_state_store_streams_the_checkpoint_bytes_and_maps_them_back_read_only(tmp_path):
    store, state = StateStore(tmp_path), tiny_state(window=4, step=4)
    assert store.save_model(state) == state_sha256(state)  # the digest of the file it wrote
    assert (tmp_path / "model-4.safetensors").read_bytes() == state_bytes(state)
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".tmp-")]
    loaded = store.load_model(4)
    assert (loaded.window, loaded.step) == (4, 4) and model_fingerprint(loaded.parameters) == model_fingerprint(
        state.parameters)
    assert loaded.fingerprint == model_fingerprint(state.parameters)  # recorded beside θ: no second hashing
    other = ModelState(4, 4, {n: p + 1 for n, p in state.parameters.items()})
    store.save_model(other)  # θ_4 replaced (a resync): its record follows it
    assert store.load_model(4).fingerprint == model_fingerprint(other.parameters) != loaded.fingerprint
    (tmp_path / "fingerprint-4.json").unlink()  # as after a save killed between the θ file and its record
    assert store.load_model(4).fingerprint is None
    store.save_momentum(2, 4, {"m": torch.ones(3, 4)})
    momentum = store.load_momentum(2, 4)
    store.load_model(4).parameters["model.norm.weight"].add_(1.0)  # in-place updates stay in this process
    momentum["m"].mul_(0.5)
    assert torch.equal(store.load_model(4).parameters["model.norm.weight"], other.parameters["model.norm.weight"])
    assert torch.equal(store.load_momentum(2, 4)["m"], torch.ones(3, 4))
    assert store.load_momentum(2, 5) is None


def test_state_store_keeps_only_the_last_windows_it_is_told_to(tmp_path):
    store, state = StateStore(tmp_path, keep_windows=2), tiny_state()
    for window in range(5):
        store.save_model(ModelState(window, window, state.parameters))
        for uid in (1, 2):
            store.save_momentum(uid, window, {"m": torch.full((2,), float(window))})
    assert store.model_windows() == [3, 4]
    assert sorted(path.name for path in tmp_path.glob("fingerprint-*")) == ["fingerprint-3.json", "fingerprint-4.json"]
    assert sorted(path.name for path in tmp_path.glob("momentum-*")) == [
        "momentum-1-3.safetensors", "momentum-1-4.safetensors", "momentum-2-3.safetensors", "momentum-2-4.safetensors"]
    store.save_model(ModelState(1, 1, state.parameters))  # re-running an old window never deletes newer state
    assert store.model_windows() == [1, 3, 4]
    everything = StateStore(tmp_path / "all")
    for window in range(5):
        everything.save_model(ModelState(window, window, state.parameters))
    assert everything.model_windows() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="keep_windows"):
        StateStore(tmp_path, keep_windows=0)


def test_model_fingerprint_changes_with_any_bit_name_or_dtype():
    parameters = tiny_state().parameters
    fingerprint = model_fingerprint(parameters)
    assert fingerprint == model_fingerprint({n: p.clone() for n, p in reversed(parameters.items())})
    flipped = {n: p.clone() for n, p in parameters.items()}
    flipped["model.norm.weight"].view(torch.int32)[3] ^= 1  # one bit of one value
    renamed = {("x." + n if n == "lm_head.weight" else n): p for n, p in parameters.items()}
    halved = parameters | {"model.norm.weight": parameters["model.norm.weight"].bfloat16()}
    assert len({fingerprint, model_fingerprint(flipped), model_fingerprint(renamed), model_fingerprint(halved)}) == 4


def test_tampered_checkpoint_is_rejected_and_latest_falls_back(tmp_path):
    bucket = LocalBucket(tmp_path)
    save_checkpoint(bucket, tiny_state(window=3, step=3), HPARAMS)
    newer = tiny_state(window=6, step=6)
    save_checkpoint(bucket, newer, HPARAMS)
    data = bytearray(bucket.get(CHECKPOINT.key(6)))
    data[-1] ^= 0x01  # flip one bit of one weight
    bucket.put(CHECKPOINT.key(6), bytes(data))
    with pytest.raises(InvalidFile, match="sha256"):
        load_checkpoint(bucket, 6)
    assert latest_checkpoint(bucket).window == 3
    bucket.put(CHECKPOINT_MANIFEST.key(7), b'{"format": 1}')  # a manifest without data: ignored
    assert latest_checkpoint(bucket).window == 3
    assert latest_checkpoint(bucket, at_most=2) is None


def test_wrong_model_shapes_are_rejected(tmp_path):
    bucket = LocalBucket(tmp_path)
    save_checkpoint(bucket, tiny_state(), HPARAMS)
    with pytest.raises(InvalidFile, match="differ from the model"):
        load_checkpoint(bucket, 0, shapes={"model.norm.weight": (128,)})


WRITER = textwrap.dedent("""
    import sys, torch
    from templar_lib.buckets import LocalBucket
    from templar_lib.checkpoints import ModelState, save_checkpoint
    from templar_lib.hparams import HParams
    bucket = LocalBucket(sys.argv[1])
    small = {"w": torch.full((4, 4), 1.0)}
    save_checkpoint(bucket, ModelState(1, 1, small), HParams())
    print("saved", flush=True)
    big = {f"w{i}": torch.full((4096, 4096), float(i)) for i in range(12)}   # ~0.8 GB: slow enough to be killed
    save_checkpoint(bucket, ModelState(2, 2, big), HParams())
    print("finished", flush=True)
""")


def test_sigkill_while_saving_leaves_previous_checkpoint_loadable(tmp_path):
    bucket_dir = tmp_path / "aggregator"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(bucket_dir)], stdout=subprocess.PIPE, text=True,
                               env=os.environ | {"PYTHONPATH": os.getcwd()})
    assert process.stdout.readline().strip() == "saved"
    deadline = time.monotonic() + 60
    while not any(p.name.startswith(".tmp-") for p in bucket_dir.iterdir()):  # the big write is in progress
        assert time.monotonic() < deadline and process.poll() is None, "writer never started the second save"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # it really died mid-save
    bucket = LocalBucket(bucket_dir)
    assert not bucket.exists(CHECKPOINT_MANIFEST.key(2))
    state = latest_checkpoint(bucket)
    assert state.window == 1 and torch.equal(state.parameters["w"], torch.full((4, 4), 1.0))


def make_aggregations(state: ModelState, windows: int, miners: int = 3):
    """Run `windows` outer steps live from `state` with random miner gradients; yield each Aggregation and θ."""
    shapes = {n: tuple(p.shape) for n, p in state.parameters.items()}
    feedback = [ErrorFeedback.zeros_like(state.parameters, topk=32, target_chunk=64, momentum_decay=0.999)
                for _ in range(miners)]
    parameters = {n: p.clone() for n, p in state.parameters.items()}
    for window in range(state.window, state.window + windows):
        step = state.step + window - state.window
        lr = learning_rate_at(step, HPARAMS)
        generator = torch.Generator().manual_seed(window)
        sent = {uid: feedback[uid].step({n: torch.randn(s, generator=generator) for n, s in shapes.items()}, lr=lr)
                for uid in range(miners)}
        aggregation = aggregate_window(window, step, lr, sent, list(shapes), HPARAMS.protocol_hash())
        apply_aggregation_(parameters, aggregation, weight_decay=HPARAMS.weight_decay)
        yield aggregation, {n: p.clone() for n, p in parameters.items()}


def test_catch_up_from_checkpoint_is_bit_identical_to_live_node(tmp_path):
    bucket = LocalBucket(tmp_path)
    live = {}
    for aggregation, parameters in make_aggregations(tiny_state(), windows=7):
        bucket.put(aggregation_key(aggregation.window), write_aggregation(aggregation))
        live[aggregation.window + 1] = parameters
        if aggregation.window + 1 == 5:
            save_checkpoint(bucket, ModelState(5, 5, parameters), HPARAMS)
    start = latest_checkpoint(bucket)
    assert start.window == 5
    caught_up = catch_up(start, bucket, 7, hparams=HPARAMS)
    assert (caught_up.window, caught_up.step) == (7, 7)
    assert all(torch.equal(caught_up.parameters[n], p) for n, p in live[7].items())
    assert not torch.equal(caught_up.parameters["model.norm.weight"], start.parameters["model.norm.weight"])
    with pytest.raises(CatchUpError, match="cannot replay window 7"):
        catch_up(start, bucket, 8, hparams=HPARAMS)


def test_aggregation_file_round_trip_and_validation():
    aggregation, _ = next(make_aggregations(tiny_state(), windows=1))
    shapes = {n: c.shape for n, c in aggregation.tensors.items()}
    data = write_aggregation(aggregation)
    back = read_aggregation(data, window=0, shapes=shapes)
    assert (back.step, back.lr, back.peers) == (aggregation.step, aggregation.lr, aggregation.peers)
    for name, combined in aggregation.tensors.items():
        assert torch.equal(back.tensors[name].idx, combined.idx)
        assert torch.equal(back.tensors[name].vals, combined.vals)
        assert torch.equal(back.tensors[name].counts, combined.counts)
    with pytest.raises(InvalidFile, match="window"):
        read_aggregation(data, window=1, shapes=shapes)
    broken = Aggregation(0, 0, 1e-3, [2, 1], aggregation.tensors)
    with pytest.raises(InvalidFile, match="peers"):
        read_aggregation(write_aggregation(broken), window=0, shapes=shapes)
    name = "model.norm.weight"
    combined = aggregation.tensors[name]
    reversed_positions = type(combined)(combined.idx.flip(0), combined.vals, combined.counts, combined.shape,
                                        combined.chunk)
    bad = Aggregation(0, 0, 1e-3, [0], aggregation.tensors | {name: reversed_positions})
    with pytest.raises(InvalidFile, match="not increasing"):
        read_aggregation(write_aggregation(bad), window=0, shapes=shapes)


def test_aggregations_are_bounded_by_the_model_not_by_the_gradient_limit(tmp_path):
    """A 1b aggregation of 20 peers is ≈ 1.08 GB, four times max_gradient_bytes: catch-up (every node's replay) must
    accept it, and refuse only what no aggregation of these shapes can be."""
    state = tiny_state()
    shapes = {n: tuple(p.shape) for n, p in state.parameters.items()}
    peers, topk = 8, 32  # enough coefficients that the format-1 bound exceeds the format-2 one
    generator = torch.Generator().manual_seed(0)

    def peer(offset):  # disjoint positions per peer: the union is exactly min(chunk, peers · topk) per chunk
        gradients = {}
        for name, shape in shapes.items():
            chunk = chunk_shape(shape, 64)
            size, kept = math.prod(chunk), min(math.prod(chunk), topk)
            n_chunks = math.prod(shape) // size
            idx = ((torch.arange(kept) + offset * kept) % size).expand(n_chunks, kept).contiguous()
            gradients[name] = Sparse(idx, torch.randn(n_chunks, kept, generator=generator) + 3.0, shape, chunk)
        return gradients

    small_gradients = HParams(max_gradient_bytes=1 << 16, max_peers=peers, topk_peers=peers)
    aggregation = aggregate_window(0, 0, learning_rate_at(0, small_gradients), {uid: peer(uid) for uid in range(peers)},
                                   list(shapes), small_gradients.protocol_hash())
    data = write_aggregation(aggregation)
    bound = max_aggregation_bytes(shapes, target_chunk=64, topk=topk, peers=peers)
    header = 8 + int.from_bytes(data[:8], "little")
    assert len(data) - header == bound - 8 - MAX_HEADER_BYTES  # the tensors of the fullest aggregation, exactly
    dense = max_aggregation_bytes(shapes, target_chunk=64, topk=topk, peers=4096 // topk)  # every coefficient kept
    assert max_aggregation_bytes(shapes, target_chunk=64, topk=topk, peers=1000) == dense > bound

    bucket = LocalBucket(tmp_path)
    bucket.put(aggregation_key(0), data)
    assert small_gradients.max_gradient_bytes <= len(data) // 4
    following = catch_up(state, bucket, 1, hparams=small_gradients)  # bigger than a gradient may be: still replayed
    assert following.window == 1 and not torch.equal(following.parameters["model.norm.weight"],
                                                     state.parameters["model.norm.weight"])
    bucket.put(aggregation_key(0), data + b"\0" * (bound - len(data) + 1))
    with pytest.raises(CatchUpError, match="cannot replay window 0: .*larger than the limit"):
        catch_up(state, bucket, 1, hparams=small_gradients)


def header_of(data: bytes) -> tuple[dict, dict]:
    entries, metadata = parse_header(data, max_bytes=len(data))
    return entries, json.loads(metadata["templar"])


def test_a_signs_aggregation_replays_to_the_same_bits_and_is_validated(tmp_path):
    aggregation, _ = next(make_aggregations(tiny_state(), windows=1))
    shapes = {n: tuple(p.shape) for n, p in tiny_state().parameters.items()}
    signs = sign_directions(aggregation)
    signs["model.norm.weight"] = signs["model.norm.weight"].clone()
    signs["model.norm.weight"][:5] = 0  # zeros travel in their own bitmap
    as_signs = dataclasses.replace(aggregation, tensors={}, format=AggregationFormat.SIGNS, signs=signs)
    coefficients, packed = write_aggregation(dataclasses.replace(aggregation, signs=None)), write_aggregation(as_signs)
    entries, _ = header_of(packed)  # one bit per parameter, and a zero bitmap only where there are zeros
    assert sum(math.prod(e["shape"]) for e in entries.values()) == sum(-(-math.prod(s) // 8) for s in shapes.values()) \
        + -(-math.prod(shapes["model.norm.weight"]) // 8)
    back = read_aggregation(packed, window=0, shapes=shapes)
    assert back.format == AggregationFormat.SIGNS and (back.step, back.lr, back.peers) == (as_signs.step, as_signs.lr,
                                                                               as_signs.peers)
    assert set(back.signs) == set(signs) and all(torch.equal(back.signs[n], s) for n, s in signs.items())
    norm = back.signs["model.norm.weight"]
    assert norm.dtype == torch.int8 and int(norm[:5].abs().sum()) == 0

    signs["model.norm.weight"] = sign_directions(aggregation)["model.norm.weight"]  # the update as computed
    bucket_one, bucket_two = LocalBucket(tmp_path / "one"), LocalBucket(tmp_path / "two")
    bucket_one.put(aggregation_key(0), coefficients)
    bucket_two.put(aggregation_key(0), write_aggregation(dataclasses.replace(as_signs, signs=signs)))
    one, two = (catch_up(tiny_state(), bucket, 1, hparams=HPARAMS) for bucket in (bucket_one, bucket_two))
    assert all(torch.equal(one.parameters[n], two.parameters[n]) for n in shapes)

    def tampered(change):
        _, header = header_of(packed)
        tensors = {k: t.clone() for k, t in safetensors_load(packed).items()}
        change(tensors, header)
        return safetensors_save(tensors, metadata={"templar": json.dumps(header)})

    name = "model.norm.weight"
    cases = {
        "bits must be": lambda t, h: t.__setitem__(f"{name}.positive", t[f"{name}.positive"][:-1].clone()),
        "do not match": lambda t, h: t.__setitem__("extra.positive", torch.zeros(1, dtype=torch.uint8)),
        "shape does not match": lambda t, h: h["params"][name].__setitem__("shape", [64]),
        "both zero and positive": lambda t, h: t[f"{name}.zero"].fill_(255),
    }
    for reason, change in cases.items():
        with pytest.raises(InvalidFile, match=reason):
            read_aggregation(tampered(change), window=0, shapes=shapes)
    odd = {"odd": (3, 3)}  # 9 signs in 2 bytes: the 7 padding bits must be zero
    data = write_aggregation(Aggregation(0, 0, 1e-3, [1], {}, format=AggregationFormat.SIGNS,
                                         signs={"odd": torch.ones(3, 3, dtype=torch.int8)}))
    assert torch.equal(read_aggregation(data, window=0, shapes=odd).signs["odd"], torch.ones(3, 3, dtype=torch.int8))
    _, header = header_of(data)
    padded = safetensors_save({"odd.positive": torch.tensor([255, 255], dtype=torch.uint8)},
                              metadata={"templar": json.dumps(header)})
    with pytest.raises(InvalidFile, match="nonzero padding"):
        read_aggregation(padded, window=0, shapes=odd)


def test_a_published_checkpoint_of_another_model_is_neither_adopted_nor_loaded(tmp_path):
    """Whoever writes to the aggregator's bucket can publish a newer checkpoint of other shapes: a node given its
    model's shapes resyncs from the last one that fits, and θ of the wrong shapes never reaches a model (copy_ would
    broadcast a (1, n) row into every row of an (m, n) weight)."""
    from templar_lib.model import load_parameters_, parameter_shapes
    from templar_lib.state import StateMissing, sync_to

    bucket, good = LocalBucket(tmp_path / "aggregator"), tiny_state(window=3, step=3)
    save_checkpoint(bucket, good, HPARAMS)
    shapes = parameter_shapes("tiny")
    name = "model.layers.0.mlp.up_proj.weight"
    wrong = dict(good.parameters, **{name: good.parameters[name][:1].clone()})  # (1, n) for (m, n)
    save_checkpoint(bucket, ModelState(5, 5, wrong), HPARAMS)
    assert shapes == {n: tuple(p.shape) for n, p in good.parameters.items()}
    adopted = sync_to(StateStore(tmp_path / "blind"), bucket, 5, hparams=HPARAMS)  # without the shapes: adopted
    assert tuple(adopted.parameters[name].shape) != shapes[name]
    # with them: checkpoint-5 is skipped, and the resync starts from checkpoint-3 (which needs aggregations 3 and 4)
    with pytest.raises(StateMissing, match="resyncing from window 3 failed"):
        sync_to(StateStore(tmp_path / "state"), bucket, 5, hparams=HPARAMS, model_shapes=lambda: shapes)
    synced = sync_to(StateStore(tmp_path / "state"), bucket, 3, hparams=HPARAMS, model_shapes=lambda: shapes)
    assert synced.window == 3 and all(torch.equal(synced.parameters[n], p) for n, p in good.parameters.items())
    model = build_model("tiny", seed=1)
    with pytest.raises(ValueError, match="shapes differ"):
        load_parameters_(model, wrong)
