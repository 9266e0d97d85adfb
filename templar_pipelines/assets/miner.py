import dagster as dg

from templar_lib.roles.miner import mine_window
from templar_pipelines.assets.common import GPU_TAGS, MODEL_STATE_POOL, NETWORK_RETRY
from templar_pipelines.assets.data import dataset_pages
from templar_pipelines.metadata import gradients_metadata, miner_lines, protocol_metadata
from templar_pipelines.partitions import partition_window, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, HParamsResource, NodeResource, WandbResource


@dg.asset(partitions_def=window_partitions, group_name="miner", kinds={"pytorch", "s3"}, deps=[dataset_pages],
          pool=MODEL_STATE_POOL, op_tags=GPU_TAGS, retry_policy=NETWORK_RETRY)
def gradients(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
              hparams: HParamsResource, node: NodeResource, wandb: WandbResource) -> dg.MaterializeResult:
    """Every served miner trains θ_w on its pages and uploads gradient-{window}-{uid}, under the network's strategy
    (demo: compressed momentum; sparseloco: a 2-bit sparse pseudo-gradient of its inner AdamW steps)."""
    window, dataset = partition_window(context), buckets.dataset()
    model, state = node.model_at(window, dataset)
    settings = hparams.load()
    results = mine_window(window, node.miners(chain.open()), model=model, step=state.step, store=node.store(),
                          dataset=dataset, gradients=buckets.gradients(), hparams=settings,
                          model_hash=state.fingerprint)
    for line in miner_lines(results):
        context.log.info(line)
    metadata = gradients_metadata(results) | protocol_metadata(settings)
    wandb.log("miner", window, {"loss": metadata["loss"], "bytes": metadata["bytes"]})
    return dg.MaterializeResult(metadata=metadata)
