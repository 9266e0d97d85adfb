"""One miner node's windows through the library's own path (templar_lib.roles.miner.mine_window): the window's
pages, forward/backward (bf16 autocast on a GPU), error feedback + compression (the fused kernels on a GPU), the
gradient file (format 2, int8 values) into a local bucket, momentum through a write-behind state store; then
the file read back and validated as a validator would. Times each window and, once, its parts.

    python bench/miner_window.py                                     # tiny preset, CPU
    python bench/miner_window.py --preset 1b --device cuda --sequence-length 2048 --pages 4 --batch 4
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from templar_lib import kernels  # noqa: E402
from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.checkpoints import model_fingerprint  # noqa: E402
from templar_lib.data import Dataset, build_dataset  # noqa: E402
from templar_lib.hparams import HParams  # noqa: E402
from templar_lib.model import build_model, parameters_of  # noqa: E402
from templar_lib.roles.miner import mine_window, window_pages  # noqa: E402
from templar_lib.strategies import new_feedback  # noqa: E402
from templar_lib.state import StateStore, WriteBehind  # noqa: E402
from templar_lib.training import loss_and_gradients, miner_autocast  # noqa: E402
from templar_lib.wire import Gradient, gradient_key, read_gradient, write_gradient  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--pages", type=int, default=6, help="pages per window (2 sequences each)")
    parser.add_argument("--batch", type=int, default=6, help="sequences per micro-batch")
    parser.add_argument("--max-chars", type=int, default=2_000_000, help="corpus characters for the dataset")
    args = parser.parse_args()
    hparams = HParams().replace(sequence_length=args.sequence_length, pages_per_window=args.pages,
                                batch_size=args.batch)
    work = Path(tempfile.mkdtemp(prefix="bench-miner-window-"))
    try:
        started = time.perf_counter()
        dataset = LocalBucket(work / "dataset")
        manifest = build_dataset(dataset, sequence_length=hparams.sequence_length, max_chars=args.max_chars,
                                 held_out_pages=8)
        built = time.perf_counter() - started
        model = build_model(args.preset, vocab_size=manifest.vocab_size, device=args.device)
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        store, gradients = StateStore(work / "state", writer=WriteBehind()), LocalBucket(work / "gradients")
        print(f"{args.preset} ({sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, vocabulary "
              f"{manifest.vocab_size}) on {args.device}"
              f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
              f"{platform.processor() or platform.machine()}; {hparams.pages_per_window} pages × 2 × "
              f"{hparams.sequence_length} tokens per window, micro-batches of {hparams.batch_size}; dataset of "
              f"{manifest.total_pages} pages built in {built:.1f} s", flush=True)
        started = time.perf_counter()
        fingerprint = model_fingerprint(parameters_of(model))  # a node reads it back with θ_w (state store)
        print(f"  θ's fingerprint: {time.perf_counter() - started:.2f} s, once per θ (recorded when θ is saved); "
              f"passed to mine_window as a node does", flush=True)
        for window in range(1, args.windows + 1):
            started = time.perf_counter()
            [result] = mine_window(window, [1], model=model, step=window, store=store,
                                   dataset=Dataset(dataset, manifest), gradients=gradients, hparams=hparams,
                                   model_hash=fingerprint)
            wall = time.perf_counter() - started
            data = gradients.get(gradient_key(window, 1))
            read = read_gradient(data, window=window, uid=1, shapes=shapes, topk=hparams.topk_compression,
                                 target_chunk=hparams.target_chunk, max_bytes=len(data))
            finite = all(bool(torch.isfinite(s.vals).all()) for s in read.tensors.values())
            print(f"  window {window}: {wall:.2f} s (mine_window: {result.seconds:.2f} s, "
                  f"{result.tokens_per_second:,.0f} tokens/s), loss {result.loss:.3f}, {result.bytes / 2**20:.1f} MiB "
                  f"gradient ({result.compression_ratio:.0f}x smaller than float32), momentum {result.momentum}; "
                  f"read back and validated: "
                  f"{len(read.tensors)} tensors, finite {finite}", flush=True)
        store.writer.flush()
        parts(model, dataset, manifest, hparams, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parts(model, dataset, manifest, hparams, args) -> None:
    """The window's parts, timed one after another (synchronising the GPU between them)."""
    device = args.device

    def clock():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter()

    feedback = new_feedback(parameters_of(model), hparams)
    t0 = clock()
    pages, tokens = window_pages(9, 1, dataset=Dataset(dataset, manifest), hparams=hparams)
    t1 = clock()
    loss, gradients = loss_and_gradients(model, tokens, hparams.batch_size, autocast_dtype=miner_autocast(model))
    t2 = clock()
    sparse = feedback.step(gradients, lr=1e-4)
    t3 = clock()
    data = write_gradient(Gradient.of(9, 1, sparse, hparams, "0" * 32))
    t4 = clock()
    print(f"  parts of a window: pages {t1 - t0:.3f} s, forward + backward {t2 - t1:.3f} s, error feedback + "
          f"compression {t3 - t2:.3f} s ({'fused kernels' if kernels.available(device) else 'torch'}), "
          f"gradient file {t4 - t3:.3f} s ({len(data) / 2**20:.1f} MiB)", flush=True)


if __name__ == "__main__":
    main()
