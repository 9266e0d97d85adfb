"""Data: bundled corpus, offline BPE tokenizer, parquet page store and deterministic page selection."""

from templar_lib.data.pages import (Dataset, InvalidPage, Manifest, build_dataset, load_page, load_pages, pages_for,
                                    random_pages, read_manifest, read_tokenizer)
from templar_lib.data.tokenizer import load_tokenizer, train_tokenizer

__all__ = ["Dataset", "Manifest", "InvalidPage", "build_dataset", "load_page", "load_pages", "pages_for",
           "random_pages",
           "read_manifest", "read_tokenizer", "load_tokenizer", "train_tokenizer"]
