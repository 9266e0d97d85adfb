import io

import pandas as pd
import pytest
import torch

from templar_lib.buckets import LocalBucket
from templar_lib.data import (InvalidPage, Manifest, build_dataset, load_page, pages_for, random_pages, read_manifest,
                              read_tokenizer)
from templar_lib.data.pages import page_key, parse_page


def test_tokenizer_round_trips_text(dataset):
    tokenizer = read_tokenizer(dataset, read_manifest(dataset))
    text = "Return the number of items in a container.\n\n    def f(x):  # ünïcode ✓\n        return x ** 2\n"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) < len(text) / 2  # BPE merges, not bytes
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id != tokenizer.pad_token_id


def test_pages_are_valid_and_deterministic(dataset, tmp_path):
    manifest = read_manifest(dataset)
    page = load_page(dataset, manifest, 3)
    assert page.shape == (manifest.rows_per_page, manifest.sequence_length) and page.dtype == torch.int64
    assert 0 <= int(page.min()) and int(page.max()) < manifest.vocab_size
    frame = pd.read_parquet(io.BytesIO(dataset.get(page_key(3))))
    assert list(frame.columns) == ["tokens", "text"] and len(frame["text"][0]) > 100
    rebuilt = LocalBucket(tmp_path)
    assert build_dataset(rebuilt, sequence_length=128, max_chars=300_000, held_out_pages=8) == manifest
    assert rebuilt.get(page_key(3)) == dataset.get(page_key(3))


def test_page_selection_is_deterministic_and_differs_across_uids_and_windows():
    chosen = pages_for(10, 1, 6, 1000)
    assert chosen == pages_for(10, 1, 6, 1000)
    assert len(set(chosen)) == 6 and all(0 <= p < 1000 for p in chosen)
    assert chosen != pages_for(10, 2, 6, 1000)
    assert chosen != pages_for(11, 1, 6, 1000)
    assert random_pages(10, 1, 6, 1000) == random_pages(10, 1, 6, 1000)
    assert random_pages(10, 1, 6, 1000) != chosen  # an independent stream
    different = {tuple(pages_for(w, u, 6, 1000)) for w in range(20) for u in range(20)}
    assert len(different) == 400
    with pytest.raises(ValueError):
        pages_for(0, 0, 7, 6)


def test_tampered_or_malformed_pages_are_rejected(dataset, tmp_path):
    manifest = read_manifest(dataset)
    copy = LocalBucket(tmp_path)
    copy.put(page_key(0), dataset.get(page_key(1)))
    with pytest.raises(InvalidPage, match="sha256"):
        load_page(copy, manifest, 0)
    with pytest.raises(InvalidPage, match="outside"):
        load_page(dataset, manifest, manifest.total_pages)
    with pytest.raises(InvalidPage, match="unreadable parquet"):
        parse_page(b"PAR1 not really", manifest)
    out_of_vocab = io.BytesIO()
    pd.DataFrame({"tokens": [[manifest.vocab_size] * manifest.sequence_length] * manifest.rows_per_page}
                 ).to_parquet(out_of_vocab)
    with pytest.raises(InvalidPage, match="vocabulary"):
        parse_page(out_of_vocab.getvalue(), manifest)
    with pytest.raises(InvalidPage, match="page counts"):
        Manifest.from_json(manifest.to_json().replace(b'"train_pages": ', b'"train_pages": 9999'))


def test_a_manifest_cannot_size_a_page_beyond_what_its_bytes_can_hold_and_rows_must_be_whole(dataset):
    """Whoever writes the dataset bucket's manifest sets the shape every page is decoded to: bounded by what a page
    within its byte limit can hold, and each row must be exactly sequence_length ids of an integer type."""
    manifest = read_manifest(dataset)
    text = manifest.to_json()
    huge = text.replace(f'"sequence_length": {manifest.sequence_length}'.encode(), b'"sequence_length": 400000000')
    assert huge != text
    with pytest.raises(InvalidPage, match="at most"):
        Manifest.from_json(huge)
    rows, length = manifest.rows_per_page, manifest.sequence_length
    assert rows == 2  # one row one id longer, the other one shorter: the right count of ids in all
    for tokens, reason in [([[1] * (length + 1), [1] * (length - 1)], "rows of"),
                           ([[str(i) for i in range(length)]] * rows, "token ids|unreadable")]:
        page = io.BytesIO()
        pd.DataFrame({"tokens": tokens}).to_parquet(page)
        with pytest.raises(InvalidPage, match=reason):
            parse_page(page.getvalue(), manifest)
