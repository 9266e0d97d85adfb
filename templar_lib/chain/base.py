"""The `Chain` protocol: what a templar node needs from a Bittensor-like chain (DESIGN §1, §2).

A Chain is bound to one identity (a hotkey and the uid it holds): `commit`, `set_weights` and `sign` act as that
node. Reads are the subnet's state. Windows are `block // blocks_per_window`; window w is complete once the chain is
in window w + 1. A block's hash is fixed once the chain has reached it and unknowable before: the seed of anything
that must be unpredictable during a window and recomputable after it. Signatures are the hotkey's (sr25519), checked
against the hotkey's public key, so a file signed by a validator cannot be forged by whoever can write its bucket.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable


class ChainError(RuntimeError):
    """The chain refused or failed an operation (not registered, rate limited, no permit, unreachable)."""


class RateLimited(ChainError):
    """set_weights came sooner than the subnet's weights rate limit allows."""


@dataclass(frozen=True)
class Neuron:
    uid: int
    hotkey: str
    stake: float
    validator_permit: bool


@dataclass(frozen=True)
class Metagraph:
    block: int
    neurons: list[Neuron]  # ascending uid

    @property
    def uids(self) -> list[int]:
        return [neuron.uid for neuron in self.neurons]

    def hotkey(self, uid: int) -> str | None:
        return next((n.hotkey for n in self.neurons if n.uid == uid), None)

    @property
    def validators(self) -> list[int]:
        return [neuron.uid for neuron in self.neurons if neuron.validator_permit]


@runtime_checkable
class Chain(Protocol):
    blocks_per_window: int

    @property
    def uid(self) -> int | None:
        """The uid this chain handle acts as (None when its hotkey is not registered)."""

    def block(self) -> int: ...

    def window(self) -> int: ...

    def block_time(self, block: int) -> datetime | None:
        """UTC time the chain reached `block`, or None if it has not (yet) or is unknown."""

    def metagraph(self) -> Metagraph: ...

    def commit(self, data: str) -> None: ...

    def commitments(self) -> dict[int, str]: ...

    def set_weights(self, weights: dict[int, float]) -> None: ...

    def weights(self) -> dict[int, dict[int, float]]:
        """validator uid -> {uid: weight}, each row normalised to sum 1."""

    def block_hash(self, block: int) -> str | None:
        """The hash of `block` (hex), or None when the chain has not reached it."""

    def sign(self, message: bytes) -> str:
        """This identity's hotkey signature of `message` (hex)."""

    def verify(self, hotkey: str, message: bytes, signature: str) -> bool:
        """Whether `signature` is `hotkey`'s signature of `message`."""


def window_of(block: int, blocks_per_window: int) -> int:
    return block // blocks_per_window


def verify_sr25519(ss58_address: str, message: bytes, signature: str) -> bool:
    """An sr25519 signature check against an ss58 public key (what bittensor hotkeys sign with); False for anything
    malformed."""
    from bittensor.sp_core import Keypair

    try:
        return bool(Keypair(ss58_address=ss58_address).verify(message, bytes.fromhex(signature)))
    except Exception:  # noqa: BLE001 - the compiled keypair raises its own types for a malformed key or signature
        return False


def window_time_range(chain: Chain, window: int) -> tuple[datetime, datetime] | None:
    """(time window opened, time window closed) from block times, or None when the chain cannot tell yet."""
    start = chain.block_time(window * chain.blocks_per_window)
    end = chain.block_time((window + 1) * chain.blocks_per_window)
    return (start, end) if start is not None and end is not None else None
