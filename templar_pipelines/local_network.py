"""The local network through Dagster: a resident node (node.py) that runs every role on the embedded LocalChain and
moves its clock itself, one block whenever nothing is due, so the roles run in the production order
(templar_lib.schedule) on the instance under TEMPLAR_HOME, the same runs `dagster dev` shows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from templar_lib.chain import LocalChain
from templar_pipelines.node import NodeRun, run_node
from templar_pipelines.resources import resources_from_env

SUMMARY = {"gradients": ("loss", "bytes"), "evaluations": ("valid_gradients", "peers"),
           "chain_weights": ("status",), "checkpoint": ("held_out_loss", "sha256")}


def run_local_network(home: str | Path, *, windows: int, environ: Mapping[str, str] | None = None,
                      on_window: Callable[[str], None] | None = None) -> list[dict]:
    """Run the next `windows` windows (from the newest θ in the state store); returns one summary per window."""
    home = Path(home).resolve()
    environ = {**(environ if environ is not None else os.environ), "TEMPLAR_HOME": str(home)}
    resources = resources_from_env(environ)
    chain = resources["chain"].open()
    if not isinstance(chain, LocalChain):
        raise ValueError(f"a local network runs on a LocalChain (local://...), not {chain!r}")
    start = max(resources["node"].store().model_windows())
    chain.advance_to_block(start * chain.blocks_per_window)
    summaries: dict[int, dict] = {}

    def collect(run: NodeRun) -> None:
        summary = summaries.setdefault(run.window, {"window": run.window, "run_ids": {}})
        summary["run_ids"][run.job] = run.run_id
        for asset, keys in SUMMARY.items():
            summary |= {f"{asset}.{key}": run.metadata[asset][key] for key in keys if asset in run.metadata}
        if "checkpoint.sha256" in summary and on_window is not None:
            on_window(format_summary(summary))

    run_node(home, until_window=start + windows - 1, environ=environ, wait=lambda _seconds: chain.advance(1),
             on_run=collect, source="templar local-network", stop_on_failure=True)
    return [summaries[window] for window in sorted(summaries) if window >= start]


def format_summary(summary: dict) -> str:
    """One line per window; a part this process did not run (a run before a restart) shows as "?"."""
    def value(key: str, style: str = "") -> str:
        return format(summary[key], style) if key in summary else "?"

    return (f"window {summary['window']:>3}: miner loss {value('gradients.loss', '.4f')}, "
            f"held-out {value('checkpoint.held_out_loss', '.4f')}, valid gradients "
            f"{value('evaluations.valid_gradients')}, peers {value('evaluations.peers')}, "
            f"weights {value('chain_weights.status')}, θ sha256 {value('checkpoint.sha256')[:12]}")
