"""Every object key of the buckets and every file name of a node's state store, and only here (DESIGN §3).

    bucket       key                                       written by
    dataset      data_{page}.parquet                       templar init
                 tokenizer.json, manifest.json             templar init
    gradients    gradient-{window}-{uid}.safetensors       miner
                 peers_{window}.json                       validator
                 evaluation-{window}-{validator}.json      validator
    aggregator   aggregation-{window}.safetensors          aggregator
                 checkpoint-{window}.safetensors / .json   aggregator (tensor file, then its manifest)

    state store  model-{window}.safetensors                θ at the start of `window`
                 fingerprint-{window}.json                 its model_fingerprint
                 momentum-{uid}-{window}.safetensors       a miner's error feedback after `window`
                 momentum-{uid}-{window}.pending           that file is being written behind
                 ratings-{window}.json                     a validator's ratings after `window`
                 weights-{window}.json                     the weights those ratings give
                 held-out-{window}.json                    held-out loss of θ_window
                 node-cursor.json                          the resident node's last window per role
                 seen-{window}.json                        a validator's first sightings of a window's gradients
                 seen-{window}-{uid}.safetensors           the bytes of uid's sighting

The state files come in families of one key per window (`Family`: `MODEL.key(12)`, `MODEL.window_of(key)`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
NODE_CURSOR = "node-cursor.json"
_WINDOW = re.compile(r"[0-9]{1,12}")


def page_key(page: int) -> str:
    return f"data_{page}.parquet"


def gradient_key(window: int, uid: int) -> str:
    return f"gradient-{window}-{uid}.safetensors"


def miner_state_key(window: int, uid: int, side: str) -> str:
    """A miner's state before or after `window` (side "before" | "after"), put when a spot check draws the uid."""
    return f"state-{window}-{uid}-{side}.safetensors"


def peers_key(window: int) -> str:
    return f"peers_{window}.json"


def evaluation_key(window: int, validator_uid: int) -> str:
    return f"evaluation-{window}-{validator_uid}.json"


def aggregation_key(window: int) -> str:
    return f"aggregation-{window}.safetensors"


@dataclass(frozen=True)
class Family:
    """The keys `{prefix}{window}{suffix}` of one kind of file."""

    prefix: str
    suffix: str

    def key(self, window: int) -> str:
        return f"{self.prefix}{window}{self.suffix}"

    def window_of(self, key: str) -> int | None:
        """The window in a key of this family ("model-12.safetensors" -> 12), None for any other key."""
        number = key[len(self.prefix):-len(self.suffix)] if key.startswith(self.prefix) and key.endswith(
            self.suffix) else ""
        return int(number) if _WINDOW.fullmatch(number) else None


CHECKPOINT = Family("checkpoint-", ".safetensors")
CHECKPOINT_MANIFEST = Family("checkpoint-", ".json")
MODEL = Family("model-", ".safetensors")
FINGERPRINT = Family("fingerprint-", ".json")
RATINGS = Family("ratings-", ".json")
WEIGHTS = Family("weights-", ".json")
HELD_OUT = Family("held-out-", ".json")
SEEN = Family("seen-", ".json")


def seen_bytes_key(window: int, uid: int) -> str:
    """A validator's copy of the bytes its watch first saw of uid's file of `window` (watch.py)."""
    return f"seen-{window}-{uid}.safetensors"


def seen_bytes_window(key: str) -> int | None:
    """The window of a seen_bytes_key ("seen-12-3.safetensors" -> 12), None for any other key."""
    parts = key[len("seen-"):-len(".safetensors")].split("-") if key.startswith("seen-") and key.endswith(
        ".safetensors") else []
    return int(parts[0]) if len(parts) == 2 and all(_WINDOW.fullmatch(part) for part in parts) else None


def late_upload(uid: int) -> Family:
    """A miner node's mark that uid's file of a window landed after the window closed (spot_check.py: no validator
    recorded it, so the next window starts from no state)."""
    return Family(f"late-{uid}-", ".json")


def momentum(uid: int) -> Family:
    """A miner's momentum files, by the window they follow."""
    return Family(f"momentum-{uid}-", ".safetensors")


def unmined(uid: int) -> Family:
    """A miner node's mark that it did not mine uid's file of a window (the window had closed when its run started,
    and no earlier attempt put a file): no spot check of it can be asked (roles/miner.py skip_window)."""
    return Family(f"unmined-{uid}-", ".json")


def carried(uid: int) -> Family:
    """A miner node's mark that uid's state after a window is its state after the window before: the node did not
    mine that window (it had closed when the run started) and the network does not spot-check, so the state carries
    over the gap (state.py StateStore.carry_momentum; roles/miner.py skip_window)."""
    return Family(f"carried-{uid}-", ".json")


def momentum_pending(uid: int) -> Family:
    """The markers of momentum files promised by a write in the background."""
    return Family(f"momentum-{uid}-", ".pending")
