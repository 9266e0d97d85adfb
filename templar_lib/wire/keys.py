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
                 node-cursor.json                          the resident node's last window per job

`window_of_key(key, prefix, suffix)` reads the window back out of a key of one of these families.
"""

from __future__ import annotations

import re

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
NODE_CURSOR = "node-cursor.json"
_WINDOW = re.compile(r"[0-9]{1,12}")


def page_key(page: int) -> str:
    return f"data_{page}.parquet"


def gradient_key(window: int, uid: int) -> str:
    return f"gradient-{window}-{uid}.safetensors"


def peers_key(window: int) -> str:
    return f"peers_{window}.json"


def evaluation_key(window: int, validator_uid: int) -> str:
    return f"evaluation-{window}-{validator_uid}.json"


def aggregation_key(window: int) -> str:
    return f"aggregation-{window}.safetensors"


CHECKPOINT = ("checkpoint-", ".safetensors")
CHECKPOINT_MANIFEST = ("checkpoint-", ".json")
MODEL = ("model-", ".safetensors")
FINGERPRINT = ("fingerprint-", ".json")
RATINGS = ("ratings-", ".json")
WEIGHTS = ("weights-", ".json")
HELD_OUT = ("held-out-", ".json")


def checkpoint_key(window: int) -> str:
    return _key(CHECKPOINT, window)


def checkpoint_manifest_key(window: int) -> str:
    return _key(CHECKPOINT_MANIFEST, window)


def model_key(window: int) -> str:
    return _key(MODEL, window)


def fingerprint_key(window: int) -> str:
    return _key(FINGERPRINT, window)


def ratings_key(window: int) -> str:
    return _key(RATINGS, window)


def weights_key(window: int) -> str:
    return _key(WEIGHTS, window)


def held_out_key(window: int) -> str:
    return _key(HELD_OUT, window)


def momentum_family(uid: int) -> tuple[str, str]:
    return (f"momentum-{uid}-", ".safetensors")


def momentum_key(uid: int, window: int) -> str:
    return _key(momentum_family(uid), window)


def momentum_pending_family(uid: int) -> tuple[str, str]:
    return (f"momentum-{uid}-", ".pending")


def momentum_pending_key(uid: int, window: int) -> str:
    return _key(momentum_pending_family(uid), window)


def window_of_key(key: str, family: tuple[str, str]) -> int | None:
    """The window in a key of `family` (prefix, suffix), e.g. 12 for ("model-", ".safetensors") and
    "model-12.safetensors"; None for a key of another family."""
    prefix, suffix = family
    number = key[len(prefix):-len(suffix)] if key.startswith(prefix) and key.endswith(suffix) else ""
    return int(number) if _WINDOW.fullmatch(number) else None


def _key(family: tuple[str, str], window: int) -> str:
    prefix, suffix = family
    return f"{prefix}{window}{suffix}"
