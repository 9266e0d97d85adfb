import pytest
import torch

from templar_lib.model import build_model, model_config, parameter_count


def test_presets_have_the_advertised_sizes():
    assert 1_000_000 <= parameter_count(build_model("tiny")) <= 3_000_000
    assert 20_000_000 <= parameter_count(build_model("small")) <= 50_000_000
    assert 1_100_000_000 <= parameter_count(build_model("1b", device="meta")) <= 1_300_000_000


def test_init_is_deterministic_in_the_seed_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("tiny", seed=7)
    after = torch.rand(1)
    b = build_model("tiny", seed=7)
    c = build_model("tiny", seed=8)
    assert torch.equal(before, after)  # building a model did not consume the caller's random stream
    for (name, pa), (_, pb), (_, pc) in zip(a.state_dict().items(), b.state_dict().items(), c.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.embed_tokens.weight, c.model.embed_tokens.weight)


def test_1b_is_refused_on_cpu_and_vocab_follows_tokenizer():
    with pytest.raises(ValueError, match="GPU or the meta device"):
        build_model("1b")
    assert model_config("tiny", vocab_size=1000).vocab_size == 1000
    with pytest.raises(ValueError, match="unknown model preset"):
        model_config("huge")


def test_bf16_dtype_helper():
    model = build_model("tiny", dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
