"""The local network through Dagster: one `local_network_job` run per window on the instance under TEMPLAR_HOME.

The block clock of the embedded LocalChain is advanced by hand: window w is registered as a partition, the chain
moves to the start of window w + 1 (so w is complete), and the job runs every role of w. The runs, their
materialisations and metadata are stored in the same instance `dagster dev` opens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from templar_lib.chain import LocalChain
from templar_pipelines.in_process import execute_window, node_instance
from templar_pipelines.resources import resources_from_env

SUMMARY = {"gradients": ("loss", "bytes"), "evaluations": ("valid_gradients", "peers"),
           "chain_weights": ("status",), "checkpoint": ("held_out_loss", "sha256")}


def run_local_network(home: str | Path, *, windows: int, environ: Mapping[str, str] | None = None,
                      on_window: Callable[[str], None] | None = None) -> list[dict]:
    """Run the next `windows` windows (after the newest θ in the state store); returns one summary per window."""
    from templar_pipelines.definitions import defs

    home = Path(home).resolve()
    environ = {**(environ if environ is not None else os.environ), "TEMPLAR_HOME": str(home)}
    resources = resources_from_env(environ)
    hparams = resources["hparams"].load()
    chain = resources["chain"].open()
    if not isinstance(chain, LocalChain):
        raise ValueError(f"a local network runs on a LocalChain (local://...), not {chain!r}")
    start = max(resources["node"].store().model_windows())
    job = defs.resolve_job_def("local_network_job")
    summaries = []
    with node_instance(home, environ) as instance:
        for window in range(start, start + windows):
            chain.advance_to_block((window + 1) * hparams.blocks_per_window)
            result = execute_window(job, window, instance=instance, resources=resources,
                                    source="templar local-network")
            summary = {"window": window, "run_id": result.run_id}
            for node, keys in SUMMARY.items():
                metadata = result.asset_materializations_for_node(node)[0].metadata
                summary |= {f"{node}.{key}": metadata[key].value for key in keys}
            summaries.append(summary)
            if on_window is not None:
                on_window(format_summary(summary))
    return summaries


def format_summary(summary: dict) -> str:
    return (f"window {summary['window']:>3}: miner loss {summary['gradients.loss']:.4f}, "
            f"held-out {summary['checkpoint.held_out_loss']:.4f}, valid gradients "
            f"{summary['evaluations.valid_gradients']}, peers {summary['evaluations.peers']}, "
            f"weights {summary['chain_weights.status']}, θ sha256 {summary['checkpoint.sha256'][:12]}")
