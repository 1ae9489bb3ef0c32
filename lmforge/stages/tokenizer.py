"""Tokenizer stage: byte-level BPE on the corpus train split; bytes per token on val."""

from __future__ import annotations

from typing import Any

from lmforge.config import TokenizerCfg
from lmforge.data.sources import iter_corpus
from lmforge.errors import UserError
from lmforge.io import atomic_dir
from lmforge.tokenizer import RunGuard, bytes_per_token, save_tokenizer, train_bpe


def main(cfg: TokenizerCfg) -> dict[str, Any]:
    if cfg.corpus is None:
        raise UserError("tokenizer: set `corpus` to a corpus stage directory")
    specials = [cfg.bos_token, cfg.eos_token, cfg.pad_token, *cfg.extra_special_tokens]
    if len(set(specials)) != len(specials):
        raise UserError(f"tokenizer: special tokens must be distinct, got {specials}")
    print(f"tokenizer: training byte-level BPE, vocab {cfg.vocab_size}, on {cfg.corpus}/train.jsonl")
    guard = RunGuard()
    tok = train_bpe(
        iter_corpus(cfg.corpus, "train", cfg.max_train_bytes),
        cfg.vocab_size, specials, cfg.min_frequency, guard=guard,
    )
    if guard.split:
        print(f"tokenizer: split {guard.split} runs of over {guard.max_run} characters without "
              "a break into pieces (BPE time grows with the square of a word's length)")
    final = cfg.run.dir / "final"
    with atomic_dir(final) as tmp:
        save_tokenizer(
            tok, tmp, bos_token=cfg.bos_token, eos_token=cfg.eos_token, pad_token=cfg.pad_token,
            extra_special_tokens=list(cfg.extra_special_tokens),
        )
    bpt, n_bytes, n_tokens = bytes_per_token(tok, iter_corpus(cfg.corpus, "val"))
    train_bpt, _, _ = bytes_per_token(tok, iter_corpus(cfg.corpus, "train", 2_000_000))
    print(f"tokenizer: {bpt:.3f} bytes/token on val ({n_bytes:,} bytes -> {n_tokens:,} tokens)")
    return {
        "vocab_size": tok.get_vocab_size(),
        "special_tokens": specials,
        "long_runs_split": guard.split,  # runs of > max_run chars cut up before training
        "max_run": guard.max_run,
        "val_bytes_per_token": round(bpt, 4),
        "train_bytes_per_token": round(train_bpt, 4),
        "val_bytes": n_bytes,
        "val_tokens": n_tokens,
        "tokenizer_dir": str(final),
    }
