"""The `Chain` protocol's contract, one driver run against every implementation: the embedded LocalChain and the
bittensor 11 adapter (its real client code over a fake substrate backend, no network)."""

from dataclasses import dataclass
from collections.abc import Callable

import pytest

from templar_lib.chain import Chain, ChainError, LocalChain
from templar_lib.chain.bittensor import BittensorChain
from tests.fakes.substrate import FakeSubstrate

BLOCKS_PER_WINDOW = 7


@dataclass
class Network:
    validator: Chain  # acts as the uid with a validator permit
    miners: list[Chain]  # act as uids without one
    advance: Callable[[int], None]  # move the chain on by this many blocks


def local_network(tmp_path) -> Network:
    chain = LocalChain(tmp_path / "chain.sqlite", clock="manual", blocks_per_window=BLOCKS_PER_WINDOW)
    validator = chain.as_uid(chain.register(hotkey="validator", stake=1000.0, validator_permit=True))
    miners = [chain.as_uid(chain.register(hotkey=f"miner-{i}")) for i in range(2)]
    chain.advance(100)
    return Network(validator, miners, chain.advance)


def bittensor_network(tmp_path) -> Network:
    from bittensor import Wallet

    wallets = []
    for name in ("validator", "miner1", "miner2"):
        wallet = Wallet(name, "hot", path=str(tmp_path / "wallets"))
        wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
        wallets.append(wallet)
    substrate = FakeSubstrate(netuid=3, hotkeys=[w.hotkey.ss58_address for w in wallets],
                              validator_permit=[True, False, False], stake_rao=[10**12, 10**9, 0], rate_limit=0)

    def advance(blocks: int) -> None:
        substrate.block += blocks

    chains = [BittensorChain(network="local", netuid=3, wallet=w, substrate=substrate,
                             blocks_per_window=BLOCKS_PER_WINDOW) for w in wallets]
    return Network(chains[0], chains[1:], advance)


@pytest.fixture(params=["local", "bittensor"])
def network(request, tmp_path) -> Network:
    return {"local": local_network, "bittensor": bittensor_network}[request.param](tmp_path)


def test_blocks_windows_and_block_times(network):
    chain = network.validator
    block = chain.block()
    assert chain.window() == block // BLOCKS_PER_WINDOW
    assert chain.block_time(block) is not None and chain.block_time(block + 1) is None
    network.advance(BLOCKS_PER_WINDOW)
    assert chain.block() == block + BLOCKS_PER_WINDOW and chain.window() == block // BLOCKS_PER_WINDOW + 1
    assert chain.block_time(block + BLOCKS_PER_WINDOW) >= chain.block_time(block)


def test_metagraph_lists_every_identity_and_who_may_validate(network):
    graph = network.validator.metagraph()
    uids = [network.validator.uid] + [miner.uid for miner in network.miners]
    assert graph.uids == sorted(uids) and graph.validators == [network.validator.uid]
    assert len({neuron.hotkey for neuron in graph.neurons}) == len(uids)


def test_commitments_round_trip_per_uid(network):
    for index, miner in enumerate(network.miners):
        miner.commit(f'{{"v":1,"gradients":"s3://miner-{index}"}}')
    commitments = network.validator.commitments()
    assert {uid: commitments[uid] for uid in (m.uid for m in network.miners)} == {
        miner.uid: f'{{"v":1,"gradients":"s3://miner-{index}"}}' for index, miner in enumerate(network.miners)}
    with pytest.raises(ChainError):
        network.miners[0].commit("x" * 2000)  # larger than any chain keeps


def test_weights_set_by_the_validator_are_normalised(network):
    first, second = (miner.uid for miner in network.miners)
    network.validator.set_weights({first: 3.0, second: 1.0})
    row = network.validator.weights()[network.validator.uid]
    assert row == {first: pytest.approx(0.75, abs=1e-4), second: pytest.approx(0.25, abs=1e-4)}


def test_block_hashes_are_fixed_once_reached_and_unknown_before(network):
    chain = network.validator
    block = chain.block()
    assert chain.block_hash(block + 1) is None
    reached = chain.block_hash(block)
    assert isinstance(reached, str) and len(reached) >= 32 and chain.block_hash(block - 1) != reached
    network.advance(1)
    assert chain.block_hash(block) == reached and chain.block_hash(block + 1) is not None


def test_signatures_verify_only_for_the_signer_and_the_message(network):
    graph = network.validator.metagraph()
    validator_hotkey, miner_hotkey = graph.hotkey(network.validator.uid), graph.hotkey(network.miners[0].uid)
    signature = network.validator.sign(b"peers_4.json")
    assert network.miners[0].verify(validator_hotkey, b"peers_4.json", signature)
    assert not network.miners[0].verify(validator_hotkey, b"peers_5.json", signature)
    assert not network.miners[0].verify(miner_hotkey, b"peers_4.json", signature)
    assert not network.miners[0].verify(validator_hotkey, b"peers_4.json", "00" * 64)
    assert not network.miners[0].verify(validator_hotkey, b"peers_4.json", "not hex")
