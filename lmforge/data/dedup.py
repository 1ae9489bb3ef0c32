"""Exact and near-duplicate removal: sha256 keys, then MinHash + LSH, verified by exact Jaccard.

MinHash + LSH is written here in numpy rather than taken from `datasketch`: datasketch is an
optional extra (DESIGN rule 9), and the math is about eighty lines.

- Shingles: `shingle_words` consecutive tokens (`\\w+|[^\\w\\s]`, so code punctuation counts).
  Each token is hashed with crc32 (deterministic, unlike Python's salted `hash()`), and a window
  is folded into one value mod P = 2^32 - 5 (a prime). Keeping every value below 2^32 is what
  makes `a * h + b` exact in uint64: (P - 1)^2 + P < 2^64, so no step can overflow.
- MinHash: `num_perm` universal hashes h -> (a*h + b) mod P, with a, b drawn from `seed`.
  For two sets, P(min-hashes agree) = Jaccard, per permutation.
- LSH: the signature is cut into `bands` bands of `rows` rows; two documents become candidates
  when any band matches exactly, which happens with probability 1 - (1 - J^rows)^bands, an
  S-curve whose steep point is about (1/bands)^(1/rows). For each `rows` we use every band the
  permutations allow (more bands only add recall), and take the largest `rows` whose point is
  at or just below the requested threshold: since candidates are verified exactly, erring low
  costs a few extra Jaccard computations while erring high loses duplicates. With 128 perms and
  0.8 this gives 12 x 10 (point 0.78): P(candidate) = 0.74 at J = 0.8, 0.93 at 0.85, 0.994 at
  0.9, so pairs just above the threshold can still be missed; pairs well above it almost never.
- Every candidate pair is verified with the exact Jaccard of its shingle sets, so nothing below
  the threshold is ever merged: precision is exact, only recall is probabilistic.
- Clusters are the connected components of verified pairs (union-find); the first document of
  each cluster in input order is kept, so the result does not depend on bucket order.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

TOKEN_RE = re.compile(r"\w+|[^\w\s]")
PRIME = np.uint64(4_294_967_291)  # the largest prime below 2^32
_BASE = np.uint64(1_000_003)  # folds a window of token hashes into one shingle hash
_CHUNK = 1 << 22  # shingles hashed per numpy pass; bounds memory at ~32 MB per buffer


def exact_key(text: str) -> bytes:
    """Identical up to whitespace runs: a re-indented or re-wrapped copy is still a copy."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).digest()


def exact_dedup(texts: Sequence[str]) -> list[int]:
    """Indices of the first occurrence of each exact key, in input order."""
    seen: set[bytes] = set()
    keep = []
    for i, text in enumerate(texts):
        key = exact_key(text)
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return keep


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """Sorted unique uint64 hashes (< PRIME) of the k-token shingles; shorter texts give one."""
    tokens = TOKEN_RE.findall(text)
    n = len(tokens)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    tok = np.fromiter((zlib.crc32(t.encode("utf-8")) for t in tokens), dtype=np.uint64, count=n)
    k = min(k, n)
    m = n - k + 1
    h = tok[:m] % PRIME
    for j in range(1, k):
        h = (h * _BASE + tok[j : j + m]) % PRIME
    return np.unique(h)


def lsh_threshold(bands: int, rows: int) -> float:
    return float((1.0 / bands) ** (1.0 / rows))


def lsh_params(num_perm: int, threshold: float) -> tuple[int, int]:
    """(bands, rows): all the bands `num_perm` allows, the largest `rows` with point <= threshold.

    A threshold below even the one-row point (1 / num_perm) gets one row.
    """
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if lsh_threshold(bands, rows) <= threshold:
            best = (bands, rows)
    return best


def minhash_signatures(shingles: Sequence[np.ndarray], num_perm: int, seed: int) -> np.ndarray:
    """(N, num_perm) uint64 signatures; every shingle set must be non-empty."""
    rng = np.random.default_rng(seed)
    a = rng.integers(1, int(PRIME), size=num_perm, dtype=np.uint64)
    b = rng.integers(0, int(PRIME), size=num_perm, dtype=np.uint64)
    sig = np.empty((len(shingles), num_perm), dtype=np.uint64)
    start = 0
    while start < len(shingles):
        # Concatenate documents up to ~_CHUNK shingles, then one reduceat per permutation.
        stop, total = start, 0
        while stop < len(shingles) and (stop == start or total + len(shingles[stop]) <= _CHUNK):
            total += len(shingles[stop])
            stop += 1
        flat = np.concatenate(shingles[start:stop])
        offsets = np.cumsum([0] + [len(s) for s in shingles[start : stop - 1]])
        buf = np.empty_like(flat)
        for p in range(num_perm):
            np.multiply(flat, a[p], out=buf)
            np.add(buf, b[p], out=buf)
            np.remainder(buf, PRIME, out=buf)
            sig[start:stop, p] = np.minimum.reduceat(buf, offsets)
        start = stop
    return sig


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Exact Jaccard of two sorted unique hash arrays."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (len(a) + len(b) - inter)


def lsh_buckets(sig: np.ndarray, bands: int, rows: int) -> list[np.ndarray]:
    """Groups (sorted row indices, size >= 2) of documents sharing at least one whole band."""
    groups = []
    for band in range(bands):
        cols = np.ascontiguousarray(sig[:, band * rows : (band + 1) * rows])
        keys = cols.view(np.dtype((np.void, cols.dtype.itemsize * rows))).ravel()
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        if counts.max(initial=0) < 2:
            continue
        order = np.argsort(inverse, kind="stable")
        bounds = np.cumsum(counts)[:-1]
        groups.extend(g for g in np.split(order, bounds) if len(g) > 1)
    return groups


@dataclass(frozen=True)
class NearDedupResult:
    keep: list[int]  # indices into the input, in input order
    removed: int
    bands: int
    rows: int
    candidate_pairs: int  # distinct LSH candidate pairs examined (size bound or exact Jaccard)
    verified_pairs: int  # of those, pairs at or above the threshold


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]  # path halving keeps the trees flat
        i = parent[i]
    return i


def near_dedup(
    texts: Sequence[str], *, threshold: float, num_perm: int, shingle_words: int, seed: int
) -> NearDedupResult:
    """Drop every document whose cluster of near-duplicates has an earlier member."""
    shingles = [shingle_hashes(t, shingle_words) for t in texts]
    # Token-less documents have no shingles (and no meaningful Jaccard): they are always kept.
    idx = [i for i, s in enumerate(shingles) if len(s)]
    bands, rows = lsh_params(num_perm, threshold)
    parent = list(range(len(texts)))
    checked: set[tuple[int, int]] = set()
    verified = 0
    if len(idx) > 1:
        sig = minhash_signatures([shingles[i] for i in idx], num_perm, seed)
        for group in lsh_buckets(sig, bands, rows):
            members = [idx[g] for g in group]
            for x, i in enumerate(members):
                for j in members[x + 1 :]:
                    ri, rj = _find(parent, i), _find(parent, j)
                    if ri == rj or (i, j) in checked:
                        continue  # already one cluster: a second proof adds nothing
                    checked.add((i, j))
                    si, sj = shingles[i], shingles[j]
                    # |A & B| / |A | B| <= min/max size: skip pairs that cannot reach it.
                    if min(len(si), len(sj)) < threshold * max(len(si), len(sj)):
                        continue
                    if jaccard(si, sj) >= threshold:
                        verified += 1
                        parent[max(ri, rj)] = min(ri, rj)  # the root is the earliest member
    keep = [i for i in range(len(texts)) if _find(parent, i) == i]
    return NearDedupResult(keep, len(texts) - len(keep), bands, rows, len(checked), verified)


# --------------------------------------------------------------------------- ROUGE-L pool
# Self-Instruct's novelty filter: a new instruction is kept only when its ROUGE-L F1 with
# every instruction already in the pool stays below a threshold (0.7 in the paper). The pool
# grows one text at a time, so this is a scan, not a batch dedup; the LCS is the dozen lines
# below (rouge-score, an extra, computes the same numbers: its default tokenizer, no stemmer).

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's default tokens: lower case, runs of anything but [a-z0-9] split."""
    return [t for t in _NON_ALNUM.split(text.lower()) if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Longest common subsequence, one row of the table at a time."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(a: Sequence[str], b: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists: P = lcs/|a|, R = lcs/|b|, F1 = 2PR/(P+R) = 2 lcs/(|a|+|b|)."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


class RougePool:
    """Texts kept so far, and the nearest one to a candidate by ROUGE-L F1."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self._tokens: list[list[str]] = []

    def add(self, text: str) -> None:
        self.texts.append(text)
        self._tokens.append(rouge_tokens(text))

    def nearest(self, text: str, stop_at: float = 1.0) -> tuple[float, int | None]:
        """(highest F1, index of that text), scanning until a score reaches `stop_at`. Since
        lcs <= min(|a|, |b|), F1 <= 2 min / (|a| + |b|): texts of very different length are
        skipped without a table."""
        cand = rouge_tokens(text)
        best, where = 0.0, None
        for i, toks in enumerate(self._tokens):
            if 2 * min(len(cand), len(toks)) <= best * (len(cand) + len(toks)):
                continue
            score = rouge_l(cand, toks)
            if score > best:
                best, where = score, i
                if best >= stop_at:
                    break
        return best, where
