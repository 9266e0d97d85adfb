"""Everything that crosses a bucket: the files' formats and their keys (DESIGN §3, §8).

    container.py   the safetensors container every templar file shares, and its checks (InvalidFile)
    gradient.py    gradient-{window}-{uid}: a miner's top-k coefficients (formats 1 and 2)
    aggregation.py aggregation-{window}: the aggregator's update (formats 1 and 2)
    documents.py   the JSON files: peers_{window}, evaluation-{window}-{validator}
    keys.py        every bucket key and state-store file name

Everything read from a bucket is untrusted: each reader checks the size limit first and raises InvalidFile(reason)
with a one-line reason that the validator records as the uid's zero-score reason. Nothing is ever unpickled.
"""

from templar_lib.encodings import AggregationFormat, GradientFormat
from templar_lib.wire.aggregation import Aggregation, max_aggregation_bytes, read_aggregation, \
    write_aggregation
from templar_lib.wire.container import DEFAULT_MAX_BYTES, MAX_HEADER_BYTES, InvalidFile, index_dtype, parse_header
from templar_lib.wire.documents import EvaluationReport, Peers, read_evaluation, read_peers, write_evaluation, \
    write_peers
from templar_lib.wire.gradient import Gradient, gradient_byte_limit, max_gradient_bytes, read_gradient, write_gradient
from templar_lib.wire.keys import aggregation_key, evaluation_key, gradient_key, peers_key

__all__ = ["DEFAULT_MAX_BYTES", "MAX_HEADER_BYTES", "Aggregation", "AggregationFormat", "EvaluationReport",
           "Gradient", "GradientFormat", "InvalidFile", "Peers", "aggregation_key", "evaluation_key",
           "gradient_byte_limit", "gradient_key", "index_dtype", "max_aggregation_bytes", "max_gradient_bytes",
           "parse_header", "peers_key", "read_aggregation", "read_evaluation", "read_gradient", "read_peers",
           "write_aggregation", "write_evaluation", "write_gradient", "write_peers"]
