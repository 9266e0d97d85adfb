"""The same pipeline on a PostgreSQL-backed Dagster instance (the real server on 127.0.0.1:5432, trust auth).

Each test gets its own database, created and dropped here, so runs never mix with other tests or sessions.
"""

import json
import uuid

import dagster as dg
import pytest

from templar_lib.chain import LocalChain
from templar_pipelines import defs
from templar_pipelines.instance import prepare_dagster_home
from templar_pipelines.local_network import run_local_network
from templar_pipelines.resources import resources_from_env
from templar_pipelines.sensors import new_block_sensor

SERVER = "postgresql://postgres@127.0.0.1:5432"
DRIVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"  # SQLAlchemy 2.1 maps postgresql:// to psycopg 3


@pytest.fixture
def postgres_url():
    psycopg2 = pytest.importorskip("psycopg2")
    try:
        admin = psycopg2.connect(f"{SERVER}/test", connect_timeout=5)
    except psycopg2.OperationalError as error:  # CI and this machine run one; say so loudly if it is gone
        pytest.fail(f"PostgreSQL is not reachable on 127.0.0.1:5432: {error}")
    admin.autocommit = True
    name = f"templar_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    yield f"{DRIVER}/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def test_window_sensor_and_backfill_on_postgres(network_home, network_env, postgres_url, monkeypatch):
    monkeypatch.setenv("TEMPLAR_PG_URL", postgres_url)
    env = {**network_env, "TEMPLAR_PG_URL": postgres_url}
    dagster_home = prepare_dagster_home(network_home / "dagster", env)
    assert "postgres_url" in (dagster_home / "dagster.yaml").read_text() and postgres_url not in \
        (dagster_home / "dagster.yaml").read_text()  # the URL stays in the environment, not in the file
    live = run_local_network(network_home, windows=1, environ=env)
    resources = resources_from_env(env)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        runs = instance.get_runs()  # a miner, a validator and an aggregator run
        assert len(runs) == 3 and all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)
        assert instance.get_dynamic_partitions("window") == ["0"]
        LocalChain(network_home / "chain.sqlite").advance_to_block(3 * 7)
        cursor = json.dumps({"watch": 1, "miner": 1, "validator": 0, "aggregator": 0})
        with dg.build_sensor_context(cursor=cursor, resources=resources, instance=instance) as context:
            tick = new_block_sensor(context)
        assert [r.run_key for r in tick.run_requests] == ["validator_job:1", "aggregator_job:1", "watch_job:2",
                                                          "miner_job:2", "validator_job:2", "aggregator_job:2",
                                                          "watch_job:3", "miner_job:3"]
        backfill = defs.resolve_job_def("local_network_job").execute_in_process(
            instance=instance, partition_key="0", resources=resources)
        sha = backfill.asset_materializations_for_node("checkpoint")[0].metadata["sha256"].value
        assert sha == live[0]["checkpoint.sha256"]
        assert len(instance.get_runs()) == 4
