"""Running jobs in this process, without a daemon: what `templar local-network` and `templar node` share.

`execute_window` runs one job for one window on the node's instance (the partition registered first), tagged with its
source and this process's identity; `recover_dead_runs` releases what the runs of a killed in-process runner held, since
no daemon monitors them.

A process is identified by its pid and its start time (Linux: /proc/<pid>/stat field 22, clock ticks since boot), not
by its pid alone: the kernel hands a dead process's pid to a new one (pid_max is 32768 on many hosts, and a restarted
container's node is PID 1 again), and a run whose recorded pid merely looks alive would block the schedule forever.
It also names the host: a run another host recorded (an instance whose storage several hosts share) is not this
host's to judge, since its pids mean nothing here.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

import dagster as dg

from templar_pipelines.instance import prepare_dagster_home

PID_TAG = "templar/pid"  # "pid:start@host" (start absent where the platform does not say: the pid alone is compared)
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the runs' events stay in the instance


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
                                  tags={"templar/source": source, PID_TAG: process_identity(), **(tags or {})})


def recover_dead_runs(instance: dg.DagsterInstance) -> list[str]:
    """Mark runs of a killed in-process runner (`templar local-network`, `templar node`) as failed and free their
    pool slots.

    A process killed mid-run (SIGKILL, OOM, power loss) leaves its run STARTED and its `model_state` pool slot
    claimed, which would block the next run forever; killed between creating a run and starting it, it leaves the run
    NOT_STARTED, which the run order (templar_pipelines.partitions) would wait for forever. Without a daemon to
    monitor runs, the next invocation checks the process each run recorded and releases what a dead one held.
    Returns the run ids recovered.
    """
    recovered = []
    in_flight = dg.RunsFilter(statuses=[dg.DagsterRunStatus.NOT_STARTED, dg.DagsterRunStatus.STARTING,
                                        dg.DagsterRunStatus.STARTED])
    for run in instance.get_runs(filters=in_flight):
        recorded = run.tags.get(PID_TAG)  # runs a daemon launched record none: its run monitoring owns them
        if not recorded or _alive(recorded):
            continue
        instance.report_run_failed(run, f"the process running it died (found by the next "
                                        f"{run.tags.get('templar/source', 'in-process runner')})")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        recovered.append(run.run_id)
    return recovered


def process_identity(pid: int | None = None) -> str:
    """"pid:start@host" for a live process of this host (this one by default); "pid@host" where its start time cannot
    be read."""
    pid = os.getpid() if pid is None else pid
    start = _start_time(pid)
    return (f"{pid}:{start}" if start is not None else str(pid)) + f"@{socket.gethostname()}"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]  # field 22; the command name before ")" may hold spaces


def _alive(recorded: str) -> bool:
    """Whether the process a run recorded (process_identity) is still the one running under that pid; a process of
    another host counts as alive (not ours to judge)."""
    process, _, host = recorded.partition("@")
    if host and host != socket.gethostname():
        return True
    pid_text, _, start = process.partition(":")
    if not pid_text.isdecimal():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or _start_time(pid) in (start, None)
