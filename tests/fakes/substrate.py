"""An in-memory Substrate backend for bittensor 11's `Client(substrate=...)` seam (no network).

It holds a tiny subnet's storage, answers the reads the SDK makes (storage items and maps, the metagraph runtime
API, block numbers/hashes/timestamps), and applies the two extrinsics templar submits the way the chain would:
`SubtensorModule.set_mechanism_weights` (u16 rows + LastUpdate) and `Commitments.set_commitment`. Every
submitted call is recorded with its signer so tests can assert the exact extrinsic arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bittensor import Balance, ExtrinsicResult


@dataclass
class Submitted:
    module: str
    function: str
    params: dict
    signer: str


@dataclass
class FakeSubstrate:
    netuid: int
    hotkeys: list[str]
    validator_permit: list[bool]
    stake_rao: list[int]
    block: int = 100
    rate_limit: int = 0
    commit_reveal: bool = False
    max_weights_limit: int = 65535
    min_allowed_weights: int = 0
    genesis_ms: int = 1_760_000_000_000
    token_symbols: dict[int, str] = field(default_factory=dict)
    submitted: list[Submitted] = field(default_factory=list)
    weights: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    last_update: dict[int, int] = field(default_factory=dict)
    commitments: dict[str, dict] = field(default_factory=dict)

    # -- lifecycle and display
    def balance(self, rao: int, netuid: int = 0) -> Balance:
        return Balance(int(rao), netuid, None)

    async def connect(self) -> None:
        pass

    async def close(self) -> None:
        pass

    # -- blocks
    async def block_number(self) -> int:
        return self.block

    async def finalized_block_number(self) -> int:
        return self.block

    async def block_hash(self, block: int | None = None) -> str:
        return f"0x{(self.block if block is None else block):064x}"

    async def block_time(self) -> float:
        return 12.0

    async def get_block(self, block_number: int | None = None) -> dict | None:
        number = self.block if block_number is None else block_number
        if number > self.block:
            return None
        return {"header": {"number": number, "hash": await self.block_hash(number)}, "extrinsics": []}

    async def spec_version(self) -> int:
        return 400

    def _block_of(self, block_hash: str | None) -> int:
        return self.block if block_hash is None else int(block_hash, 16)

    # -- storage
    async def query(self, module: str, storage_function: str, params: list | None = None,
                    block_hash: str | None = None) -> Any:
        params = list(params or [])
        key = (module, storage_function)
        if key == ("Timestamp", "Now"):
            return self.genesis_ms + self._block_of(block_hash) * 12_000
        if key == ("SubtensorModule", "Uids"):
            netuid, hotkey = params
            return self.hotkeys.index(hotkey) if netuid == self.netuid and hotkey in self.hotkeys else None
        scalars = {"CommitRevealWeightsEnabled": self.commit_reveal, "WeightsSetRateLimit": self.rate_limit,
                   "MinAllowedWeights": self.min_allowed_weights, "MaxWeightsLimit": self.max_weights_limit,
                   "SubnetEpochConsensus": "Yuma"}
        if module == "SubtensorModule" and storage_function in scalars:
            return scalars[storage_function]
        if key == ("SubtensorModule", "LastUpdate"):
            return [self.last_update.get(uid, 0) for uid in range(len(self.hotkeys))]
        if key == ("SubtensorModule", "ValidatorPermit"):
            return list(self.validator_permit)
        raise NotImplementedError(f"fake substrate has no storage {module}.{storage_function}")

    async def query_map(self, module: str, storage_function: str, params: list | None = None,
                        block_hash: str | None = None) -> list[tuple[Any, Any]]:
        key = (module, storage_function)
        if key == ("SubtensorModule", "Weights"):
            return sorted(self.weights.items())
        if key == ("Commitments", "CommitmentOf"):
            return sorted(self.commitments.items())
        if key in (("Commitments", "RevealedCommitments"), ("SubtensorModule", "TokenSymbol")):
            return []
        if key == ("SubtensorModule", "Uids"):
            return [(hotkey, uid) for uid, hotkey in enumerate(self.hotkeys)]
        raise NotImplementedError(f"fake substrate has no map {module}.{storage_function}")

    async def runtime_call(self, api: str, method: str, params: list, block_hash: str | None = None) -> Any:
        if (api, method) == ("SubnetInfoRuntimeApi", "get_metagraph"):
            if params[0] != self.netuid:
                return None
            count = len(self.hotkeys)
            return {
                "netuid": self.netuid, "name": list(b"templar"), "symbol": list(b"t"), "block": self.block,
                "tempo": 360, "last_step": 0, "blocks_since_last_step": self.block, "owner_hotkey": self.hotkeys[0],
                "owner_coldkey": self.hotkeys[0], "network_registered_at": 1, "num_uids": count, "max_uids": 256,
                "hotkeys": list(self.hotkeys), "coldkeys": list(self.hotkeys), "active": [True] * count,
                "validator_permit": list(self.validator_permit), "total_stake": list(self.stake_rao),
                "last_update": [self.last_update.get(uid, 0) for uid in range(count)],
                "block_at_registration": [1] * count,
            }
        raise NotImplementedError(f"fake substrate has no runtime API {api}.{method}")

    # -- extrinsics
    async def compose(self, call) -> Any:
        return call

    async def account_next_index(self, address: str) -> int:
        return len(self.submitted)

    async def estimate_fee(self, call, keypair) -> Balance:
        return Balance(0, 0, None)

    async def submit(self, call, keypair, *, nonce=None, period=None, wait_for_inclusion=True,
                     wait_for_finalization=True) -> ExtrinsicResult:
        signer = keypair.ss58_address
        self.submitted.append(Submitted(call.module, call.function, dict(call.params), signer))
        if (call.module, call.function) == ("SubtensorModule", "set_mechanism_weights"):
            uid = self.hotkeys.index(signer)
            self.weights[uid] = list(zip(call.params["dests"], call.params["weights"]))
            self.last_update[uid] = self.block
        elif (call.module, call.function) == ("Commitments", "set_commitment"):
            fields = []
            for entry in call.params["info"]["fields"]:
                ((variant, payload),) = entry.items()
                fields.append({variant: payload if isinstance(payload, str) else "0x" + bytes(payload).hex()})
            self.commitments[signer] = {"info": {"fields": fields}, "block": self.block, "deposit": 0}
        else:
            return ExtrinsicResult(success=False, message=f"fake chain does not apply {call.module}.{call.function}")
        return ExtrinsicResult(success=True, message="ok", block_hash=await self.block_hash())
