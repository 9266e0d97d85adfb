"""Model presets: `transformers.LlamaForCausalLM` built from a `LlamaConfig`, never downloaded.

    tiny   ≈ 1.8 M parameters (vocab 4096): trains on a CPU in the tests and the demo
    small  ≈ 28 M parameters (vocab 4096): a CPU/GPU middle ground
    1b     ≈ 1.24 B parameters, the shape of Llama-3.2-1B (vocab 128256, tied embeddings): GPU or meta device only

Initialisation is deterministic: the same (preset, seed, vocab_size) gives bit-identical weights on CPU, without
touching the process-wide RNG.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from templar_lib.encodings import CODES, FLOAT_CODES, torch_dtype

PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 tie_word_embeddings=False),
    "small": dict(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
                  tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
               rope_theta=500000.0, tie_word_embeddings=True),
}
CPU_PRESETS = ("tiny", "small")

_DTYPE_NAMES = {name: name for name in (CODES[code] for code in FLOAT_CODES)} | {"fp32": "float32", "bf16": "bfloat16",
                                                                                    "fp16": "float16"}


def model_config(preset: str, *, vocab_size: int | None = None) -> LlamaConfig:
    """LlamaConfig of a preset; `vocab_size` overrides the preset's (to match a tokenizer)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
    settings = dict(PRESETS[preset], rms_norm_eps=1e-5, initializer_range=0.02, attention_bias=False,
                    mlp_bias=False, use_cache=False)
    if vocab_size is not None:
        settings["vocab_size"] = vocab_size
    config = LlamaConfig(**settings)
    config._attn_implementation = "sdpa"  # torch scaled_dot_product_attention (flash kernels on GPU)
    return config


def build_model(preset: str, *, seed: int = 0, vocab_size: int | None = None, device: str | torch.device = "cpu",
                dtype: str | torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A freshly initialised model. Deterministic in (preset, seed, vocab_size) on CPU.

    The 1b preset is refused on CPU (≈5 GB of fp32 weights): build it on "cuda" or on "meta" (shapes only).
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    if preset not in CPU_PRESETS and device.type == "cpu":
        raise ValueError(f"preset {preset!r} is only built on a GPU or the meta device, not on the CPU")
    config = model_config(preset, vocab_size=vocab_size)
    with _seeded(seed), torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype)


def parameters_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters by name (the live tensors, not copies)."""
    return {name: p for name, p in model.named_parameters()}


@torch.no_grad()
def load_parameters_(model: torch.nn.Module, parameters: dict[str, torch.Tensor]) -> None:
    """Copy `parameters` into the model's own tensors in place; the names and shapes must match exactly (copy_
    alone would broadcast a (1, n) tensor into every row of an (m, n) weight)."""
    own = parameters_of(model)
    if set(own) != set(parameters):
        raise ValueError(f"parameter names differ: missing {sorted(set(own) - set(parameters))[:3]}, "
                         f"unexpected {sorted(set(parameters) - set(own))[:3]}")
    wrong = [name for name, tensor in own.items() if tuple(parameters[name].shape) != tuple(tensor.shape)]
    if wrong:
        raise ValueError(f"parameter shapes differ from the model's: {wrong[:3]} (e.g. {wrong[0]}: "
                         f"{tuple(parameters[wrong[0]].shape)}, not {tuple(own[wrong[0]].shape)})")
    for name, tensor in own.items():
        tensor.copy_(parameters[name])


@functools.lru_cache(maxsize=8)
def parameter_shapes(preset: str, vocab_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """The preset's parameter shapes (names as parameters_of gives them), from a model on the meta device: no memory,
    no initialisation. What a node checks published checkpoints against."""
    return {name: tuple(p.shape) for name, p in parameters_of(build_model(preset, vocab_size=vocab_size,
                                                                          device="meta")).items()}


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(_DTYPE_NAMES)}")
    return torch_dtype(_DTYPE_NAMES[dtype])


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's default generators for the block and restore them after (weights init uses them)."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
