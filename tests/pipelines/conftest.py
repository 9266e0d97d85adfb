"""A local network home on a temporary directory: dataset (copied from the session fixture), LocalChain with a
validator and three miners, θ_0 in the state store, and the environment the resources are built from."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from templar_lib.hparams import HParams
from templar_pipelines.cli import init

ROOT = Path(__file__).resolve().parents[2]
FAST_HPARAMS = ROOT / "deploy" / "simulate-hparams.yaml"


@pytest.fixture
def network_home(tmp_path, dataset) -> Path:
    home = tmp_path / "templar"
    shutil.copytree(dataset.root, home / "dataset")
    init(home, hparams=HParams.load(FAST_HPARAMS), max_chars=None, miners=3)
    return home


@pytest.fixture
def network_env(network_home) -> dict[str, str]:
    return {"TEMPLAR_HOME": str(network_home), "TEMPLAR_HPARAMS_FILE": str(FAST_HPARAMS),
            "TEMPLAR_WANDB_MODE": "disabled", "TEMPLAR_HP_CHECKPOINT_FREQUENCY": "1"}
