"""Exact and near dedup: planted duplicates are found, distinct documents are never merged."""

from __future__ import annotations

import os
import random
import subprocess
import sys

import numpy as np
import pytest

from lmforge.data.dedup import (
    PRIME,
    exact_dedup,
    jaccard,
    lsh_params,
    lsh_threshold,
    minhash_signatures,
    near_dedup,
    shingle_hashes,
)

K = 5
Planted = tuple[list[str], list[int], dict[str, float]]


def _vocab(rng: np.random.Generator, n: int = 5000) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(n)]


def _edit(words: list[str], n_changes: int, rng: np.random.Generator, vocab: list[str]) -> list[str]:
    """Substitute `n_changes` distinct positions with words the text did not have."""
    out = list(words)
    for pos in rng.choice(len(words), size=n_changes, replace=False):
        out[pos] = vocab[rng.integers(len(vocab))] + "x"  # the "x" makes it a new token
    return out


@pytest.fixture(scope="module")
def planted() -> Planted:
    """50 distinct bases; 30 light copies (2-3 words of 300 changed); 10 copies with ~5% of
    words changed and 10 with ~50% changed, which must both stay (their Jaccard is < 0.8).

    A 5-shingle survives a substitution only if none of its 5 words changed, so a fraction q of
    changed words leaves about (1-q)^5 of the shingles: q = 1% -> J ~ 0.9, q = 5% -> J ~ 0.63.
    """
    rng = np.random.default_rng(1234)
    vocab = _vocab(rng)
    bases = [[vocab[i] for i in rng.integers(len(vocab), size=300)] for _ in range(50)]
    texts = [" ".join(b) for b in bases]
    expected_keep = list(range(50))
    light = [_edit(bases[i], int(rng.integers(2, 4)), rng, vocab) for i in range(30)]
    medium = [_edit(bases[i], 15, rng, vocab) for i in range(30, 40)]
    heavy = [_edit(bases[i], 150, rng, vocab) for i in range(40, 50)]
    texts += [" ".join(w) for w in light]
    for w in medium + heavy:
        expected_keep.append(len(texts))
        texts.append(" ".join(w))
    sh = [shingle_hashes(t, K) for t in texts]
    js = {
        "light_min": min(jaccard(sh[i], sh[50 + i]) for i in range(30)),
        "medium_max": max(jaccard(sh[30 + i], sh[80 + i]) for i in range(10)),
        "heavy_max": max(jaccard(sh[40 + i], sh[90 + i]) for i in range(10)),
        "distinct_max": max(jaccard(sh[i], sh[j]) for i in range(50) for j in range(i + 1, 50)),
    }
    return texts, expected_keep, js


def test_planted_fixture_has_the_jaccards_it_claims(planted: Planted) -> None:
    _, _, js = planted
    # At J >= 0.9 the 12x10 LSH curve catches a pair with P >= 0.994, so "all 30 found" is a
    # property of the method, not of a lucky seed.
    assert js["light_min"] >= 0.9
    assert 0.4 < js["medium_max"] < 0.75
    assert js["heavy_max"] < 0.1
    assert js["distinct_max"] < 0.01


def test_near_dedup_recall_and_precision_are_exact(planted: Planted) -> None:
    texts, expected_keep, _ = planted
    res = near_dedup(texts, threshold=0.8, num_perm=128, shingle_words=K, seed=0)
    assert res.keep == expected_keep  # every light copy removed; nothing else touched
    assert res.removed == 30
    assert res.verified_pairs == 30
    assert (res.bands, res.rows) == (12, 10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_dedup_result_does_not_depend_on_seed_here(planted: Planted, seed: int) -> None:
    texts, expected_keep, _ = planted
    res = near_dedup(texts, threshold=0.8, num_perm=128, shingle_words=K, seed=seed)
    assert res.keep == expected_keep


def test_signatures_are_deterministic_by_seed() -> None:
    sets = [shingle_hashes(f"alpha beta gamma delta {i} epsilon zeta eta theta", K) for i in range(5)]
    s0 = minhash_signatures(sets, 64, seed=0)
    assert np.array_equal(s0, minhash_signatures(sets, 64, seed=0))
    assert not np.array_equal(s0, minhash_signatures(sets, 64, seed=1))


def test_shingle_hashes_are_not_salted_by_pythonhashseed() -> None:
    text = "def f(x):\n    return x + 1  # the same bytes must hash the same in every process"
    code = (
        "from lmforge.data.dedup import shingle_hashes;"
        f"print(shingle_hashes({text!r}, 5).tolist())"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
        ).stdout
        for seed in (1, 2)
    }
    assert outs == {str(shingle_hashes(text, 5).tolist()) + "\n"}


def test_minhash_matches_python_bigint_reference() -> None:
    """No uint64 overflow: numpy's (a*h + b) mod P equals the same math on Python ints."""
    sets = [np.array([0, 1, int(PRIME) - 1, 4_000_000_000], dtype=np.uint64), np.array([7], dtype=np.uint64)]
    sig = minhash_signatures(sets, 32, seed=5)
    rng = np.random.default_rng(5)
    a = rng.integers(1, int(PRIME), size=32, dtype=np.uint64)
    b = rng.integers(0, int(PRIME), size=32, dtype=np.uint64)
    p = int(PRIME)
    for i, s in enumerate(sets):
        ref = [min((int(a[k]) * int(h) + int(b[k])) % p for h in s) for k in range(32)]
        assert sig[i].tolist() == ref


def test_minhash_agreement_estimates_jaccard() -> None:
    # Random values, like real (crc32-folded) shingle hashes: a linear hash family is not
    # min-wise independent on structured inputs such as consecutive integers, and is biased there.
    rng = np.random.default_rng(0)
    universe = rng.choice(int(PRIME), size=1500, replace=False).astype(np.uint64)
    a, b = np.sort(universe[:1000]), np.sort(universe[500:])  # J = 500 / 1500
    agree = [minhash_signatures([a, b], 512, seed=s) for s in range(8)]
    est = float(np.mean([np.mean(sig[0] == sig[1]) for sig in agree]))
    assert abs(est - 1 / 3) < 0.03  # sd = sqrt(p(1-p) / 4096) = 0.0074; this is 4 sd


@pytest.mark.parametrize("num_perm", [64, 128, 256])
@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
def test_lsh_params_put_the_s_curve_just_below_the_threshold(num_perm: int, threshold: float) -> None:
    bands, rows = lsh_params(num_perm, threshold)
    point = (1 / bands) ** (1 / rows)  # closed form of the S-curve's steep point
    assert bands == num_perm // rows  # every permutation the rows allow is used as a band
    assert point == pytest.approx(lsh_threshold(bands, rows))
    assert point <= threshold < lsh_threshold(num_perm // (rows + 1), rows + 1)
    assert threshold - point < 0.1


def test_lsh_params_known_values() -> None:
    assert lsh_params(128, 0.8) == (12, 10)  # point 0.780; the next row up gives 0.804 > 0.8
    assert lsh_params(128, 0.5) == (32, 4)
    assert lsh_params(128, 1.0) == (1, 128)


def test_exact_dedup_keeps_first_and_ignores_whitespace_runs() -> None:
    texts = ["a b  c", "x", "a b c\n", " a\tb c ", "x", "a b d"]
    assert exact_dedup(texts) == [0, 1, 5]


def test_near_dedup_clusters_transitively_and_keeps_the_earliest() -> None:
    rng = np.random.default_rng(0)
    vocab = _vocab(rng, 2000)
    base = [vocab[i] for i in rng.integers(len(vocab), size=400)]
    one = _edit(base, 2, rng, vocab)
    two = _edit(one, 2, rng, vocab)
    other = [vocab[i] for i in rng.integers(len(vocab), size=400)]
    texts = [" ".join(w) for w in (two, other, base, one)]
    res = near_dedup(texts, threshold=0.8, num_perm=128, shingle_words=K, seed=0)
    assert res.keep == [0, 1]  # `two` came first, so it represents the cluster


def test_near_dedup_keeps_documents_without_tokens() -> None:
    texts = ["   ", "\n\n", "a b c d e f g"]
    res = near_dedup(texts, threshold=0.8, num_perm=32, shingle_words=K, seed=0)
    assert res.keep == [0, 1, 2]


def test_shingles_of_short_and_empty_texts() -> None:
    assert len(shingle_hashes("", K)) == 0
    assert len(shingle_hashes("x = 1", K)) == 1  # 3 tokens < K: one shingle of all of them
    assert len(shingle_hashes("a b c d e f", K)) == 2
    h = shingle_hashes("a b c d e f g h", K)
    assert h.dtype == np.uint64 and np.all(h < PRIME) and np.all(np.diff(h.astype(np.int64)) > 0)


def test_jaccard_exact() -> None:
    a = np.array([1, 2, 3, 4], dtype=np.uint64)
    b = np.array([3, 4, 5], dtype=np.uint64)
    assert jaccard(a, b) == pytest.approx(2 / 5)
    assert jaccard(a, np.empty(0, dtype=np.uint64)) == 0.0


# --------------------------------------------------------------------------- ROUGE-L pool


def test_rouge_l_worked_by_hand() -> None:
    from lmforge.data.dedup import lcs_length, rouge_l, rouge_tokens

    a, b = rouge_tokens("The cat sat on the mat."), rouge_tokens("the CAT, on a mat")
    assert a == ["the", "cat", "sat", "on", "the", "mat"] and b == ["the", "cat", "on", "a", "mat"]
    assert lcs_length(a, b) == 4  # the cat on mat
    assert rouge_l(a, b) == 2 * 4 / (6 + 5)  # P 4/6, R 4/5, F1 = 2PR/(P+R)
    assert rouge_l([], b) == 0.0 and rouge_l(a, a) == 1.0


def test_rouge_l_equals_rouge_score() -> None:
    """The reference implementation (the `metrics` extra), default tokenizer, no stemmer."""
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    from lmforge.data.dedup import rouge_l, rouge_tokens

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rng = random.Random(0)
    words = ["a", "list", "Sort", "the", "word's", "x-y", "2", "of", "É", "sum"]
    for _ in range(300):
        x = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        y = " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))
        want = scorer.score(x, y)["rougeL"].fmeasure
        # both are 2 lcs / (m + n) <= 1, rouge-score's through P, R and 2PR / (P + R): five
        # roundings of values <= 1 at most, so within 8 machine epsilons
        assert rouge_l(rouge_tokens(x), rouge_tokens(y)) == pytest.approx(
            want, abs=8 * sys.float_info.epsilon)


def test_rouge_pool_nearest_equals_a_full_scan() -> None:
    """The length bound only skips texts that cannot beat the best so far."""
    from lmforge.data.dedup import RougePool, rouge_l, rouge_tokens

    rng = random.Random(1)
    words = ["sort", "a", "list", "of", "words", "sum", "the", "numbers", "in", "reverse"]
    pool = RougePool()
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 15))) for _ in range(60)]
    for t in texts:
        pool.add(t)
    for _ in range(100):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(1, 15)))
        scores = [rouge_l(rouge_tokens(q), rouge_tokens(t)) for t in texts]
        best, where = pool.nearest(q)
        assert best == max(scores) and where == scores.index(max(scores))
        stop, _ = pool.nearest(q, stop_at=0.5)  # stops at the first text reaching 0.5
        assert (stop >= 0.5) == (max(scores) >= 0.5)
