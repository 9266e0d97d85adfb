"""BittensorChain: the `Chain` protocol over the bittensor 11 SDK (a real subnet: finney, test, or a local node).

    bittensor://<network>?netuid=N&wallet=NAME&hotkey=NAME[&wallet_path=DIR&blocks_per_window=7]

Reads go through `bittensor.Subtensor` (the typed metagraph in one runtime-API call, commitments from the
Commitments pallet, weights rows, block numbers and timestamps). Writes are signed by the wallet's hotkey:
`set_weights` goes through the SDK's `SetWeights` intent, which preflights registration and the rate limit,
clips to the subnet's max weight, quantises to u16 and picks plain or commit-reveal submission;
`commit` submits `Commitments.set_commitment` with the data in up to three raw fields of 128 bytes (the SDK
concatenates raw fields when it reads a commitment back).

The wallet's key material never leaves the SDK: this class only holds the Wallet object and never logs it.
A `subtensor` (or `substrate`) can be injected; the tests inject a fake substrate backend so the adapter's real
code paths run with no network.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from templar_lib.chain.base import ChainError, Metagraph, Neuron, RateLimited, verify_sr25519, window_of

log = logging.getLogger(__name__)

RAW_FIELD_BYTES = 128  # the Commitments pallet's largest raw field (Raw0..Raw128)
MAX_FIELDS = 3  # fields per commitment the pallet accepts (MaxFields)
MAX_COMMITMENT_BYTES = RAW_FIELD_BYTES * MAX_FIELDS


class BittensorChain:
    def __init__(self, *, network: str = "finney", netuid: int, wallet="default", hotkey: str = "default",
                 wallet_path: str | None = None, blocks_per_window: int = 7, subtensor=None, substrate=None) -> None:
        import bittensor

        self.netuid = netuid
        self.blocks_per_window = blocks_per_window
        if subtensor is None:
            subtensor = bittensor.Subtensor(network, substrate=substrate) if substrate is not None \
                else bittensor.Subtensor(network)
        self.subtensor = subtensor
        if isinstance(wallet, str):
            wallet = bittensor.Wallet(wallet, hotkey, **({"path": wallet_path} if wallet_path else {}))
        self.wallet = wallet
        self._uid: int | None = None

    def __repr__(self) -> str:
        return f"BittensorChain(network={getattr(self.subtensor, 'network', '?')!r}, netuid={self.netuid})"

    # ------------------------------------------------------------------ identity
    @property
    def hotkey_address(self) -> str:
        return self.wallet.hotkey.ss58_address

    @property
    def uid(self) -> int | None:
        if self._uid is None:
            graph = self.metagraph()
            self._uid = next((n.uid for n in graph.neurons if n.hotkey == self.hotkey_address), None)
        return self._uid

    # ------------------------------------------------------------------ clock
    def block(self) -> int:
        return int(self.subtensor.block)

    def window(self) -> int:
        return window_of(self.block(), self.blocks_per_window)

    def block_time(self, block: int) -> datetime | None:
        if block > self.block():
            return None
        stamp = self.subtensor.timestamp(block)
        if isinstance(stamp, datetime):
            return stamp.astimezone(timezone.utc)
        return datetime.fromtimestamp(float(stamp), tz=timezone.utc)

    def block_hash(self, block: int) -> str | None:
        if block < 0 or block > self.block():
            return None
        info = self.subtensor.block_info(block)
        return str(info.hash).removeprefix("0x") if info is not None and info.hash else None

    # ------------------------------------------------------------------ signatures
    def sign(self, message: bytes) -> str:
        return bytes(self.wallet.hotkey.sign(message)).hex()

    def verify(self, hotkey: str, message: bytes, signature: str) -> bool:
        return verify_sr25519(hotkey, message, signature)

    # ------------------------------------------------------------------ subnet state
    def _graph(self):
        graph = self.subtensor.subnets.metagraph(self.netuid)
        if graph is None:
            raise ChainError(f"subnet {self.netuid} does not exist on this network")
        return graph

    def metagraph(self) -> Metagraph:
        graph = self._graph()
        neurons = [Neuron(uid=n.uid, hotkey=n.hotkey, stake=float(n.total_stake.amount),
                          validator_permit=n.validator_permit)
                   for n in graph.neurons]
        return Metagraph(block=int(graph.block), neurons=sorted(neurons, key=lambda n: n.uid))

    def commitments(self) -> dict[int, str]:
        """Registered uids' visible commitment text (unrevealed or undecodable ones are left out)."""
        out = {}
        for uid, commitment in self._graph().commitments.items():
            value = commitment.value
            if isinstance(value, str):
                out[int(uid)] = value
        return dict(sorted(out.items()))

    def weights(self) -> dict[int, dict[int, float]]:
        rows = self.subtensor.weights.weights(self.netuid)
        return {int(v): {int(u): float(w) for u, w in row.items()} for v, row in sorted(rows.items())}

    # ------------------------------------------------------------------ writes (signed by the hotkey)
    def commit(self, data: str) -> None:
        import bittensor

        raw = data.encode()
        if len(raw) > MAX_COMMITMENT_BYTES:
            raise ChainError(f"commitment of {len(raw)} bytes exceeds the chain's {MAX_COMMITMENT_BYTES}")
        parts = [raw[start:start + RAW_FIELD_BYTES] for start in range(0, len(raw), RAW_FIELD_BYTES)] or [b""]
        fields = [{f"Raw{len(part)}": part} for part in parts]  # BoundedVec<Data>, Data::RawN
        call = bittensor.calls.Commitments.set_commitment(netuid=self.netuid, info={"fields": fields})
        result = self.subtensor.submit_call(call, self.wallet, signer="hotkey")
        self._raise_for(result, "commit")

    def set_weights(self, weights: dict[int, float]) -> None:
        """Submit this validator's weights; the SDK clips, normalises and quantises them to u16."""
        import bittensor

        positive = {int(uid): float(w) for uid, w in weights.items() if w > 0}
        if not positive:
            raise ChainError("all weights are zero; nothing to set")
        try:
            result = self.subtensor.execute(bittensor.SetWeights(netuid=self.netuid, weights=positive), self.wallet)
        except bittensor.ChainError as error:
            if getattr(error, "code", None) == bittensor.ErrorCode.RATE_LIMITED:
                raise RateLimited(str(error)) from None
            raise ChainError(str(error)) from None
        self._raise_for(result, "set_weights")

    @staticmethod
    def _raise_for(result, what: str) -> None:
        if not getattr(result, "success", False):
            raise ChainError(f"{what} failed on chain: {getattr(result, 'message', result)}")

