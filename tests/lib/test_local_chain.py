"""LocalChain: identities, commitments, weights rules, block clocks, and concurrent writers in two processes."""

import multiprocessing
import time
from datetime import timedelta

import pytest

from templar_lib.chain import ChainError, LocalChain, RateLimited, open_chain, window_time_range


def test_register_commit_and_metagraph(tmp_path):
    chain = LocalChain(tmp_path / "chain.sqlite")
    validator = chain.register(stake=1000.0, validator_permit=True)
    miners = [chain.register() for _ in range(3)]
    assert (validator, miners) == (0, [1, 2, 3])
    assert chain.register(hotkey=chain.metagraph().hotkey(2)) == 2  # same hotkey, same uid
    graph = chain.metagraph()
    assert graph.uids == [0, 1, 2, 3] and graph.validators == [0]
    assert len({n.hotkey for n in graph.neurons}) == 4
    chain.as_uid(1).commit('{"v": 1}')
    chain.as_uid(3).commit("x")
    chain.as_uid(3).commit("y")  # replaces
    assert chain.commitments() == {1: '{"v": 1}', 3: "y"}
    with pytest.raises(ChainError, match="no uid"):
        chain.commit("z")
    with pytest.raises(ChainError, match="larger than"):
        chain.as_uid(1).commit("x" * 2000)
    chain.deregister(3)
    assert chain.metagraph().uids == [0, 1, 2] and 3 not in chain.commitments()


def test_weights_are_normalised_permissioned_and_rate_limited(tmp_path):
    chain = LocalChain(tmp_path / "chain.sqlite", weights_rate_limit=5)
    validator = chain.as_uid(chain.register(validator_permit=True))
    for _ in range(3):
        chain.register()
    validator.set_weights({1: 2.0, 2: 6.0, 3: 0.0, 99: 5.0})  # unregistered uid 99 and zero weights dropped
    assert chain.weights() == {0: {1: 0.25, 2: 0.75}}
    assert chain.weights_block(0) == 0
    with pytest.raises(RateLimited, match="next allowed at block 5"):
        validator.set_weights({1: 1.0})
    chain.advance(5)
    validator.set_weights({3: 1.0})
    assert chain.weights() == {0: {3: 1.0}} and chain.weights_block(0) == 5
    with pytest.raises(ChainError, match="no validator permit"):
        chain.as_uid(1).set_weights({2: 1.0})


def test_manual_clock_windows_and_time_ranges(tmp_path):
    chain = open_chain(f"local://{tmp_path}/chain.sqlite?clock=manual")
    assert (chain.block(), chain.window()) == (0, 0)
    assert window_time_range(chain, 0) is None  # window 0 has not closed
    chain.advance(6)
    assert chain.window() == 0
    chain.advance(1)
    assert (chain.block(), chain.window()) == (7, 1)
    start, end = window_time_range(chain, 0)
    assert start <= end and chain.block_time(8) is None
    assert chain.advance_to_block(21) == 21 and chain.window() == 3


def test_wall_clock_follows_time(tmp_path):
    chain = LocalChain(tmp_path / "chain.sqlite", clock="wall", seconds_per_block=0.05)
    first = chain.block()
    time.sleep(0.3)
    assert chain.block() >= first + 4
    block = chain.block()
    assert chain.block_time(block + 100) is None
    # datetimes hold whole microseconds: genesis + 2 × 0.05 s can round either way by one
    assert abs(chain.block_time(2) - chain.block_time(0) - timedelta(seconds=0.1)) <= timedelta(microseconds=1)
    with pytest.raises(ChainError, match="manual clock"):
        chain.advance()
    # another process opening the same file sees the same clock without repeating its settings
    assert LocalChain(tmp_path / "chain.sqlite").block() >= block


def _register_many(path: str, count: int, tag: str) -> None:
    chain = LocalChain(path)
    for index in range(count):
        uid = chain.register(hotkey=f"{tag}-{index}")
        chain.as_uid(uid).commit(f"{tag}:{index}")


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path = str(tmp_path / "chain.sqlite")
    LocalChain(path)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_register_many, args=(path, 40, tag)) for tag in ("a", "b")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    chain = LocalChain(path)
    graph = chain.metagraph()
    assert graph.uids == list(range(80))  # every registration got its own uid, none lost or doubled
    assert sorted(chain.commitments().values()) == sorted(f"{t}:{i}" for t in "ab" for i in range(40))


def test_open_chain_rejects_unknown_urls(tmp_path):
    with pytest.raises(ValueError, match="unsupported"):
        open_chain("ethereum://x")
    with pytest.raises(ValueError, match="unknown chain URL option"):
        open_chain(f"local://{tmp_path}/c.sqlite?colour=red")
