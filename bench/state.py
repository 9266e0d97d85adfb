"""Per-window state cost of a node: θ_w and one miner's error-feedback momentum through the node's state store,
plus the θ fingerprint every miner, validator and aggregator computes each window (DESIGN §6: "measure it, then
make it cheap"). Side by side in one run:

    reference   whole-file bytes: safetensors save() into memory, write; read the whole file, load() from bytes;
                fingerprint over tensor.numpy().tobytes() copies, one parameter after another
    ours        templar_lib.state.StateStore (safetensors written straight to a temp file then renamed; read through
                safetensors' mmap; θ's fingerprint computed once when θ is saved, per-parameter digests in threads
                with no copies, and recorded beside it, so every role that loads θ that window reads it back)

    resident    the same store with a WriteBehind, as `templar node` runs it: θ (saved by sync_to) and the momentum
                stay in memory for the next window and their files are written on a background thread. Timed is
                what a run waits for (the fingerprint, the .pending marker, handing the state over); the time the
                background write takes to land is printed beside it (the same write as ours, off the run's path)

Each operation is timed with the file in the page cache (a node reads what it wrote one window earlier), and every
load reads all of θ or the momentum (as copying it into the model or folding the gradient in does). Our θ save
includes computing the fingerprint it records (once per window, by the node that produces θ).

    python bench/state.py [--preset small]     (--preset 1b: ≈ 5 GB per state file, 20 GB of RAM)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from timing import timed  # bench/timing.py (the script's folder is on sys.path)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from templar_lib.buckets import LocalBucket  # noqa: E402
from templar_lib.checkpoints import ModelState, model_fingerprint  # noqa: E402
from templar_lib.model import build_model  # noqa: E402
from templar_lib.state import StateStore, WriteBehind  # noqa: E402


def reference_fingerprint(parameters):
    digest = hashlib.sha256()
    for name in sorted(parameters):
        tensor = parameters[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(name.encode() + b"\0" + str(tensor.dtype).encode() + b"\0")
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:32]


def resident_timings(store: StateStore, state: ModelState, momentum, *, read_theta, touched, repeats: int
                     ) -> dict[str, tuple]:
    """(seconds a run waits, seconds the background write takes to land) per operation, medians over `repeats`
    windows: save θ behind, load θ (held; read_theta as for the other columns), save momentum behind, load momentum
    (held, after its write landed)."""
    samples: dict[str, list[tuple[float, float]]] = {}

    def sample(label, run, lands=None):
        started = time.perf_counter()
        result = run()
        waited = time.perf_counter() - started
        if lands is not None:
            lands()
        samples.setdefault(label, []).append((waited, time.perf_counter() - started - waited))
        return result

    for _ in range(repeats + 1):  # the first round warms up, as timed() does
        unknown = ModelState(state.window, state.step, state.parameters)  # fingerprint not known yet
        sample("save θ", lambda: store.save_model(unknown, background=True), store.writer.flush)
        sample("load θ + fingerprint", lambda: read_theta(store.load_model(7)))
        sample("save momentum", lambda: store.save_momentum(3, 7, momentum), store.writer.flush)
        sample("load momentum", lambda: touched(store.load_momentum(3, 7)))
    return {label: tuple(statistics.median(column) for column in zip(*values[1:]))
            for label, values in samples.items()}


def resident_only(preset, shapes, size, state, parameters, work, read_theta, touched, repeats) -> None:
    print(f"{preset}: {len(shapes)} tensors, {size / 2**30:.2f} GiB per state file (float32); "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; resident column only", flush=True)
    store = StateStore(work / "resident", writer=WriteBehind())
    resident = resident_timings(store, state, parameters, read_theta=read_theta, touched=touched, repeats=repeats)
    for label, (waited, landed) in resident.items():
        landing = (f" (+ {landed:.3f} s landing in the background, {size / landed / 2**30:.2f} GiB/s)"
                   if landed > 0.0005 else "")
        print(f"  {label:<21} resident {waited:7.3f} s" + landing)
    total = sum(waited for waited, _ in resident.values())
    print(f"  a miner node's window (save θ, load θ + fingerprint, load + save momentum): resident {total:.2f} s = "
          f"{100 * total / 84:.1f} % of an 84 s window; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--resident-only", action="store_true",
                        help="only the resident column (what a `templar node` run waits for): a short run for 1b")
    args = parser.parse_args()
    shapes = {n: tuple(p.shape) for n, p in build_model(args.preset, device="meta").named_parameters()}
    generator = torch.Generator().manual_seed(0)
    parameters = {n: torch.empty(s).uniform_(-0.1, 0.1, generator=generator) for n, s in shapes.items()}
    size = sum(p.numel() * 4 for p in parameters.values())
    state = ModelState(window=7, step=7, parameters=parameters)
    work = Path(tempfile.mkdtemp(prefix="bench-state-"))
    try:
        store, plain = StateStore(work / "ours"), LocalBucket(work / "reference")
        header = {"templar": json.dumps({"kind": "checkpoint", "window": 7, "step": 7}, sort_keys=True)}

        def reference_save():
            plain.put("model-7.safetensors", safetensors_save(dict(sorted(parameters.items())), metadata=header))

        def reference_load():
            return safetensors_load(plain.get("model-7.safetensors"))

        store.save_momentum(3, 7, parameters)
        plain.put("momentum-3-7.safetensors", safetensors_save(dict(sorted(parameters.items()))))

        def fingerprint_as_roles_do(loaded):  # the record save_model wrote (else hash θ), then θ read in full
            return loaded.fingerprint or model_fingerprint(loaded.parameters), touched(loaded.parameters)

        def touched(tensors):  # a lazily mapped file costs its page faults when first read: read every byte
            return sum(float(t.sum()) for t in tensors.values())

        def touched_fingerprint(tensors):  # the same work for the reference: fingerprint, then θ read in full
            return reference_fingerprint(tensors), touched(tensors)

        if args.resident_only:
            resident_only(args.preset, shapes, size, state, parameters, work, fingerprint_as_roles_do, touched,
                          args.repeats)
            return
        rows = [("save θ", timed(reference_save, "cpu", args.repeats),
                 timed(lambda: store.save_model(state), "cpu", args.repeats)),
                ("load θ + fingerprint", timed(lambda: touched_fingerprint(reference_load()), "cpu", args.repeats),
                 timed(lambda: fingerprint_as_roles_do(store.load_model(7)), "cpu", args.repeats)),
                ("load momentum", timed(lambda: touched(safetensors_load(plain.get("momentum-3-7.safetensors"))),
                                        "cpu", args.repeats),
                 timed(lambda: touched(store.load_momentum(3, 7)), "cpu", args.repeats)),
                ("save momentum", timed(lambda: plain.put("momentum-3-7.safetensors", safetensors_save(
                    dict(sorted(parameters.items())))), "cpu", args.repeats),
                 timed(lambda: store.save_momentum(3, 7, parameters), "cpu", args.repeats))]
        assert store.load_model(7).fingerprint == model_fingerprint(parameters)  # the record matches θ
        same_bytes = (work / "ours" / "model-7.safetensors").read_bytes() == plain.get("model-7.safetensors")
        resident_store = StateStore(work / "resident", writer=WriteBehind())
        resident = resident_timings(resident_store, state, parameters, read_theta=fingerprint_as_roles_do,
                                    touched=touched, repeats=args.repeats)  # nothing modifies `parameters`
        same_bytes &= (work / "resident" / "model-7.safetensors").read_bytes() == plain.get("model-7.safetensors")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.preset}: {len(shapes)} tensors, {size / 2**30:.2f} GiB per state file (float32); "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; files byte-identical: {same_bytes}")
    for label, reference, ours in rows:
        waited, landed = resident[label]
        print(f"  {label:<21} reference {reference:7.3f} s   ours {ours:7.3f} s   ratio {reference / ours:5.2f}x   "
              f"({size / ours / 2**30:.2f} GiB/s)   resident {waited:7.3f} s"
              + (f" (+ {landed:.3f} s landing in the background)" if landed > 0.0005 else ""))
    miner = [0, 1, 2, 3]  # a miner node's window: θ_w replayed and saved by sync_to, loaded, its momentum in and out
    reference, ours = (sum(rows[i][column] for i in miner) for column in (1, 2))
    resident_total = sum(resident[rows[i][0]][0] for i in miner)
    print(f"  a miner node's window (save θ, load θ + fingerprint, load + save momentum): reference {reference:.2f} s, "
          f"ours {ours:.2f} s = {100 * ours / 84:.1f} %, resident {resident_total:.2f} s = "
          f"{100 * resident_total / 84:.1f} % of an 84 s window; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
