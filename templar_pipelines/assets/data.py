import dagster as dg

from templar_lib.data import pages_for
from templar_pipelines.metadata import pages_metadata
from templar_pipelines.partitions import window_of, window_partitions
from templar_pipelines.resources import BucketsResource, ChainResource, TrainingResource


@dg.asset(partitions_def=window_partitions, group_name="data", kinds={"parquet"})
def dataset_pages(context: dg.AssetExecutionContext, chain: ChainResource, buckets: BucketsResource,
                  training: TrainingResource) -> dg.MaterializeResult:
    """The dataset pages each miner uid must train on in this window (any validator recomputes the same ids)."""
    window, hparams, manifest = window_of(context), training.hparams(), training.manifest(buckets)
    pages = {uid: pages_for(window, uid, hparams.pages_per_window, manifest.train_pages)
             for uid in training.miners(chain.open())}
    return dg.MaterializeResult(metadata=pages_metadata(window, pages, manifest.rows_per_page * manifest.sequence_length))
