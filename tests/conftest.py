"""Shared fixtures: a small dataset built once per session from the bundled corpus, the conformance vectors."""

from __future__ import annotations

import os

# Triton's interpreter must be chosen before triton is first imported (transformers imports it), so that
# tests/lib/test_kernels.py can run the fused kernels on CPU tensors. Nothing picks those kernels off CUDA by itself.
os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import shutil
from pathlib import Path

import pytest  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.data import build_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402

DATA = Path(__file__).parent / "data"


def pytest_addoption(parser):
    parser.addoption("--regenerate-golden", action="store_true",
                     help="rewrite tests/data/golden/ from this run (only on purpose: a behaviour change you meant)")


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> LocalBucket:
    """~300 k characters of the corpus as pages of 2 × 128 tokens; 8 held-out pages. Read-only for tests."""
    bucket = LocalBucket(tmp_path_factory.mktemp("dataset"))
    build_dataset(bucket, sequence_length=128, max_chars=300_000, held_out_pages=8)
    return bucket


@pytest.fixture(scope="session")
def vectors() -> dict:
    return load_file(DATA / "vectors.safetensors")


@pytest.fixture(scope="session")
def vectors_meta() -> dict:
    return json.loads((DATA / "vectors.json").read_text())


@pytest.fixture(scope="session")
def moto_server():
    """A real S3 endpoint on 127.0.0.1 (moto), for the whole session: yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    """Throw-away credentials for moto (it accepts any); never real ones."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)


@pytest.fixture
def s3_bucket(moto_server, s3_env, request):
    """A fresh S3 bucket on the moto server; yields an S3Bucket on it."""
    import uuid

    import boto3

    from templar_lib.buckets import open_bucket

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    return open_bucket(f"s3://{name}?endpoint_url={moto_server}")


# ---------------------------------------------------------------------------------------------------- local network
ROOT = Path(__file__).resolve().parents[1]
FAST_HPARAMS = ROOT / "deploy" / "simulate-hparams.yaml"


@pytest.fixture
def network_home(tmp_path, dataset) -> Path:
    """A local network home: dataset (copied from the session fixture), LocalChain with a validator and three
    miners, θ_0 in the state store."""
    from templar_pipelines.cli import init

    home = tmp_path / "templar"
    shutil.copytree(dataset.root, home / "dataset")
    init(home, hparams=HParams.load(FAST_HPARAMS), max_chars=None, miners=3)
    return home


@pytest.fixture
def network_env(network_home) -> dict[str, str]:
    return {"TEMPLAR_HOME": str(network_home), "TEMPLAR_HPARAMS_FILE": str(FAST_HPARAMS),
            "TEMPLAR_WANDB_MODE": "disabled", "TEMPLAR_HP_CHECKPOINT_FREQUENCY": "1"}
