"""The Kubernetes deployment (deploy/k8s, deploy/helm, Dockerfile), proven offline with dagster-k8s's own code.

The pods are the ones dagster-k8s would create: the run pod from `K8sRunLauncher.get_container_context_for_run`
(the run's tags, the launcher of deploy/k8s/dagster.yaml), the step pods from the `K8sStepHandler` that
`k8s_job_executor` builds from a role job's executor config, each turned into a Job by `construct_dagster_k8s_job`.
No cluster is contacted: the launcher's kubeconfig names a closed local port and nothing calls the Kubernetes API.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tomllib
import types
from pathlib import Path

import dagster as dg
import kubernetes
import pytest
import yaml
from dagster._core.definitions.job_base import InMemoryJob
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.execution.api import create_execution_plan
from dagster._core.execution.validate_run_config import validate_run_config
from dagster._core.executor.init import InitExecutorContext
from dagster._core.instance.config import dagster_instance_config
from dagster._core.run_coordinator import QueuedRunCoordinator
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.system_config.objects import ResolvedRunConfig
from dagster_k8s import K8sRunLauncher
from dagster_k8s.job import construct_dagster_k8s_job

from templar_lib.chain import open_chain
from templar_pipelines.definitions import defs
from templar_pipelines.instance import SQLITE_YAML
from templar_pipelines.jobs import (EXECUTOR_VARIABLE, FORKSERVER, K8S_CONFIG_TAG, WALLETS, _forked_steps, build_jobs,
                                    executor_from_env)

ROOT = Path(__file__).resolve().parents[2]
K8S, HELM = ROOT / "deploy" / "k8s", ROOT / "deploy" / "helm"
MANIFESTS = ["state.yaml", "config.yaml", "secrets.yaml", "rbac.yaml"]

# What each job's pods need: the role whose hotkey and chain URL they carry, and which steps hold the model (a GPU,
# TEMPLAR_DEVICE=cuda) and which only read or compute on the CPU (TEMPLAR_DEVICE=meta: shapes at most).
ROLES = {"watch_job": "validator", "miner_job": "miner", "validator_job": "validator",
         "aggregator_job": "aggregator", "sync_job": None, "audit_job": None}
HOLDS_MODEL = {"gradients": True, "evaluations": True, "checkpoint": True, "checkpoint_audit": True,
               "dataset_pages": False, "gradient_sightings": False, "ratings": False, "chain_weights": False,
               "aggregation": False, "published_checkpoint": False}
STEPS = {"watch_job": ["gradient_sightings"], "miner_job": ["dataset_pages", "gradients"],
         "validator_job": ["evaluations", "ratings", "chain_weights"], "aggregator_job": ["aggregation", "checkpoint"],
         "sync_job": ["checkpoint"], "audit_job": ["published_checkpoint", "checkpoint_audit"]}


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def documents(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


@pytest.fixture(scope="module")
def kubeconfig(tmp_path_factory):
    """A kubeconfig that points nowhere reachable; kubernetes' default configuration is restored afterwards."""
    path = tmp_path_factory.mktemp("kube") / "config"
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "offline",
        "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:9"}}],
        "users": [{"name": "offline", "user": {"token": "unused"}}],
        "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline"}}]}))
    saved = kubernetes.client.Configuration.get_default_copy()
    yield str(path)
    kubernetes.client.Configuration.set_default(saved)


@pytest.fixture(scope="module")
def instance(kubeconfig):
    """deploy/k8s/dagster.yaml as a live instance: its launcher, coordinator, limits and retries; SQLite storage in
    place of PostgreSQL, and the launcher reading the offline kubeconfig instead of the in-cluster one."""
    config = load_yaml(K8S / "dagster.yaml")
    del config["storage"]
    config["run_launcher"]["config"].update(load_incluster_config=False, kubeconfig_file=kubeconfig)
    with dg.instance_for_test(overrides=config) as live:
        yield live


def resolved_jobs(executor: str) -> dict[str, dg.JobDefinition]:
    definitions = dg.Definitions(assets=defs.assets, asset_checks=defs.asset_checks, resources=defs.resources,
                                 jobs=list(build_jobs(executor).values()))
    return {name: definitions.resolve_job_def(name) for name in ROLES}


@pytest.fixture(scope="module")
def run_pod_jobs():
    return resolved_jobs("multiprocess")


@pytest.fixture(scope="module")
def step_pod_jobs():
    return resolved_jobs("k8s")


def run_pod(instance, job: dg.JobDefinition) -> kubernetes.client.V1PodSpec:
    """The pod K8sRunLauncher.launch_run creates for a run of `job` (its tags, a window partition)."""
    launcher = instance.run_launcher
    run = DagsterRun(job_name=job.name, run_id="0a0b0c0d", tags={**job.run_tags, "dagster/partition": "5"})
    context = launcher.get_container_context_for_run(run)
    k8s_job = construct_dagster_k8s_job(context.get_k8s_job_config(job_image=None, run_launcher=launcher),
                                        args=["dagster", "api", "execute_run"], job_name="dagster-run-0a0b0c0d",
                                        component="run_worker", user_defined_k8s_config=context.run_k8s_config,
                                        labels={"dagster/job": job.name})
    return k8s_job.spec.template.spec


def step_pods(instance, job: dg.JobDefinition,
              run_config: dict | None = None) -> dict[str, kubernetes.client.V1PodSpec]:
    """The pod of each step of a run of `job` under its k8s_job_executor, as K8sStepHandler.launch_step builds it:
    the executor made from the run config (none, like the sensor's runs), the step's tags from the execution plan."""
    run_config = run_config or {}
    executor_config = ResolvedRunConfig.build(job, run_config).execution.execution_engine_config
    executor = job.executor_def.executor_creation_fn(InitExecutorContext(
        job=InMemoryJob(job), executor_def=job.executor_def, executor_config=executor_config, instance=instance))
    handler = executor._step_handler  # the K8sStepHandler: launch_step's first half, without the API call
    plan = create_execution_plan(job, run_config)
    run = DagsterRun(job_name=job.name, run_id="0a0b0c0d", tags={**job.run_tags, "dagster/partition": "5"})
    pods = {}
    for step in plan.get_all_steps_in_topo_order():
        context = types.SimpleNamespace(
            execute_step_args=types.SimpleNamespace(step_keys_to_execute=[step.key]), dagster_run=run,
            instance=instance, step_tags={step.key: step.tags},
            get_step_context=lambda key, op=step.node_handle.name: types.SimpleNamespace(
                step=types.SimpleNamespace(op_name=op)))
        container_context = handler._get_container_context(context)
        k8s_job = construct_dagster_k8s_job(
            container_context.get_k8s_job_config(handler._executor_image, instance.run_launcher),
            args=["dagster", "api", "execute_step"], job_name=f"dagster-step-{step.key}",
            component="step_worker", user_defined_k8s_config=container_context.run_k8s_config,
            labels={"dagster/op": step.key})
        pods[step.key] = k8s_job.spec.template.spec
    return pods


def gpus(pod: kubernetes.client.V1PodSpec) -> int:
    resources = pod.containers[0].resources
    return int((resources.limits or {}).get("nvidia.com/gpu", 0)) if resources else 0


def env(pod: kubernetes.client.V1PodSpec) -> dict[str, str]:
    return {variable.name: variable.value for variable in pod.containers[0].env or []}


def source_keys(kind: str, name: str) -> list[str]:
    """The variables an envFrom source gives: the keys of that ConfigMap or Secret in deploy/k8s."""
    manifest = "config.yaml" if kind == "ConfigMap" else "secrets.yaml"
    doc = next(doc for doc in documents(manifest) if doc["kind"] == kind and doc["metadata"]["name"] == name)
    return list(doc.get("data") or doc.get("stringData"))


def variables(pod: kubernetes.client.V1PodSpec) -> list[str]:
    """Every variable the container gets, from env and from each envFrom source, duplicates kept."""
    container = pod.containers[0]
    names = [variable.name for variable in container.env or []]
    for source in container.env_from or []:
        kind, ref = ("ConfigMap", source.config_map_ref) if source.config_map_ref else ("Secret", source.secret_ref)
        names += source_keys(kind, ref.name)
    return names


def assert_each_setting_once(pod: kubernetes.client.V1PodSpec) -> None:
    container = pod.containers[0]
    names = variables(pod)
    assert len(names) == len(set(names)), f"a variable set twice: {sorted(names)}"
    assert len({volume.name for volume in pod.volumes}) == len(pod.volumes)
    assert len({mount.mount_path for mount in container.volume_mounts}) == len(container.volume_mounts)


def test_the_executor_is_chosen_by_one_variable():
    assert executor_from_env({}) == "multiprocess" and executor_from_env({EXECUTOR_VARIABLE: "k8s"}) == "k8s"
    with pytest.raises(ValueError, match="TEMPLAR_EXECUTOR='pods'"):
        executor_from_env({EXECUTOR_VARIABLE: "pods"})
    loaded = {"multiprocess": "step_processes", "k8s": "k8s_miner"}[executor_from_env(os.environ)]
    assert defs.resolve_job_def("miner_job").executor_def.name == loaded  # multiprocess (forkserver) unless told


def test_step_processes_are_forked_unless_the_run_config_says_otherwise():
    """jobs.STEP_PROCESSES: Dagster's multiprocess executor, its whole config schema kept (an operator may still
    choose spawn or a concurrency), forkserver preloading the code location when the run config leaves it out."""
    job = defs.resolve_job_def("local_network_job")
    assert job.executor_def.name == "step_processes"
    settings = {"execution": {"config": {"max_concurrent": 1}}}
    validate_run_config(job, settings)
    assert _forked_steps(settings["execution"]["config"]) == {"max_concurrent": 1, "start_method": FORKSERVER}
    assert _forked_steps({"start_method": {"spawn": {}}})["start_method"] == {"spawn": {}}
    with pytest.raises(DagsterInvalidConfigError):  # k8s_job_executor's settings are not this executor's
        validate_run_config(job, {"execution": {"config": {"job_namespace": "templar"}}})


def test_k8s_instance_validates_and_orders_runs_like_every_templar_instance(instance):
    dagster_instance_config(str(K8S), "dagster.yaml")  # the whole file, PostgreSQL storage included
    k8s, local = load_yaml(K8S / "dagster.yaml"), yaml.safe_load(SQLITE_YAML)
    for section in ("concurrency", "run_coordinator", "run_retries"):
        assert k8s[section] == local[section], section
    assert isinstance(instance.run_launcher, K8sRunLauncher)
    assert isinstance(instance.run_coordinator, QueuedRunCoordinator)
    assert instance.run_retries_enabled and instance.run_retries_max_retries == 1
    assert instance.run_monitoring_enabled and instance.run_monitoring_settings["free_slots_after_run_end_seconds"]
    assert k8s["storage"]["postgres"]["postgres_url"] == {"env": "TEMPLAR_PG_URL"}


@pytest.mark.parametrize("name", list(ROLES))
def test_a_run_pod_holds_a_gpu_exactly_when_one_of_its_steps_holds_the_model(instance, run_pod_jobs, name):
    job = run_pod_jobs[name]
    assert sorted(node.name for node in job.nodes) == sorted(STEPS[name])
    pod = run_pod(instance, job)
    holds_model = any(HOLDS_MODEL[op] for op in STEPS[name])
    assert gpus(pod) == (1 if holds_model else 0)
    assert env(pod)["TEMPLAR_DEVICE"] == ("cuda" if holds_model else "meta")
    assert_each_setting_once(pod)
    assert pod.containers[0].image == load_yaml(K8S / "dagster.yaml")["run_launcher"]["config"]["job_image"]


def test_miner_validator_and_aggregator_run_pods_get_their_gpu_from_the_run_tags(instance, run_pod_jobs):
    for name in ("miner_job", "validator_job", "aggregator_job"):
        job = run_pod_jobs[name]
        tag = json.loads(job.run_tags[K8S_CONFIG_TAG])  # where K8sRunLauncher reads it: the run's tags
        assert tag["container_config"]["resources"]["limits"] == {"nvidia.com/gpu": 1}
        # and only there: the same run without that tag gets none (op tags never reach the run pod)
        untagged = {key: value for key, value in job.run_tags.items() if key != K8S_CONFIG_TAG}
        run = DagsterRun(job_name=name, run_id="0", tags=untagged)
        container = instance.run_launcher.get_container_context_for_run(run).run_k8s_config.container_config
        assert "nvidia.com/gpu" not in container.get("resources", {}).get("limits", {})


@pytest.mark.parametrize("name", list(ROLES))
def test_a_step_pod_holds_a_gpu_exactly_when_its_step_holds_the_model(instance, step_pod_jobs, name):
    job = step_pod_jobs[name]
    assert gpus(run_pod(instance, job)) == 0  # the run pod only orchestrates
    pods = step_pods(instance, job)
    assert sorted(pods) == sorted(STEPS[name])
    for step, pod in pods.items():
        assert gpus(pod) == (1 if HOLDS_MODEL[step] else 0), step
        assert env(pod)["TEMPLAR_DEVICE"] == ("cuda" if HOLDS_MODEL[step] else "meta"), step
        assert_each_setting_once(pod)


def test_executor_yaml_is_run_config_of_every_role_job_and_keeps_the_role_settings(instance, step_pod_jobs,
                                                                                     run_pod_jobs):
    run_config = load_yaml(K8S / "executor.yaml")
    for name, job in step_pod_jobs.items():
        validate_run_config(job, run_config)
        pods = step_pods(instance, job, run_config)
        for step, pod in pods.items():
            requests = pod.containers[0].resources.requests
            assert requests["cpu"] == "2" and gpus(pod) == (1 if HOLDS_MODEL[step] else 0), (name, step)
        if "aggregation" in pods:
            assert pods["aggregation"].containers[0].resources.requests["memory"] == "24Gi"
    # The operator's report: with one pod per run the role jobs do not take a k8s_job_executor config.
    with pytest.raises(DagsterInvalidConfigError):
        validate_run_config(run_pod_jobs["miner_job"], run_config)


def projected(pod: kubernetes.client.V1PodSpec, secret: str, root: Path, files: dict[str, bytes]) -> Path:
    """Lay out `files` (the Secret's data) under `root` as the kubelet projects the pod's volume of `secret`;
    returns where the container would see `root` (the volume's mount path)."""
    volume = next(v for v in pod.volumes if v.secret and v.secret.secret_name == secret)
    mount = next(m for m in pod.containers[0].volume_mounts if m.name == volume.name)
    assert mount.read_only
    for item in volume.secret.items:
        (root / item.path).parent.mkdir(parents=True, exist_ok=True)
        (root / item.path).write_bytes(files[item.key])
    return Path(mount.mount_path)


@pytest.mark.parametrize("name", ["miner_job", "validator_job", "watch_job"])
def test_a_role_pod_finds_its_hotkey_where_its_chain_url_says(instance, run_pod_jobs, step_pod_jobs, tmp_path,
                                                             monkeypatch, name):
    from bittensor import Wallet
    from bittensor.sp_core import Keypair

    def offline(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", offline)
    role = ROLES[name]
    # The operator's wallet, and the Secret made from its files (deploy/k8s/secrets.yaml).
    operator = Wallet("my_wallet", f"my_{role}", path=str(tmp_path / "operator"))
    hotkey = Keypair.create_from_seed(bytes(range(32)))
    operator.hotkey_file.set_keypair(hotkey, encrypt=False)
    operator.coldkeypub_file.set_keypair(Keypair.create_from_seed(bytes(32)), encrypt=False)
    data = {"hotkey": Path(operator.hotkey_file.path).read_bytes(),
            "coldkeypub.txt": Path(operator.coldkeypub_file.path).read_bytes()}
    secret = next(doc for doc in documents("secrets.yaml") if doc["metadata"]["name"] == f"templar-wallet-{role}")
    assert set(secret["stringData"]) == set(data)
    config_map = next(doc for doc in documents("config.yaml") if doc["metadata"]["name"] == f"templar-{role}")
    pods = [run_pod(instance, run_pod_jobs[name]), *step_pods(instance, step_pod_jobs[name]).values()]
    for index, pod in enumerate(pods):
        assert [source.config_map_ref.name for source in pod.containers[0].env_from if source.config_map_ref] == \
            ["templar-network", f"templar-{role}"]
        root = tmp_path / f"volume-{index}"
        mount = projected(pod, f"templar-wallet-{role}", root, data)
        assert str(mount) == WALLETS
        # templar_lib's own URL parsing, with the socket closed: the chain handle's wallet reads the mounted files.
        chain = open_chain(config_map["data"]["TEMPLAR_CHAIN_URL"])
        relative = Path(chain.wallet.hotkey_file.path).relative_to(mount)
        assert (root / relative).read_bytes() == data["hotkey"]
        assert Path(chain.wallet.coldkeypub_file.path).relative_to(mount) in \
            {Path(item.path) for volume in pod.volumes if volume.secret for item in volume.secret.items}
        seen = Wallet(chain.wallet.name, chain.wallet.hotkey_str, path=str(root))  # wallet_path = the mount
        assert seen.hotkey.ss58_address == hotkey.ss58_address


def test_pods_without_a_hotkey_role_mount_no_wallet(instance, run_pod_jobs, step_pod_jobs):
    for name in ("aggregator_job", "sync_job", "audit_job"):
        pods = [run_pod(instance, run_pod_jobs[name]), *step_pods(instance, step_pod_jobs[name]).values()]
        for pod in pods:
            assert not [volume for volume in pod.volumes if volume.secret]
            assert [volume.persistent_volume_claim.claim_name for volume in pod.volumes] == ["templar-state"]
    aggregator = next(doc for doc in documents("config.yaml") if doc["metadata"]["name"] == "templar-aggregator")
    assert "wallet" not in aggregator["data"]["TEMPLAR_CHAIN_URL"]


def test_manifests_are_kubernetes_objects_and_hold_what_the_pods_reference(instance, run_pod_jobs):
    client = kubernetes.client.ApiClient()
    names: dict[str, set[str]] = {}
    for manifest in MANIFESTS:
        for doc in documents(manifest):
            kind = doc["kind"]
            model = client._ApiClient__deserialize(doc, f"V1{kind}")  # the client's models: required fields checked
            assert client.sanitize_for_serialization(model) == doc, f"{manifest}: a key the {kind} model drops"
            assert doc["metadata"]["namespace"] == "templar"
            names.setdefault(kind, set()).add(doc["metadata"]["name"])
    claim = next(doc for doc in documents("state.yaml") if doc["kind"] == "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] in (["ReadWriteOnce"], ["ReadWriteMany"])  # stated: deploy/k8s/README.md
    launcher = load_yaml(K8S / "dagster.yaml")["run_launcher"]["config"]
    assert set(launcher["env_secrets"]) <= names["Secret"] and set(launcher["env_config_maps"]) <= names["ConfigMap"]
    assert launcher["service_account_name"] in names["ServiceAccount"]
    for name in ("miner_job", "validator_job", "aggregator_job"):
        pod = run_pod(instance, run_pod_jobs[name])
        assert {volume.persistent_volume_claim.claim_name for volume in pod.volumes
                if volume.persistent_volume_claim} <= names["PersistentVolumeClaim"]
        assert {volume.secret.secret_name for volume in pod.volumes if volume.secret} <= names["Secret"]
        assert {source.config_map_ref.name for source in pod.containers[0].env_from
                if source.config_map_ref} <= names["ConfigMap"]
        assert {source.secret_ref.name for source in pod.containers[0].env_from
                if source.secret_ref} <= names["Secret"]


def snake(value):
    """camelCase keys (the Helm chart's) as snake_case (dagster.yaml's); values untouched."""
    if isinstance(value, dict):
        return {re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower(): snake(item) for key, item in value.items()}
    if isinstance(value, list):
        return [snake(item) for item in value]
    return value


# The keys of the chart's values schema this file uses, from helm/dagster/schema/schema/charts in the dagster
# repository (dagster/values.py, subschema/{daemon,run_launcher,concurrency,postgresql,global_}.py,
# dagster_user_deployments/subschema/user_deployments.py), read at the time of writing: the chart's
# values.schema.json is not available offline, so this is the structural check, not the chart's own validation.
HELM_KEYS = {
    "": {"global", "generatePostgresqlPasswordSecret", "postgresql", "telemetry", "dagster-user-deployments",
         "runLauncher", "concurrency", "dagsterDaemon", "dagsterWebserver", "computeLogManager", "scheduler",
         "pythonLogs", "busybox", "migrate", "serviceAccount", "retention", "imagePullSecrets", "ingress", "rabbitmq",
         "redis", "flower", "generateCeleryConfigSecret", "additionalInstanceConfig"},
    "global": {"postgresqlSecretName", "dagsterHome", "serviceAccountName", "celeryConfigSecretName",
               "dagsterInstanceConfigMap"},
    "postgresql": {"postgresqlScheme", "image", "enabled", "postgresqlHost", "postgresqlUsername", "postgresqlPassword",
                   "postgresqlDatabase", "postgresqlParams", "service"},
    "dagster-user-deployments": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    "deployment": {"name", "image", "dagsterApiGrpcArgs", "codeServerArgs", "includeConfigInLaunchedRuns",
                   "deploymentNamespace", "port", "replicaCount", "env", "envConfigMaps", "envSecrets", "annotations",
                   "nodeSelector", "affinity", "tolerations", "podSecurityContext", "securityContext", "resources",
                   "livenessProbe", "readinessProbe", "startupProbe", "labels", "volumeMounts", "volumes",
                   "schedulerName", "initContainers", "sidecarContainers", "deploymentStrategy"},
    "runLauncher": {"type", "config"},
    "k8sRunLauncher": {"image", "imagePullPolicy", "jobNamespace", "loadInclusterConfig", "kubeconfigFile",
                       "envConfigMaps", "envSecrets", "envVars", "volumeMounts", "volumes", "labels",
                       "failPodOnRunFailure", "resources", "schedulerName", "securityContext", "runK8sConfig"},
    "runK8sConfig": {"containerConfig", "podSpecConfig", "podTemplateSpecMetadata", "jobSpecConfig", "jobMetadata"},
    "concurrency": {"enabled", "pools", "runs"},
    "pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
    "dagsterDaemon": {"enabled", "image", "runCoordinator", "heartbeatTolerance", "env", "envConfigMaps", "envSecrets",
                      "deploymentLabels", "labels", "nodeSelector", "affinity", "tolerations", "podSecurityContext",
                      "securityContext", "resources", "checkDbReadyInitContainer", "livenessProbe", "readinessProbe",
                      "startupProbe", "annotations", "runMonitoring", "runRetries", "sensors", "schedules",
                      "backfills", "schedulerName", "logFormat", "volumeMounts", "volumes", "initContainerResources",
                      "extraContainers", "extraPrependedInitContainers"},
    "runCoordinator": {"enabled", "type", "config"},
    "runRetries": {"enabled", "maxRetries", "retryOnAssetOrOpFailure"},
}


def test_helm_values_use_the_charts_keys_and_give_the_same_instance():
    values = load_yaml(HELM / "values.yaml")
    deployment, = values["dagster-user-deployments"]["deployments"]
    k8s_launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    for where, mapping in [("", values), ("global", values["global"]), ("postgresql", values["postgresql"]),
                           ("dagster-user-deployments", values["dagster-user-deployments"]),
                           ("deployment", deployment), ("runLauncher", values["runLauncher"]),
                           ("k8sRunLauncher", k8s_launcher), ("runK8sConfig", k8s_launcher["runK8sConfig"]),
                           ("concurrency", values["concurrency"]), ("pools", values["concurrency"]["pools"]),
                           ("runs", values["concurrency"]["runs"]), ("dagsterDaemon", values["dagsterDaemon"]),
                           ("runCoordinator", values["dagsterDaemon"]["runCoordinator"]),
                           ("runRetries", values["dagsterDaemon"]["runRetries"])]:
        assert set(mapping) <= HELM_KEYS[where], f"{where}: {sorted(set(mapping) - HELM_KEYS[where])}"
    assert {"name", "image", "port"} <= set(deployment) and set(deployment["image"]) == {"repository", "tag",
                                                                                         "pullPolicy"}
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "templar_pipelines"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    assert {key: coordinator[key] for key in ("enabled", "type")} == {"enabled": True, "type": "QueuedRunCoordinator"}
    assert set(coordinator["config"]) == {"queuedRunCoordinator"}
    assert set(coordinator["config"]["queuedRunCoordinator"]) <= {"dequeueIntervalSeconds", "dequeueUseThreads",
                                                                   "dequeueNumWorkers"}  # limits: concurrency.runs
    # What the chart renders into the instance is what deploy/k8s/dagster.yaml says (camelCase → snake_case).
    instance = load_yaml(K8S / "dagster.yaml")
    assert values["concurrency"].pop("enabled") is True
    assert snake(values["concurrency"]) == instance["concurrency"]
    assert snake(values["dagsterDaemon"]["runRetries"]) == instance["run_retries"]
    assert snake(coordinator["config"]["queuedRunCoordinator"]) == instance["run_coordinator"]["config"]
    assert snake(values["dagsterDaemon"]["runMonitoring"]) == instance["run_monitoring"]
    launcher = instance["run_launcher"]["config"]
    assert snake(k8s_launcher["runK8sConfig"]) == launcher["run_k8s_config"]
    assert k8s_launcher["volumes"] == launcher["volumes"] and k8s_launcher["volumeMounts"] == launcher["volume_mounts"]
    assert [source["name"] for source in k8s_launcher["envConfigMaps"]] == launcher["env_config_maps"]
    assert [secret["name"] for secret in k8s_launcher["envSecrets"]] == ["templar-r2-credentials"]  # PG: the chart's
    assert not k8s_launcher["envVars"] and "env_vars" not in launcher
    # The code server reads the shared environment (TEMPLAR_EXECUTOR: the same job definitions as the runs) and a
    # chain URL without a wallet for the sensor, and keeps it to itself: in a run it would override the role's URL.
    assert [source["name"] for source in deployment["envConfigMaps"]] == launcher["env_config_maps"]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": False}
    own = {variable["name"]: variable["value"] for variable in deployment["env"]}
    assert set(own) == {"TEMPLAR_CHAIN_URL"} and "wallet" not in own["TEMPLAR_CHAIN_URL"]
    assert not set(own) & {key for name in launcher["env_config_maps"] for key in source_keys("ConfigMap", name)}
    assert "TEMPLAR_EXECUTOR" in source_keys("ConfigMap", "templar-network")
    assert values["global"]["postgresqlSecretName"] in {doc["metadata"]["name"] for doc in documents("secrets.yaml")}


def test_dockerfile_installs_the_pinned_project_as_a_non_root_code_server():
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.replace("\\\n", " ").splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    user = next(line for line in instructions if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert str(load_yaml(K8S / "dagster.yaml")["run_launcher"]["config"]["run_k8s_config"]["pod_spec_config"]
               ["security_context"]["run_as_user"]) == user.split()[1].split(":")[0]
    command = json.loads(next(line for line in instructions if line.startswith("CMD ")).removeprefix("CMD "))
    assert command[:3] == ["dagster", "api", "grpc"] and command[-2:] == ["--module-name", "templar_pipelines"]
    # The requirements the image installs are pyproject.toml's exact pins: run the Dockerfile's own extraction.
    extraction = re.search(r'python -c "(.+?)"', text).group(1)
    printed = subprocess.run([sys.executable, "-c", extraction], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert printed == pins and all("==" in pin for pin in pins)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".templar", ".git"} <= set(ignored)
    for copied in re.findall(r"^COPY (\S+)", text, flags=re.M):
        assert copied not in ignored
