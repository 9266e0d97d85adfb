import dagster as dg

from templar_pipelines.metadata import pages_metadata
from templar_pipelines.partitions import partition_window, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, HParamsResource, NodeResource


@dg.asset(partitions_def=window_partitions, group_name="data", kinds={"parquet"})
def dataset_pages(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
                  hparams: HParamsResource, node: NodeResource) -> dg.MaterializeResult:
    """The dataset pages each miner uid must train on in this window (any validator recomputes the same ids)."""
    window, dataset, count = partition_window(context), buckets.dataset(), hparams.load().pages_per_window
    pages = {uid: dataset.miner_pages(window, uid, count) for uid in node.miners(chain.open())}
    tokens_per_page = dataset.manifest.rows_per_page * dataset.manifest.sequence_length
    return dg.MaterializeResult(metadata=pages_metadata(window, pages, tokens_per_page))
