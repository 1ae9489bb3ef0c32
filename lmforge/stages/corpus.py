"""The corpus stage: raw files -> clean, deduplicated train.jsonl + val.jsonl.

read sources -> unicode normalization -> size filters -> exact dedup -> near dedup (MinHash +
LSH, verified) -> split by document hash -> write. Every step's drop count lands in
summary.json, so a surprising corpus size can be traced to the step that caused it.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Any, Literal

from lmforge.config import CorpusCfg
from lmforge.data.dedup import exact_dedup, lsh_threshold, near_dedup
from lmforge.data.sources import Document, default_sources, describe_sources, read_sources
from lmforge.errors import UserError
from lmforge.io import atomic_file


def normalize(docs: list[Document], form: Literal["NFC", "NFKC", "none"]) -> list[Document]:
    if form == "none":
        return docs
    # NFC at least: the same visible text must have one byte sequence, or dedup and the
    # tokenizer see two different strings.
    return [Document(unicodedata.normalize(form, d.text), d.source) for d in docs]


def in_val(text: str, seed: int, val_fraction: float) -> bool:
    """A document's split depends only on its own text (and the seed): adding or removing other
    documents never moves it, so val stays comparable across corpus versions."""
    digest = hashlib.sha256(f"lmforge-split:{seed}:".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < val_fraction * 2**64


def write_jsonl(path: Path, docs: list[Document]) -> int:
    """Write atomically (temp name, then rename) and return the UTF-8 bytes of the texts."""
    n_bytes = 0
    with atomic_file(path) as f:
        for d in docs:
            f.write(json.dumps({"text": d.text, "source": d.source}, ensure_ascii=False) + "\n")
            n_bytes += len(d.text.encode("utf-8"))
    return n_bytes


def main(cfg: CorpusCfg) -> dict[str, Any]:
    sources = cfg.sources or default_sources()
    described = describe_sources(sources)
    print(f"corpus: sources: {'; '.join(described)}" + ("" if cfg.sources else " (embedded default)"))

    read = read_sources(sources, cfg.extensions)
    print(f"corpus: read {read.files_seen} files -> {len(read.documents)} documents "
          f"({len(read.undecodable)} undecodable skipped)")

    docs = normalize(read.documents, cfg.normalize)
    too_short = sum(len(d.text) < cfg.min_chars for d in docs)
    too_long = sum(len(d.text) > cfg.max_chars for d in docs)
    docs = [d for d in docs if cfg.min_chars <= len(d.text) <= cfg.max_chars]
    print(f"corpus: size filter [{cfg.min_chars}, {cfg.max_chars}] chars: "
          f"dropped {too_short} too short, {too_long} too long")
    if not docs:
        raise UserError(
            f"no document survives the size filters ({len(read.documents)} read, {too_short} "
            f"shorter than min_chars={cfg.min_chars}, {too_long} longer than max_chars={cfg.max_chars})"
        )

    n_before = len(docs)
    docs = [docs[i] for i in exact_dedup([d.text for d in docs])]
    exact_duplicates = n_before - len(docs)

    lsh: dict[str, Any] | None = None
    near_duplicates = 0
    if cfg.near_dedup:
        near = near_dedup(
            [d.text for d in docs], threshold=cfg.jaccard_threshold, num_perm=cfg.num_perm,
            shingle_words=cfg.shingle_words, seed=cfg.seed,
        )
        docs = [docs[i] for i in near.keep]
        near_duplicates = near.removed
        lsh = {
            "bands": near.bands, "rows": near.rows,
            "s_curve_point": round(lsh_threshold(near.bands, near.rows), 4),
            "candidate_pairs": near.candidate_pairs, "verified_pairs": near.verified_pairs,
        }
    print(f"corpus: dedup: {exact_duplicates} exact, {near_duplicates} near duplicates removed"
          + (f" (LSH {lsh['bands']}x{lsh['rows']}, {lsh['candidate_pairs']} candidate pairs)" if lsh else ""))

    is_val = [in_val(d.text, cfg.seed, cfg.val_fraction) for d in docs]
    val = [d for d, v in zip(docs, is_val, strict=True) if v]
    train = [d for d, v in zip(docs, is_val, strict=True) if not v]
    if not val or not train:
        empty, full = ("val", "train") if not val else ("train", "val")
        raise UserError(
            f"the split leaves {empty} empty: all {len(docs)} documents hash into {full} "
            f"(val_fraction={cfg.val_fraction}); add documents or change val_fraction"
        )

    out = cfg.run.dir
    train_bytes = write_jsonl(out / "train.jsonl", train)
    val_bytes = write_jsonl(out / "val.jsonl", val)
    print(f"corpus: wrote {len(train)} train docs ({train_bytes:,} bytes), "
          f"{len(val)} val docs ({val_bytes:,} bytes) -> {out}")

    return {
        "sources": described,
        "files_seen": read.files_seen,
        "documents_read": len(read.documents),
        "undecodable_skipped": len(read.undecodable),
        "undecodable_files": read.undecodable[:20],  # the first few, to find the culprit fast
        "too_short": too_short,
        "too_long": too_long,
        "exact_duplicates": exact_duplicates,
        "near_duplicates": near_duplicates,
        "lsh": lsh,
        "train_docs": len(train),
        "val_docs": len(val),
        "train_bytes": train_bytes,  # UTF-8 bytes of the document texts, not of the JSON
        "val_bytes": val_bytes,
    }
