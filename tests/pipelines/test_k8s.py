"""The Kubernetes Job a GPU step becomes, built offline with dagster-k8s from the asset's op tags."""

import json
from pathlib import Path

import yaml
from dagster_k8s.job import DagsterK8sJobConfig, construct_dagster_k8s_job, get_user_defined_k8s_config

from templar_pipelines.assets.aggregator import aggregation
from templar_pipelines.assets.miner import gradients
from templar_pipelines.assets.validator import evaluations

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


def job_for(asset) -> object:
    tags = {key: value if isinstance(value, str) else json.dumps(value) for key, value in asset.op.tags.items()}
    launcher = yaml.safe_load((DEPLOY / "dagster.yaml").read_text())["run_launcher"]["config"]
    config = DagsterK8sJobConfig(job_image=launcher["job_image"], dagster_home=launcher["dagster_home"],
                                 instance_config_map=launcher["instance_config_map"])
    return construct_dagster_k8s_job(config, args=["dagster", "api", "execute_step"], job_name="templar-step",
                                     user_defined_k8s_config=get_user_defined_k8s_config(tags)), launcher


def test_gpu_steps_request_a_gpu_on_the_configured_image():
    for asset in (gradients, evaluations):
        job, launcher = job_for(asset)
        container = job.spec.template.spec.containers[0]
        assert container.image == launcher["job_image"]
        assert str(container.resources.limits["nvidia.com/gpu"]) == "1"
        assert str(container.resources.requests["nvidia.com/gpu"]) == "1"


def test_light_steps_do_not_hold_a_gpu():
    job, _ = job_for(aggregation)
    resources = job.spec.template.spec.containers[0].resources
    assert resources is None or "nvidia.com/gpu" not in (resources.limits or {})


def test_executor_config_is_valid_yaml_for_the_k8s_job_executor():
    config = yaml.safe_load((DEPLOY / "executor.yaml").read_text())
    assert config["execution"]["config"]["job_namespace"] == "templar"
