"""The corpus stage: raw files -> clean, deduplicated train.jsonl + val.jsonl.

read sources -> unicode normalization -> size filters -> exact dedup -> near dedup (MinHash +
LSH, verified) -> decontamination against evaluation files (13-gram overlap, off by default)
-> split by document hash -> write. Every step's drop count lands in summary.json, so a
surprising corpus size can be traced to the step that caused it.
"""

from __future__ import annotations

import hashlib
import json
import unicodedata
from pathlib import Path
from typing import Any, Literal

from lmforge.config import CorpusCfg, DecontaminateCfg
from lmforge.data.dedup import exact_dedup, lsh_threshold, near_dedup
from lmforge.data.sources import Document, default_sources, describe_sources, read_sources
from lmforge.errors import UserError
from lmforge.eval.contamination import build_index, eval_texts_from_file, scan_index
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


def dedup(
    docs: list[Document], cfg: CorpusCfg
) -> tuple[list[Document], int, int, dict[str, Any] | None]:
    """Exact, then near dedup: (kept docs, exact removed, near removed, LSH stats or None)."""
    n_before = len(docs)
    docs = [docs[i] for i in exact_dedup([d.text for d in docs])]
    exact_duplicates = n_before - len(docs)
    if not cfg.near_dedup:
        return docs, exact_duplicates, 0, None
    near = near_dedup(
        [d.text for d in docs], threshold=cfg.jaccard_threshold, num_perm=cfg.num_perm,
        shingle_words=cfg.shingle_words, seed=cfg.seed,
    )
    lsh = {
        "bands": near.bands, "rows": near.rows,
        "s_curve_point": round(lsh_threshold(near.bands, near.rows), 4),
        "candidate_pairs": near.candidate_pairs, "verified_pairs": near.verified_pairs,
    }
    return [docs[i] for i in near.keep], exact_duplicates, near.removed, lsh


def load_eval_sets(cfg: DecontaminateCfg) -> dict[str, list[tuple[str, str]]]:
    """The evaluation files' (id, text) items, keyed by path as given; read before the corpus
    so a wrong path fails in a second, not after a long read and dedup."""
    eval_sets: dict[str, list[tuple[str, str]]] = {}
    for i, path in enumerate(cfg.against):
        if not path.is_file():
            raise UserError(f"decontaminate.against.{i}: evaluation file not found: {path}")
        eval_sets[str(path)] = eval_texts_from_file(path, cfg.fields)
    return eval_sets


def decontaminate(
    docs: list[Document], eval_sets: dict[str, list[tuple[str, str]]], cfg: DecontaminateCfg,
    out: Path,
) -> tuple[list[Document], dict[str, Any] | None]:
    """Drop every document sharing an n-gram with an evaluation item (None: turned off).

    It runs after dedup (fewer documents to scan) and before the split, so neither train nor
    val keeps a benchmark's text: val perplexity on a leaked item is as misleading as training
    on it. Each dropped document and the items it matched go to decontamination.jsonl.
    """
    if not cfg.against:
        return docs, None
    index = build_index(eval_sets, cfg.n, cfg.min_words)
    # Positions as ids: a source names its document, but two sources may name one file.
    report = scan_index(((str(i), d.text) for i, d in enumerate(docs)), index)
    dropped = {int(m.doc_id) for m in report.docs}
    with atomic_file(out / "decontamination.jsonl") as f:
        for m in report.docs:
            row = {"doc": docs[int(m.doc_id)].source, "items": m.items}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    by_set = {s.name: sum(s.name in m.items for m in report.docs) for s in report.sets}
    print(f"corpus: decontamination ({cfg.n}-grams, {len(index.items)} eval items checked): "
          f"dropped {len(dropped)} docs" + "".join(f"; {k}: {v}" for k, v in by_set.items()))
    summary = {
        "n": cfg.n, "min_words": cfg.min_words, "dropped_docs": len(dropped),
        "dropped_by_set": by_set,
        "sets": {s.name: {"items": s.items, "checked": s.checked, "too_short": s.too_short,
                          "contaminated_items": len(s.contaminated)} for s in report.sets},
    }
    return [d for i, d in enumerate(docs) if i not in dropped], summary


def main(cfg: CorpusCfg) -> dict[str, Any]:
    eval_sets = load_eval_sets(cfg.decontaminate)
    sources = cfg.sources or default_sources()
    described = describe_sources(sources)
    print(f"corpus: sources: {'; '.join(described)}" + ("" if cfg.sources else " (embedded default)"))

    read = read_sources(sources, cfg.extensions)
    print(f"corpus: read {read.files_seen} files -> {len(read.documents)} documents "
          f"({len(read.undecodable)} undecodable skipped)")

    undecodable = ""
    if read.undecodable:
        undecodable = (f"{len(read.undecodable)} of {read.files_seen} files undecodable "
                       f"(not UTF-8), e.g. {read.undecodable[0]}")
    if not read.documents:
        # nothing was read at all: the size filter has nothing to say about it
        raise UserError(f"no documents read from {read.files_seen} files: "
                        + (undecodable or "the .jsonl files hold no rows"))
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
            + (f"; {undecodable}" if undecodable else "")
        )

    docs, exact_duplicates, near_duplicates, lsh = dedup(docs, cfg)
    print(f"corpus: dedup: {exact_duplicates} exact, {near_duplicates} near duplicates removed"
          + (f" (LSH {lsh['bands']}x{lsh['rows']}, {lsh['candidate_pairs']} candidate pairs)" if lsh else ""))
    docs, decontamination = decontaminate(docs, eval_sets, cfg.decontaminate, cfg.run.dir)

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
        "decontamination": decontamination,
        "train_docs": len(train),
        "val_docs": len(val),
        "train_bytes": train_bytes,  # UTF-8 bytes of the document texts, not of the JSON
        "val_bytes": val_bytes,
    }
