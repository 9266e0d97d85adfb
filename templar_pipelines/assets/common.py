"""Settings shared by the asset modules."""

import dagster as dg

# GPU-bound steps ask Kubernetes for one GPU when run by the dagster-k8s run launcher / k8s_job_executor.
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": 1},
                                                                       "requests": {"nvidia.com/gpu": 1}}}}}
MODEL_STATE_POOL = "model_state"  # runs that advance θ or a miner's momentum are serialised through this pool

# Steps that read peers' buckets or upload may meet a flaky network; they are idempotent (a rerun rewrites the same
# bytes), so they retry. Missing θ fails without retrying (dg.Failure(allow_retries=False) in resources.py).
NETWORK_RETRY = dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
