"""Secrets (bucket credentials, wallet keys) never reach logs, run events, metadata, wandb files or exceptions."""

import json
import logging
import uuid
from pathlib import Path

import boto3
import dagster as dg
import pytest
from bittensor import Wallet

from templar_lib.buckets import BucketAccessDenied, S3Bucket
from templar_lib.chain import ChainError
from templar_lib.chain.bittensor import BittensorChain
from templar_pipelines.local_network import run_local_network
from tests.fakes.substrate import FakeSubstrate
from tests.s3 import FaultProxy

KEY_ID = "AKIASENTINEL" + uuid.uuid4().hex[:8].upper()
SECRET = "secret-" + uuid.uuid4().hex


def all_text_under(path: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in path.rglob("*") if p.is_file())


def test_bucket_credentials_stay_out_of_runs_metadata_logs_and_wandb(network_home, network_env, moto_server,
                                                                    monkeypatch, caplog, capfd):
    # our own loggers at DEBUG, everything else at INFO: botocore's DEBUG output prints signed request headers
    # (with the access key id) by design, and no node runs botocore at DEBUG
    caplog.set_level(logging.INFO)
    for name in ("templar_lib", "templar_pipelines", "templar"):
        caplog.set_level(logging.DEBUG, logger=name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"agg-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    env = {**network_env, "TEMPLAR_AGGREGATOR_URL": f"s3://{name}?endpoint_url={moto_server}",
           "TEMPLAR_WANDB_MODE": "offline"}
    summaries = run_local_network(network_home, windows=1, environ=env)  # the aggregator bucket is S3: keys used
    assert boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").list_objects_v2(
        Bucket=name)["KeyCount"] >= 2  # aggregation + checkpoint really went through S3 with those credentials
    with dg.DagsterInstance.from_config(str(network_home / "dagster")) as instance:
        events = "\n".join(repr(record) for record in instance.all_logs(summaries[0]["run_ids"]["validator_job"]))
        run = instance.get_run_by_id(summaries[0]["run_ids"]["validator_job"])
        texts = {"events": events, "run": repr(run), "captured logs": caplog.text,
                 "stdout/stderr": "".join(capfd.readouterr()), "wandb files": all_text_under(network_home / "wandb"),
                 "state and buckets": all_text_under(network_home / "state")
                 + all_text_under(network_home / "gradients")}
    assert events and texts["wandb files"]  # there was something to search
    for where, text in texts.items():
        assert SECRET not in text and KEY_ID not in text, f"credential leaked into {where}"


def test_access_errors_name_the_key_not_the_credentials(moto_server, s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    proxy = FaultProxy(int(moto_server.rsplit(":", 1)[1]))
    try:
        proxy.inject("status", 1, 403)
        with pytest.raises(BucketAccessDenied) as error:
            S3Bucket(s3_bucket.name, endpoint_url=proxy.url, credentials=(KEY_ID, SECRET)).get("gradient-1-1")
    finally:
        proxy.close()
    assert "gradient-1-1" in str(error.value)
    assert SECRET not in str(error.value) and KEY_ID not in str(error.value) and SECRET not in repr(error.value)


def test_wallet_keys_stay_out_of_chain_errors_and_logs(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    wallet = Wallet("validator", "hot", path=str(tmp_path / "wallets"))
    mnemonics = []
    wallet.create_new_hotkey(use_password=False, overwrite=True, on_mnemonic=mnemonics.append)
    keyfile = tmp_path / "wallets" / "validator" / "hotkeys" / "hot"
    material = json.loads(keyfile.read_text())
    secrets = [mnemonics[0]] + [str(material[k]) for k in ("secretSeed", "privateKey", "secretPhrase") if k in material]
    assert len(secrets) >= 2  # the mnemonic and at least one raw key from the keyfile
    substrate = FakeSubstrate(netuid=3, hotkeys=[wallet.hotkey.ss58_address], validator_permit=[True],
                              stake_rao=[1], rate_limit=100)
    chain = BittensorChain(network="local", netuid=3, wallet=wallet, substrate=substrate)
    chain.set_weights({0: 1.0})
    substrate.block += 1
    with pytest.raises(ChainError) as error:
        chain.set_weights({0: 1.0})  # rate limited: an error that travels into run logs
    for text in (str(error.value), repr(chain), repr(wallet), caplog.text):
        assert not any(secret in text for secret in secrets)
