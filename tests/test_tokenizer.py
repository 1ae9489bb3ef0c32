"""Tokenizer: byte-level BPE round trips any text; bytes/token by hand; unfillable vocab;
long runs cannot hang training, and a signal stops it at once."""

from __future__ import annotations

import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from lmforge.errors import UserError
from lmforge.tokenizer import RunGuard, bytes_per_token, save_tokenizer, train_bpe
from tests.conftest import ROOT, spawn

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


def test_run_guard_splits_only_long_runs_and_loses_nothing() -> None:
    guard = RunGuard(max_run=10)
    texts = ["short words only", "x" * 25 + " tail", " " * 11, "ab" * 5]
    pieces = list(guard(texts))
    assert "".join(pieces) == "".join(texts)  # the trainer sees every character
    assert guard.split == 2  # the 25 x's and the 11 spaces; "abab..." is exactly 10
    for p in pieces:
        assert not re.search(r"\S{11,}|\s{11,}", p)
    assert pieces[:2] == ["short words only", "x" * 10]


def test_a_200k_run_of_one_character_trains_in_seconds() -> None:
    guard = RunGuard()
    t0 = time.perf_counter()
    tok = train_bpe([*TEXTS, "a" * 200_000, "=" * 200_000], 280, ["<s>"], 1, guard=guard)
    took = time.perf_counter() - t0
    assert guard.split == 2 and tok.get_vocab_size() == 280
    # unguarded this is ~45 s (BPE time grows with the square of a word's length)
    assert took < 10, took


SIGNAL_SCRIPT = """
import sys
import lmforge.tokenizer as T
T.MAX_RUN = 10**9  # no guard: training a 400k-character word takes minutes
from lmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)],
                         ids=["sigint", "sigterm"])
def test_a_signal_stops_bpe_training_at_once(tmp_path: Path, sig: int, code: int) -> None:
    corpus, out = tmp_path / "corpus", tmp_path / "tok"
    corpus.mkdir()
    for split in ("train", "val"):
        rows = [{"text": t} for t in TEXTS] + [{"text": "a" * 400_000}]
        (corpus / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = spawn([sys.executable, "-c", SIGNAL_SCRIPT, "tokenizer", f"corpus={corpus}",
                  f"run.dir={out}", "vocab_size=300"], cwd=ROOT)
    try:
        assert proc.stdout is not None
        assert "training byte-level BPE" in proc.stdout.readline()
        time.sleep(1.0)  # well inside training
        sent = time.perf_counter()
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert time.perf_counter() - sent < 5
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (out / "summary.json").exists() and not (out / "final").exists()
    assert not list(out.glob(".final*"))  # no half-written tokenizer either


def test_micro_llama_ids_match_the_test_tokenizers(chat_tok) -> None:
    from tests.conftest import micro_llama

    conf = micro_llama().config
    assert (conf.bos_token_id, conf.eos_token_id, conf.pad_token_id) == (
        chat_tok.bos_token_id, chat_tok.eos_token_id, chat_tok.pad_token_id)
