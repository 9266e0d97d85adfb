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
    """Today's date, the CPU count and the processor's model: where a printed figure comes from. The model matters
    beyond speed: another CPU's kernels round otherwise, and a 200-round training run ends up to 1.5 % apart on one
    seed (bench/RESULTS.md "What the aggregator's rule costs")."""
    return f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, {_cpu_model()}"


def _cpu_model() -> str:
    """/proc/cpuinfo's "model name" where there is one (Linux), else what `platform` says."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == "model name" and value.strip():
                return f"{value.strip()} ({platform.machine()})"
    return platform.processor() or platform.machine()
