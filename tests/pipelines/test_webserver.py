"""The UI path: `dagster dev` on loopback over a temporary DAGSTER_HOME, driven through its GraphQL API."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

from templar_pipelines.instance import prepare_dagster_home
from templar_pipelines.local_network import run_local_network
from templar_lib.hparams import HParams
from templar_pipelines.cli import init
from tests.conftest import FAST_HPARAMS, ROOT

LIST_ASSETS = "{ assetNodes { assetKey { path } } }"
REPOSITORIES = "{ repositoriesOrError { ... on RepositoryConnection { nodes { name location { name } } } } }"
LAUNCH_BACKFILL = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on InvalidStepError { invalidStepKey }
  }
}"""
RUNS = """
query Runs($filter: RunsFilter) {
  runsOrError(filter: $filter) { ... on Runs { results { runId status tags { key value } } } }
}"""
MATERIALIZATIONS = """
query Checkpoint($partitions: [String!]) {
  assetOrError(assetKey: {path: ["checkpoint"]}) {
    ... on Asset { assetMaterializations(partitions: $partitions) {
      partition runId metadataEntries { label ... on TextMetadataEntry { text } } } }
  }
}"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def graphql(port: int, query: str, variables: dict | None = None) -> dict:
    response = requests.post(f"http://127.0.0.1:{port}/graphql", json={"query": query, "variables": variables or {}},
                             timeout=30)
    response.raise_for_status()
    body = response.json()
    assert "errors" not in body, body["errors"]
    return body["data"]


@pytest.mark.timeout(420)
def test_ui_lists_assets_and_runs_a_backfill_of_two_windows(network_home, network_env, tmp_path, dataset):
    dagster_home = prepare_dagster_home(network_home / "dagster", network_env)
    port = free_port()
    env = {**os.environ, **network_env, "DAGSTER_HOME": str(dagster_home)}
    dagster = ROOT / ".venv" / "bin" / "dagster"
    server = subprocess.Popen([str(dagster) if dagster.exists() else "dagster", "dev", "-m", "templar_pipelines",
                               "-h", "127.0.0.1", "-p", str(port)], cwd=ROOT, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, "dagster dev exited"
            try:
                if requests.get(f"http://127.0.0.1:{port}/server_info", timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "dagster dev did not come up"
            time.sleep(1)

        assets = {tuple(node["assetKey"]["path"]) for node in graphql(port, LIST_ASSETS)["assetNodes"]}
        assert {("dataset_pages",), ("gradients",), ("evaluations",), ("ratings",), ("aggregation",),
                ("checkpoint",), ("chain_weights",)} <= assets

        from dagster import DagsterInstance

        with DagsterInstance.from_config(str(dagster_home)) as instance:
            instance.add_dynamic_partitions("window", ["0", "1"])
        repository = graphql(port, REPOSITORIES)["repositoriesOrError"]["nodes"][0]
        params = {"selector": {"partitionSetName": "local_network_job_partition_set",
                               "repositorySelector": {"repositoryName": repository["name"],
                                                      "repositoryLocationName": repository["location"]["name"]}},
                  "partitionNames": ["0", "1"]}
        launched = graphql(port, LAUNCH_BACKFILL, {"params": params})["launchPartitionBackfill"]
        assert launched["__typename"] == "LaunchBackfillSuccess", launched
        backfill_id = launched["backfillId"]
        started = time.monotonic()

        # reference hashes: the same two windows on a second home built the same way, in-process, made while the
        # daemon's backfill loop (every 30 s, not configurable) has yet to pick the backfill up
        reference_home = tmp_path / "reference"
        shutil.copytree(dataset.root, reference_home / "dataset")
        init(reference_home, hparams=HParams.load(FAST_HPARAMS), max_chars=None, miners=3)
        expected = [w["checkpoint.sha256"] for w in run_local_network(reference_home, windows=2, environ=network_env)]

        deadline = started + 300
        while True:
            runs = graphql(port, RUNS, {"filter": {"tags": [{"key": "dagster/backfill", "value": backfill_id}]}})
            results = runs["runsOrError"]["results"]
            statuses = [run["status"] for run in results]
            if len(results) == 2 and all(s in ("SUCCESS", "FAILURE", "CANCELED") for s in statuses):
                break
            assert time.monotonic() < deadline, f"backfill did not finish: {statuses}"
            time.sleep(2)
        assert statuses == ["SUCCESS", "SUCCESS"]
        print(f"backfill of two windows finished in {time.monotonic() - started:.0f}s")

        materialized = graphql(port, MATERIALIZATIONS, {"partitions": ["0", "1"]})["assetOrError"]
        hashes = {}
        for event in materialized["assetMaterializations"]:
            entries = {entry["label"]: entry.get("text") for entry in event["metadataEntries"]}
            hashes.setdefault(event["partition"], entries["sha256"])
        assert [hashes["0"], hashes["1"]] == expected
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # dagster dev and the daemon/webserver/code server it started
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
