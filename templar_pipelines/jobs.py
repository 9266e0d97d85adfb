"""One job per role, the whole local network, and the checkpoint audit. Partitioned jobs take the window as the
`dagster/partition` tag:

    dagster job execute -m templar_pipelines -j miner_job --tags '{"dagster/partition": "5"}'

On Kubernetes (dagster-k8s, `deploy/k8s/`), where a run's steps execute is one choice, TEMPLAR_EXECUTOR, read here
when the code location loads. The code server, every run pod and every step pod must load the same value: it is in
the ConfigMap templar-network, which all of them read (deploy/k8s/config.yaml).

- `multiprocess` (the default): Dagster's multiprocess executor, its step processes forked from a server that
  imported the code location once per run (STEP_PROCESSES). Under the K8sRunLauncher a run is one pod and its steps
  run in it, so the job's run tags carry what that pod needs (`dagster-k8s/config`, which the launcher reads from
  the run's tags): the role's chain settings and hotkey, TEMPLAR_DEVICE, and `nvidia.com/gpu` when one of its steps
  holds the model.
- `k8s`: dagster-k8s's `k8s_job_executor`, one pod per step. dagster-k8s puts a job's tags on the run pod only, not
  on step pods (those get the executor's config and the op's tags), so each role job's executor is configured
  with the same settings step by step: the role's on every step, the GPU and TEMPLAR_DEVICE on the steps that hold
  the model, TEMPLAR_DEVICE=meta on the others. The run pod only orchestrates and holds no GPU.

Runs in this process (`templar local-network`, `templar node`, the tests) use the in-process executor and ignore both.

Order and retries, the same for every job whatever starts its runs (templar_pipelines/partitions.py): each window
job's partitioned config tags its runs with their place in the schedule (`dagster/priority`), so the queue starts a
retried run before the runs that need it, and the node resource refuses to start a run while one before it has not
finished. A step that fails in a way retrying cannot help (`dg.Failure(allow_retries=False)`: an earlier window must
run first; a miner momentum that can be neither loaded nor recomputed) is not retried as a run either: the hook
`failure_not_retried` tags its run `dagster/retry_on_asset_or_op_failure=false`, which the run-retry daemon reads
when the run fails (dagster/_daemon/auto_run_reexecution), so only crashes and retryable failures are retried.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg
from dagster._core.storage.tags import RETRY_ON_ASSET_OR_OP_FAILURE_TAG

from templar_lib.state import MomentumUnrecoverable
from templar_pipelines.assets.aggregator import aggregation, checkpoint, published_checkpoint
from templar_pipelines.assets.chain import chain_weights
from templar_pipelines.assets.data import dataset_pages
from templar_pipelines.assets.miner import gradients
from templar_pipelines.assets.validator import evaluations, gradient_sightings, ratings
from templar_pipelines.checks import checkpoint_audit
from templar_pipelines.partitions import MODEL_LANE, WATCH_LANE, OutOfOrder, ordered_config

# Each window job's place in a window of templar_lib.schedule (`sync_job` replays what the aggregator published, in
# its place; `local_network_job` is every role of a window in one run, in the window's first place).
JOB_ROLES = {"watch_job": "watch", "miner_job": "miner", "validator_job": "validator", "aggregator_job": "aggregator",
             "sync_job": "aggregator", "local_network_job": "watch"}

K8S_CONFIG_TAG = "dagster-k8s/config"
EXECUTOR_VARIABLE = "TEMPLAR_EXECUTOR"
EXECUTORS = ("multiprocess", "k8s")

# Steps that hold the model on TEMPLAR_DEVICE: training, evaluation, replaying θ and the audit's held-out loss.
# Every other step runs with TEMPLAR_DEVICE=meta: the watch and the ratings build the model only for its parameter
# shapes, and the 1b preset cannot be built on a CPU (templar_lib.model.build_model).
MODEL_STEPS = frozenset({gradients.op.name, evaluations.op.name, checkpoint.op.name, checkpoint_audit.node_def.name})
GPU = {"nvidia.com/gpu": 1}

# A role's hotkey: the Secret templar-wallet-<role> holds the files of a bittensor wallet (keys `hotkey` and
# `coldkeypub.txt`), mounted read-only as the wallet WALLET under WALLETS with the hotkey named after the role. The
# ConfigMap templar-<role> holds the role's environment: TEMPLAR_CHAIN_URL
# (bittensor://<network>?netuid=N&wallet=templar&hotkey=<role>&wallet_path=/var/run/templar/wallets) and its uids.
WALLETS = "/var/run/templar/wallets"
WALLET = "templar"
HOTKEY_ROLES = ("miner", "validator")  # roles acting as a uid's hotkey (the validator signs peers lists and weights)


def executor_from_env(environ: Mapping[str, str]) -> str:
    """TEMPLAR_EXECUTOR: `multiprocess` (default: a run's steps in the run's pod) or `k8s` (a pod per step)."""
    executor = environ.get(EXECUTOR_VARIABLE, "multiprocess")
    if executor not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_VARIABLE}={executor!r}: choose one of {', '.join(EXECUTORS)}")
    return executor


def role_k8s_config(role: str | None) -> dict[str, Any]:
    """The pod settings of a role (dagster-k8s user-defined config): its ConfigMap as environment, and for a role that
    acts as a hotkey the wallet Secret mounted read-only. None (a job that needs neither): nothing."""
    if role is None:
        return {}
    container: dict[str, Any] = {"env_from": [{"config_map_ref": {"name": f"templar-{role}"}}]}
    if role not in HOTKEY_ROLES:
        return {"container_config": container}
    container["volume_mounts"] = [{"name": "wallet", "mount_path": WALLETS, "read_only": True}]
    secret = {"secret_name": f"templar-wallet-{role}", "default_mode": 0o440,
              "items": [{"key": "hotkey", "path": f"{WALLET}/hotkeys/{role}"},
                        {"key": "coldkeypub.txt", "path": f"{WALLET}/coldkeypub.txt"}]}
    return {"container_config": container, "pod_spec_config": {"volumes": [{"name": "wallet", "secret": secret}]}}


def device_k8s_config(holds_model: bool) -> dict[str, Any]:
    """TEMPLAR_DEVICE, and one GPU for a pod whose steps hold the model."""
    container: dict[str, Any] = {"env": [{"name": "TEMPLAR_DEVICE", "value": "cuda" if holds_model else "meta"}]}
    if holds_model:
        container["resources"] = {"limits": dict(GPU), "requests": dict(GPU)}
    return {"container_config": container}


def merge_k8s_config(*configs: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of dagster-k8s config dicts, later ones winning: mappings merged key by key, lists concatenated."""
    merged: dict[str, Any] = {}
    for config in configs:
        for key, value in config.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                merged[key] = merge_k8s_config(merged[key], value)
            elif isinstance(value, list) and isinstance(merged.get(key), list):
                merged[key] = [*merged[key], *value]
            else:
                merged[key] = value
    return merged


def run_k8s_config(role: str | None, ops: Sequence[str]) -> dict[str, Any]:
    """The run pod's settings when it runs the steps `ops` itself (the `dagster-k8s/config` run tag)."""
    return merge_k8s_config(role_k8s_config(role), device_k8s_config(any(op in MODEL_STEPS for op in ops)))


def step_pods_executor(role: str | None, ops: Sequence[str]) -> dg.ExecutorDefinition:
    """k8s_job_executor with the role's settings on every step and the device settings per op, merged into whatever
    the run config adds (deploy/k8s/executor.yaml): sensor runs come with no run config and still get them."""
    from dagster_k8s import k8s_job_executor  # only on Kubernetes: the client library is not imported otherwise

    fixed = {"step_k8s_config": role_k8s_config(role),
             "per_step_k8s_config": {op: device_k8s_config(op in MODEL_STEPS) for op in ops}}

    def with_role(config: Mapping[str, Any]) -> dict[str, Any]:
        return merge_k8s_config(config, fixed)

    return k8s_job_executor.configured(with_role, name=f"k8s_{role or 'node'}",
                                       config_schema=k8s_job_executor.config_schema.as_field().config_type)


def retrying_cannot_help(error: BaseException | None) -> bool:
    """dg.Failure(allow_retries=False), or a miner's momentum that can be neither loaded nor recomputed (it stays so
    until the windows before it are backfilled), anywhere in the error's chain of causes."""
    while error is not None:
        if isinstance(error, dg.Failure) and not error.allow_retries and not isinstance(error, OutOfOrder):
            return True
        if isinstance(error, MomentumUnrecoverable):
            return True
        error = error.__cause__
    return False


@dg.failure_hook(name="failure_not_retried")
def failure_not_retried(context: dg.HookContext) -> None:
    """A step that failed in a way retrying cannot help is not retried as a run either (module docstring)."""
    if retrying_cannot_help(context.op_exception):
        context.instance.add_run_tags(context.run_id, {RETRY_ON_ASSET_OR_OP_FAILURE_TAG: "false"})
        context.log.info(f"{context.step_key} failed in a way retrying cannot help: this run will not be retried")


def window_job(name: str, selection, *, tags: Mapping[str, str], description: str,
               executor_def: dg.ExecutorDefinition | None = None) -> dg.UnresolvedAssetJobDefinition:
    """A job over window partitions: its runs tagged with their place in the schedule (JOB_ROLES), its
    non-retryable failures not retried as runs."""
    return dg.define_asset_job(name, selection=selection, tags=dict(tags), description=description,
                               executor_def=executor_def, config=ordered_config(JOB_ROLES[name]),
                               hooks={failure_not_retried})


# `multiprocess`: Dagster's multiprocess executor, each step forked from a server that has imported this code location
# once per run (forkserver), not a fresh interpreter importing torch, transformers and dagster per step (≈ 4.5 s a
# step on 2 cores: bench/RESULTS.md, "Dagster overhead per window"). The server imports and builds nothing else: no
# model, no device, no connection, so CUDA is first touched in the step that needs it.
# A run config may still set any of the executor's fields (start_method included); what it leaves out is Dagster's
# default, but for start_method.
FORKSERVER = {"forkserver": {"preload_modules": ["templar_pipelines"]}}


def _forked_steps(config: Mapping[str, Any]) -> dict[str, Any]:
    return {**config, "start_method": config.get("start_method") or FORKSERVER}


STEP_PROCESSES = dg.multiprocess_executor.configured(
    _forked_steps, name="step_processes", config_schema=dg.multiprocess_executor.config_schema.as_field().config_type)


def build_jobs(executor: str) -> dict[str, dg.UnresolvedAssetJobDefinition]:
    """Every job of the code location by name, its steps placed as `executor` says (module docstring)."""

    def role_job(name: str, selection, ops: Sequence[str], *, role: str | None, tags: Mapping[str, str],
                 description: str) -> dg.UnresolvedAssetJobDefinition:
        define = window_job if name in JOB_ROLES else dg.define_asset_job
        if executor == "k8s":
            return define(name, selection=selection, tags=dict(tags), description=description,
                          executor_def=step_pods_executor(role, ops))
        k8s = json.dumps(run_k8s_config(role, ops), sort_keys=True)
        return define(name, selection=selection, tags={**tags, K8S_CONFIG_TAG: k8s}, description=description,
                      executor_def=STEP_PROCESSES)

    jobs = [
        role_job("watch_job", [gradient_sightings], [gradient_sightings.op.name], role="validator", tags=WATCH_LANE,
                 description="While the window is open, keep what each miner's bucket shows first."),
        role_job("miner_job", [dataset_pages, gradients], [dataset_pages.op.name, gradients.op.name], role="miner",
                 tags=MODEL_LANE, description="Train on the window's pages and upload gradients (GPU node)."),
        role_job("validator_job", [evaluations, ratings, chain_weights],
                 [evaluations.op.name, ratings.op.name, chain_weights.op.name], role="validator", tags=MODEL_LANE,
                 description="Score the window's gradients, update ratings, set weights."),
        role_job("aggregator_job", [aggregation, checkpoint], [aggregation.op.name, checkpoint.op.name],
                 role="aggregator", tags=MODEL_LANE,
                 description="Combine exactly the gradients the validator scored; advance θ."),
        role_job("sync_job", [checkpoint], [checkpoint.op.name], role=None, tags=MODEL_LANE,
                 description="Replay the published aggregation to advance this node's θ."),
        role_job("audit_job", dg.AssetSelection.assets(published_checkpoint),
                 [published_checkpoint.op.name, checkpoint_audit.node_def.name], role=None, tags={},
                 description="Find the newest published checkpoint and audit it."),
        # Local networks only (a LocalChain, every role in one run): no Kubernetes settings.
        window_job(
            "local_network_job", tags=MODEL_LANE,
            selection=[dataset_pages, gradients, gradient_sightings, evaluations, ratings, chain_weights, aggregation,
                       checkpoint],
            description="Every role of a window in one run (backfills of a local network's past windows).",
            executor_def=STEP_PROCESSES),
    ]
    return {job.name: job for job in jobs}


_JOBS = build_jobs(executor_from_env(os.environ))
watch_job, miner_job, validator_job = _JOBS["watch_job"], _JOBS["miner_job"], _JOBS["validator_job"]
aggregator_job, sync_job, audit_job = _JOBS["aggregator_job"], _JOBS["sync_job"], _JOBS["audit_job"]
local_network_job = _JOBS["local_network_job"]

JOBS = {"watch": watch_job.name, "miner": miner_job.name, "validator": validator_job.name,
        "aggregator": aggregator_job.name}  # by role (templar_lib.schedule)
