"""The templar code location: one Definitions object over templar_lib (DESIGN §6)."""

import os

import dagster as dg

from templar_pipelines.assets.aggregator import aggregation, checkpoint, published_checkpoint
from templar_pipelines.assets.chain import chain_weights
from templar_pipelines.assets.data import dataset_pages
from templar_pipelines.assets.miner import gradients
from templar_pipelines.assets.validator import evaluations, gradient_sightings, ratings
from templar_pipelines.checks import checkpoint_audit
from templar_pipelines.jobs import (aggregator_job, audit_job, local_network_job, miner_job, sync_job,
                                    validator_job, watch_job)
from templar_pipelines.resources import resources_from_env
from templar_pipelines.schedules import checkpoint_audit_schedule
from templar_pipelines.sensors import new_block_sensor

defs = dg.Definitions(
    assets=[dataset_pages, gradients, gradient_sightings, evaluations, ratings, chain_weights, aggregation,
            checkpoint, published_checkpoint],
    asset_checks=[checkpoint_audit],
    jobs=[watch_job, miner_job, validator_job, aggregator_job, sync_job, local_network_job, audit_job],
    sensors=[new_block_sensor],
    schedules=[checkpoint_audit_schedule],
    resources=resources_from_env(os.environ),
)
