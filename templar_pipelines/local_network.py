"""The local network through Dagster: a resident node (node.py) that runs every role on the embedded LocalChain and
moves its clock itself, one block whenever nothing is due, so the roles run in the production order
(templar_lib.schedule) on the instance under TEMPLAR_HOME, the same runs `dagster dev` shows.

Cheating miners (`adversaries`, kinds of templar_lib.simulate.adversaries) are the last uids of the network. The
miner run mines every uid honestly; each cheat then acts when a real one would: over its honest file once the
miner run is done (before the validator's watch looks), once the window's honest uploads are public, after the
window closed, or after the validator scored it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

from templar_lib.chain import LocalChain
from templar_lib.model import build_model, load_parameters_
from templar_lib.simulate.adversaries import KINDS, Miner, Turn, backdate
from templar_lib.wire import evaluation_key, gradient_key, read_evaluation
from templar_pipelines.node import NodeRun, run_node
from templar_pipelines.resources import resources_from_env

SUMMARY = {"gradients": ("loss", "bytes"), "evaluations": ("valid_gradients", "peers", "spot_checks"),
           "chain_weights": ("status",), "checkpoint": ("held_out_loss", "sha256")}
PUBLIC_OFFSET = 2  # the block of a window at which its honest uploads are public


def run_local_network(home: str | Path, *, windows: int, environ: Mapping[str, str] | None = None,
                      adversaries: Mapping[str, int] | None = None,
                      on_window: Callable[[str], None] | None = None) -> list[dict]:
    """Run the next `windows` windows (from the newest θ in the state store); returns one summary per window: what
    the runs report, and the window's scores, weights and the held-out loss of θ after it."""
    home = Path(home).resolve()
    environ = {**(environ if environ is not None else os.environ), "TEMPLAR_HOME": str(home)}
    resources = resources_from_env(environ)
    chain, node, buckets = resources["chain"].open(), resources["node"], resources["buckets"]
    if not isinstance(chain, LocalChain):
        raise ValueError(f"a local network runs on a LocalChain (local://...), not {chain!r}")
    bpw = chain.blocks_per_window
    start = max(node.store().model_windows())
    chain.advance_to_block(start * bpw)
    cheats = _Cheats(resources, chain, adversaries or {})
    summaries: dict[int, dict] = {}

    def collect(run: NodeRun) -> None:
        summary = summaries.setdefault(run.window, {"window": run.window, "run_ids": {}})
        summary["run_ids"][run.job] = run.run_id
        for asset, keys in SUMMARY.items():
            summary |= {f"{asset}.{key}": run.metadata[asset][key] for key in keys if asset in run.metadata}
        if run.job == "miner_job":
            cheats.act(run.window, "mine")
        elif run.job == "validator_job":
            cheats.act(run.window, "scored")
            validator = node.validator(chain)
            report = read_evaluation(buckets.gradients().get(evaluation_key(run.window, validator)),
                                     window=run.window, validator=validator)
            summary |= {"scores": {uid: s.score for uid, s in report.scores.items()},
                        "reasons": {uid: s.reason for uid, s in report.scores.items() if s.reason},
                        "weights": node.store().load_weights(run.window) or {}, "roles": cheats.roles}
        elif run.job == "aggregator_job":
            summary["held_out_loss"] = summary.get("checkpoint.held_out_loss")
            if on_window is not None:
                on_window(format_summary(summary))

    def next_block(_seconds: float) -> None:
        block = chain.advance(1)
        window, offset = divmod(block, bpw)
        if offset == 0 and window >= 1:
            cheats.act(window - 1, "close")
        elif offset == PUBLIC_OFFSET:
            cheats.act(window, "public")

    run_node(home, until_window=start + windows - 1, environ=environ, wait=next_block, on_run=collect,
             source="templar local-network", stop_on_failure=True)
    return [summaries[window] for window in sorted(summaries) if window >= start]


class _Cheats:
    """The local network's cheating miners: the last uids, each with its own error feedback."""

    def __init__(self, resources: dict, chain: LocalChain, adversaries: Mapping[str, int]) -> None:
        self.resources, self.chain = resources, chain
        miners = resources["node"].miners(chain)
        kinds = [kind for kind, count in sorted(adversaries.items()) for _ in range(count)]
        if len(kinds) > len(miners):
            raise ValueError(f"{len(kinds)} adversaries for {len(miners)} miners")
        if hostile := sorted({kind for kind in kinds if KINDS[kind].endpoint}):
            # a hostile endpoint holds the validator for production's timeouts here: `templar simulate` scales them
            raise ValueError(f"{', '.join(hostile)} runs in `templar simulate`, not through Dagster")
        self.roles = {uid: "honest" for uid in miners} | dict(zip(miners[len(miners) - len(kinds):], kinds))
        self.miners: dict[int, Miner] = {}
        self.model = None

    def act(self, window: int, when: str) -> None:
        acting = [uid for uid, kind in self.roles.items() if kind != "honest" and KINDS[kind].when == when
                  and KINDS[kind].upload is not None]
        if not acting:
            return
        node, buckets, hparams = self.resources["node"], self.resources["buckets"], self.resources["hparams"].load()
        dataset, gradients = buckets.dataset(), buckets.gradients()
        state = node.sync_state(window)
        if self.model is None:
            self.model = build_model(self.resources["training"].preset, vocab_size=dataset.vocab_size)
        load_parameters_(self.model, state.parameters)
        honest = {uid: gradients.get(gradient_key(window, uid)) for uid, kind in self.roles.items()
                  if kind == "honest" and gradients.exists(gradient_key(window, uid))}
        for uid in acting:
            behaviour = KINDS[self.roles[uid]]
            miner = self.miners.setdefault(uid, Miner(uid, self.roles[uid]))
            turn = Turn(window, miner, self.model, state, dataset, hparams, self.chain, gradients, honest,
                        node.validator(self.chain))
            upload = behaviour.upload(turn)
            if upload is not None:
                gradients.put(gradient_key(window, uid), upload)
                if behaviour.backdates:
                    backdate(turn, 30.0)


def format_summary(summary: dict) -> str:
    """One line per window; a part this process did not run (a run before a restart) shows as "?"."""
    def value(key: str, style: str = "") -> str:
        return format(summary[key], style) if key in summary else "?"

    line = (f"window {summary['window']:>3}: miner loss {value('gradients.loss', '.4f')}, "
            f"held-out {value('checkpoint.held_out_loss', '.4f')}, valid gradients "
            f"{value('evaluations.valid_gradients')}, peers {value('evaluations.peers')}, "
            f"weights {value('chain_weights.status')}, θ sha256 {value('checkpoint.sha256')[:12]}")
    if summary.get("evaluations.spot_checks", "none") != "none":
        line += f"\n    spot checks of {summary['evaluations.spot_checks'][:200]}"
    reasons = summary.get("reasons") or {}
    return line + "".join(f"\n    uid {uid} ({summary['roles'].get(uid, '?')}): {reason[:110]}"
                          for uid, reason in sorted(reasons.items()))

