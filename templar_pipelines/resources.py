"""Resources: configuration of the external systems a node talks to, each returning a templar_lib object.

    chain     ChainResource     local://… (embedded SQLite, default) or bittensor://…
    buckets   BucketsResource   file://… (default) or s3://… through dagster-aws S3Resource (boto3; R2/MinIO)
    training  TrainingResource  preset, device, dtype, hyper-parameters, the node's uids and its state store
    wandb     WandbResource     metrics per window (offline by default; disabled in tests)

Only `resources_from_env` reads the environment. Secrets are never fields here: S3 credentials come from
boto3's own chain (or `dg.EnvVar` on the S3Resource), wallets from their files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from templar_lib.buckets import Bucket, open_bucket
from templar_lib.chain import Chain, open_chain
from templar_lib.data import Manifest, read_manifest
from templar_lib.hparams import HParams
from templar_lib.state import StateMissing, StateStore, WriteBehind, sync_to


class ChainResource(dg.ConfigurableResource):
    url: str = Field(description="local:///abs/chain.sqlite[?uid=N] or bittensor://<network>?netuid=N&wallet=..")

    def open(self) -> Chain:
        return open_chain(self.url)

    def open_as(self, uid: int) -> Chain:
        """A handle acting as `uid`: on a local chain any uid (one operator runs every node); a bittensor chain
        acts as its wallet's hotkey whatever uid is asked."""
        chain = self.open()
        return chain.as_uid(uid) if hasattr(chain, "as_uid") else chain

    @property
    def is_local(self) -> bool:
        return urlparse(self.url).scheme == "local"


class BucketsResource(dg.ConfigurableResource):
    gradients_url: str = Field(description="where this node writes gradients, peers lists and evaluations")
    dataset_url: str = Field(description="dataset pages, tokenizer.json and manifest.json")
    aggregator_url: str = Field(description="aggregations and checkpoints")
    allow_local_peers: bool = Field(default=False, description="accept file:// and http:// bucket commitments "
                                                               "(a local network only)")
    enforce_upload_window: bool = Field(default=True, description="skip gradients uploaded outside their window "
                                                                  "(off for a local network, so reruns reproduce)")
    s3: S3Resource | None = Field(default=None, description="dagster-aws S3 client for s3:// URLs (default: boto3)")

    def _open(self, url: str) -> Bucket:
        client = self.s3.get_client() if self.s3 is not None and url.startswith("s3://") else None
        return open_bucket(url, client=client)

    def gradients(self) -> Bucket:
        return self._open(self.gradients_url)

    def dataset(self) -> Bucket:
        return self._open(self.dataset_url)

    def aggregator(self) -> Bucket:
        return self._open(self.aggregator_url)


class TrainingResource(dg.ConfigurableResource):
    preset: str = Field(default="tiny", description="model preset: tiny, small, 1b")
    device: str = Field(default="cpu", description="cpu, cuda, cuda:N or auto")
    hparams_file: str | None = Field(default=None, description="JSON/YAML hyper-parameters (default: DESIGN §4)")
    hparams_overrides: dict[str, str] = Field(default_factory=dict, description="TEMPLAR_HP_* values")
    state_dir: str = Field(description="node-local state: θ_w, momentum, ratings")
    seed: int = Field(default=0, description="seed of θ_0")
    miner_uids: list[int] = Field(default_factory=list, description="uids this node mines for")
    validator_uid: int | None = Field(default=None, description="uid this node validates as")
    keep_windows: int = Field(default=4, description="windows of θ and momentum kept in the state store (≈ 5 GB "
                                                      "each for the 1b preset); older θ is rebuilt from checkpoints")
    write_behind: bool = Field(default=False, description="keep θ and momentum in memory for the next window and "
                                                          "write their files in the background (a resident node)")
    compile: bool = Field(default=False, description="torch.compile the model (GPU nodes: 1b miner step 39 → 48 % "
                                                     "MFU on an H200; ≈ 40 s of compilation once per process, so for a "
                                                     "resident node)")

    def hparams(self) -> HParams:
        return HParams.load(self.hparams_file, self.hparams_overrides)

    def store(self) -> StateStore:
        behind = state_writer(self.state_dir) if self.write_behind else None
        return StateStore(self.state_dir, keep_windows=self.keep_windows, behind=behind)

    def state_at(self, window: int, buckets: BucketsResource):
        """θ_window from the state store, resynced from published checkpoints and aggregations when this node is
        behind; dg.Failure with a clear message when neither has it."""
        try:
            return sync_to(self.store(), buckets.aggregator(), window, hparams=self.hparams())
        except StateMissing as missing:  # retrying cannot help: the previous window must run first
            raise dg.Failure(description=str(missing), allow_retries=False) from None

    def model_at(self, window: int, buckets: BucketsResource, manifest: Manifest):
        """(model holding θ_window, its ModelState). The model object is built once per process (see cached_model)
        and θ_window copied into it every call."""
        from templar_lib.model import load_parameters_

        state = self.state_at(window, buckets)
        model = self.model(manifest)
        load_parameters_(model, state.parameters)
        return model, state

    def model(self, manifest: Manifest):
        """This node's model object (preset, device), whatever θ it last held: callers load the θ they need."""
        return cached_model(self.preset, manifest.vocab_size, self.device, compile=self.compile)

    def manifest(self, buckets: BucketsResource) -> Manifest:
        return read_manifest(buckets.dataset())

    def miners(self, chain: Chain) -> list[int]:
        """The uids this node mines for: configured, else every uid without a validator permit (local network)."""
        if self.miner_uids:
            return sorted(self.miner_uids)
        return [n.uid for n in chain.metagraph().neurons if not n.validator_permit]

    def validator(self, chain: Chain) -> int:
        """The uid this node validates as: configured, else the chain's first validator (local network)."""
        if self.validator_uid is not None:
            return self.validator_uid
        validators = chain.metagraph().validators
        if not validators:
            raise dg.Failure(description="no uid holds a validator permit on this chain (run `templar init`)")
        return validators[0]


class WandbResource(dg.ConfigurableResource):
    mode: str = Field(default="offline", description="offline, online or disabled")
    project: str = Field(default="templar-dagster")
    directory: str | None = Field(default=None, description="where offline runs are kept")
    api_key: str | None = Field(default=None, description="set through dg.EnvVar('WANDB_API_KEY') only")

    def log(self, role: str, window: int, metrics: Mapping[str, float]) -> None:
        """Metrics of one window for `role`: a run `{role}-{window}` in the group `role` (offline runs cannot be
        resumed, so one short run per window; `wandb sync` uploads them and the UI plots the group over windows)."""
        if self.mode == "disabled" or not metrics:
            return
        import wandb

        if self.directory:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
        settings = wandb.Settings(silent=True, x_disable_stats=True, console="off")
        with contextlib.ExitStack() as stack:
            if self.api_key:
                stack.enter_context(_environment({"WANDB_API_KEY": self.api_key}))
            run = wandb.init(project=self.project, id=f"{role}-{window}", name=f"{role}-{window}", group=role,
                             mode=self.mode, dir=self.directory, settings=settings,
                             config={"role": role, "window": window})
            run.log({**metrics, "window": window})
            run.finish()


@contextlib.contextmanager
def _environment(values: Mapping[str, str]):
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def resources_from_env(environ: Mapping[str, str]) -> dict[str, dg.ConfigurableResource]:
    """Embedded local defaults under TEMPLAR_HOME (default ./.templar); each URL overridable by a variable."""
    home = Path(environ.get("TEMPLAR_HOME", ".templar")).resolve()
    chain = ChainResource(url=environ.get("TEMPLAR_CHAIN_URL", f"local://{home}/chain.sqlite"))
    s3 = None
    if environ.get("TEMPLAR_S3_ENDPOINT_URL"):
        s3 = S3Resource(endpoint_url=environ["TEMPLAR_S3_ENDPOINT_URL"], region_name=environ.get("AWS_REGION", "auto"))
    buckets = BucketsResource(
        gradients_url=environ.get("TEMPLAR_GRADIENTS_URL", (home / "gradients").as_uri()),
        dataset_url=environ.get("TEMPLAR_DATASET_URL", (home / "dataset").as_uri()),
        aggregator_url=environ.get("TEMPLAR_AGGREGATOR_URL", (home / "aggregator").as_uri()),
        allow_local_peers=chain.is_local, enforce_upload_window=not chain.is_local, s3=s3)
    miner_uids = [int(u) for u in environ.get("TEMPLAR_MINER_UIDS", "").split(",") if u.strip()]
    validator = environ.get("TEMPLAR_VALIDATOR_UID")
    training = TrainingResource(
        preset=environ.get("TEMPLAR_PRESET", "tiny"), device=environ.get("TEMPLAR_DEVICE", "cpu"),
        hparams_file=environ.get("TEMPLAR_HPARAMS_FILE"), state_dir=str(home / "state"),
        hparams_overrides={k: v for k, v in environ.items() if k.startswith("TEMPLAR_HP_")},
        miner_uids=miner_uids, validator_uid=int(validator) if validator else None,
        keep_windows=int(environ.get("TEMPLAR_STATE_KEEP_WINDOWS", "4")),
        write_behind=environ.get("TEMPLAR_STATE_WRITE_BEHIND", "0") == "1",
        compile=environ.get("TEMPLAR_COMPILE", "0") == "1")
    wandb = WandbResource(mode=environ.get("TEMPLAR_WANDB_MODE", "offline"), directory=str(home / "wandb"),
                          api_key=dg.EnvVar("WANDB_API_KEY") if "WANDB_API_KEY" in environ else None)
    return {"chain": chain, "buckets": buckets, "training": training, "wandb": wandb}


_MODELS: dict[tuple[str, int, str, bool], object] = {}


def cached_model(preset: str, vocab_size: int, device: str, *, compile: bool = False):
    """The process's model of this (preset, vocabulary, device), built on first use (and compiled in place when
    asked: parameter names and tensors stay the model's own, so θ is still copied in with load_parameters_).

    A fresh-process run builds it once either way; a resident process (`templar node`, `templar local-network`)
    keeps it, and for the 1b preset that saves initialising 1.2 B parameters on the GPU every window. Callers
    always overwrite every parameter (load_parameters_), and runs in one process execute one step at a time.
    """
    from templar_lib.model import build_model

    key = (preset, vocab_size, device, compile)
    if key not in _MODELS:
        _MODELS.clear()  # one model per process: a different preset or device replaces it
        model = build_model(preset, vocab_size=vocab_size, device=device)
        if compile:
            model.compile()
        _MODELS[key] = model
    return _MODELS[key]


_WRITERS: dict[str, WriteBehind] = {}


def state_writer(state_dir: str) -> WriteBehind:
    """The process's WriteBehind for a state directory: shared by every run this process executes, so one window
    hands θ and momentum to the next in memory. Only a resident process (`templar node`) turns it on, and it calls
    flush_state_writers before it exits."""
    key = str(Path(state_dir).resolve())
    if key not in _WRITERS:
        _WRITERS[key] = WriteBehind()
    return _WRITERS[key]


def flush_state_writers() -> None:
    """Wait until every state file this process wrote behind has landed (raises the first write that failed)."""
    for writer in list(_WRITERS.values()):
        writer.flush()
