"""N-gram contamination: which evaluation items share a long word span with the training data.

The method of GPT-3 (Brown et al. 2020, app. C) and PaLM (Chowdhery et al. 2022, sec. 8): an
evaluation item counts as contaminated when any of its n-grams (default n = 13) of normalised
words also occurs in a training document. Thirteen words are long enough that a shared span is
almost never a coincidence of common phrasing, short enough that a copied item is caught even
when it was reformatted around the span.

- Normalisation: NFKC, then casefold, then words = runs of `\\w` (Unicode letters, digits and
  underscore). Case, punctuation, whitespace and layout (indentation, line breaks, markup
  around the text) therefore never hide a copy; `snake_case` names stay one word, as they are
  one identifier in code. NFKC folds compatibility forms (full-width digits, ligatures) that a
  scraped copy often has and the benchmark does not.
- Items shorter than n words: with at least `min_words` (default 8) words, the whole item is one
  n-gram of its own length (so it must appear in full); with fewer, the item is skipped and
  counted as too short to check. 8 is the lower bound GPT-3 used for n: below it, a match is
  mostly a common phrase ("what is the sum of the"), not a leak.
- Hashing: every n-gram becomes one 64-bit int, so the index over evaluation items is two sorted
  numpy arrays (hash, item) of 12 bytes per n-gram, and scanning a training document is one
  `searchsorted`. Each word hashes to 8 bytes of blake2b (deterministic across processes, unlike
  `hash()`), and a window folds as h = h * B + w mod 2^64 with B odd, so every position's word
  is multiplied by an invertible constant and two different windows collide with probability
  near 2^-64 (a few bits less when they hold the same words in another order): 10^9 training
  windows against 10^7 evaluation n-grams expect well under 10^-2 false matches.
  `data/dedup.py`'s shingle hashes are not reused: they are 32-bit (fine for a Jaccard that
  is verified, but here 10^9 windows against 10^6 n-grams would give ~2x10^5 false hits) and
  count punctuation tokens, which a reformatted copy changes.
- Fractions count distinct n-grams: `fraction` of an item = its n-grams found anywhere in the
  training data / its distinct n-grams.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.sources import invalid_json, jsonl_lines
from lmforge.errors import UserError

WORD_RE = re.compile(r"\w+")
_BASE = np.uint64(0x9E3779B97F4A7C13)  # odd, = 3 mod 8: few factors of 2 in B^d - 1

# Fields of common benchmark rows (mbpp, humaneval, gsm8k, alpaca-style) that hold content a
# model could memorise; ids, entry points and metadata are left out.
CONTENT_FIELDS = (
    "text", "prompt", "question", "answer", "code", "canonical_solution", "solution", "test",
    "test_list", "challenge_test_list", "context", "instruction", "input", "output", "response",
    "completion",
)
ID_FIELDS = ("task_id", "id", "idx")


def normalize_words(text: str) -> list[str]:
    """The words contamination compares: NFKC, casefolded, runs of `\\w` (see the module doc)."""
    return WORD_RE.findall(unicodedata.normalize("NFKC", text).casefold())


def ngrams(text: str, n: int) -> list[tuple[str, ...]]:
    """The n-grams of normalised words, in order (with repeats); none if fewer than n words."""
    words = normalize_words(text)
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def _word_hashes(words: list[str]) -> np.ndarray:
    codes: dict[str, int] = {}
    pos = [codes.setdefault(w, len(codes)) for w in words]
    # Each distinct word is hashed once per text: words repeat a lot, blake2b is the slow part.
    table = np.fromiter(
        (int.from_bytes(hashlib.blake2b(w.encode("utf-8"), digest_size=8).digest(), "little")
         for w in codes),
        dtype=np.uint64, count=len(codes),
    )
    return table[np.asarray(pos, dtype=np.int64)]


def window_hashes(words: list[str], k: int) -> np.ndarray:
    """uint64 hashes of the k-word windows of `words`, in order (empty if fewer than k words)."""
    m = len(words) - k + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    w = _word_hashes(words)
    h = w[:m].copy()
    for j in range(1, k):
        h *= _BASE  # uint64 arrays wrap mod 2^64, which is the hash's modulus
        h += w[j : j + m]
    return h


@dataclass(frozen=True)
class EvalItem:
    set_name: str
    item_id: str
    text: str
    length: int  # the window length its n-grams use: n, or all its words when shorter


@dataclass
class ContaminationIndex:
    """Every checkable evaluation item's n-gram hashes: `keys` sorted, `owners` the item
    (an index into `items`) of each key; a hash two items share appears once per item."""

    n: int
    min_words: int
    set_names: list[str]
    set_sizes: dict[str, int]
    too_short: dict[str, int]
    items: list[EvalItem]
    keys: np.ndarray  # (K,) uint64, sorted
    owners: np.ndarray  # (K,) int32
    lengths: tuple[int, ...]  # window lengths a training document must be cut into

    def entries(self, text: str) -> np.ndarray:
        """Indices into `keys` of every evaluation n-gram that `text` contains (sorted)."""
        words = normalize_words(text)
        found = []
        for k in self.lengths:
            h = np.unique(window_hashes(words, k))
            lo = np.searchsorted(self.keys, h, side="left")
            hi = np.searchsorted(self.keys, h, side="right")
            hit = hi > lo
            lo, counts = lo[hit], (hi - lo)[hit]
            if counts.size:
                # the runs [lo, lo + count) laid end to end, without a Python loop
                starts = np.repeat(lo - np.cumsum(counts) + counts, counts)
                found.append(starts + np.arange(counts.sum()))
        return np.unique(np.concatenate(found)) if found else np.empty(0, dtype=np.int64)

    def matching_items(self, text: str) -> np.ndarray:
        """Indices into `items` of the evaluation items that share an n-gram with `text`."""
        return np.unique(self.owners[self.entries(text)])


def build_index(
    eval_sets: dict[str, Sequence[tuple[str, str]]], n: int = 13, min_words: int = 8
) -> ContaminationIndex:
    """Index (id, text) items per named set; built once, then any number of documents scanned."""
    if n < 1 or min_words < 1:
        raise ValueError(f"n and min_words must be >= 1, got n={n}, min_words={min_words}")
    items: list[EvalItem] = []
    too_short: dict[str, int] = {}
    keys: list[np.ndarray] = []
    owners: list[np.ndarray] = []
    for name, rows in eval_sets.items():
        too_short[name] = 0
        for item_id, text in rows:
            words = normalize_words(text)
            if len(words) < min(n, min_words):
                too_short[name] += 1
                continue
            length = min(n, len(words))
            h = np.unique(window_hashes(words, length))
            keys.append(h)
            owners.append(np.full(len(h), len(items), dtype=np.int32))
            items.append(EvalItem(name, str(item_id), text, length))
    all_keys = np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64)
    all_owners = np.concatenate(owners) if owners else np.empty(0, dtype=np.int32)
    order = np.argsort(all_keys, kind="stable")
    return ContaminationIndex(
        n=n, min_words=min_words, set_names=list(eval_sets),
        set_sizes={name: len(rows) for name, rows in eval_sets.items()}, too_short=too_short,
        items=items, keys=all_keys[order], owners=all_owners[order],
        lengths=tuple(sorted({it.length for it in items}, reverse=True)),
    )


def doc_is_contaminated(text: str, index: ContaminationIndex) -> bool:
    """Whether a training document shares any n-gram with any indexed evaluation item."""
    return index.entries(text).size > 0


# --------------------------------------------------------------------------- the report


@dataclass(frozen=True)
class ItemHit:
    item_id: str
    train_docs: list[str]  # the first `max_doc_ids` training docs that share an n-gram with it
    n_train_docs: int  # all of them
    shared_ngrams: int  # its distinct n-grams found in any training doc
    item_ngrams: int  # its distinct n-grams
    fraction: float  # shared_ngrams / item_ngrams
    example: str  # one shared n-gram, as normalised words


@dataclass(frozen=True)
class SetReport:
    name: str
    items: int
    too_short: int  # fewer than min(n, min_words) words: not checked
    contaminated: list[ItemHit]

    @property
    def checked(self) -> int:
        return self.items - self.too_short

    @property
    def fraction(self) -> float:
        """Contaminated share of the items that could be checked (too-short ones are unknown)."""
        return len(self.contaminated) / self.checked if self.checked else 0.0


@dataclass(frozen=True)
class DocMatch:
    doc_id: str
    items: dict[str, list[str]]  # eval set -> ids of its items this training doc shares with


@dataclass(frozen=True)
class ContaminationReport:
    n: int
    min_words: int
    train_docs: int  # training documents scanned
    sets: list[SetReport]
    docs: list[DocMatch] = field(default_factory=list)  # the contaminated training docs

    def to_json(self) -> dict[str, Any]:
        sets = {
            s.name: {"items": s.items, "checked": s.checked, "too_short": s.too_short,
                     "contaminated": len(s.contaminated), "fraction": round(s.fraction, 6),
                     "contaminated_items": [asdict(h) for h in s.contaminated]}
            for s in self.sets
        }
        return {"n": self.n, "min_words": self.min_words, "train_docs": self.train_docs,
                "sets": sets, "contaminated_docs": [asdict(d) for d in self.docs]}


def _example(item: EvalItem, found_keys: np.ndarray) -> str:
    """The first (in reading order) of the item's n-grams that the training data contains."""
    words = normalize_words(item.text)
    h = window_hashes(words, item.length)
    first = int(np.flatnonzero(np.isin(h, found_keys))[0])
    return " ".join(words[first : first + item.length])


def scan_index(
    train_docs: Iterable[tuple[str, str]], index: ContaminationIndex, max_doc_ids: int = 5
) -> ContaminationReport:
    """Scan (id, text) training documents against a built index; one pass, docs not kept."""
    found = np.zeros(len(index.keys), dtype=bool)
    n_docs = np.zeros(len(index.items), dtype=np.int64)
    doc_ids: dict[int, list[str]] = {}
    docs: list[DocMatch] = []
    scanned = 0
    for doc_id, text in train_docs:
        scanned += 1
        entries = index.entries(text)
        if not entries.size:
            continue
        found[entries] = True
        hit_items = np.unique(index.owners[entries])
        n_docs[hit_items] += 1
        matched: dict[str, list[str]] = {}
        for i in hit_items.tolist():
            ids = doc_ids.setdefault(i, [])
            if len(ids) < max_doc_ids:
                ids.append(doc_id)
            matched.setdefault(index.items[i].set_name, []).append(index.items[i].item_id)
        docs.append(DocMatch(doc_id, matched))

    total = np.bincount(index.owners, minlength=len(index.items))
    shared = np.bincount(index.owners[found], minlength=len(index.items))
    # The found keys grouped by item, so each item's lookup is a slice, not a pass over all keys.
    hit_keys = np.flatnonzero(found)
    hit_keys = hit_keys[np.argsort(index.owners[hit_keys], kind="stable")]
    bounds = np.concatenate(([0], np.cumsum(shared)))
    by_set: dict[str, list[ItemHit]] = {name: [] for name in index.set_names}
    for i in np.flatnonzero(shared).tolist():
        item = index.items[i]
        found_keys = index.keys[hit_keys[bounds[i] : bounds[i + 1]]]
        by_set[item.set_name].append(ItemHit(
            item.item_id, doc_ids[i], int(n_docs[i]), int(shared[i]), int(total[i]),
            float(shared[i] / total[i]), _example(item, found_keys),
        ))
    sets = [SetReport(name, index.set_sizes[name], index.too_short[name], by_set[name])
            for name in index.set_names]
    return ContaminationReport(index.n, index.min_words, scanned, sets, docs)


def scan(
    train_docs: Iterable[tuple[str, str]],
    eval_sets: dict[str, Sequence[tuple[str, str]]],
    n: int = 13,
    *,
    min_words: int = 8,
    max_doc_ids: int = 5,
) -> ContaminationReport:
    """Which items of each evaluation set share an n-gram with which training documents."""
    return scan_index(train_docs, build_index(eval_sets, n, min_words), max_doc_ids)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_report(report: ContaminationReport, max_items: int = 20) -> str:
    """A table per report: one row per set, then its most contaminated items."""
    lines = [f"contamination: {report.n}-grams of normalised words, {report.train_docs:,} "
             f"training docs, {len(report.docs):,} contaminated"]
    width = max([len("set"), *(len(s.name) for s in report.sets)])
    lines.append(f"{'set':<{width}}  {'items':>7}  {'checked':>7}  {'short':>6}  "
                 f"{'contam.':>7}  {'fraction':>8}")
    for s in report.sets:
        lines.append(f"{s.name:<{width}}  {s.items:>7,}  {s.checked:>7,}  {s.too_short:>6,}  "
                     f"{len(s.contaminated):>7,}  {_pct(s.fraction):>8}")
    for s in report.sets:
        if not s.contaminated:
            continue
        worst = sorted(s.contaminated, key=lambda h: -h.fraction)[:max_items]
        more = len(s.contaminated) - len(worst)
        lines.append(f"\n{s.name}: contaminated items" + (f" (top {len(worst)})" if more else ""))
        for h in worst:
            example = h.example if len(h.example) <= 60 else h.example[:57] + "..."
            lines.append(f"  {h.item_id}  {h.shared_ngrams}/{h.item_ngrams} n-grams "
                         f"({_pct(h.fraction)}) in {h.n_train_docs} docs, e.g. "
                         f"{', '.join(h.train_docs[:2])}: \"{example}\"")
    return "\n".join(lines)


# --------------------------------------------------------------------------- evaluation files


def _field_text(value: Any) -> str | None:
    """A content field's text: a string, or a list of strings (mbpp's test_list) joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return "\n".join(value)
    return None


def _row_text(row: Any, where: str, fields: Sequence[str] | None) -> str:
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fields is None:
        parts = [t for k, v in row.items() if k in CONTENT_FIELDS and (t := _field_text(v))]
        if not parts:
            raise UserError(f"{where}: no content field (looked for {', '.join(CONTENT_FIELDS)}; "
                            f"keys: {', '.join(sorted(row)) or 'none'}); name the fields to use")
        return "\n\n".join(parts)
    parts = []
    for k in fields:
        if k not in row:
            raise UserError(f"{where}: missing field {k!r} (keys: {', '.join(sorted(row)) or 'none'})")
        text = _field_text(row[k])
        if text is None:
            raise UserError(f"{where}: field {k!r} must be a string or a list of strings, "
                            f"got {type(row[k]).__name__}")
        parts.append(text)
    return "\n\n".join(parts)


def _row_id(row: dict[str, Any], fallback: str) -> str:
    for k in ID_FIELDS:
        if isinstance(row.get(k), (str, int)) and not isinstance(row[k], bool):
            return str(row[k])
    return fallback


def eval_texts_from_file(path: Path | str, fields: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(id, text) per row of a .jsonl file (one object a line) or a .json file (a list of
    objects). text: the named fields joined by blank lines, in the order named; by default every
    string (or list-of-strings) field of CONTENT_FIELDS, in the row's order. id: the row's
    task_id / id / idx, else `name:line` (.jsonl) or `name[i]` (.json)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json"):
        raise UserError(f"{path}: evaluation files must be .jsonl or .json, not {suffix or 'no suffix'!r}")
    try:
        text = path.read_bytes().decode("utf-8-sig")  # -sig: a BOM is an encoding mark, not text
    except FileNotFoundError:
        raise UserError(f"evaluation file not found: {path}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    rows: list[tuple[str, Any, str]] = []  # (where, row, fallback id)
    if suffix == ".jsonl":
        for lineno, row in jsonl_lines(text):
            if isinstance(row, json.JSONDecodeError):
                raise UserError(invalid_json(f"{path}:{lineno}", row))
            rows.append((f"{path}:{lineno}", row, f"{path.name}:{lineno}"))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(invalid_json(f"{path}:{e.lineno}", e)) from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
        rows = [(f"{path}: item {i}", row, f"{path.name}[{i}]") for i, row in enumerate(data)]
    out = []
    for where, row, fallback in rows:
        text = _row_text(row, where, fields)  # first: it checks that the row is an object
        out.append((_row_id(row, fallback), text))
    return out
