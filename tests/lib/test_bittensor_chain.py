"""BittensorChain over bittensor 11's real client code with a fake substrate backend injected (no network)."""

import pytest
from bittensor import Wallet

from templar_lib.chain import ChainError, RateLimited
from templar_lib.chain.bittensor import BittensorChain
from tests.fakes.substrate import FakeSubstrate

NETUID = 3


@pytest.fixture
def wallets(tmp_path):
    """Three real wallets (sr25519 hotkeys) in a temporary directory; nothing is read from ~/.bittensor."""
    made = []
    for name in ("validator", "miner1", "miner2"):
        wallet = Wallet(name, "hot", path=str(tmp_path / "wallets"))
        wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
        made.append(wallet)
    return made


@pytest.fixture
def substrate(wallets):
    return FakeSubstrate(netuid=NETUID, hotkeys=[w.hotkey.ss58_address for w in wallets],
                         validator_permit=[True, False, False], stake_rao=[10**12, 10**9, 0], rate_limit=100)


def chain_for(wallet, substrate) -> BittensorChain:
    return BittensorChain(network="local", netuid=NETUID, wallet=wallet, substrate=substrate, blocks_per_window=7)


def test_block_window_and_block_time(wallets, substrate):
    chain = chain_for(wallets[0], substrate)
    assert (chain.block(), chain.window()) == (100, 14)
    assert (chain.block_time(98) - chain.block_time(91)).total_seconds() == 84
    assert chain.block_time(101) is None


def test_metagraph_and_identity(wallets, substrate):
    chain = chain_for(wallets[1], substrate)
    graph = chain.metagraph()
    assert graph.uids == [0, 1, 2] and graph.validators == [0] and graph.block == 100
    assert graph.hotkey(2) == wallets[2].hotkey.ss58_address
    assert graph.neurons[0].stake > graph.neurons[1].stake > graph.neurons[2].stake == 0
    assert chain.uid == 1


def test_commit_builds_the_commitments_extrinsic_and_reads_back(wallets, substrate):
    for uid in (1, 2):
        chain_for(wallets[uid], substrate).commit(f'{{"v":1,"gradients":"s3://miner{uid}"}}')
    call = substrate.submitted[0]
    assert (call.module, call.function, call.signer) == ("Commitments", "set_commitment",
                                                         wallets[1].hotkey.ss58_address)
    assert call.params["netuid"] == NETUID
    assert chain_for(wallets[0], substrate).commitments() == {1: '{"v":1,"gradients":"s3://miner1"}',
                                                              2: '{"v":1,"gradients":"s3://miner2"}'}
    long = '{"v":1,"gradients":"s3://grads?endpoint_url=https://acct.r2.cloudflarestorage.com",' \
           '"access_key_id":"' + "k" * 32 + '","secret_access_key":"' + "s" * 64 + '"}'
    chain_for(wallets[2], substrate).commit(long)  # > 128 bytes: split over raw fields, read back whole
    assert [list(f)[0] for f in substrate.submitted[-1].params["info"]["fields"]] == ["Raw128", f"Raw{len(long) - 128}"]
    assert chain_for(wallets[0], substrate).commitments()[2] == long
    with pytest.raises(ChainError, match="exceeds"):
        chain_for(wallets[1], substrate).commit("x" * 400)


def test_set_weights_submits_u16_weights_signed_by_the_hotkey(wallets, substrate):
    validator = chain_for(wallets[0], substrate)
    validator.set_weights({1: 0.75, 2: 0.25, 0: 0.0})
    (call,) = substrate.submitted
    assert (call.module, call.function) == ("SubtensorModule", "set_mechanism_weights")
    assert call.signer == wallets[0].hotkey.ss58_address
    assert call.params["netuid"] == NETUID and call.params["dests"] == [1, 2]
    assert call.params["weights"] == [65535, 21845]  # max-upscaled to u16, zero weights dropped
    assert validator.weights() == {0: {1: pytest.approx(0.75, abs=1e-4), 2: pytest.approx(0.25, abs=1e-4)}}


def test_set_weights_rate_limit_and_unregistered_hotkey(wallets, substrate, tmp_path):
    validator = chain_for(wallets[0], substrate)
    validator.set_weights({1: 1.0})
    substrate.block += 10
    with pytest.raises(RateLimited, match="rate limit is 100"):
        validator.set_weights({2: 1.0})
    substrate.block += 100
    validator.set_weights({2: 1.0})
    assert len(substrate.submitted) == 2
    stranger = Wallet("stranger", "hot", path=str(tmp_path / "other"))
    stranger.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    with pytest.raises(ChainError, match="not registered"):
        chain_for(stranger, substrate).set_weights({1: 1.0})
    with pytest.raises(ChainError, match="all weights are zero"):
        validator.set_weights({1: 0.0})
