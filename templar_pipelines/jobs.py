"""One job per role, the whole local network, and the checkpoint audit. Partitioned jobs take the window as the
`dagster/partition` tag:

    dagster job execute -m templar_pipelines -j miner_job --tags '{"dagster/partition": "5"}'
"""

import dagster as dg

from templar_pipelines.assets.aggregator import aggregation, checkpoint, published_checkpoint
from templar_pipelines.assets.chain import chain_weights
from templar_pipelines.assets.data import dataset_pages
from templar_pipelines.assets.miner import gradients
from templar_pipelines.assets.validator import evaluations, ratings

miner_job = dg.define_asset_job("miner_job", selection=[dataset_pages, gradients],
                                description="Train on the window's pages and upload gradients (GPU node).")
validator_job = dg.define_asset_job("validator_job", selection=[evaluations, ratings, chain_weights],
                                    description="Score the window's gradients, update ratings, set weights.")
aggregator_job = dg.define_asset_job("aggregator_job", selection=[aggregation, checkpoint],
                                     description="Combine the accepted gradients and advance θ.")
sync_job = dg.define_asset_job("sync_job", selection=[checkpoint],
                               description="Replay the published aggregation to advance this node's θ.")
local_network_job = dg.define_asset_job(
    "local_network_job",
    selection=[dataset_pages, gradients, evaluations, ratings, chain_weights, aggregation, checkpoint],
    description="Every role of a window in one run (the local network).")
audit_job = dg.define_asset_job("audit_job", selection=dg.AssetSelection.assets(published_checkpoint),
                                description="Find the newest published checkpoint and audit it.")

JOBS = {"miner": miner_job.name, "validator": validator_job.name, "aggregator": aggregator_job.name}  # by role
