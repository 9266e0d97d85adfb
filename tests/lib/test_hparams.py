import json

import pytest
import yaml

from templar_lib.hparams import HParams, HParamsError


def test_defaults_are_the_seed_era_values():
    hp = HParams()
    assert (hp.topk_compression, hp.target_chunk, hp.blocks_per_window, hp.pages_per_window) == (32, 64, 7, 6)
    assert (hp.learning_rate, hp.momentum_decay, hp.weight_decay) == (4e-4, 0.999, 0.1)
    assert (hp.warmup_steps, hp.t_max, hp.checkpoint_frequency) == (250, 5000, 100)
    assert (hp.openskill_beta, hp.openskill_tau, hp.binary_score_ma_alpha) == (7, 0.1, 0.05)
    assert (hp.score_ema_alpha, hp.ban_windows, hp.peer_score_ratio) == (0.2, 10, 0.2)
    with pytest.raises(HParamsError, match="validator_offset: unknown"):  # the schedule fixes it (schedule.py)
        HParams.from_dict({"validator_offset": 2})


def test_load_json_and_yaml_then_environment_overrides(tmp_path):
    (tmp_path / "h.json").write_text(json.dumps({"topk_compression": 16, "learning_rate": 1}))
    (tmp_path / "h.yaml").write_text("target_chunk: 32\nweight_decay: 0.0\n")
    from_json = HParams.load(tmp_path / "h.json", {"TEMPLAR_HP_TOPK_COMPRESSION": "8", "OTHER": "x"})
    assert from_json.topk_compression == 8 and from_json.learning_rate == 1.0
    assert isinstance(from_json.learning_rate, float)
    from_yaml = HParams.load(tmp_path / "h.yaml")
    assert from_yaml.target_chunk == 32 and from_yaml.weight_decay == 0.0 and from_yaml.topk_compression == 32


@pytest.mark.parametrize("values, field", [
    ({"topk_compression": 0}, "topk_compression"),
    ({"learning_rate": -1.0}, "learning_rate"),
    ({"momentum_decay": 1.5}, "momentum_decay"),
    ({"batch_size": "6"}, "batch_size"),
    ({"blocks_per_window": True}, "blocks_per_window"),
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"gradient_value_dtype": "int4"}, "gradient_value_dtype"),
    ({"gradient_value_dtype": "int8", "gradient_format": 1}, "gradient_value_dtype"),
    ({"gradient_format": 3}, "gradient_format"),
    ({"topk_compresion": 3}, "topk_compresion"),
    ({"inner_beta2": 1.0}, "inner_beta2"),  # the bias correction would divide by 1 − β₂ᵗ = 0
    ({"inner_beta2": 0.999}, "inner_beta2"),  # beyond the norm bound's measured allowance (honest files at 3.09×)
    # a sparseloco network's outside [0.8, 0.9], where the norm bound's allowance is measured (the uncompressed
    # baselines of `templar train` take any β₁ below 1)
    ({"strategy": "sparseloco", "inner_beta1": 0.95}, "inner_beta1"),
    ({"strategy": "sparseloco", "inner_beta1": 0.7}, "inner_beta1"),
    ({"inner_beta1": 1.0}, "inner_beta1"),
])
def test_invalid_values_name_the_field(values, field):
    with pytest.raises(HParamsError, match=f"^{field}:"):
        HParams.from_dict(values)


def test_bad_environment_override_names_field_and_variable():
    with pytest.raises(HParamsError, match="^batch_size: cannot parse 'six'.*TEMPLAR_HP_BATCH_SIZE"):
        HParams.load(environ={"TEMPLAR_HP_BATCH_SIZE": "six"})
    with pytest.raises(HParamsError, match="^nope: unknown"):
        HParams.load(environ={"TEMPLAR_HP_NOPE": "1"})


def test_file_that_is_not_a_mapping_is_rejected(tmp_path):
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(HParamsError, match="expected a mapping"):
        HParams.load(tmp_path / "bad.yaml")


def test_protocol_hash_tracks_protocol_fields_only():
    base = HParams()
    assert base.protocol_hash() == HParams().protocol_hash()
    assert base.replace(topk_compression=16).protocol_hash() != base.protocol_hash()
    assert base.replace(openskill_beta=5.0).protocol_hash() == base.protocol_hash()


def test_a_spot_checked_network_hash_names_how_states_are_digested(monkeypatch):
    """Nodes that digest a miner's state otherwise must refuse each other's files as another protocol's, not ban
    each other's honest miners for states that do not hash to their commitments."""
    import templar_lib.hparams as hparams_module

    checked, unchecked = HParams(spot_check_probability=0.5), HParams()
    before = checked.protocol_hash(), unchecked.protocol_hash()
    monkeypatch.setattr(hparams_module, "STATE_DIGEST_CHUNK", hparams_module.STATE_DIGEST_CHUNK * 2)
    assert checked.protocol_hash() != before[0] and unchecked.protocol_hash() == before[1]


def test_a_network_record_from_before_a_field_existed_keeps_its_old_value_and_hash(tmp_path):
    # `templar init` writes every field; one written before inner_beta1 and inner_beta2 existed lacks only those
    later = ("inner_beta1", "inner_beta2")
    network = HParams(strategy="sparseloco", inner_beta1=0.9, inner_beta2=0.95, sparse_topk=32,
                      outer_learning_rate=0.5)  # 2026-12-05
    record = {name: value for name, value in network.to_dict().items() if name not in later}
    (tmp_path / "hparams.json").write_text(json.dumps(record))
    loaded = HParams.load(tmp_path / "hparams.json")
    assert (loaded.inner_beta1, loaded.inner_beta2) == (0.9, 0.95)
    assert loaded.protocol_hash() == network.protocol_hash() == "e87be85720dbba3e"
    # as YAML too; the environment still overrides it
    (tmp_path / "record.yaml").write_text(yaml.safe_dump(record))
    assert HParams.load(tmp_path / "record.yaml").protocol_hash() == network.protocol_hash()
    assert HParams.load(tmp_path / "record.yaml", {"TEMPLAR_HP_INNER_BETA2": "0.99"}).inner_beta2 == 0.99
    # one written between the two (2026-12-06: β₂ 0.99 stated, β₁ not yet a field) keeps Templar's β₁
    (tmp_path / "hparams.json").write_text(json.dumps(record | {"inner_beta2": 0.99}))
    loaded = HParams.load(tmp_path / "hparams.json")
    assert (loaded.inner_beta1, loaded.inner_beta2) == (0.9, 0.99)
    assert loaded.protocol_hash() == "04d51ccfcc683441"
    # a partial file (a deployment's overrides) loads what it says and the defaults
    (tmp_path / "overrides.yaml").write_text("strategy: sparseloco\nouter_learning_rate: 0.4\n")
    loaded = HParams.load(tmp_path / "overrides.yaml")
    assert (loaded.inner_beta1, loaded.inner_beta2) == (HParams().inner_beta1, HParams().inner_beta2) != (0.9, 0.95)
    # a record missing a field that existed from the start is partial too: it does not pin the old values
    del record["sparse_topk"]
    (tmp_path / "hparams.json").write_text(json.dumps(record))
    assert HParams.load(tmp_path / "hparams.json").inner_beta2 == HParams().inner_beta2


@pytest.mark.parametrize("strategy", ["demo", "sparseloco"])
def test_the_protocol_settings_are_what_the_hash_covers(strategy):
    """What run metadata shows as the protocol (templar_pipelines.metadata.protocol_metadata): every field of the
    strategy's protocol with its value, JSON as it is; the hash is theirs, a later field left out at its old value."""
    from templar_lib.hparams import IMPLICIT_BEFORE, PROTOCOL_FIELDS, SPARSELOCO_FIELDS

    hparams = HParams(strategy=strategy)
    settings = hparams.protocol_settings()
    fields = list(PROTOCOL_FIELDS + (SPARSELOCO_FIELDS if strategy != "demo" else ()))
    assert list(settings) == [f for f in fields if f != "spot_check_tolerance"]  # the tolerance of checks that are off
    checked = hparams.replace(spot_check_probability=0.1)  # with checks, what a state commitment means as well
    assert list(checked.protocol_settings()) == fields + ["state_digest_chunk"]
    assert json.loads(json.dumps(settings)) == settings
    assert hparams.replace(pages_per_window=3).protocol_hash() != hparams.protocol_hash()
    if strategy == "sparseloco":  # shown at the old value, which the hash leaves out: another hash than the defaults'
        older = hparams.replace(**IMPLICIT_BEFORE)
        assert older.protocol_settings()["inner_beta1"] == 0.9 and older.protocol_hash() != hparams.protocol_hash()

