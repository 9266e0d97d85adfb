"""In-process runs without Dagster, for tests, benchmarks and the `templar train` / `templar simulate` commands.

    core.py         `train`: the bare training core (honest miners, compression, outer step; no chain, no validator)
    network.py      `run_network`: validator, aggregator and miners on a LocalChain, through the real role functions
    adversaries.py  the cheating miners `run_network` can field: a table from kind to behaviour
"""

from templar_lib.simulate.adversaries import ADVERSARIES, parse_adversaries
from templar_lib.simulate.core import TrainingReport, WindowReport, train
from templar_lib.simulate.network import NetworkReport, NetworkWindow, run_network

__all__ = ["ADVERSARIES", "NetworkReport", "NetworkWindow", "TrainingReport", "WindowReport", "parse_adversaries",
           "run_network", "train"]
