"""The checkpoint audit is honest: `templar audit` (the same checks.run_audit as the checkpoint_audit asset checks)
passes on a sound checkpoint, and after one flipped byte fails naming the file and the reason, with no check of the
corrupted checkpoint reported as passed; a check that could not be evaluated is never passed."""

import re

import dagster as dg
import pytest

from templar_lib.audit import CHECKS, FAILED, PASSED, SKIPPED, audit_checkpoint
from templar_lib.buckets import LocalBucket
from templar_lib.checkpoints import ModelState, save_checkpoint
from templar_lib.data import Dataset
from templar_lib.hparams import HParams
from templar_lib.model import build_model
from templar_pipelines import defs
from templar_pipelines.checks import run_audit
from templar_pipelines.cli import main
from templar_pipelines.local_network import run_local_network
from templar_pipelines.resources import resources_from_env
from tests.conftest import FAST_HPARAMS, ROOT


def templar_audit(home, capsys) -> tuple[int, str]:
    """`templar --home HOME audit` in this process: (exit status, what it printed)."""
    with pytest.raises(SystemExit) as exit_:
        main(["--home", str(home), "audit"])
    return exit_.value.code, capsys.readouterr().out


def flip_one_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensor data, past the safetensors header
    path.write_bytes(bytes(data))


@pytest.mark.timeout(180)
def test_audit_passes_then_a_flipped_byte_fails_naming_the_file_and_nothing_passes(network_home, network_env,
                                                                                  monkeypatch, capsys):
    run_local_network(network_home, windows=2, environ=network_env)  # checkpoint_frequency 1: checkpoints 1 and 2
    for name, value in network_env.items():
        monkeypatch.setenv(name, value)
    status, output = templar_audit(network_home, capsys)
    assert status == 0, output
    assert "audit of checkpoint-2" in output and "against checkpoint-1" in output
    for name in CHECKS:
        assert re.search(rf"PASSED +{name} +\S", output), output
    assert "3 of 3 checks passed" in output

    path = network_home / "aggregator" / "checkpoint-2.safetensors"
    flip_one_byte(path)
    status, output = templar_audit(network_home, capsys)
    assert status == 1, output
    assert "PASSED" not in output
    assert re.search(r"FAILED +checkpoint_matches_manifest", output)
    assert f"{path.as_uri()}: checkpoint-2: tensor file does not match its manifest's sha256" in output
    assert "0 of 3 checks passed" in output

    resources = resources_from_env(network_env)
    audit = run_audit(resources["buckets"], resources["hparams"], resources["training"])
    assert [v.status for v in audit.verdicts] == [FAILED, SKIPPED, SKIPPED] and not audit.passed
    with dg.instance_for_test() as instance:
        result = defs.resolve_job_def("audit_job").execute_in_process(instance=instance, resources=resources,
                                                                      raise_on_error=False)
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert set(evaluations) == set(CHECKS)
    assert [name for name, e in evaluations.items() if e.passed] == []
    assert {name: e.metadata["status"].value for name, e in evaluations.items()} == {
        "checkpoint_matches_manifest": FAILED, "checkpoint_replays_from_previous": SKIPPED,
        "held_out_loss_within_threshold": SKIPPED}
    assert "checkpoint-2.safetensors" in evaluations["checkpoint_matches_manifest"].metadata["reason"].value


def test_unevaluated_checks_are_not_passed(tmp_path, dataset):
    data, aggregator = Dataset.open(dataset), LocalBucket(tmp_path / "aggregator")
    model = build_model("tiny", seed=0, vocab_size=data.vocab_size)
    kwargs = {"hparams": HParams.load(FAST_HPARAMS), "model": model, "dataset": data}
    nothing = audit_checkpoint(aggregator, **kwargs)
    assert [v.status for v in nothing.verdicts] == [FAILED, SKIPPED, SKIPPED]
    assert f"no checkpoint published in {aggregator.url}" in nothing.verdicts[0].reason

    theta = {name: p.detach().clone() for name, p in model.named_parameters()}
    save_checkpoint(aggregator, ModelState(4, 4, theta), kwargs["hparams"])
    first = audit_checkpoint(aggregator, **kwargs)  # nothing earlier to replay from or compare with
    assert [v.status for v in first.verdicts] == [PASSED, SKIPPED, SKIPPED] and not first.passed
    assert "checkpoint-4 is the first published" in first.verdicts[1].reason

    save_checkpoint(aggregator, ModelState(8, 8, theta), kwargs["hparams"])
    unreplayable = audit_checkpoint(aggregator, **kwargs)  # aggregation-4..7 were never published
    assert unreplayable.verdicts[1].status == FAILED and not unreplayable.passed
    assert "aggregation-4" in unreplayable.verdicts[1].reason


def test_templar_audit_without_a_checkpoint_exits_1_with_the_reason(tmp_path, dataset, monkeypatch, capsys):
    home = tmp_path / "templar"
    (home / "dataset").mkdir(parents=True)
    for key in dataset.list():
        (home / "dataset" / key).write_bytes(dataset.get(key))
    monkeypatch.setenv("TEMPLAR_WANDB_MODE", "disabled")
    status, output = templar_audit(home, capsys)
    assert status == 1
    reason = f"no checkpoint published in {(home / 'aggregator').as_uri()}"
    assert re.search(rf"FAILED +checkpoint_matches_manifest +{re.escape(reason)}", output), output
    assert "PASSED" not in output


def test_the_demo_publishes_two_checkpoints_for_the_audit():
    """`make demo` (deploy/simulate-hparams.yaml, DEMO_WINDOWS windows) publishes a checkpoint and an earlier one to
    replay it from, so `templar audit` right after it has something to pass on."""
    windows = int(re.search(r"^DEMO_WINDOWS \?= (\d+)$", (ROOT / "Makefile").read_text(), re.MULTILINE).group(1))
    assert windows // HParams.load(FAST_HPARAMS).checkpoint_frequency >= 2
