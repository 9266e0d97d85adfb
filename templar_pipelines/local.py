"""The local network through Dagster: one `local_network_job` run per window on the instance under TEMPLAR_HOME.

The block clock of the embedded LocalChain is advanced by hand: window w is registered as a partition, the chain
moves to the start of window w + 1 (so w is complete), and the job runs every role of w. The runs, their
materialisations and metadata are stored in the same instance `dagster dev` opens.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import dagster as dg

from templar_lib.chain import LocalChain
from templar_lib.state import StateStore
from templar_pipelines.instance import prepare_dagster_home
from templar_pipelines.resources import resources_from_env

PID_TAG = "templar/pid"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the runs' events stay in the instance
SUMMARY = {"gradients": ("loss", "bytes"), "evaluations": ("valid_gradients", "peers"),
           "chain_weights": ("status",), "checkpoint": ("held_out_loss", "sha256")}


def run_local_network(home: str | Path, *, windows: int, environ: Mapping[str, str] | None = None,
                      on_window: Callable[[str], None] | None = None) -> list[dict]:
    """Run the next `windows` windows (after the newest θ in the state store); returns one summary per window."""
    from templar_pipelines.definitions import defs

    home = Path(home).resolve()
    environ = {**(environ if environ is not None else os.environ), "TEMPLAR_HOME": str(home)}
    resources = resources_from_env(environ)
    hparams = resources["training"].hparams()
    chain = LocalChain(home / "chain.sqlite", blocks_per_window=hparams.blocks_per_window)
    start = max(StateStore(home / "state").model_windows())
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


@contextlib.contextmanager
def node_instance(home: Path, environ: Mapping[str, str]) -> Iterator[dg.DagsterInstance]:
    """The node's Dagster instance (under home/dagster), with the runs of any dead in-process runner recovered."""
    with dg.DagsterInstance.from_config(str(prepare_dagster_home(home / "dagster", environ))) as instance:
        recover_dead_runs(instance)
        yield instance


def execute_window(job: dg.JobDefinition, window: int, *, instance: dg.DagsterInstance, resources: dict,
                   source: str, tags: Mapping[str, str] | None = None,
                   raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    """One run of `job` for `window` in this process (the partition registered first), tagged with its source and
    this process's id so that recover_dead_runs can release it if the process dies."""
    instance.add_dynamic_partitions("window", [str(window)])
    return job.execute_in_process(instance=instance, partition_key=str(window), resources=resources,
                                  run_config=QUIET, raise_on_error=raise_on_error,
                                  tags={"templar/source": source, PID_TAG: str(os.getpid()), **(tags or {})})


def recover_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark runs of a killed in-process runner (`templar local-network`, `templar node`) as failed and free their
    pool slots.

    A process killed mid-run (SIGKILL, OOM, power loss) leaves its run STARTED and its `model_state` pool slot
    claimed, which would block the next run forever. Without a daemon to monitor runs, the next invocation checks
    the process id each run recorded and releases what a dead process held. Returns the run ids recovered.
    """
    recovered = []
    in_flight = dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING])
    for run in instance.get_runs(filters=in_flight):
        pid = int(run.tags.get(PID_TAG, "0"))  # runs a daemon launched record none: its run monitoring owns them
        if not pid or _alive(pid):
            continue
        instance.report_run_failed(run, f"the process running it died (found by the next "
                                        f"{run.tags.get('templar/source', 'in-process runner')})")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def format_summary(summary: dict) -> str:
    return (f"window {summary['window']:>3}: miner loss {summary['gradients.loss']:.4f}, "
            f"held-out {summary['checkpoint.held_out_loss']:.4f}, valid gradients "
            f"{summary['evaluations.valid_gradients']}, peers {summary['evaluations.peers']}, "
            f"weights {summary['chain_weights.status']}, θ sha256 {summary['checkpoint.sha256'][:12]}")
