"""Golden regression record of a seeded local network (4 miners, 3 windows, through Dagster): per-window losses,
scores and θ hashes, and the sha256 of every bucket object and state file. Any change to what the network computes
fails here loudly; when the change is meant, regenerate the record on purpose:

    .venv/bin/python -m pytest tests/pipelines/test_golden.py --regenerate-golden

The floats of training depend on the CPU's kernels: MKL and PyTorch pick code paths by instruction set and split
reductions by thread count, and every gradient, θ_3 and score of the record changed between the machine that made it
(an earlier session's) and an Intel one with AVX-512 of the same kind. The network therefore runs in a process of its
own with the kernels pinned (PINNED: MKL's conditional numerical reproducibility in its COMPATIBLE mode, documented to
give the same results on Intel and AMD processors; PyTorch's and oneDNN's dispatch at AVX2; two threads). Checked
here: the pinned record is reproducible and differs from the unpinned one, so the pins take effect; not checked: an
AMD machine.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import DATA, FAST_HPARAMS, ROOT

GOLDEN = DATA / "golden" / "local-network-4-miners-3-windows.json"
PINNED = {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
          "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


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
    environ = {key: value for key, value in os.environ.items() if not key.startswith("TEMPLAR_")}
    environ |= PINNED | {"TEMPLAR_WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    network = subprocess.run([sys.executable, "-m", "templar_pipelines.cli", "--home", str(home), "--hparams",
                              str(FAST_HPARAMS), "local-network", "--miners", "4", "--windows", "3", "--json",
                              str(tmp_path / "windows.json")], env=environ, cwd=ROOT, capture_output=True, text=True,
                             timeout=240)
    assert network.returncode == 0, network.stderr[-3000:]
    record = record_of(home, json.loads((tmp_path / "windows.json").read_text()))
    if request.config.getoption("--regenerate-golden"):
        GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"regenerated {GOLDEN.name}")
    golden = json.loads(GOLDEN.read_text())
    assert record["windows"] == golden["windows"]
    changed = sorted(key for key in golden["objects"].keys() | record["objects"].keys()
                     if golden["objects"].get(key) != record["objects"].get(key))
    assert changed == [], f"objects that differ from the golden record: {changed}"
