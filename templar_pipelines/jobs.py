"""One job per role, the whole local network, and the checkpoint audit. Partitioned jobs take the window as the
`dagster/partition` tag:

    dagster job execute -m templar_pipelines -j miner_job --tags '{"dagster/partition": "5"}'
"""

import dagster as dg

from templar_pipelines.assets.aggregator import aggregation, checkpoint, published_checkpoint
from templar_pipelines.assets.chain import chain_weights
from templar_pipelines.assets.data import dataset_pages
from templar_pipelines.assets.miner import gradients
from templar_pipelines.assets.validator import evaluations, gradient_sightings, ratings

# Runs of the model lane advance θ and momentum and must run one at a time in window order; a watch runs for a whole
# window beside them (the instance limits each lane to one run: templar_pipelines/instance.py).
LANE = "templar/lane"
MODEL_LANE, WATCH_LANE = {LANE: "model"}, {LANE: "watch"}

watch_job = dg.define_asset_job("watch_job", selection=[gradient_sightings], tags=WATCH_LANE,
                                description="While the window is open, keep what each miner's bucket shows first.")
miner_job = dg.define_asset_job("miner_job", selection=[dataset_pages, gradients], tags=MODEL_LANE,
                                description="Train on the window's pages and upload gradients (GPU node).")
validator_job = dg.define_asset_job("validator_job", selection=[evaluations, ratings, chain_weights],
                                    tags=MODEL_LANE,
                                    description="Score the window's gradients, update ratings, set weights.")
aggregator_job = dg.define_asset_job("aggregator_job", selection=[aggregation, checkpoint], tags=MODEL_LANE,
                                     description="Combine exactly the gradients the validator scored; advance θ.")
sync_job = dg.define_asset_job("sync_job", selection=[checkpoint], tags=MODEL_LANE,
                               description="Replay the published aggregation to advance this node's θ.")
local_network_job = dg.define_asset_job(
    "local_network_job", tags=MODEL_LANE,
    selection=[dataset_pages, gradients, gradient_sightings, evaluations, ratings, chain_weights, aggregation,
               checkpoint],
    description="Every role of a window in one run (backfills of a local network's past windows).")
audit_job = dg.define_asset_job("audit_job", selection=dg.AssetSelection.assets(published_checkpoint),
                                description="Find the newest published checkpoint and audit it.")

JOBS = {"watch": watch_job.name, "miner": miner_job.name, "validator": validator_job.name,
        "aggregator": aggregator_job.name}  # by role (templar_lib.schedule)
