"""Golden regression record of a seeded local network (4 miners, 3 windows, through Dagster): per-window losses,
scores and θ hashes, and the sha256 of every bucket object and state file. Any change to what the network computes
fails here loudly; when the change is meant, regenerate the record on purpose:

    .venv/bin/python -m pytest tests/pipelines/test_golden.py --regenerate-golden
"""

import hashlib
import json
import shutil

import pytest

from templar_lib.hparams import HParams
from templar_pipelines.cli import init
from templar_pipelines.local_network import run_local_network
from tests.conftest import DATA, FAST_HPARAMS

GOLDEN = DATA / "golden" / "local-network-4-miners-3-windows.json"


def stable_bytes(path) -> bytes:
    """What of a file must not change between runs: all of it, but for a peers list's signature (sr25519 signatures
    are randomised; the signed message is compared) and the file times a validator's sightings record."""
    data = path.read_bytes()
    if path.name.startswith("peers_"):
        return json.dumps(json.loads(data) | {"signature": ""}, sort_keys=True).encode()
    if path.name.startswith("seen-") and path.suffix == ".json":
        record = json.loads(data)
        for sighting in record["seen"].values():
            sighting["modified"] = ""
        return json.dumps(record, sort_keys=True).encode()
    return data


def record_of(home, summaries) -> dict:
    windows = []
    for summary in summaries:
        window = summary["window"]
        evaluation = json.loads((home / "gradients" / f"evaluation-{window}-0.json").read_text())
        windows.append({"window": window, "miner_loss": summary["gradients.loss"],
                        "held_out_loss": summary["checkpoint.held_out_loss"],
                        "scores": {uid: row["score"] for uid, row in evaluation["uids"].items()},
                        "peers": evaluation["peers"], "theta_sha256": summary["checkpoint.sha256"]})
    objects = {str(path.relative_to(home)): hashlib.sha256(stable_bytes(path)).hexdigest()
               for folder in ("gradients", "aggregator", "state") for path in sorted((home / folder).rglob("*"))
               if path.is_file() and path.name != "node-cursor.json"}
    return {"windows": windows, "objects": objects}


def test_seeded_local_network_matches_its_golden_record(tmp_path, dataset, request):
    home = tmp_path / "templar"
    shutil.copytree(dataset.root, home / "dataset")
    init(home, hparams=HParams.load(FAST_HPARAMS), max_chars=None, miners=4)
    environ = {"TEMPLAR_HOME": str(home), "TEMPLAR_HPARAMS_FILE": str(FAST_HPARAMS), "TEMPLAR_WANDB_MODE": "disabled"}
    record = record_of(home, run_local_network(home, windows=3, environ=environ))
    if request.config.getoption("--regenerate-golden"):
        GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN.name}")
    golden = json.loads(GOLDEN.read_text())
    assert record["windows"] == golden["windows"]
    changed = sorted(key for key in golden["objects"].keys() | record["objects"].keys()
                     if golden["objects"].get(key) != record["objects"].get(key))
    assert changed == [], f"objects that differ from the golden record: {changed}"
