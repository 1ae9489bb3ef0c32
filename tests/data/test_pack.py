"""Packing: round trip, dtype choice, batches as a pure function of (seed, step)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.data.pack import TokenWindows, ids_dtype, pack_corpus, unigram_entropy
from lmforge.tokenizer import train_bpe

TEXTS = [f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(60)]


def _corpus(tmp: Path) -> Path:
    d = tmp / "corpus"
    d.mkdir()
    for split, texts in (("train", TEXTS[:50]), ("val", TEXTS[50:])):
        (d / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return d


def test_dtype_choice() -> None:
    assert ids_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert ids_dtype(65537) == np.uint32
    assert ids_dtype(50257) == np.uint16


def test_pack_round_trip_and_reuse(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    tok = train_bpe(TEXTS, 300, ["<eos>"], min_frequency=1)
    m = pack_corpus(corpus, tok, 300, 0, tmp_path / "pack")
    assert m["dtype"] == "uint16" and m["splits"]["train"]["documents"] == 50
    assert m["splits"]["val"]["bytes"] == sum(len(t.encode()) for t in TEXTS[50:])
    ids = np.fromfile(tmp_path / "pack" / "train.bin", dtype=np.uint16)
    assert len(ids) == m["splits"]["train"]["tokens"]
    docs = np.split(ids, np.flatnonzero(ids == 0) + 1)[:-1]  # eos (id 0) ends every document
    assert [tok.decode(d[:-1].tolist()) for d in docs] == TEXTS[:50]
    mtime = (tmp_path / "pack" / "train.bin").stat().st_mtime_ns
    assert pack_corpus(corpus, tok, 300, 0, tmp_path / "pack") == m  # unchanged sources: reused
    assert (tmp_path / "pack" / "train.bin").stat().st_mtime_ns == mtime
    with open(corpus / "val.jsonl", "a") as f:
        f.write(json.dumps({"text": "x = 1\n"}) + "\n")
    assert pack_corpus(corpus, tok, 300, 0, tmp_path / "pack")["splits"]["val"]["documents"] == 11


def test_pack_uint32_for_large_vocab(tmp_path: Path) -> None:
    corpus = _corpus(tmp_path)
    tok = train_bpe(TEXTS, 300, ["<eos>"], min_frequency=1)
    m = pack_corpus(corpus, tok, 70_000, 0, tmp_path / "pack")
    assert m["dtype"] == "uint32"
    assert (tmp_path / "pack" / "val.bin").stat().st_size == 4 * m["splits"]["val"]["tokens"]


def test_batches_are_pure_in_seed_and_step(tmp_path: Path) -> None:
    (np.arange(1000) % 500).astype(np.uint16).tofile(tmp_path / "t.bin")
    w = TokenWindows(tmp_path / "t.bin", "uint16", 16)
    b = w.batch(0, 7, 4)
    assert b.shape == (4, 17) and b.dtype == torch.int64
    assert torch.equal(b, TokenWindows(tmp_path / "t.bin", "uint16", 16).batch(0, 7, 4))
    assert not torch.equal(b, w.batch(0, 8, 4)) and not torch.equal(b, w.batch(1, 7, 4))
    assert torch.all((b[:, 1:] - b[:, :-1]) % 500 == 1)  # contiguous windows of the stream
    # accumulation splits the same windows: 8 rows at once == 8 rows later split 1 by 1
    assert torch.equal(torch.cat(list(w.batch(3, 2, 8).split(1))), w.batch(3, 2, 8))


def test_eval_windows_do_not_overlap(tmp_path: Path) -> None:
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "t.bin")
    w = TokenWindows(tmp_path / "t.bin", "uint16", 9)
    rows = torch.cat(w.eval_batches(100, 4))
    assert rows.shape == (100, 10)  # 1000 // 10 windows fit exactly
    starts = rows[:, 0].tolist()
    assert starts == sorted(starts) and all(b - a >= 10 for a, b in zip(starts, starts[1:]))


def test_unigram_entropy_closed_form() -> None:
    assert unigram_entropy(np.array([5, 5, 0])) == pytest.approx(math.log(2))
    assert unigram_entropy(np.array([1, 1, 2])) == pytest.approx(1.5 * math.log(2))
    assert unigram_entropy(np.array([7])) == 0.0
