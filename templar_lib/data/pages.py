"""Dataset pages: token sequences stored as parquet in the dataset bucket, and which pages a window uses.

Layout (DESIGN §3):

    data_{page}.parquet   rows of one page: `tokens` list<int32> of exactly sequence_length ids, `text` (decoded)
    tokenizer.json        the tokenizer that produced the ids
    manifest.json         page counts, sequence length, vocab size, sha256 of every page and of the tokenizer

The corpus is tokenised, documents are joined with end-of-text, the stream is cut into sequences of
`sequence_length` tokens (the tail is dropped) and `rows_per_page` consecutive sequences form a page. The last
`held_out_pages` pages are never trained on: they measure held-out loss.

Selection is a pure function of (window, uid), so a validator recomputes exactly the pages a miner had to use:

    pages_for(window, uid, n, total)     the miner's pages: n distinct pages of [0, total)
    random_pages(window, seed, n, total) a validator's comparison pages, from an independent stream

Roles read pages through a `Dataset`: the bucket and its validated manifest, which always travel together.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from templar_lib.buckets import Bucket
from templar_lib.data import corpus
from templar_lib.data.tokenizer import load_tokenizer, train_tokenizer
from templar_lib.wire.container import InvalidFile, json_object
from templar_lib.wire.keys import MANIFEST as MANIFEST_KEY
from templar_lib.wire.keys import TOKENIZER as TOKENIZER_KEY
from templar_lib.wire.keys import page_key

FORMAT_VERSION = 1
MAX_PAGE_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_PAGE_EXPANSION = 4  # a page's decoded column data may be at most this many times its int32 token bytes
MAX_PAGE_TOKENS = MAX_PAGE_BYTES // 4  # what a page of int32 ids within its size limit can hold
MAX_VOCAB = 1 << 24


class InvalidPage(ValueError):
    """A page, manifest or tokenizer from the dataset bucket failed validation; the message says why."""


@dataclass(frozen=True)
class Manifest:
    """What `templar init` built. Pages [0, train_pages) are for training, [train_pages, total_pages) held out."""

    total_pages: int
    train_pages: int
    sequence_length: int
    rows_per_page: int
    vocab_size: int
    tokenizer_sha256: str
    page_sha256: list[str] = field(repr=False)
    format: int = FORMAT_VERSION

    @property
    def held_out(self) -> list[int]:
        return list(range(self.train_pages, self.total_pages))

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            raw = json_object(data, "manifest")
        except InvalidFile as error:
            raise InvalidPage(str(error)) from None
        fields = {"total_pages": int, "train_pages": int, "sequence_length": int, "rows_per_page": int,
                  "vocab_size": int, "tokenizer_sha256": str, "page_sha256": list, "format": int}
        if set(raw) != set(fields):
            raise InvalidPage(f"manifest: expected exactly the fields {sorted(fields)}")
        for name, kind in fields.items():
            if not isinstance(raw[name], kind) or isinstance(raw[name], bool):
                raise InvalidPage(f"manifest: {name} must be {kind.__name__}")
        if raw["format"] != FORMAT_VERSION:
            raise InvalidPage(f"manifest: unsupported format {raw['format']}")
        if not 0 < raw["train_pages"] <= raw["total_pages"] == len(raw["page_sha256"]):
            raise InvalidPage("manifest: page counts are inconsistent")
        if min(raw["sequence_length"], raw["rows_per_page"], raw["vocab_size"]) <= 0:
            raise InvalidPage("manifest: sizes must be positive")
        if raw["rows_per_page"] * raw["sequence_length"] > MAX_PAGE_TOKENS or raw["vocab_size"] > MAX_VOCAB:
            raise InvalidPage(f"manifest: pages of at most {MAX_PAGE_TOKENS} tokens from a vocabulary of at most "
                              f"{MAX_VOCAB}")  # else a page's decoding would be sized by whoever wrote the manifest
        if not all(isinstance(digest, str) and len(digest) == 64 for digest in raw["page_sha256"]):
            raise InvalidPage("manifest: page_sha256 must hold sha256 hex digests")
        return cls(**raw)


@dataclass(frozen=True)
class Dataset:
    """A dataset bucket and its validated manifest."""

    bucket: Bucket
    manifest: Manifest

    @classmethod
    def open(cls, bucket: Bucket) -> Dataset:
        return cls(bucket, read_manifest(bucket))

    @property
    def vocab_size(self) -> int:
        return self.manifest.vocab_size

    def tokens(self, pages: list[int]) -> torch.Tensor:
        """The pages' token ids stacked in the order given: (len(pages) · rows_per_page, sequence_length) int64."""
        return load_pages(self.bucket, self.manifest, pages)

    def miner_pages(self, window: int, uid: int, count: int) -> list[int]:
        """The training pages `uid` must use in `window` (pages_for over the training pages)."""
        return pages_for(window, uid, count, self.manifest.train_pages)

    def held_out_tokens(self, count: int) -> torch.Tensor:
        """The first `count` held-out pages: what held-out loss is measured on."""
        return self.tokens(self.manifest.held_out[:count])


# ---------------------------------------------------------------------------------------------------- building
def build_dataset(bucket: Bucket, *, sequence_length: int, vocab_size: int = 4096, rows_per_page: int = 2,
                  held_out_pages: int = 16, max_chars: int | None = None) -> Manifest:
    """Train the tokenizer on the bundled corpus, write every page, the tokenizer and (last) the manifest.

    Deterministic: the same arguments on the same Python give byte-identical objects.
    """
    documents = corpus.documents(max_chars)
    tokenizer_json = train_tokenizer(documents, vocab_size).to_str().encode()
    tokenizer = load_tokenizer(tokenizer_json)
    stream: list[int] = []
    for ids in tokenizer(documents)["input_ids"]:
        stream.extend(ids)
        stream.append(tokenizer.eos_token_id)
    sequences = torch.tensor(stream[: len(stream) // sequence_length * sequence_length], dtype=torch.int32)
    sequences = sequences.reshape(-1, sequence_length)  # (n_sequences, sequence_length)
    total_pages = sequences.shape[0] // rows_per_page
    if total_pages <= held_out_pages:
        raise ValueError(f"corpus gives only {total_pages} pages; need more than {held_out_pages} held-out pages")
    digests = []
    for page in range(total_pages):
        rows = sequences[page * rows_per_page:(page + 1) * rows_per_page]
        data = _page_bytes(rows, tokenizer.batch_decode(rows.tolist()))
        bucket.put(page_key(page), data)
        digests.append(hashlib.sha256(data).hexdigest())
    bucket.put(TOKENIZER_KEY, tokenizer_json)
    manifest = Manifest(total_pages=total_pages, train_pages=total_pages - held_out_pages,
                        sequence_length=sequence_length, rows_per_page=rows_per_page,
                        vocab_size=tokenizer.vocab_size, tokenizer_sha256=hashlib.sha256(tokenizer_json).hexdigest(),
                        page_sha256=digests)
    bucket.put(MANIFEST_KEY, manifest.to_json())
    return manifest


def _page_bytes(rows: torch.Tensor, texts: list[str]) -> bytes:
    table = pa.table({"tokens": pa.array(rows.tolist(), type=pa.list_(pa.int32())), "text": pa.array(texts)})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


# ---------------------------------------------------------------------------------------------------- reading
def read_manifest(bucket: Bucket) -> Manifest:
    return Manifest.from_json(bucket.get(MANIFEST_KEY, max_bytes=MAX_MANIFEST_BYTES))


def read_tokenizer(bucket: Bucket, manifest: Manifest):
    data = bucket.get(TOKENIZER_KEY, max_bytes=MAX_MANIFEST_BYTES)
    if hashlib.sha256(data).hexdigest() != manifest.tokenizer_sha256:
        raise InvalidPage("tokenizer.json: sha256 does not match the manifest")
    return load_tokenizer(data)


def load_page(bucket: Bucket, manifest: Manifest, page: int) -> torch.Tensor:
    """Token ids of one page, (rows_per_page, sequence_length) int64, after checking its sha256 and contents."""
    if not 0 <= page < manifest.total_pages:
        raise InvalidPage(f"page {page}: outside [0, {manifest.total_pages})")
    data = bucket.get(page_key(page), max_bytes=MAX_PAGE_BYTES)
    if hashlib.sha256(data).hexdigest() != manifest.page_sha256[page]:
        raise InvalidPage(f"page {page}: sha256 does not match the manifest")
    return parse_page(data, manifest)


def parse_page(data: bytes, manifest: Manifest) -> torch.Tensor:
    """Validate and decode the parquet bytes of a page: (rows_per_page, sequence_length) int64."""
    expected_values = manifest.rows_per_page * manifest.sequence_length
    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
        metadata = parquet.metadata
        # decompression bomb guard: the footer says how much the column chunks expand to; refuse before decoding
        expanded = sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups))
        values = sum(metadata.row_group(i).column(j).num_values for i in range(metadata.num_row_groups)
                     for j in range(metadata.num_columns) if metadata.row_group(i).column(j).path_in_schema
                     .startswith("tokens"))
    except Exception as error:  # pyarrow raises many types for corrupt input; all mean "not a page"
        raise InvalidPage(f"page: unreadable parquet ({type(error).__name__})") from None
    if metadata.num_rows != manifest.rows_per_page:
        raise InvalidPage(f"page: {metadata.num_rows} rows, expected {manifest.rows_per_page}")
    if values != expected_values:
        raise InvalidPage(f"page: {values} token values declared, expected {expected_values}")
    if expanded > MAX_PAGE_EXPANSION * (expected_values * 4 + 64 * 1024):
        raise InvalidPage(f"page: decompresses to {expanded} bytes, far more than a page holds")
    try:
        column = parquet.read(columns=["tokens"]).column("tokens").combine_chunks()
        flat = column.flatten()  # the ids of every row, back to back: numpy, not a Python int per token
        if not pa.types.is_integer(flat.type) or len(flat) != expected_values or column.null_count or flat.null_count:
            raise InvalidPage(f"page: expected {expected_values} token ids")
        lengths = np.diff(column.offsets.to_numpy())
        if (lengths != manifest.sequence_length).any():
            raise InvalidPage(f"page: rows of {sorted(set(lengths.tolist()))[:3]} tokens, expected "
                              f"{manifest.sequence_length}")
        tokens = torch.from_numpy(flat.to_numpy().astype(np.int64)).view(manifest.rows_per_page,
                                                                         manifest.sequence_length)
    except InvalidPage:
        raise
    except Exception as error:  # pyarrow raises many types for corrupt input; all mean "not a page"
        raise InvalidPage(f"page: unreadable parquet ({type(error).__name__})") from None
    if tuple(tokens.shape) != (manifest.rows_per_page, manifest.sequence_length):
        raise InvalidPage(f"page: shape {tuple(tokens.shape)}, expected "
                          f"{(manifest.rows_per_page, manifest.sequence_length)}")
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= manifest.vocab_size):
        raise InvalidPage("page: token id outside the vocabulary")
    return tokens


def load_pages(bucket: Bucket, manifest: Manifest, pages: list[int]) -> torch.Tensor:
    """Several pages stacked: (len(pages) * rows_per_page, sequence_length) int64, in the order given."""
    return torch.cat([load_page(bucket, manifest, page) for page in pages])


# ---------------------------------------------------------------------------------------------------- selection
def _generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from sha256 of the parts: independent streams for different tags/windows/uids."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _choose(n: int, total: int, generator: torch.Generator) -> list[int]:
    if not 0 < n <= total:
        raise ValueError(f"cannot choose {n} distinct pages out of {total}")
    return torch.randperm(total, generator=generator)[:n].tolist()


def pages_for(window: int, uid: int, pages_per_window: int, total_pages: int) -> list[int]:
    """The pages miner `uid` trains on in `window`: distinct ids in [0, total_pages), deterministic."""
    return _choose(pages_per_window, total_pages, _generator("pages", window, uid))


def random_pages(window: int, seed: int, n: int, total_pages: int) -> list[int]:
    """Pages a validator (identified by `seed`, e.g. its uid) compares against in `window`; independent of
    every miner's `pages_for` stream."""
    return _choose(n, total_pages, _generator("random", window, seed))
