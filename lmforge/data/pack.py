"""Tokenize a corpus split into a flat memmap of ids, and cut training windows from it.

Batches are a pure function of (seed, step): resuming at step k sees exactly the windows an
uninterrupted run would, and accumulation splits the same windows whatever the micro-batch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.data.sources import iter_corpus
from lmforge.errors import UserError
from lmforge.io import atomic_file, atomic_write_json, sha256_file
from lmforge.tokenizer import batched


def ids_dtype(vocab_size: int) -> np.dtype[Any]:
    """uint16 halves disk and page-cache use whenever every id fits in 16 bits."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_ids(
    texts: Iterable[str], tok: Tokenizer, eos_id: int, out: Path, dtype: np.dtype[Any],
    chunk: int = 512,
) -> tuple[int, int, int]:
    """Encode `texts` (eos after each document) into `out`; returns (tokens, documents, bytes)."""
    n_tokens = n_docs = n_bytes = 0
    with atomic_file(out, "wb") as f:
        for buf in batched(texts, chunk):
            n_bytes += sum(len(t.encode("utf-8")) for t in buf)
            for enc in tok.encode_batch(buf, add_special_tokens=False):
                arr = np.asarray([*enc.ids, eos_id], dtype=dtype)
                f.write(arr.tobytes())
                n_tokens += arr.size
            n_docs += len(buf)
    return n_tokens, n_docs, n_bytes


def pack_corpus(
    corpus_dir: Path, tok: Tokenizer, vocab_size: int, eos_id: int, out_dir: Path,
    tokenizer_file: Path | None = None,
) -> dict[str, Any]:
    """Pack train/val of a corpus stage into `out_dir`; reuse it when the sources are unchanged."""
    sources = {f"{s}.jsonl": sha256_file(corpus_dir / f"{s}.jsonl") for s in ("train", "val")
               if (corpus_dir / f"{s}.jsonl").exists()}
    if len(sources) != 2:
        raise UserError(f"corpus dir {corpus_dir} lacks train.jsonl/val.jsonl (run the corpus stage)")
    if tokenizer_file is not None:
        sources["tokenizer.json"] = sha256_file(tokenizer_file)
    manifest_path = out_dir / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old.get("sources") == sources and old.get("vocab_size") == vocab_size:
            return old  # type: ignore[no-any-return]
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = ids_dtype(vocab_size)
    splits = {}
    for split in ("train", "val"):
        n_tok, n_doc, n_bytes = write_ids(iter_corpus(corpus_dir, split), tok, eos_id,
                                          out_dir / f"{split}.bin", dtype)
        splits[split] = {"file": f"{split}.bin", "tokens": n_tok, "documents": n_doc,
                         "bytes": n_bytes}
    manifest = {"dtype": dtype.name, "vocab_size": vocab_size, "eos_id": eos_id,
                "splits": splits, "sources": sources}
    atomic_write_json(manifest_path, manifest)  # written last: its presence means complete
    return manifest


class TokenWindows:
    """(B, T+1) windows from a packed split: inputs are [:, :-1], targets [:, 1:]."""

    def __init__(self, path: Path, dtype: str, seq_len: int) -> None:
        self.data = np.memmap(path, dtype=np.dtype(dtype), mode="r")
        self.seq_len = seq_len
        if len(self.data) < seq_len + 2:
            raise UserError(
                f"{path}: {len(self.data)} tokens, fewer than one window of seq_len={seq_len}+1"
            )

    @classmethod
    def from_manifest(cls, pack_dir: Path, split: str, seq_len: int) -> TokenWindows:
        m = json.loads((pack_dir / "manifest.json").read_text())
        return cls(pack_dir / m["splits"][split]["file"], m["dtype"], seq_len)

    def _rows(self, starts: Iterable[int]) -> torch.Tensor:
        n = self.seq_len + 1
        rows = np.stack([np.asarray(self.data[s : s + n], dtype=np.int64) for s in starts])
        return torch.from_numpy(rows)

    def batch(self, seed: int, step: int, batch_size: int) -> torch.Tensor:
        """The training batch of optimizer step `step`: random windows, pure in (seed, step)."""
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(self.data) - self.seq_len - 1, size=batch_size)
        return self._rows(starts.tolist())  # (B, T+1)

    def eval_batches(self, n_batches: int, batch_size: int) -> list[torch.Tensor]:
        """Non-overlapping windows spread evenly over the split: the same every evaluation."""
        n = self.seq_len + 1
        total = min(n_batches * batch_size, len(self.data) // n)
        stride = (len(self.data) - n) // max(total - 1, 1) if total > 1 else 0
        starts = [i * max(stride, n) for i in range(total)]
        starts = [s for s in starts if s + n <= len(self.data)]
        return [self._rows(starts[i : i + batch_size]) for i in range(0, len(starts), batch_size)]

    def token_counts(self, vocab_size: int) -> np.ndarray:
        return np.bincount(np.asarray(self.data, dtype=np.int64), minlength=vocab_size)


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy (nats/token) of the empirical token distribution: the loss of the best model
    that ignores context. A language model earns its keep below this line."""
    p = counts[counts > 0].astype(np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())
