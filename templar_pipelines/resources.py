"""Resources: each configures one external system or one concern of a node, and returns templar_lib objects.

    hparams    HParamsResource   the protocol's hyper-parameters (file + TEMPLAR_HP_* overrides)
    chain      ChainResource     local://… (embedded SQLite, default) or bittensor://…
    buckets    BucketsResource   file://… (default) or s3://… through dagster-aws S3Resource; the dataset manifest
    training   TrainingResource  the model: preset, device, compilation (one model object per process)
    node       NodeResource      who this node is (miner uids, validator uid) and its state store (θ, momentum,
                                 ratings), with θ_w brought up to date from published checkpoints when behind
    wandb      WandbResource     metrics per window (offline by default; disabled in tests)

`resources_from_env` is the one place that reads the environment and picks each implementation. Secrets are never
fields here: S3 credentials come from boto3's own chain (or `dg.EnvVar` on the S3Resource), wallets from their files.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from urllib.parse import urlparse

import dagster as dg
from dagster_aws.s3 import S3Resource
from pydantic import Field

from templar_lib.buckets import Bucket, open_bucket
from templar_lib.chain import Chain, open_chain
from templar_lib.checkpoints import ModelState
from templar_lib.commitments import PeerBuckets, peer_buckets
from templar_lib.data import Dataset
from templar_lib.hparams import ENV_PREFIX, HParams, hparams_file
from templar_lib.roles.spot_checks import Records, kept_windows, validator_records
from templar_lib.state import StateMissing, StateStore, WriteBehind, sync_to
from templar_lib.watch import Watch
from templar_lib.strategies import strategy_of


class HParamsResource(dg.ConfigurableResource):
    file: str | None = Field(default=None, description="JSON/YAML hyper-parameters (default: DESIGN §4)")
    overrides: dict[str, str] = Field(default_factory=dict, description="TEMPLAR_HP_<FIELD> values")

    def load(self) -> HParams:
        return HParams.load(self.file, self.overrides)


class ChainResource(dg.ConfigurableResource):
    url: str = Field(description="local:///abs/chain.sqlite[?uid=N] or bittensor://<network>?netuid=N&wallet=..")
    hparams: HParamsResource

    def open(self) -> Chain:
        """The chain, counting HParams.blocks_per_window blocks per window (a URL that says otherwise is refused)."""
        return open_chain(self.url, blocks_per_window=self.hparams.load().blocks_per_window)

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
    s3: S3Resource | None = Field(default=None, description="dagster-aws S3 client for s3:// URLs (default: boto3)")

    def _open(self, url: str) -> Bucket:
        client = self.s3.get_client() if self.s3 is not None and url.startswith("s3://") else None
        return open_bucket(url, client=client)

    def gradients(self) -> Bucket:
        return self._open(self.gradients_url)

    def dataset(self) -> Dataset:
        """The dataset bucket with its validated manifest."""
        return Dataset.open(self._open(self.dataset_url))

    def aggregator(self) -> Bucket:
        return self._open(self.aggregator_url)

    def peers(self, chain: Chain, uids: Collection[int] | None = None) -> PeerBuckets:
        """The buckets the chain's commitments point to (local ones only on a local network); of `uids` only,
        where given (each bucket opened is a client made)."""
        commitments = chain.commitments()
        if uids is not None:
            commitments = {uid: text for uid, text in commitments.items() if uid in uids}
        return peer_buckets(commitments, allow_local=self.allow_local_peers)

    def validator_records(self, chain: Chain, window: int) -> Records:
        """Every validator's evaluation report of `window`, from the bucket it commits (a local network's write to
        the gradients bucket), read side by side within roles.spot_checks.REPORTS_SECONDS, with their stakes: what a
        miner checks its last file against before it mines, and what a validator mends a missed file from
        (roles.spot_checks.Records, mender)."""
        metagraph = chain.metagraph()
        return validator_records(window, metagraph=metagraph, shared=self.gradients(),
                                 peers=self.peers(chain, uids=metagraph.validators))


class TrainingResource(dg.ConfigurableResource):
    preset: str = Field(default="tiny", description="model preset: tiny, small, 1b")
    device: str = Field(default="cpu", description="cpu, cuda or cuda:N")
    compile: bool = Field(default=False, description="torch.compile the model: compiles once per process, so for "
                                                     "a resident node (bench/RESULTS.md has the cost and speed-up)")

    def model(self, vocab_size: int):
        """This node's model object (preset, device), whatever θ it last held: callers load the θ they need."""
        return cached_model(self.preset, vocab_size, self.device, compile=self.compile)


class NodeResource(dg.ConfigurableResource):
    state_dir: str = Field(description="node-local state: θ_w, momentum, ratings")
    miner_uids: list[int] = Field(default_factory=list, description="uids this node mines for (default: every uid "
                                                                     "without a validator permit, a local network)")
    validator_uid: int | None = Field(default=None, description="uid this node validates as (default: the chain's "
                                                                "first validator, a local network)")
    keep_windows: int = Field(default=4, description="windows of θ and momentum kept in the state store; older θ is "
                                                      "rebuilt from checkpoints; at least sync_max_lag + 3 where "
                                                      "the network spot-checks (a check made again a window late "
                                                      "replays a file of window − 2 on θ up to sync_max_lag before)")
    keep_origin: bool = Field(default=True, description="keep the node's first θ (θ_0 of `templar init`, or the "
                                                        "checkpoint it joined from) besides the newest windows: θ of "
                                                        "a window before the first published checkpoint is rebuilt "
                                                        "from it (one more θ file)")
    write_behind: bool = Field(default=False, description="keep θ and momentum in memory for the next window and "
                                                          "write their files in the background (a resident node)")
    watch_poll_seconds: float = Field(default=3.0, description="seconds between a validator's looks at every "
                                                               "miner's bucket while a window is open")
    hparams: HParamsResource
    buckets: BucketsResource
    training: TrainingResource

    @staticmethod
    def _in_order() -> None:
        """Inside a run, before its first use of the node: refuse to start while a run before it in the schedule has
        not finished (templar_pipelines/partitions.py: the step fails with the reason, is not retried as a step, and
        the run is retried after that one). Every window asset's first use of `node` goes through store(), miners()
        or validator(); a failure here, in the step's own code, skips the step's retry policy, which a failure in
        resource setup would not."""
        from templar_pipelines.partitions import check_current_run

        check_current_run()

    def store(self) -> StateStore:
        self._in_order()
        writer = WriteBehind.for_directory(self.state_dir) if self.write_behind else None
        return StateStore(self.state_dir, keep_windows=kept_windows(self.keep_windows, self.hparams.load()),
                          writer=writer, keep_origin=self.keep_origin)

    def sync_state(self, window: int) -> ModelState:
        """θ_window from the state store, replayed from published checkpoints and aggregations (and saved) when this
        node is behind or θ_window is older than the windows it keeps (a backfill); dg.Failure with a clear message
        when neither has it. A published checkpoint must have this node's model's shapes (the dataset's vocabulary:
        read only then)."""
        from templar_lib.model import parameter_shapes

        def model_shapes():
            return parameter_shapes(self.training.preset, self.buckets.dataset().vocab_size)

        try:
            return sync_to(self.store(), self.buckets.aggregator(), window, hparams=self.hparams.load(),
                           model_shapes=model_shapes)
        except StateMissing as missing:  # retrying cannot help: the previous window must run first
            raise dg.Failure(description=str(missing), allow_retries=False) from None

    def model_at(self, window: int, dataset: Dataset):
        """(model holding θ_window, its ModelState): the process's model object with θ_window copied in."""
        from templar_lib.model import load_parameters_

        state = self.sync_state(window)
        model = self.training.model(dataset.vocab_size)
        load_parameters_(model, state.parameters)
        return model, state

    def watch(self, window: int, chain: Chain) -> Watch:
        """The validator's first sightings of `window` (its state directory holds them): every uid but its own."""
        hparams, validator = self.hparams.load(), self.validator(chain)
        uids = [uid for uid in chain.metagraph().uids if uid != validator][: hparams.max_peers]
        model = self.training.model(self.buckets.dataset().vocab_size)
        limit = strategy_of(hparams).gradient_limit({name: tuple(p.shape) for name, p in model.named_parameters()})
        return Watch(window, blocks_per_window=hparams.blocks_per_window, state=self.store().bucket,
                     peers=self.buckets.peers(chain), uids=uids, max_bytes=limit)

    def miners(self, chain: Chain) -> list[int]:
        """The uids this node mines for: configured, else every uid without a validator permit (local network)."""
        self._in_order()
        if self.miner_uids:
            return sorted(self.miner_uids)
        return [n.uid for n in chain.metagraph().neurons if not n.validator_permit]

    def validator(self, chain: Chain) -> int:
        """The uid this node validates as: configured, else the chain's first validator (local network)."""
        self._in_order()
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

    def log(self, role: str, window: int, metrics: Mapping[str, float],
            per_uid: Mapping[str, Mapping[int, float]] | None = None) -> None:
        """Metrics of one window for `role`: a run `{role}-{window}` in the group `role` (offline runs cannot be
        resumed, so one short run per window; `wandb sync` uploads them and the UI plots the group over windows).
        per_uid: series -> uid -> value, logged as `{series}/uid_{uid}` (W&B puts each series in a section of its
        own, one chart per uid, e.g. `score/uid_3`)."""
        metrics = {**metrics, **{f"{series}/uid_{uid}": float(value) for series, values in (per_uid or {}).items()
                                 for uid, value in sorted(values.items())}}
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
    file = hparams_file(home, environ)
    hparams = HParamsResource(file=None if file is None else str(file),
                              overrides={k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)})
    chain = ChainResource(url=environ.get("TEMPLAR_CHAIN_URL", f"local://{home}/chain.sqlite"), hparams=hparams)
    s3 = None
    if environ.get("TEMPLAR_S3_ENDPOINT_URL"):
        s3 = S3Resource(endpoint_url=environ["TEMPLAR_S3_ENDPOINT_URL"], region_name=environ.get("AWS_REGION", "auto"))
    buckets = BucketsResource(
        gradients_url=environ.get("TEMPLAR_GRADIENTS_URL", (home / "gradients").as_uri()),
        dataset_url=environ.get("TEMPLAR_DATASET_URL", (home / "dataset").as_uri()),
        aggregator_url=environ.get("TEMPLAR_AGGREGATOR_URL", (home / "aggregator").as_uri()),
        allow_local_peers=chain.is_local, s3=s3)
    training = TrainingResource(preset=environ.get("TEMPLAR_PRESET", "tiny"),
                                device=environ.get("TEMPLAR_DEVICE", "cpu"),
                                compile=environ.get("TEMPLAR_COMPILE", "0") == "1")
    validator = environ.get("TEMPLAR_VALIDATOR_UID")
    node = NodeResource(
        state_dir=str(home / "state"),
        miner_uids=[int(u) for u in environ.get("TEMPLAR_MINER_UIDS", "").split(",") if u.strip()],
        validator_uid=int(validator) if validator else None,
        keep_windows=int(environ.get("TEMPLAR_STATE_KEEP_WINDOWS", "4")),
        write_behind=environ.get("TEMPLAR_STATE_WRITE_BEHIND", "0") == "1",
        hparams=hparams, buckets=buckets, training=training)
    wandb = WandbResource(mode=environ.get("TEMPLAR_WANDB_MODE", "offline"), directory=str(home / "wandb"),
                          api_key=dg.EnvVar("WANDB_API_KEY") if "WANDB_API_KEY" in environ else None)
    return {"hparams": hparams, "chain": chain, "buckets": buckets, "training": training, "node": node,
            "wandb": wandb}


_MODELS: dict[tuple[str, int, str, bool], object] = {}


def cached_model(preset: str, vocab_size: int, device: str, *, compile: bool = False):
    """The process's model of this (preset, vocabulary, device), built on first use (and compiled in place when
    asked: parameter names and tensors stay the model's own, so θ is still copied in with load_parameters_).

    A fresh-process run builds it once either way; a resident process (`templar node`, `templar local-network`)
    keeps it, which for a large preset saves initialising it on the GPU every window. Callers always overwrite every
    parameter (load_parameters_), and runs in one process execute one step at a time.
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
