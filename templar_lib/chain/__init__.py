"""Chains: the `Chain` protocol, the embedded LocalChain and the bittensor adapter, chosen by URL.

    local:///abs/chain.sqlite[?clock=manual|wall&seconds_per_block=12&uid=N&weights_rate_limit=0]
    bittensor://<network>?netuid=N[&wallet=NAME&hotkey=NAME]

Blocks per window is a protocol setting (HParams.blocks_per_window): callers pass it to `open_chain`. A URL may still
say `blocks_per_window=N`, but only the same N: a conflict is refused, since a window must mean the same blocks on
every node.
"""

from __future__ import annotations

from urllib.parse import parse_qs, unquote, urlparse

from templar_lib.chain.base import (Chain, ChainError, Metagraph, Neuron, RateLimited, verify_sr25519, window_of,
                                    window_time_range)
from templar_lib.chain.local import LocalChain
from templar_lib.hparams import HParams

__all__ = ["Chain", "ChainError", "Metagraph", "Neuron", "RateLimited", "LocalChain", "open_chain", "verify_sr25519",
           "window_of", "window_time_range"]


def open_chain(url: str, *, blocks_per_window: int | None = None) -> Chain:
    """The chain at `url`, counting `blocks_per_window` blocks per window (default: the URL's, else HParams')."""
    parsed = urlparse(url)
    options = {name: values[-1] for name, values in parse_qs(parsed.query).items()}
    declared = _int(options, "blocks_per_window")
    if declared is not None and blocks_per_window is not None and declared != blocks_per_window:
        raise ValueError(f"the chain URL says blocks_per_window={declared} but the hyper-parameters say "
                         f"{blocks_per_window}: drop it from the URL (HParams.blocks_per_window is the one setting)")
    blocks_per_window = blocks_per_window or declared or HParams.blocks_per_window
    if parsed.scheme == "local":
        allowed = {"clock", "seconds_per_block", "uid", "blocks_per_window", "weights_rate_limit"}
        _refuse_unknown(options, allowed)
        return LocalChain(unquote(parsed.path), uid=_int(options, "uid"), clock=options.get("clock"),
                          seconds_per_block=float(options["seconds_per_block"]) if "seconds_per_block" in options
                          else None, blocks_per_window=blocks_per_window,
                          weights_rate_limit=_int(options, "weights_rate_limit"))
    if parsed.scheme == "bittensor":
        from templar_lib.chain.bittensor import BittensorChain

        _refuse_unknown(options, {"netuid", "wallet", "hotkey", "blocks_per_window", "wallet_path"})
        if "netuid" not in options:
            raise ValueError("bittensor chain URL needs ?netuid=N")
        return BittensorChain(network=parsed.netloc or "finney", netuid=int(options["netuid"]),
                              wallet=options.get("wallet", "default"), hotkey=options.get("hotkey", "default"),
                              wallet_path=options.get("wallet_path"),
                              blocks_per_window=blocks_per_window)
    raise ValueError(f"unsupported chain URL scheme {parsed.scheme!r} (supported: local://, bittensor://)")


def _int(options: dict[str, str], name: str) -> int | None:
    return int(options[name]) if name in options else None


def _refuse_unknown(options: dict[str, str], allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"unknown chain URL option(s) {sorted(unknown)}")
