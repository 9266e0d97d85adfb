"""Bytes per kept value of a sparseloco gradient file (format 3), everything included, per preset.

    python bench/sparse_wire.py [--presets tiny,small,1b]

One miner's first file at the strategy's HParams defaults (top-32 per chunk of ≤ 64 × 64, 2-bit codes): the whole
file (safetensors and templar headers, Rice-coded positions, codes four to a byte, each parameter's shift and table)
over the number of kept values, and how the bytes split. tiny and small: the pseudo-gradient of 3 real inner AdamW
steps on the bundled pages; 1b (not built on a CPU): a Gaussian pseudo-gradient per parameter of the preset's shapes
(positions of a continuous tensor's top-k are uniform within a chunk, which is what the Rice code is sized for).
The issue's target: ≤ 2 bytes per kept value on the small and 1b presets.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.workspace import machine, scratch_dataset  # noqa: E402
from templar_lib.data import Dataset, pages_for  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.inner import InnerState, inner_steps  # noqa: E402
from templar_lib.model import build_model, parameters_of  # noqa: E402
from templar_lib.strategies import SparseLoCoStrategy  # noqa: E402
from templar_lib.wire.sparse import code_bits  # noqa: E402

HPARAMS = HParams(strategy="sparseloco", warmup_steps=0, pages_per_window=3, batch_size=6)


def real_deltas(preset: str, dataset: Dataset) -> dict[str, torch.Tensor]:
    model = build_model(preset, seed=0, vocab_size=dataset.vocab_size)
    tokens = dataset.tokens(pages_for(0, 1, HPARAMS.pages_per_window, dataset.manifest.train_pages))
    _, delta = inner_steps(model, InnerState.zeros_like(parameters_of(model)), tokens, step=0, hparams=HPARAMS)
    return delta


def gaussian_deltas(preset: str, vocab_size: int):
    generator = torch.Generator().manual_seed(0)
    for name, p in parameters_of(build_model(preset, vocab_size=vocab_size, device="meta")).items():
        yield name, torch.randn(p.shape, generator=generator) * 1e-3


def measure(preset: str, deltas) -> dict:
    strategy = SparseLoCoStrategy(HPARAMS)
    sent, parameters, values = {}, 0, 0
    for name, delta in deltas:
        sent.update(strategy.encode({name: delta}, None)[0])
        parameters += delta.numel()
        values += sent[name].idx.numel()
    data = strategy.write_gradient(1, 1, sent)
    header = 8 + struct.unpack("<Q", data[:8])[0]
    entries = json.loads(data[8:header])
    bits = code_bits(HPARAMS.quantization_bins)
    codes = sum((sent[name].idx.numel() * bits + 7) // 8 for name in sent)
    quant = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for key, entry in entries.items()
                if key.endswith(".quant"))
    return {"preset": preset, "parameters": parameters, "tensors": len(sent), "kept": values, "bytes": len(data),
            "per_value": len(data) / values, "header": header / values, "codes": codes / values,
            "positions": (len(data) - header - codes - quant) / values, "quant": quant / values,
            "bf16_ratio": 2 * parameters / len(data)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small,1b")
    args = parser.parse_args()
    print(f"{machine()}; sparseloco defaults: top-{HPARAMS.sparse_topk} per chunk of ≤ {HPARAMS.target_chunk}², "
          f"{HPARAMS.quantization_bins} bins", flush=True)
    print("| preset | parameters | tensors | kept values | file bytes | bytes / kept value | header | positions | "
          "codes | shift + table | vs dense bf16 | seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    with scratch_dataset("bench-sparse-wire-") as (_, bucket):
        dataset = Dataset.open(bucket)
        for preset in args.presets.split(","):
            started = time.perf_counter()
            deltas = (real_deltas(preset, dataset).items() if preset != "1b"
                      else gaussian_deltas(preset, dataset.vocab_size))
            row = measure(preset, deltas)
            print(f"| {preset} | {row['parameters']:,} | {row['tensors']} | {row['kept']:,} | {row['bytes']:,} | "
                  f"**{row['per_value']:.3f}** | {row['header']:.3f} | {row['positions']:.3f} | {row['codes']:.3f} | "
                  f"{row['quant']:.3f} | {row['bf16_ratio']:.0f}× fewer | {time.perf_counter() - started:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
