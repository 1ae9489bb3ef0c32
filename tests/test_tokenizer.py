"""Tokenizer: byte-level BPE round trips any text; bytes/token by hand; unfillable vocab."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lmforge.errors import UserError
from lmforge.tokenizer import bytes_per_token, save_tokenizer, train_bpe

TEXTS = ["def add(a, b):\n    return a + b\n", "print('héllo wörld')  # ünïcode\n"] * 30


def test_round_trip_any_text_and_special_tokens(tmp_path: Path) -> None:
    tok = train_bpe(TEXTS, 280, ["<|endoftext|>", "<|pad|>", "<|user|>"], min_frequency=1)
    fast = save_tokenizer(tok, tmp_path, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                          pad_token="<|pad|>", extra_special_tokens=["<|user|>"])
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("never seen: 漢字 🙂 \t\r\n", *TEXTS[:2]):
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text  # byte-level: nothing is unknown, nothing is lost
    assert loaded.convert_tokens_to_ids("<|user|>") == 2
    assert loaded("<|user|>hi", add_special_tokens=False)["input_ids"][0] == 2  # kept whole
    assert loaded.eos_token_id == fast.eos_token_id == 0 and loaded.pad_token_id == 1
    assert len(loaded) == 280


def test_bytes_per_token_by_hand() -> None:
    tok = train_bpe(["ab" * 50] * 10, 256 + 1 + 1, ["<s>"], min_frequency=1)  # bytes, <s>, "ab"
    ratio, n_bytes, n_tokens = bytes_per_token(tok, ["abab", "abx"])
    assert (n_bytes, n_tokens) == (7, 4)  # [ab, ab] + [ab, x]
    assert ratio == pytest.approx(7 / 4)


def test_vocab_the_corpus_cannot_fill() -> None:
    with pytest.raises(UserError, match=r"vocab_size=5000 cannot be filled: .* only \d+ tokens"):
        train_bpe(TEXTS, 5000, ["<s>"], min_frequency=2)
