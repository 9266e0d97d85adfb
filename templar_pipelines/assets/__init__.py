"""Window assets grouped by role: data, miner, validator, aggregator, chain."""
