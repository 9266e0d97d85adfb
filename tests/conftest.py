"""Shared fixtures: a small dataset built once per session from the bundled corpus, the conformance vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from templar_lib.buckets import LocalBucket
from templar_lib.data import build_dataset

DATA = Path(__file__).parent / "data"


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
