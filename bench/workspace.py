"""Shared set-up of the bench scripts that run networks: a scratch directory with a dataset built from the shipped
corpus, removed afterwards, and the line that names the machine a figure was measured on."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.data import build_dataset  # noqa: E402


@contextlib.contextmanager
def scratch_dataset(prefix: str, *, sequence_length: int = 128, held_out_pages: int = 8
                    ) -> Iterator[tuple[Path, LocalBucket]]:
    """(a scratch directory, a dataset bucket in it: ~300 k characters of the corpus), both removed on exit."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        dataset = LocalBucket(work / "dataset")
        build_dataset(dataset, sequence_length=sequence_length, max_chars=300_000, held_out_pages=held_out_pages)
        yield work, dataset
    finally:
        shutil.rmtree(work, ignore_errors=True)


def machine() -> str:
    """Today's date, the CPU count and the processor: where a printed figure comes from."""
    return f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
