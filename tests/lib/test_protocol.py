"""The protocol among strangers at the role level: the aggregator combines only bytes a permitted validator scored
and signed for, and the validator's random pages are fixed by a block nobody knew during the window."""

import dataclasses
import hashlib

import pytest
import torch

from templar_lib.buckets import LocalBucket
from templar_lib.chain import LocalChain
from templar_lib.checkpoints import ModelState
from templar_lib.commitments import PeerBuckets
from templar_lib.compression import encode, unit_norm
from templar_lib.gather import publish_peers
from templar_lib.hparams import HParams
from templar_lib.roles.aggregator import PeersListError, aggregator_step
from templar_lib.wire import Gradient, Peers, gradient_key, read_aggregation, write_gradient
from templar_lib.wire.aggregation import CHANGED_AFTER_SCORING

SHAPES = {"w": (64, 128), "b": (60,)}
HPARAMS = HParams(max_gradient_bytes=1 << 20)
WINDOW = 2


@pytest.fixture
def network(tmp_path):
    chain = LocalChain(tmp_path / "chain.sqlite", secret="protocol-test")
    validator = chain.register(hotkey="validator", validator_permit=True)
    miners = [chain.register(hotkey=f"miner-{i}") for i in range(3)]
    chain.advance((WINDOW + 1) * HPARAMS.blocks_per_window)
    bucket = LocalBucket(tmp_path / "gradients")
    files = {}
    for uid in miners:
        generator = torch.Generator().manual_seed(uid)
        tensors = {n: unit_norm(encode(torch.randn(s, generator=generator), 32, 64)) for n, s in SHAPES.items()}
        files[uid] = write_gradient(Gradient(WINDOW, uid, tensors, HPARAMS.protocol_hash(), format=1,
                                             values="float32"))
        bucket.put(gradient_key(WINDOW, uid), files[uid])
    state = ModelState(WINDOW, WINDOW, {n: torch.zeros(s) for n, s in SHAPES.items()})
    return chain, validator, miners, bucket, files, state, LocalBucket(tmp_path / "aggregator")


def publish(chain, signer: int, bucket, uids, files, validator=None, reserves=()) -> None:
    peers = Peers(WINDOW, signer if validator is None else validator, uids,
                  {uid: hashlib.sha256(files[uid]).hexdigest() for uid in [*uids, *reserves]},
                  reserves=list(reserves))
    publish_peers(bucket, dataclasses.replace(peers, signature=chain.as_uid(signer).sign(peers.message())))


def aggregate(chain, bucket, state, aggregator):
    return aggregator_step(WINDOW, state=state, chain=chain, peers=PeerBuckets.of(
        {uid: bucket for uid in range(4)}), aggregator=aggregator, hparams=HPARAMS, peers_list=bucket)


def test_nothing_is_aggregated_without_a_list_a_permitted_validator_signed(network):
    chain, validator, miners, bucket, files, state, aggregator = network
    with pytest.raises(PeersListError, match="no validator has published"):
        aggregate(chain, bucket, state, aggregator)
    publish(chain, miners[0], bucket, miners, files)  # a miner signs a list naming itself
    with pytest.raises(PeersListError, match="no validator permit"):
        aggregate(chain, bucket, state, aggregator)
    publish(chain, miners[0], bucket, miners, files, validator=validator)  # a miner forges the validator's list
    with pytest.raises(PeersListError, match="not signed by validator"):
        aggregate(chain, bucket, state, aggregator)
    assert not aggregator.list()  # no aggregation was published


def test_only_the_scored_bytes_are_combined_and_a_swap_is_named(network):
    chain, validator, miners, bucket, files, state, aggregator = network
    publish(chain, validator, bucket, miners, files)
    swapped = Gradient(WINDOW, miners[1], {n: encode(torch.ones(s), 32, 64) for n, s in SHAPES.items()},
                       HPARAMS.protocol_hash(), format=1, values="float32")
    bucket.put(gradient_key(WINDOW, miners[1]), write_gradient(swapped))  # after the validator scored
    bucket.delete(gradient_key(WINDOW, miners[2]))
    result = aggregate(chain, bucket, state, aggregator)
    assert result.peers == [miners[0]]
    assert result.skipped[miners[1]].startswith(CHANGED_AFTER_SCORING)
    assert result.skipped[miners[2]].startswith("missing")
    published = read_aggregation(aggregator.get(result.key), window=WINDOW, shapes=SHAPES)
    assert published.peers == [miners[0]] and published.refused == result.skipped


def test_a_swap_to_bytes_no_reader_accepts_is_still_named_a_swap(network):
    """Bytes that differ from what the validator scored prove the swap by their hash alone: refused before parsing,
    so a file built to break the reader (JSON nested past the parser's stack) is named, and banned, as a swap."""
    chain, validator, miners, bucket, files, state, aggregator = network
    publish(chain, validator, bucket, miners, files)
    deep = b"[" * 20_000
    bucket.put(gradient_key(WINDOW, miners[1]), len(deep).to_bytes(8, "little") + deep)  # after the validator scored
    result = aggregate(chain, bucket, state, aggregator)
    assert result.peers == [miners[0], miners[2]]
    assert result.skipped[miners[1]].startswith(CHANGED_AFTER_SCORING)


def test_a_reserve_fills_the_place_a_listed_uid_left(network):
    chain, validator, miners, bucket, files, state, aggregator = network
    publish(chain, validator, bucket, miners[:2], files, reserves=[miners[2]])
    swapped = Gradient(WINDOW, miners[1], {n: encode(torch.ones(s), 32, 64) for n, s in SHAPES.items()},
                       HPARAMS.protocol_hash(), format=1, values="float32")
    bucket.put(gradient_key(WINDOW, miners[1]), write_gradient(swapped))  # changed after it was scored
    result = aggregate(chain, bucket, state, aggregator)
    assert result.peers == [miners[0], miners[2]] and result.skipped[miners[1]].startswith(CHANGED_AFTER_SCORING)


def test_random_pages_follow_the_closing_block_nobody_knew(tmp_path):
    from templar_lib.data import random_pages

    one = LocalChain(tmp_path / "a.sqlite", secret="one")
    two = LocalChain(tmp_path / "b.sqlite", secret="two")
    assert one.block_hash(7) is None  # window 0 has not closed: its seed does not exist yet
    one.advance(7)
    two.advance(7)
    assert one.block_hash(7) != two.block_hash(7)
    pages = [random_pages(0, f"{chain.block_hash(7)}:0", 6, 1000) for chain in (one, two)]
    assert pages[0] != pages[1]
    assert pages[0] == random_pages(0, f"{one.block_hash(7)}:0", 6, 1000)  # anyone recomputes them afterwards
