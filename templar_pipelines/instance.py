"""The Dagster instance a node runs on: SQLite under DAGSTER_HOME by default, PostgreSQL in production.

`prepare_dagster_home(path, environ)` writes DAGSTER_HOME/dagster.yaml: the repository's `dagster.yaml` (SQLite
storage, the `model_state` pool limited to one run) or, when TEMPLAR_PG_URL or DAGSTER_PG_HOST is set, the same
with run/event/schedule storage on dagster-postgres. The URL is not written to the file: Dagster reads it from the
environment at start-up (`env:`), so credentials stay out of files and the UI.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

SQLITE_YAML = """\
# Dagster instance settings for a templar node (written by `templar`; the repository's dagster.yaml is the same).
# Storage: SQLite under DAGSTER_HOME. Set TEMPLAR_PG_URL to run on PostgreSQL instead.
telemetry:
  enabled: false

# Runs that advance the model state (θ_w -> θ_{w+1}, miner momentum) are serialised through this pool.
# Queued runs of the model lane start one at a time, lowest window first, a window's runs in the schedule's order
# (each run's dagster/priority tag is its place: a retried run goes before the runs that need it), and a run refuses
# to start while a run before it has not finished (templar_pipelines/partitions.py): a backfill over windows applies
# them in order (window w + 1 needs the θ that window w's run writes). A validator's watch of the open window runs
# beside them.
concurrency:
  pools:
    default_limit: 1
  runs:
    max_concurrent_runs: 2
    tag_concurrency_limits:
      - key: templar/lane
        value: model
        limit: 1
      - key: templar/lane
        value: watch
        limit: 1

# The queue is polled every second, not Dagster's default 5 s: a window is a few blocks (7 × 12 s in production) and
# each of its runs waits for the poll after the one before it, so 5 s a run cost up to a fifth of a window.
run_coordinator:
  module: dagster.core.run_coordinator
  class: QueuedRunCoordinator
  config:
    dequeue_interval_seconds: 1

# A run that failed (e.g. its node restarted) is retried once from the failed step: every step is idempotent. A run
# that refused to start before the run ahead of it is retried after that one, at no cost to its retries; a step that
# failed with dg.Failure(allow_retries=False) (an earlier window must run first) tags its run
# dagster/retry_on_asset_or_op_failure=false, so it is not retried (templar_pipelines/jobs.py).
run_retries:
  enabled: true
  max_retries: 1
"""

POSTGRES_URL_YAML = """\
storage:
  postgres:
    postgres_url:
      env: TEMPLAR_PG_URL
"""

POSTGRES_PARTS_YAML = """\
storage:
  postgres:
    postgres_db:
      hostname:
        env: DAGSTER_PG_HOST
      username:
        env: DAGSTER_PG_USER
      password:
        env: DAGSTER_PG_PASSWORD
      db_name:
        env: DAGSTER_PG_DB
      port: 5432
"""


def instance_yaml(environ: Mapping[str, str]) -> str:
    if environ.get("TEMPLAR_PG_URL"):
        return SQLITE_YAML + POSTGRES_URL_YAML
    if environ.get("DAGSTER_PG_HOST"):
        return SQLITE_YAML + POSTGRES_PARTS_YAML
    return SQLITE_YAML


def prepare_dagster_home(path: str | Path, environ: Mapping[str, str]) -> Path:
    home = Path(path).resolve()
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    text = instance_yaml(environ)
    if not target.exists() or target.read_text() != text:
        target.write_text(text)
    return home
