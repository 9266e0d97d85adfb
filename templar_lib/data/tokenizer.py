"""A byte-level BPE tokenizer trained offline on the bundled corpus, used as a transformers tokenizer.

Training with `tokenizers` is deterministic for the same documents in the same order; the result is saved as
`tokenizer.json` in the dataset bucket and loaded from those bytes by every node.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def train_tokenizer(documents: Sequence[str], vocab_size: int = 4096) -> Tokenizer:
    """Byte-level BPE of `vocab_size` tokens (two of them special: end-of-text and padding)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tokenizer


def as_transformers(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap for use with transformers (batch encode, decode, eos/pad ids)."""
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)


def load_tokenizer(data: bytes) -> PreTrainedTokenizerFast:
    """A tokenizer from the bytes of a `tokenizer.json` (as stored in the dataset bucket)."""
    return as_transformers(Tokenizer.from_str(data.decode("utf-8")))
