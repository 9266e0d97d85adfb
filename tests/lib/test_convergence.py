"""Convergence smoke test: 4 miners, top-32 DCT compression with error feedback, 20 outer sign-SGD steps.

The learning rate is raised and warm-up removed (defaults are tuned for thousands of windows); the same run
without compression (sign of the averaged dense gradient, same optimiser) is reported alongside.
"""

import logging

from templar_lib.hparams import HParams
from templar_lib.simulate import train

SMOKE = HParams(learning_rate=2e-3, warmup_steps=0)


def test_compressed_training_lowers_held_out_loss_close_to_dense(dataset, caplog):
    caplog.set_level(logging.INFO)
    compressed = train(dataset, miners=4, windows=20, hparams=SMOKE, strategy="demo")
    dense = train(dataset, miners=4, windows=20, hparams=SMOKE, strategy="dense-sign")
    print(f"\nheld-out loss: initial {compressed.initial_held_out_loss:.3f}, "
          f"compressed k=32 {compressed.final_held_out_loss:.3f}, dense {dense.final_held_out_loss:.3f}")
    assert compressed.initial_held_out_loss == dense.initial_held_out_loss  # same seed, same θ_0
    assert compressed.final_held_out_loss < compressed.initial_held_out_loss - 1.0
    assert dense.final_held_out_loss < dense.initial_held_out_loss - 1.0
    # compression costs little at this scale: at least 80 % of the dense run's improvement
    gain = compressed.initial_held_out_loss - compressed.final_held_out_loss
    assert gain > 0.8 * (dense.initial_held_out_loss - dense.final_held_out_loss)
    # what a miner uploads: a compressed file against a dense bf16 gradient
    assert all(0 < w.bytes_per_miner < dense.windows[0].bytes_per_miner / 20 for w in compressed.windows)
    # a fixed seed makes the run reproducible bit for bit
    again = train(dataset, miners=4, windows=2, hparams=SMOKE, strategy="demo")
    assert [w.held_out_loss for w in again.windows] == [w.held_out_loss for w in compressed.windows[:2]]
