"""Chains: the `Chain` protocol, the embedded LocalChain and the bittensor adapter, chosen by URL.

    local:///abs/chain.sqlite[?clock=manual|wall&seconds_per_block=12&uid=N&blocks_per_window=7&weights_rate_limit=0]
    bittensor://<network>?netuid=N[&wallet=NAME&hotkey=NAME&blocks_per_window=7]
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlparse

from templar_lib.chain.base import (Chain, ChainError, Metagraph, Neuron, RateLimited, window_of,
                                    window_time_range)
from templar_lib.chain.local import LocalChain

__all__ = ["Chain", "ChainError", "Metagraph", "Neuron", "RateLimited", "LocalChain", "open_chain", "window_of",
           "window_time_range"]


def open_chain(url: str) -> Chain:
    parsed = urlparse(url)
    options = {name: values[-1] for name, values in parse_qs(parsed.query).items()}
    if parsed.scheme == "local":
        allowed = {"clock", "seconds_per_block", "uid", "blocks_per_window", "weights_rate_limit"}
        _refuse_unknown(options, allowed)
        return LocalChain(unquote(parsed.path), uid=_int(options, "uid"), clock=options.get("clock"),
                          seconds_per_block=float(options["seconds_per_block"]) if "seconds_per_block" in options
                          else None, blocks_per_window=_int(options, "blocks_per_window") or 7,
                          weights_rate_limit=_int(options, "weights_rate_limit"))
    if parsed.scheme == "bittensor":
        from templar_lib.chain.bittensor import BittensorChain

        _refuse_unknown(options, {"netuid", "wallet", "hotkey", "blocks_per_window", "wallet_path"})
        if "netuid" not in options:
            raise ValueError("bittensor chain URL needs ?netuid=N")
        return BittensorChain(network=parsed.netloc or "finney", netuid=int(options["netuid"]),
                              wallet=options.get("wallet", "default"), hotkey=options.get("hotkey", "default"),
                              wallet_path=options.get("wallet_path"),
                              blocks_per_window=_int(options, "blocks_per_window") or 7)
    raise ValueError(f"unsupported chain URL scheme {parsed.scheme!r} (supported: local://, bittensor://)")


def _int(options: dict[str, str], name: str) -> int | None:
    return int(options[name]) if name in options else None


def _refuse_unknown(options: dict[str, str], allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown chain URL option(s) {sorted(unknown)}")
