"""Views of the network over time: per-uid series and health as numeric metadata on window partitions (the UI plots
them), per-uid lines in the step logs, the same series in the offline W&B runs. One local network, two windows, the
last miner a cheat that copies another's upload."""

import json
import re

import dagster as dg
import pytest

from templar_lib.chain import LocalChain
from templar_lib.roles import AggregatorResult
from templar_pipelines.health import NetworkHealth, WindowRecord
from templar_pipelines.local_network import run_local_network
from templar_pipelines.metadata import PLOTTED_UIDS, aggregation_lines, human_bytes, network_metadata

CHEAT = 3  # the last of the three miners (local_network: cheats are the last uids)


def raw_metadata_of(instance, asset: str, window: int) -> dict[str, dg.MetadataValue]:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[str(window)]), limit=1).records
    assert records, f"{asset} has no materialization for window {window}"
    return dict(records[0].asset_materialization.metadata)


def metadata_of(instance, asset: str, window: int) -> dict:
    return {key: value.value for key, value in raw_metadata_of(instance, asset, window).items()}


def log_messages(instance, run_id: str) -> list[str]:
    return [event.user_message for event in instance.all_logs(run_id) if event.dagster_event is None]


def wandb_history(home) -> dict[str, dict]:
    """run id -> the values it logged, read from the offline runs' .wandb files (what `wandb sync` uploads)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    runs = {}
    for path in sorted((home / "wandb" / "wandb").glob("offline-run-*/run-*.wandb")):
        store = datastore.DataStore()
        store.open_for_scan(str(path))
        while (data := store.scan_data()) is not None:
            record = wandb_internal_pb2.Record()
            record.ParseFromString(data)
            if record.WhichOneof("record_type") == "history":
                values = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                          for item in record.history.item}
                runs.setdefault(path.stem.removeprefix("run-"), {}).update(values)
    return runs


@pytest.mark.timeout(400)
def test_a_cheating_miner_shows_in_the_series_health_logs_and_wandb(network_home, network_env):
    env = {**network_env, "TEMPLAR_WANDB_MODE": "offline"}
    summaries = run_local_network(network_home, windows=2, environ=env, adversaries={"copy": 1})
    assert [s["roles"][CHEAT] for s in summaries] == ["copy", "copy"]
    chain = LocalChain(network_home / "chain.sqlite")
    bpw = chain.blocks_per_window
    with dg.DagsterInstance.from_config(str(network_home / "dagster")) as instance:
        for summary in summaries:
            window, scores, weights = summary["window"], summary["scores"], summary["weights"]
            assert scores[CHEAT] == 0 and "copy of uid 1" in summary["reasons"][CHEAT]  # the cheat really was caught
            network = metadata_of(instance, "network", window)
            # each uid's series, one point per window partition
            for uid in (1, 2, CHEAT):
                assert network[f"uid_{uid}_score"] == pytest.approx(scores[uid])
                assert network[f"uid_{uid}_weight"] == pytest.approx(weights.get(uid, 0.0))
                assert isinstance(network[f"uid_{uid}_rating"], float)
            assert network[f"uid_{CHEAT}_weight"] == 0 and network["uid_1_weight"] > 0
            assert network[f"uid_{CHEAT}_rating"] < min(network["uid_1_rating"], network["uid_2_rating"])
            assert "copy of uid 1" in network["zero_score_reasons"]
            # health: three seen, the copy invalid, both honest ones peers; lag and weights block in blocks
            assert (network["miners_seen"], network["valid"], network["peers"]) == (3, 2, 2)
            assert network["valid_over_seen"] == pytest.approx(2 / 3) and network["peers_over_valid"] == 1.0
            assert network["closing_block"] == (window + 1) * bpw
            assert network["lag_blocks"] == network["chain_block"] - network["closing_block"] >= 0
            assert network["weights_status"] == "set"
            assert network["weights_block"] == metadata_of(instance, "chain_weights", window)["block"]
            assert network["blocks_since_weights"] == network["chain_block"] - network["weights_block"] >= 0
            # the same series on the assets they come from
            assert metadata_of(instance, "evaluations", window)[f"uid_{CHEAT}_score"] == 0
            assert metadata_of(instance, "chain_weights", window)[f"uid_{CHEAT}_weight"] == 0
            assert metadata_of(instance, "ratings", window)[f"uid_{CHEAT}_rating"] == network[f"uid_{CHEAT}_rating"]
        assert chain.weights_block(0) == metadata_of(instance, "network", 1)["weights_block"]
        # what the UI plots over partitions: Int and Float metadata entries
        raw = raw_metadata_of(instance, "network", 1)
        assert isinstance(raw[f"uid_{CHEAT}_score"], dg.FloatMetadataValue)
        assert all(isinstance(raw[key], dg.IntMetadataValue) for key in ("miners_seen", "lag_blocks", "weights_block"))

        # the history table of the last window holds every uid across both windows
        history = {row.data["uid"]: row.data for row in metadata_of(instance, "network", 1)["history"].records}
        assert sorted(history) == [1, 2, CHEAT]
        assert history[CHEAT]["zero_windows"] == 2 and history[1]["zero_windows"] == 0
        assert history[CHEAT]["last_zero_reason"].startswith("window 1: copy of uid 1")
        assert history[CHEAT]["scores"].endswith("0 0") and history[CHEAT]["weight"] == 0
        assert len(history[1]["scores"].split()) == 3  # the sparkline, then one value per window

        # per-uid progress lines in the step logs
        last = summaries[-1]["run_ids"]
        miner, validator = log_messages(instance, last["miner_job"]), log_messages(instance, last["validator_job"])
        aggregator = log_messages(instance, last["aggregator_job"])
    size = r"\d[\d.]* k?B"
    for uid in (1, 2, CHEAT):
        assert any(re.fullmatch(rf"uid {uid}: \d+ pages, loss [\d.]+, uploaded {size}", line) for line in miner), miner
    for uid in (1, 2):
        assert any(re.fullmatch(rf"uid {uid}: downloaded {size}, scored [\d.e-]+", line) for line in validator)
        assert f"uid {uid}: combined" in aggregator
    assert any(re.match(rf"uid {CHEAT}: downloaded {size}, zero, reason: copy of uid 1", line) for line in validator)
    assert not any(line.startswith(f"uid {CHEAT}:") for line in aggregator)  # never listed, so never combined

    # the offline W&B runs carry the same series, per uid per window
    runs = wandb_history(network_home)
    for summary in summaries:
        run = runs[f"network-{summary['window']}"]
        assert run["window"] == summary["window"] and run["miners_seen"] == 3 and run["valid"] == 2
        for uid in (1, 2, CHEAT):
            assert run[f"score/uid_{uid}"] == pytest.approx(summary["scores"][uid])
            assert run[f"weight/uid_{uid}"] == pytest.approx(summary["weights"].get(uid, 0.0))
            assert f"rating/uid_{uid}" in run
        assert run[f"score/uid_{CHEAT}"] == 0


def test_network_metadata_stays_within_what_the_ui_plots():
    """The UI plots at most 100 numeric keys per asset: a large network plots its first PLOTTED_UIDS uids and keeps
    every uid in the history table."""
    uids = range(1, 201)
    record = WindowRecord(7, scores={u: 0.01 for u in uids}, reasons={5: "missing"}, ratings={u: 1.0 for u in uids},
                          weights={u: 1 / 200 for u in uids})
    health = NetworkHealth(7, seen=199, valid=198, peers=15, chain_block=60, closing_block=56, weights_status="set",
                           weights_block=57)
    metadata = network_metadata(health, [record])
    numeric = [key for key, value in metadata.items() if type(value) in (int, float)]
    assert len(numeric) < 100
    assert f"uid_{PLOTTED_UIDS}_score" in metadata and f"uid_{PLOTTED_UIDS + 1}_score" not in metadata
    assert (metadata["lag_blocks"], metadata["blocks_since_weights"]) == (4, 3)
    assert len(metadata["history"].records) == 200 and metadata["history_windows"] == "7"


def test_aggregator_lines_name_refusals_and_sizes_read_as_people_write_them():
    result = AggregatorResult(window=3, step=3, lr=0.1, peers=[1, 2], skipped={5: "changed after scoring: sha256 …"},
                              key="aggregation-3.safetensors", bytes=10, seconds=0.1)
    assert aggregation_lines(result) == ["uid 1: combined", "uid 2: combined",
                                         "uid 5: refused, reason: changed after scoring: sha256 …"]
    assert [human_bytes(n) for n in (512, 48_123, 1_234_567, 3 * 10**9)] == ["512 B", "48.1 kB", "1.23 MB", "3 GB"]
